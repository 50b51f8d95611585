"""BatchNorm sanity: do a checkpoint's running statistics describe the data its weights see?

In eval mode a BatchNorm layer normalises with its stored running mean and variance. A
checkpoint whose running statistics do not belong to its weights (reset buffers, statistics
of another run, a half-finished fine-tune) gives near-chance full-precision accuracy, and
then every comparison with it is wrong; in particular "PTQ does no harm" when FP and PTQ
are both at chance. :func:`check_batchnorm` measures, at every BatchNorm layer, how far the
batch statistics of the analysis data at the layer's input (model in eval mode) are from
the running statistics; :func:`recalibrate_batchnorm` re-estimates them on the data.

Threshold
---------
A layer is flagged when, on any channel, the standardized mean shift
``|mu_batch - mu_run| / sqrt(var_run + eps)`` exceeds ``0.5`` or the variance ratio
``(var_batch + eps) / (var_run + eps)`` leaves ``[1/4, 4]``. For a healthy network evaluated on
data from its training distribution both are sampling noise plus the drift of the running
averages during training: the standard error of a channel mean over ``n`` values is
``1/sqrt(n)`` sd, so even the largest of 1000 channels stays near ``sqrt(2 ln 1000 / n)``
(0.12 sd for ``n = 1024``), and healthy checkpoints measured here stay below about 0.2 sd and
a variance ratio within ``[0.7, 1.4]``. A shift of half a standard deviation moves every
normalized activation of that channel by 0.5, a variance off by 4x rescales it by 2: both
change downstream activations as much as the signal itself. Corrupted statistics (reset
buffers, buffers of another run) give shifts of several sd. With very few samples per
channel (``n`` below ~30) the noise alone approaches the threshold; the result records ``n``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batching import call_model, move
from .io.jsonable import fields_dict
from .objective import _to_batches

__all__ = [
    "SHIFT_THRESHOLD",
    "VARIANCE_RATIO_THRESHOLD",
    "BatchNormLayerCheck",
    "BatchNormCheck",
    "check_batchnorm",
    "recalibrate_batchnorm",
    "batchnorm_preflight",
]

#: flag a layer whose standardized mean shift exceeds this on any channel (in running standard deviations)
SHIFT_THRESHOLD = 0.5
#: flag a layer whose variance ratio leaves [1/t, t] on any channel
VARIANCE_RATIO_THRESHOLD = 4.0


@dataclass(frozen=True)
class BatchNormLayerCheck:
    """Running vs data statistics of one BatchNorm layer (worst channel of each measure).

    Attributes
    ----------
    name : str
        Qualified module name (``"features.1"``).
    channels : int
        Number of channels.
    samples : int
        Values per channel that entered the data statistics (batch x spatial positions).
    mean_shift : float
        ``max_c |mu_data - mu_run| / sqrt(var_run + eps)``.
    mean_shift_channel : int
        Channel of ``mean_shift``.
    log_variance_ratio : float
        ``log((var_data + eps) / (var_run + eps))`` of the channel with the largest absolute value.
    flagged : bool
        ``mean_shift > shift threshold`` or ``|log_variance_ratio| > log(variance threshold)``.
    """

    name: str
    channels: int
    samples: int
    mean_shift: float
    mean_shift_channel: int
    log_variance_ratio: float
    flagged: bool

    @property
    def variance_ratio(self) -> float:
        """``(var_data + eps) / (var_run + eps)`` of the worst channel."""
        return math.exp(self.log_variance_ratio)

    def describe(self) -> str:
        """``"layer X: shift 3.2 sd, variance ratio 0.11"``."""
        return f"layer {self.name}: shift {self.mean_shift:.2g} sd, variance ratio {self.variance_ratio:.2g}"

    def to_dict(self) -> dict:
        """The fields and ``variance_ratio``, as JSON values."""
        return fields_dict(self, variance_ratio=self.variance_ratio)


@dataclass(frozen=True)
class BatchNormCheck:
    """The outcome of :func:`check_batchnorm`: one :class:`BatchNormLayerCheck` per layer with running statistics.

    Attributes
    ----------
    layers : tuple of BatchNormLayerCheck
        In module order.
    shift_threshold, variance_ratio_threshold : float
        The thresholds the verdict used.
    """

    layers: tuple[BatchNormLayerCheck, ...]
    shift_threshold: float = SHIFT_THRESHOLD
    variance_ratio_threshold: float = VARIANCE_RATIO_THRESHOLD

    @property
    def mismatched(self) -> bool:
        """Whether any layer is flagged (the running statistics do not match the data)."""
        return any(layer.flagged for layer in self.layers)

    @property
    def flagged(self) -> tuple[BatchNormLayerCheck, ...]:
        return tuple(layer for layer in self.layers if layer.flagged)

    @property
    def worst(self) -> Optional[BatchNormLayerCheck]:
        """The layer with the largest mean shift (``None`` without BatchNorm layers)."""
        return max(self.layers, key=lambda layer: layer.mean_shift, default=None)

    @property
    def max_mean_shift(self) -> float:
        return max((layer.mean_shift for layer in self.layers), default=0.0)

    def message(self) -> str:
        """One sentence for the report: the verdict and the worst layer."""
        if not self.layers:
            return "no BatchNorm layer with running statistics"
        first = self.flagged[0] if self.mismatched else self.worst
        if self.mismatched:
            more = f" and {len(self.flagged) - 1} more" if len(self.flagged) > 1 else ""
            return f"BatchNorm running statistics do not match the data ({first.describe()}{more})"
        return f"BatchNorm running statistics match the data (largest: {first.describe()})"

    def to_dict(self) -> dict:
        """The verdict, the thresholds and every layer's check, as JSON values."""
        return {"mismatched": self.mismatched, **fields_dict(self)}


