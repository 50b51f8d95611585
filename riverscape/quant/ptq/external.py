"""Weights quantized elsewhere as the PTQ point: ``Q(theta)`` read from another library's model.

A model quantized by torchao, optimum-quanto, Brevitas or a custom pipeline stores its weights as
integer codes with scales (tensor subclasses, or torch's own quantized tensors). Dequantized,
those weights are a point ``Q(theta)`` on some grid, and riverscape can analyse it against the
full-precision checkpoint like any of its own PTQ points (docs/ptq_methods.md §6):

* :func:`dequantized_weights` turns a quantized model or state dict into plain float tensors
  (``.dequantize()`` of every quantized tensor, subclasses included);
* :func:`infer_grid` recovers the uniform grid of one dequantized tensor: per output channel (or
  per group of ``group_size`` input weights) the step ``s`` is the greatest common divisor of the
  gaps between its values and of their magnitudes (zero is on the grid), the codes are ``round(w / s)``, and the residual ``max |w / s - round(w / s)|``
  says whether the values really lie on ``s * integers`` (0 up to float rounding);
* :class:`External` is a PTQ method (``ptq(obj, quantizer, method=External(weights))``) that
  takes the dequantized weights as ``theta_q`` and the inferred grids as its quantization
  parameters, so flips, damage and alignment work as for round-to-nearest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ...objective import Objective
from ..qmap import QuantMap
from ..quantizers import QParams
from .base import PTQConfig, PTQDiagnostics

__all__ = ["External", "InferredGrid", "dequantized_weights", "infer_grid", "external_quantize"]

GRID_TOLERANCE = 1e-3
"""Largest residual (in steps) accepted as "on the grid": float32 dequantization ``s * q`` is exact
to about 1e-7 relative, so values off a uniform grid show residuals of order 0.1 - 0.5."""


def _dequantize(value: Any) -> Tensor:
    """A plain tensor of ``value``: ``.dequantize()`` of torch-quantized tensors and tensor subclasses."""
    data = value.data if isinstance(value, nn.Parameter) else value
    if isinstance(data, Tensor) and data.is_quantized:
        return data.dequantize()
    if isinstance(data, Tensor) and type(data) is not Tensor and hasattr(data, "dequantize"):
        return data.dequantize()  # torchao's Int8Tensor, IntxUnpackedToInt8Tensor, ...
    if not isinstance(data, Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return data


def dequantized_weights(source: Union[nn.Module, Mapping[str, Any]]) -> dict[str, Tensor]:
    """Every parameter (module) or entry (state dict) of ``source`` as a plain, detached float tensor.

    Parameters
    ----------
    source : nn.Module or mapping of str to Tensor
        A model quantized by another library (its parameters may be tensor subclasses such as
        torchao's), or a state dict of dequantized or torch-quantized tensors.

    Returns
    -------
    dict of str to Tensor
        Parameter names to dequantized values (integer tensors, e.g. counters, are dropped).
    """
    items = source.named_parameters() if isinstance(source, nn.Module) else source.items()
    out = {}
    for name, value in items:
        tensor = _dequantize(value).detach()
        if tensor.is_floating_point():
            out[name] = tensor.clone()
    return out


@dataclass(frozen=True)
class InferredGrid:
    """The uniform grid a dequantized tensor lies on.

    Attributes
    ----------
    qparams : QParams
        Step per channel (or per group; ``scale`` then has the tensor's shape), zero point 0 and
        the integer range of the codes actually used.
    residual : float
        ``max |w / s - round(w / s)|`` over the tensor, in steps (0 for values on the grid).
    levels : int
        The largest number of distinct values in one channel or group.
    """

    qparams: QParams
    residual: float
    levels: int

    @property
    def on_grid(self) -> bool:
        """Whether the residual is below :data:`GRID_TOLERANCE`."""
        return self.residual <= GRID_TOLERANCE


def _steps(rows: Tensor, rounds: int = 32) -> Tensor:
    """The grid step of each row: the (float) greatest common divisor of its values' gaps and magnitudes.

    Zero lies on every grid riverscape and the usual integer formats use (``s * (q - z)`` with an
    integer zero point), so the magnitudes count as gaps too. Starting from the smallest gap, the
    step is replaced by the smallest centred remainder of a gap that is not a whole number of steps
    (more than :data:`GRID_TOLERANCE` of a step off) until none is left: Euclid's algorithm, all rows
    at once, with the tolerance in steps so float noise of a dequantization never counts as a gap.
    A row whose values only ever differ by even multiples of the true step gets twice the step: the
    point is the same, its grid description coarser. Rows of one value get ``max |value|`` (or 1).
    """
    ordered, _ = torch.sort(rows, dim=1)
    gaps = torch.cat([ordered[:, 1:] - ordered[:, :-1], rows.abs()], dim=1)
    magnitude = rows.abs().amax(dim=1, keepdim=True)
    floor = 1e-6 * magnitude  # below this a gap is float noise (dequantized s * q is exact to ~1e-7 relative)
    gaps = torch.where(gaps > floor, gaps, torch.full_like(gaps, float("nan")))
    step = torch.where(torch.isnan(gaps), torch.full_like(gaps, float("inf")), gaps).amin(dim=1, keepdim=True)
    for _ in range(rounds):
        off = gaps / step - torch.round(gaps / step)
        bad = off.abs() > GRID_TOLERANCE  # NaN compares False: noise gaps never count
        if not bool(bad.any()):
            break
        remainder = torch.where(bad, off.abs() * step, torch.full_like(gaps, float("inf"))).amin(dim=1, keepdim=True)
        # a 16-bit grid has steps >= range / 65535: a smaller "step" means the row is on no uniform grid; keep
        # the last plausible one (its residual then says so)
        step = torch.where(remainder >= magnitude / 2**17, torch.minimum(step, remainder), step)
    step = step[:, 0]
    fallback = rows.abs().amax(dim=1)
    return torch.where(torch.isfinite(step), step, torch.where(fallback > 0, fallback, torch.ones_like(fallback)))


def infer_grid(weight: Tensor, channel_axis: int = 0, group_size: Optional[int] = None) -> InferredGrid:
    """Recover the uniform grid of a dequantized weight tensor (see the module docstring).

    Parameters
    ----------
    weight : Tensor
        Dequantized values.
    channel_axis : int
        Output-channel axis (one step per channel).
    group_size : int, optional
        Groups of this many consecutive input weights per channel have their own step
        (torchao's ``PerGroup``, GPTQ's ``group_size``).

    Returns
    -------
    InferredGrid

    Examples
    --------
    >>> w = torch.tensor([[0.5, -1.0, 0.0, 1.5], [0.2, 0.4, -0.2, 0.0]])
    >>> grid = infer_grid(w)
    >>> grid.qparams.scale.flatten().tolist(), grid.residual, grid.levels
    ([0.5, 0.2], 0.0, 4)
    """
    if weight.ndim == 0:
        raise ValueError("a scalar has no grid to infer")
    w = weight.detach().to(torch.float64)
    axis = channel_axis % w.ndim if w.ndim > 1 else 0
    rows = w.movedim(axis, 0).reshape(w.shape[axis], -1) if w.ndim > 1 else w.reshape(1, -1)
    width = rows.shape[1]
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        groups = -(-width // group_size)
        padded = torch.nn.functional.pad(rows, (0, groups * group_size - width), value=float("nan"))
        blocks = padded.reshape(-1, group_size)
        filled = torch.where(torch.isnan(blocks), blocks.nan_to_num(0.0)[:, :1].expand_as(blocks), blocks)  # pad with a present value
        step = _steps(filled).reshape(rows.shape[0], groups).repeat_interleave(group_size, dim=1)[:, :width]
        levels = max(int(torch.unique(b[~torch.isnan(b)]).numel()) for b in blocks)
    else:
        step = _steps(rows)[:, None].expand_as(rows)
        levels = max(int(torch.unique(r).numel()) for r in rows)
    ratio = rows / step
    codes = torch.round(ratio)
    residual = float((ratio - codes).abs().max())
    shaped = step.reshape(w.movedim(axis, 0).shape).movedim(0, axis) if w.ndim > 1 else step.reshape(w.shape)
    if group_size is None and w.ndim > 1:  # one step per channel: broadcastable shape, as the quantizers give it
        index = [slice(None) if d == axis else slice(0, 1) for d in range(w.ndim)]
        shaped = shaped[tuple(index)]
    scale = shaped.to(weight.dtype)
    qparams = QParams(scale, torch.zeros_like(scale), int(codes.min()), int(codes.max()))
    return InferredGrid(qparams, residual, levels)


@dataclass(frozen=True, eq=False)
class External(PTQConfig):
    """Weights quantized by another library, given dequantized (see :func:`dequantized_weights`).

    Parameters
    ----------
    weights : mapping of str to Tensor
        Dequantized values of (at least) every quantized tensor of the map, by parameter name.
    source : str
        Where they came from (recorded in results, e.g. ``"torchao Int8WeightOnlyConfig"``).
    group_size : int, optional
        Per-group steps of this size when inferring the grids.
    allow_off_grid : bool
        Accept tensors whose values do not lie on a uniform grid (residual above
        :data:`GRID_TOLERANCE`, e.g. non-uniform or float8 formats); their quantization parameters
        are then only the nearest uniform description.
    """

    method: ClassVar[str] = "external"
    selectable_by_name: ClassVar[bool] = False
    weights: Optional[Mapping[str, Tensor]] = field(default=None, repr=False)
    source: str = ""
    group_size: Optional[int] = None
    allow_off_grid: bool = False

    def to_dict(self) -> dict:
        """The method, its source and options (not the tensors)."""
        return {"method": self.method, "source": self.source, "tensors": len(self.weights or {}),
                "group_size": self.group_size, "allow_off_grid": self.allow_off_grid}


def external_quantize(config: External, objective: Objective, qmap: QuantMap, theta: Tensor) -> tuple[Tensor, list[QParams], PTQDiagnostics]:
    """Handler of :class:`External`: the given weights as ``theta_q``, grids inferred per tensor."""
    if not config.weights:
        raise ValueError("method 'external' needs the dequantized weights: ptq(obj, q, method=External(weights=dequantized_weights(model)))")
    missing = [t.name for t in qmap.targets if t.name not in config.weights]
    if missing:
        raise ValueError(f"the external weights lack {len(missing)} quantized tensor(s): {', '.join(missing[:5])}")
    theta_q = theta.clone()
    qparams, residuals = [], {}
    for target in qmap.targets:
        value = config.weights[target.name]
        if tuple(value.shape) != tuple(target.spec.shape):
            raise ValueError(f"external weight {target.name!r} has shape {tuple(value.shape)}, the model's is {target.spec.shape}")
        grid = infer_grid(value, target.channel_axis, config.group_size)
        if not grid.on_grid and not config.allow_off_grid:
            raise ValueError(f"external weight {target.name!r} is not on a uniform grid (residual {grid.residual:.3g} steps, "
                             f"{grid.levels} distinct values in a channel); pass group_size= if it was quantized per group, "
                             "or allow_off_grid=True")
        theta_q[target.spec.slice] = value.detach().reshape(-1).to(theta_q)
        qparams.append(QParams(grid.qparams.scale.to(theta_q), grid.qparams.zero_point.to(theta_q), grid.qparams.qmin, grid.qparams.qmax))
        residuals[target.name] = grid.residual
    return theta_q, qparams, PTQDiagnostics(calibration={"source": config.source, "grid_residual": residuals})
