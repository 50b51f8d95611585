"""BatchNorm re-estimation at a quantized point: the Objective whose running statistics belong to ``theta``.

Quantizing the weights shifts the mean and variance of every pre-BatchNorm activation, while
an Objective's private module keeps the running statistics of the full-precision network;
part of the measured PTQ damage of a BatchNorm network is then this statistics mismatch, not
the weights. Re-estimating the statistics at the quantized point (Nagel et al. 2021, arXiv
2106.08295, section 3.2 "bias correction" and BN re-estimation; Li et al. 2021, BRECQ)
removes it. docs/ptq_search.md §2.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor

from ..batchnorm import recalibrate_batchnorm
from ..objective import Objective

__all__ = ["objective_with_reestimated_bn"]


def objective_with_reestimated_bn(objective: Objective, theta: Tensor, data: Any, *, batch_size: Optional[int] = None) -> Objective:
    """A new Objective whose BatchNorm running statistics are re-estimated on ``data`` at ``theta``.

    The private module of ``objective`` is copied, ``theta`` is loaded into its selected
    parameters, and every BatchNorm layer's running statistics are reset and re-accumulated
    by :func:`riverscape.batchnorm.recalibrate_batchnorm`: forward passes without gradients
    with the BatchNorm layers in train mode and ``momentum=None``, i.e. the running mean is
    the average over the batches of the batch means, and the running variance the average of
    the unbiased batch variances (each batch weighs equally; one batch gives the exact
    statistics of ``data``). The new Objective has the same loss, analysis batches, parameter
    selection, metric, HVP mode and forward context, and ``theta0 == theta``; ``objective``
    is untouched.

    Cost: one forward pass over ``data`` (plus copies of the module) per call. Landscape and
    search functions can call it once per evaluated point to measure ``L`` with statistics
    re-estimated at that point (docs/ptq_search.md §2); this is a different, per-point
    function from ``objective.loss`` and cannot be batched with ``objective.losses``.

    Parameters
    ----------
    objective : Objective
        Supplies the module, loss, analysis data and layout. Not modified.
    theta : Tensor, shape (D,)
        The point (e.g. a quantized ``theta_q``) whose statistics are estimated.
    data : (inputs, targets) tensors or an iterable of such batches
        Calibration data (targets ignored); ``objective.batches`` reuses the analysis set.
    batch_size : int, optional
        Split tensor data into batches of this size (default: one batch, exact statistics).

    Returns
    -------
    Objective
        A new Objective at ``theta`` with re-estimated statistics. A model without BatchNorm
        gives an Objective with the same losses.
    """
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an Objective, got {type(objective).__name__}")
    theta = objective.check_theta(theta)
    module = copy.deepcopy(objective.module)
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in objective.unflatten(theta).items():
            named[name].copy_(value)
    with objective._forward_context():
        module = recalibrate_batchnorm(module, data, batch_size=batch_size)
    names = set(objective.param_names)
    out = Objective(
        module,
        objective.loss_fn,
        objective.batches,
        params=lambda name, _: name in names,
        device=objective.device, dtype=objective.dtype, compute_dtype=objective.compute_dtype,
        metric=objective._metric,
        hvp_mode=objective.hvp_mode,
        reuse_max_batches=objective.reuse_max_batches,
    )
    out.set_forward_context(objective._forward_context)
    return out