def _batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm layers that normalise with running statistics in eval mode."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None and m.running_var is not None
    ]


def _inputs(data: Any, batch_size: Optional[int]) -> list[Any]:
    """The inputs of every batch of ``data`` (``(inputs, targets)`` or an iterable of batches)."""
    return [x for x, _ in _to_batches(data, batch_size, None)]


def _where(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    if first is None:
        return torch.device("cpu"), torch.get_default_dtype()
    return first.device, first.dtype


def check_batchnorm(
    model: nn.Module,
    data: Any,
    *,
    batch_size: Optional[int] = 256,
    shift_threshold: float = SHIFT_THRESHOLD,
    variance_ratio_threshold: float = VARIANCE_RATIO_THRESHOLD,
) -> BatchNormCheck:
    """Compare every BatchNorm layer's running statistics with the data's statistics at its input.

    The model runs in eval mode (as it is evaluated) on a private copy with forward pre-hooks
    that accumulate, per channel, the mean and variance of the layer's input over all samples
    (and spatial positions) in float64. The caller's model is not modified.

    Parameters
    ----------
    model : nn.Module
    data : (inputs, targets) tensors or an iterable of such batches
        The analysis data (targets are ignored).
    batch_size : int, optional
        Forward tensor data in batches of this size (bounds memory; the statistics are exact
        over all samples either way).
    shift_threshold, variance_ratio_threshold : float
        Verdict thresholds (see the module docstring for their justification).

    Returns
    -------
    BatchNormCheck
        Per-layer measures and the overall verdict ``mismatched``.
    """
    if variance_ratio_threshold <= 1.0 or shift_threshold <= 0.0:
        raise ValueError("shift_threshold must be > 0 and variance_ratio_threshold > 1")
    private = copy.deepcopy(model).eval()
    layers = _batchnorm_layers(private)
    if not layers:
        return BatchNormCheck((), shift_threshold, variance_ratio_threshold)
    sums: dict[str, list] = {name: [0, None, None] for name, _ in layers}  # count, sum, sum of squares

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * spatial)
            acc = sums[name]
            acc[0] += flat.shape[1]
            acc[1] = flat.sum(1) if acc[1] is None else acc[1] + flat.sum(1)
            acc[2] = flat.pow(2).sum(1) if acc[2] is None else acc[2] + flat.pow(2).sum(1)

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers]
    device, dtype = _where(private)
    try:
        with torch.no_grad():
            for x in _inputs(data, batch_size):
                call_model(private, move(x, device, dtype))
    finally:
        for handle in handles:
            handle.remove()
    log_limit = math.log(variance_ratio_threshold)
    results = []
    for name, module in layers:
        count, total, squares = sums[name]
        if count < 2:
            continue  # the layer was never reached (or saw one value): nothing to compare
        mean = total / count
        var = (squares - count * mean.pow(2)).clamp_min(0.0) / (count - 1)  # unbiased, like running_var
        run_mean = module.running_mean.detach().to(torch.float64)
        run_var = module.running_var.detach().to(torch.float64)
        shift = (mean - run_mean).abs() / (run_var + module.eps).sqrt()
        log_ratio = torch.log((var + module.eps) / (run_var + module.eps))
        worst_var = int(log_ratio.abs().argmax())
        worst_mean = int(shift.argmax())
        results.append(
            BatchNormLayerCheck(
                name=name,
                channels=int(mean.numel()),
                samples=int(count),
                mean_shift=float(shift[worst_mean]),
                mean_shift_channel=worst_mean,
                log_variance_ratio=float(log_ratio[worst_var]),
                flagged=bool(float(shift[worst_mean]) > shift_threshold or abs(float(log_ratio[worst_var])) > log_limit),
            )
        )
    return BatchNormCheck(tuple(results), shift_threshold, variance_ratio_threshold)


