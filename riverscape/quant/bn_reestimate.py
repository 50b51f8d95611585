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
from torch import Tensor, nn

from ..batchnorm import _batchnorm_layers, recalibrate_batchnorm
from ..objective import Objective

__all__ = [
    "objective_with_reestimated_bn",
    "reestimated_module",
    "objective_on_module",
    "has_batchnorm",
    "calibration_data",
    "reestimated_evaluate",
]


def has_batchnorm(objective_or_module: Any) -> bool:
    """Whether the model (or an Objective's private module) has a BatchNorm layer with running statistics."""
    module = objective_or_module.module if isinstance(objective_or_module, Objective) else objective_or_module
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an Objective or an nn.Module, got {type(objective_or_module).__name__}")
    return bool(_batchnorm_layers(module))


def calibration_data(objective: Objective) -> list[tuple]:
    """The ``(inputs, targets)`` batches of ``objective`` as re-estimation data (read once when streaming)."""
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an Objective, got {type(objective).__name__}")
    if objective.streaming:
        return [(x, y) for _, x, y in objective.weighted_batches()]
    return objective.batches


def reestimated_module(objective: Objective, theta: Tensor, data: Any, *, batch_size: Optional[int] = None) -> nn.Module:
    """A copy of ``objective``'s private module holding ``theta`` with BatchNorm statistics re-estimated on ``data``.

    See :func:`objective_with_reestimated_bn` for the estimate; the module is in eval mode and
    ``objective`` is untouched.
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
        return recalibrate_batchnorm(module, data, batch_size=batch_size)


def objective_on_module(objective: Objective, module: nn.Module, *, data: Any = None) -> Objective:
    """A new Objective like ``objective`` (loss, batches or ``data``, selection, metric, HVP mode, forward context) on ``module``.

    ``module`` is copied by the Objective (never modified); ``theta0`` is read from it.
    """
    names = set(objective.param_names)
    out = Objective(
        module,
        objective.loss_fn,
        calibration_data(objective) if data is None else data,
        params=lambda name, _: name in names,
        device=objective.device,
        dtype=objective.dtype, compute_dtype=objective.compute_dtype,
        metric=objective._metric,
        hvp_mode=objective.hvp_mode,
        reuse_max_batches=objective.reuse_max_batches,
    )
    out.set_forward_context(objective._forward_context)
    return out


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

    Cost: one forward pass over ``data`` (plus copies of the module) per call. Landscape
    functions call it once per evaluated point with ``reestimate_bn=data``
    (:func:`reestimated_evaluate`, docs/ptq_search.md §2); this is a different, per-point
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
    return objective_on_module(objective, reestimated_module(objective, theta, data, batch_size=batch_size))


def reestimated_evaluate(objective: Objective, thetas: Tensor, data: Any, *, batch_size: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Loss (and metric) at every row of ``thetas``, each with BatchNorm statistics re-estimated on ``data`` at that point.

    The per-point counterpart of :meth:`Objective.evaluate`: point ``i`` is evaluated on
    ``objective``'s data by a private module whose statistics were re-estimated at
    ``thetas[i]`` (:func:`reestimated_module`). Cost per point: one forward pass over ``data``
    plus one over the objective's data and three module copies; nothing is vmapped across points.

    Returns
    -------
    losses : Tensor, shape (n,)
    metrics : Tensor of shape (n,) or None
        As :meth:`Objective.evaluate` (``None`` without a metric).
    """
    thetas = thetas.to(device=objective.device, dtype=objective.dtype)
    if thetas.ndim != 2 or thetas.shape[1] != objective.dim:
        raise ValueError(f"thetas must have shape (n, {objective.dim}), got {tuple(thetas.shape)}")
    losses, metrics = [], []
    for theta in thetas:
        point = objective_on_module(objective, reestimated_module(objective, theta, data, batch_size=batch_size))
        loss, metric = point.evaluate(theta[None], chunk_size=1)
        losses.append(loss)
        if metric is not None:
            metrics.append(metric)
    if not losses:
        return torch.zeros(0, dtype=objective.dtype, device=objective.device), None
    return torch.cat(losses), (torch.cat(metrics) if metrics else None)
