"""The layer-by-layer driver of data-aware PTQ: one method per layer with ``H``, round-to-nearest elsewhere.

GPTQ and AdaRound share it: :func:`quantize_layerwise` collects the calibration inputs
(:func:`~riverscape.quant.ptq.calibration.collect_input_hessians`), hands each supported weight
(as an ``(out, n)`` float64 matrix) and its ``H`` to the method's layer function, puts the result
back on the quantizer's grid in the working dtype, and reports the relative reconstruction error
of every layer with ``H`` (docs/ptq_methods.md §3).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ...objective import Objective
from ..qmap import QuantMap
from ..quantizers import QParams, UniformQuantizer
from .base import PTQDiagnostics
from .calibration import Calibration, collect_input_hessians, relative_reconstruction_error

__all__ = ["LayerMethod", "quantize_layerwise"]

LayerMethod = Callable[[Tensor, Tensor, UniformQuantizer, Tensor], "tuple[Tensor, QParams]"]
"""``layer_fn(weight, hessian, quantizer, like) -> (quantized, qparams)``.

``weight`` is the layer's weight as a float64 ``(out, n)`` matrix, ``hessian`` the mean input
second moment ``H / rows`` (so ``tr(D H D^T)`` is the reconstruction error per input row),
``like`` the weight tensor in its own shape; the function returns the quantized matrix and the
:class:`QParams` shaped for ``like`` (as :meth:`UniformQuantizer.qparams` shapes them).
"""


def _cast(qparams: QParams, dtype: torch.dtype) -> QParams:
    fields = [None if t is None else t.to(dtype) for t in (qparams.scale, qparams.zero_point, qparams.threshold)]
    return QParams(fields[0], fields[1], qparams.qmin, qparams.qmax, fields[2], qparams.group_size)


def quantize_layerwise(
    objective: Objective,
    qmap: QuantMap,
    theta: Tensor,
    layer_fn: Optional[LayerMethod],
    *,
    calibration_samples: Optional[int],
    seed: int,
) -> tuple[Tensor, list[QParams], PTQDiagnostics]:
    """Quantize every target of ``qmap`` with ``layer_fn`` where calibration inputs exist.

    Parameters
    ----------
    objective, qmap, theta
        As a PTQ handler receives them.
    layer_fn : LayerMethod or None
        The method's per-layer function; ``None`` is round-to-nearest everywhere (only the
        reconstruction errors are computed).
    calibration_samples : int or None
        Number of calibration samples (all when ``None``).
    seed : int
        Seed of the draw of the calibration samples.

    Returns
    -------
    theta_q, qparams, diagnostics
        The quantized point (every quantized tensor exactly on its grid in ``theta``'s dtype:
        ``quantize_with(theta_q, qparams)`` is the identity), the parameters in
        ``qmap.targets`` order, and the reconstruction errors, fallbacks and calibration record.
    """
    theta = theta.detach()
    calibration: Calibration = collect_input_hessians(objective, qmap, theta, n_samples=calibration_samples, seed=seed)
    quantized: list[Tensor] = []
    qparams: list[QParams] = []
    errors: dict[str, float] = {}
    for i, target in enumerate(qmap.targets):
        quantizer = qmap.quantizer_for(i)
        w = qmap.tensor(theta, target)
        hessian = calibration.hessians.get(target.name)
        if hessian is None or layer_fn is None:
            qp = quantizer.qparams(w)
            q = quantizer.quantize_with(w, qp)
        else:
            mean_hessian = hessian / calibration.rows[target.name]
            q_matrix, qp = layer_fn(quantizer.as_matrix(w).to(torch.float64), mean_hessian, quantizer, w)
            qp = _cast(qp, w.dtype)
            # back on the grid in the working dtype (a float64 grid point maps to its own code)
            q = quantizer.quantize_with(quantizer.from_matrix(q_matrix, w).to(w.dtype), qp)
        if hessian is not None:
            errors[target.name] = relative_reconstruction_error(quantizer.as_matrix(w), quantizer.as_matrix(q), hessian)
        quantized.append(q)
        qparams.append(qp)
    theta_q = qmap.map_targets(theta, lambda target, w, i: quantized[i])
    fallback = {} if layer_fn is None else dict(calibration.unsupported)
    return theta_q, qparams, PTQDiagnostics(errors, fallback, calibration.to_dict())