def recalibrate_batchnorm(model: nn.Module, data: Any, *, batch_size: Optional[int] = None) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``data``.

    Every BatchNorm layer's running statistics are reset and re-accumulated as a cumulative
    average over the batches (``momentum=None``) in one pass without gradients; only the
    BatchNorm layers are in train mode during the pass (dropout and the like stay in eval
    mode). Weights are untouched; the copy keeps the original momenta and training flags.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    data : (inputs, targets) tensors or an iterable of such batches
        Targets are ignored. Pass the data in as few, large batches as memory allows: the
        cumulative average weighs batches equally and averages per-batch variances.
    batch_size : int, optional
        Split tensor data into batches of this size (default: one batch).

    Returns
    -------
    nn.Module
        The recalibrated copy.
    """
    out = copy.deepcopy(model)
    layers = _batchnorm_layers(out)
    if not layers:
        return out
    flags = {name: m.training for name, m in out.named_modules()}
    momenta = {name: m.momentum for name, m in layers}
    out.eval()
    for _, m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device, dtype = _where(out)
    with torch.no_grad():
        for x in _inputs(data, batch_size):
            call_model(out, move(x, device, dtype))
    for name, m in layers:
        m.momentum = momenta[name]
    for name, m in out.named_modules():
        m.training = flags[name]
    return out


def batchnorm_preflight(model: nn.Module, data: Any, *, recalibrate: bool = False) -> tuple[nn.Module, list[str], list[str]]:
    """What ``riverscape analyze`` runs first: check the BatchNorm statistics and optionally re-estimate them.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    data : analysis data, as for :func:`check_batchnorm`.
    recalibrate : bool
        Return a copy with re-estimated statistics (:func:`recalibrate_batchnorm`).

    Returns
    -------
    model : nn.Module
        ``model`` itself, or its recalibrated copy.
    notes : list of str
        A record of the recalibration, if any.
    warnings : list of str
        One warning when the statistics do not match and were not re-estimated; empty for
        a model without BatchNorm or with matching statistics.
    """
    check = check_batchnorm(model, data)
    if not check.layers:
        return model, [], []
    notes, warnings = [], []
    if recalibrate:
        model = recalibrate_batchnorm(model, data)
        after = check_batchnorm(model, data)
        notes.append(
            f"BatchNorm running statistics re-estimated on the analysis data (--bn-recalibrate): largest mean shift "
            f"{check.max_mean_shift:.2g} sd before, {after.max_mean_shift:.2g} sd after"
        )
    elif check.mismatched:
        warnings.append(f"{check.message()}; FP accuracy may be wrong; rerun with --bn-recalibrate")
    return model, notes, warnings
