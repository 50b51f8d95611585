"""Calibration inputs of data-aware PTQ: each quantized layer's input second moment ``H = X^T X``.

GPTQ and AdaRound minimise the layer-wise reconstruction error ``||X W^T - X Q^T||_F^2`` of one
layer at a time; for a layer that is linear in its weight this depends on the inputs only
through ``H = X^T X`` (docs/ptq_methods.md §3):

    ||X (W - Q)^T||_F^2 = tr(D H D^T),   D = W - Q   (weights as ``(out, n)`` matrices).

Rows of ``X`` are the layer's input vectors: for ``Linear`` the input flattened to ``(-1, in)``;
for ``Conv1d``/``Conv2d`` (``groups=1``, any padding mode, stride and dilation) the receptive
field patches (``unfold``) in the weight's ``in * kh * kw`` layout. Other layer types are not
supported and are reported with the reason (PTQ methods then fall back to round-to-nearest).

Inputs are those of the full-precision model at ``theta`` for every layer at once (not the
sequential "quantized prefix" variant of the GPTQ reference code).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ...batching import index_samples, model_args
from ...objective import Objective
from ..qmap import QuantMap

__all__ = ["Calibration", "collect_input_hessians", "run_calibration", "layer_patches", "calibration_indices", "relative_reconstruction_error", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class Calibration:
    """Input second moments of the quantized layers.

    Attributes
    ----------
    hessians : dict of str to Tensor
        ``H = sum_rows x x^T`` (float64, ``(n, n)`` with ``n = in * prod(kernel)``) by weight name
        (``qmap`` target name), for the supported layers reached by the forward pass.
    rows : dict of str to int
        Number of input rows summed into each ``H`` (samples times positions).
    unsupported : dict of str to str
        Targets without ``H`` and why (layer type, grouped convolution, not reached, ...).
    n_samples : int
        Number of calibration samples used.
    seed : int
        Seed of the draw of the samples from the objective's data.
    """

    hessians: dict[str, Tensor]
    rows: dict[str, int]
    unsupported: dict[str, str]
    n_samples: int
    seed: int

    def to_dict(self) -> dict:
        """JSON-friendly summary (no matrices)."""
        return {"n_samples": self.n_samples, "seed": self.seed, "rows": dict(self.rows), "unsupported": dict(self.unsupported)}


def _unsupported_reason(module: Optional[nn.Module], param: str) -> Optional[str]:
    if module is None:
        return "no owning module"
    if param != "weight":
        return f"{param!r} is not a layer weight"
    if not isinstance(module, SUPPORTED_LAYERS):
        return f"{type(module).__name__} is not supported (Linear, Conv1d and Conv2d are)"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}) is not supported"
    return None


def layer_patches(module: nn.Module, x: Tensor) -> Tensor:
    """The rows of ``X`` for one layer input ``x``: ``(rows, n)`` with ``n`` the weight's flattened input size.

    ``Linear``: ``x.reshape(-1, in_features)``. ``Conv1d``/``Conv2d`` (``groups=1``): the padded
    receptive fields, ordered ``(c, kh, kw)`` like ``weight.reshape(out, -1)``.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        raise TypeError(f"layer_patches supports Linear, Conv1d and Conv2d, got {type(module).__name__}")
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if x.ndim == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if spatial == 1:
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, kernel[0]), (1, dilation[0]), (1, stride[0])
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C * kh * kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def calibration_indices(n_total: int, n_samples: Optional[int], seed: int) -> Tensor:
    """Sorted indices of ``n_samples`` samples drawn without replacement with ``seed`` (all when ``None`` or too many)."""
    if n_samples is None or n_samples >= n_total:
        return torch.arange(n_total)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=generator)[:n_samples].sort().values


def run_calibration(objective: Objective, module: nn.Module, theta: Tensor, n_samples: Optional[int], seed: int) -> Tensor:
    """Forward ``module`` (a private copy of ``objective.module``, hooks attached) at ``theta`` on the calibration samples.

    The samples are ``n_samples`` rows of the objective's materialised batches drawn without
    replacement with ``seed`` (:func:`calibration_indices`; all when ``None``), forwarded batch
    by batch without gradients inside the objective's forward context. Returns the drawn indices.
    """
    indices = calibration_indices(objective.n_samples, n_samples, seed)
    params = objective.model_params(theta.detach())
    start = 0
    with torch.no_grad(), objective._forward_context():
        for (x, _), size in zip(objective.batches, objective.batch_sizes):
            local = indices[(indices >= start) & (indices < start + size)] - start
            start += size
            if local.numel():
                args, kwargs = model_args(index_samples(x, local))
                functional_call(module, params, args, kwargs)
    return indices


def collect_input_hessians(
    objective: Objective, qmap: QuantMap, theta: Tensor, *, n_samples: Optional[int] = None, seed: int = 0
) -> Calibration:
    """``H = X^T X`` of every quantized layer's input at ``theta``, from a seeded sample of the data.

    Forward hooks run on a private copy of the objective's model; the objective (and the
    user's model) are untouched.

    Parameters
    ----------
    objective : Objective
        Its materialised batches are the pool of calibration samples.
    qmap : QuantMap
        Which weights are quantized (their owning layers are hooked).
    theta : Tensor, shape (D,)
        The point whose layer inputs are collected.
    n_samples : int, optional
        Number of samples drawn without replacement with ``seed`` (default: all).
    seed : int

    Returns
    -------
    Calibration
    """
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be None (all) or a positive integer, got {n_samples!r}")
    if objective.reduction is not None:
        raise ValueError("a data-parallel Objective holds one process's shard, and calibration would differ between processes: "
                         "calibrate on an Objective over all the data (riverscape analyze does so in every process)")
    module = copy.deepcopy(objective.module)
    modules = dict(module.named_modules())
    owners: dict[str, nn.Module] = {}
    unsupported: dict[str, str] = {}
    for target in qmap.targets:
        layer, _, param = target.name.rpartition(".")
        owner = modules.get(layer)
        reason = _unsupported_reason(owner, param)
        if reason is None:
            owners[target.name] = owner
        else:
            unsupported[target.name] = reason
    sums = {name: None for name in owners}
    rows = {name: 0 for name in owners}

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple, output) -> None:
            x = layer_patches(mod, inputs[0].detach()).to(torch.float64)
            sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
            rows[name] += x.shape[0]
        return record

    for name in owners:
        owners[name].register_forward_hook(hook(name))  # on the private copy, dropped with it
    indices = run_calibration(objective, module, theta, n_samples, seed)
    hessians = {}
    for name in owners:
        if sums[name] is None:
            unsupported[name] = "the layer is not called on its weight in the forward pass"
            rows.pop(name)
        else:
            hessians[name] = sums[name]
    return Calibration(hessians, rows, unsupported, int(indices.numel()), seed)


def relative_reconstruction_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """``tr(D H D^T) / tr(W H W^T)`` with ``D = W - Q``: ``||X W^T - X Q^T||_F^2 / ||X W^T||_F^2``.

    Parameters
    ----------
    weight, quantized : Tensor, shape (out, n)
        The weight and its quantized image as matrices (float64 is used).
    hessian : Tensor, shape (n, n)
        ``H = X^T X``.

    Returns
    -------
    float
        ``0.0`` when both traces vanish (no signal reaches the layer and nothing changed on it),
        ``inf`` when only the denominator does.
    """
    w = weight.to(torch.float64)
    d = w - quantized.to(torch.float64)
    num = float(((d @ hessian) * d).sum())
    den = float(((w @ hessian) * w).sum())
    if den > 0:
        return num / den
    return 0.0 if num <= 0 else float("inf")
