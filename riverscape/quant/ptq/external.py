"""Weights quantized elsewhere as the PTQ point: ``Q(theta)`` read from another library's model.

A model quantized by torchao, optimum-quanto, Brevitas or a custom pipeline stores its weights as
integer codes with scales (tensor subclasses, or torch's own quantized tensors), or keeps float
weights and quantizes them in its forward (Brevitas, optimum-quanto before ``freeze``). Dequantized,
those weights are a point ``Q(theta)`` on some grid, and riverscape can analyse it against the
full-precision checkpoint like any of its own PTQ points (docs/ptq_methods.md §6):

* :func:`dequantized_weights` turns a quantized model or state dict into plain float tensors
  (``.dequantize()`` of every quantized tensor, subclasses included; for a layer that quantizes
  its float weight on the fly, the weight its forward uses);
* :func:`infer_grid` recovers the uniform grid of one dequantized tensor: per output channel (or
  per group of ``group_size`` input weights) the step ``s`` is the greatest common divisor of the
  gaps between its values and of their magnitudes (zero is on the grid), the codes are ``round(w / s)``, and the residual ``max |w / s - round(w / s)|``
  says whether the values really lie on ``s * integers`` (0 up to float rounding). Values on an
  affine grid ``s * q + m`` whose offset ``m`` is not a multiple of ``s`` (optimum-quanto's int2/int4
  with a float shift, HQQ) do not have zero on the grid: their step is the gcd of the gaps only,
  ``m`` the smallest value, and the zero point ``-m / s`` is fractional;
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


def _layer_weight(module: nn.Module) -> Optional[Tensor]:
    """The weight ``module``'s forward actually uses, when a quantization library keeps it apart from ``module.weight``.

    Recognised by duck typing, so that no optional package is imported:

    * Brevitas layers (``QuantLinear``, ``QuantConv2d``, ...; ``QuantWeightMixin``) keep a float
      ``weight`` and quantize it in every forward: ``quant_weight()`` returns a ``QuantTensor``
      whose ``.value`` is the dequantized weight (a plain tensor when weight quantization is off);
    * optimum-quanto layers (``QModuleMixin``) expose ``qweight``: the frozen ``QTensor`` after
      ``freeze``, else the weight quantized on the fly (``None`` when weights are not quantized).
    """
    if callable(getattr(module, "quant_weight", None)) and isinstance(getattr(module, "weight", None), Tensor):
        with torch.no_grad():
            quantized = module.quant_weight()
        value = getattr(quantized, "value", quantized)
        return value if isinstance(value, Tensor) else None
    if isinstance(getattr(type(module), "qweight", None), property) and getattr(module, "weight_qtype", None) is not None:
        with torch.no_grad():
            return module.qweight
    return None


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
        torchao's or optimum-quanto's; Brevitas and optimum-quanto layers that quantize a float
        weight in their forward give that quantized weight), or a state dict of dequantized or
        torch-quantized tensors.

    Returns
    -------
    dict of str to Tensor
        Parameter names to dequantized values (integer tensors, e.g. counters, are dropped).
        Biases and other parameters are taken as stored (a Brevitas bias quantizer, which needs
        the input's scale, is not applied).

    Examples
    --------
    >>> state = {"weight": torch.quantize_per_tensor(torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.75, 1.0]]), 0.25, 0, torch.qint8)}
    >>> dequantized_weights(state)["weight"]
    tensor([[ 0.5000, -1.0000,  0.2500],
            [ 0.0000,  0.7500,  1.0000]])
    """
    if isinstance(source, nn.Module):
        items = dict(source.named_parameters())
        for prefix, module in source.named_modules():
            used = _layer_weight(module)
            if used is not None:
                items[f"{prefix}.weight" if prefix else "weight"] = used
    else:
        items = dict(source.items())
    out = {}
    for name, value in items.items():
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
        Step per channel (or per group; ``scale`` then has the tensor's shape), zero point and
        the integer range of the codes actually used. The zero point is 0 when zero lies on the
        grid; on an affine grid ``s * q + m`` it is ``-m / s`` (fractional) and the codes are
        ``round(w / s + zero_point)``, the values ``s * (code - zero_point)``.
    residual : float
        ``max |u - round(u)|`` over the tensor with ``u = w / s + zero_point``, in steps (0 for
        values on the grid).
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

    @property
    def affine(self) -> bool:
        """Whether zero is off the grid (an offset ``m`` that is not a multiple of the step)."""
        return bool((self.qparams.zero_point != 0).any())


def _steps(rows: Tensor, rounds: int = 32, zero_on_grid: bool = True) -> Tensor:
    """The grid step of each row: the (float) greatest common divisor of its values' gaps and magnitudes.

    Zero lies on every grid riverscape and the usual integer formats use (``s * (q - z)`` with an
    integer zero point), so the magnitudes count as gaps too; with ``zero_on_grid=False`` (an affine
    grid ``s * q + m``) only the gaps between values do. Starting from the smallest gap, the
    step is replaced by the smallest centred remainder of a gap that is not a whole number of steps
    (more than :data:`GRID_TOLERANCE` of a step off) until none is left: Euclid's algorithm, all rows
    at once, with the tolerance in steps so float noise of a dequantization never counts as a gap.
    A row whose values only ever differ by even multiples of the true step gets twice the step: the
    point is the same, its grid description coarser. Rows of one value get ``max |value|`` (or 1).
    """
    ordered, _ = torch.sort(rows, dim=1)
    gaps = ordered[:, 1:] - ordered[:, :-1]
    if zero_on_grid:
        gaps = torch.cat([gaps, rows.abs()], dim=1)
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


def _blocks(rows: Tensor, group_size: int) -> Tensor:
    """Groups of ``group_size`` consecutive columns of every row, one per row of the result (a ragged last group NaN-padded)."""
    groups = -(-rows.shape[1] // group_size)
    return torch.nn.functional.pad(rows, (0, groups * group_size - rows.shape[1]), value=float("nan")).reshape(-1, group_size)


def _spread(per_block: Tensor, rows: Tensor, group_size: Optional[int]) -> Tensor:
    """One value per row (or per group of ``group_size`` columns) repeated over its entries: ``rows``' shape."""
    if group_size is None:
        return per_block[:, None].expand_as(rows)
    return per_block.reshape(rows.shape[0], -1).repeat_interleave(group_size, dim=1)[:, :rows.shape[1]]


def _row_steps(rows: Tensor, group_size: Optional[int], zero_on_grid: bool) -> tuple[Tensor, Tensor]:
    """Step and smallest value of each row (or of each group of ``group_size`` columns), repeated over its entries."""
    if group_size is None:
        return _spread(_steps(rows, zero_on_grid=zero_on_grid), rows, None), _spread(rows.amin(dim=1), rows, None)
    blocks = _blocks(rows, group_size)
    filled = torch.where(torch.isnan(blocks), blocks.nan_to_num(0.0)[:, :1].expand_as(blocks), blocks)  # pad with a present value
    return _spread(_steps(filled, zero_on_grid=zero_on_grid), rows, group_size), _spread(filled.amin(dim=1), rows, group_size)


def _refit(rows: Tensor, codes: Tensor, step: Tensor, offset: Tensor, group_size: Optional[int],
           zero_on_grid: bool) -> tuple[Tensor, Tensor]:
    """Step (and offset) of each row or group refitted to its codes by least squares: ``w = s q`` or ``w = s q + m``.

    The gcd step comes from one or two gaps, so the float32 rounding of their end points (~1e-7
    relative) is multiplied by the code (up to 127 at 8 bits) in the residual; the fit over all
    entries averages it out. Rows or groups with one code keep their step and offset.
    """
    def per_block(t: Tensor) -> Tensor:
        return t if group_size is None else _blocks(t, group_size)

    w, q = per_block(rows), per_block(codes)
    present = ~torch.isnan(w)
    w, q = w.nan_to_num(0.0), q.nan_to_num(0.0)
    old_step, old_offset = per_block(step)[:, 0], per_block(offset)[:, 0]
    if zero_on_grid:
        denominator = (q * q).sum(dim=1)
        fitted = (w * q).sum(dim=1) / denominator.clamp_min(1.0)
        fitted_offset = torch.zeros_like(fitted)
    else:
        count = present.sum(dim=1).clamp_min(1)
        q_mean, w_mean = q.sum(dim=1) / count, w.sum(dim=1) / count
        dq = torch.where(present, q - q_mean[:, None], torch.zeros_like(q))
        denominator = (dq * dq).sum(dim=1)
        fitted = (dq * (w - w_mean[:, None])).sum(dim=1) / denominator.clamp_min(1e-300)
        fitted_offset = w_mean - fitted * q_mean
    usable = (denominator > 0) & (fitted > 0)
    new_step, new_offset = torch.where(usable, fitted, old_step), torch.where(usable, fitted_offset, old_offset)
    return _spread(new_step, rows, group_size), _spread(new_offset, rows, group_size)


def _levels(rows: Tensor, group_size: Optional[int]) -> int:
    """The largest number of distinct values in one row (or group of ``group_size`` columns)."""
    ordered, _ = torch.sort(rows if group_size is None else _blocks(rows, group_size), dim=1)  # NaN padding sorts last
    new_value = (ordered[:, 1:] != ordered[:, :-1]) & ~torch.isnan(ordered[:, 1:])
    return int(new_value.sum(dim=1).max()) + 1


def _code_span(codes: Tensor, group_size: Optional[int]) -> int:
    """The largest ``max - min`` of the codes of one row (or group of ``group_size`` columns)."""
    blocks = codes if group_size is None else _blocks(codes, group_size)
    top = torch.where(torch.isnan(blocks), torch.full_like(blocks, -float("inf")), blocks).amax(dim=1)
    bottom = torch.where(torch.isnan(blocks), torch.full_like(blocks, float("inf")), blocks).amin(dim=1)
    return int((top - bottom).max())


def infer_grid(weight: Tensor, channel_axis: int = 0, group_size: Optional[int] = None,
               zero_on_grid: Optional[bool] = None) -> InferredGrid:
    """Recover the uniform grid of a dequantized weight tensor (see the module docstring).

    Parameters
    ----------
    weight : Tensor
        Dequantized values.
    channel_axis : int
        Output-channel axis (one step per channel).
    group_size : int, optional
        Groups of this many consecutive input weights per channel have their own step
        (torchao's ``PerGroup``, GPTQ's ``group_size``, optimum-quanto's ``weight_group_size``).
    zero_on_grid : bool, optional
        ``True``: the grid is ``s * integers`` (every symmetric format and any integer zero point).
        ``False``: an affine grid ``s * q + m`` per channel (or group), ``m`` its smallest value
        (optimum-quanto's int2/int4 with their float shift). ``None`` (default): of the two that
        the values lie on, the one with fewer codes (the first when they tie; one choice for the
        whole tensor).

    Returns
    -------
    InferredGrid

    Examples
    --------
    >>> w = torch.tensor([[0.5, -1.0, 0.0, 1.5], [0.25, 0.5, -0.25, 0.0]])
    >>> grid = infer_grid(w)
    >>> grid.qparams.scale.flatten().tolist(), grid.residual, grid.levels
    ([0.5, 0.25], 0.0, 4)
    >>> shifted = infer_grid(0.5 * torch.tensor([[0.0, 1.0, 2.0, 4.0]], dtype=torch.float64) + 2**0.5)  # zero is not on it
    >>> shifted.affine, round(shifted.qparams.scale.item(), 12), (shifted.qparams.qmin, shifted.qparams.qmax), shifted.on_grid
    (True, 0.5, (0, 4), True)
    """
    if weight.ndim == 0:
        raise ValueError("a scalar has no grid to infer")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    w = weight.detach().to(torch.float64)
    axis = channel_axis % w.ndim if w.ndim > 1 else 0
    rows = w.movedim(axis, 0).reshape(w.shape[axis], -1) if w.ndim > 1 else w.reshape(1, -1)
    fits = []
    for zero in ((True, False) if zero_on_grid is None else (bool(zero_on_grid),)):
        step, low = _row_steps(rows, group_size, zero)
        offset = torch.zeros_like(step) if zero else low
        step, offset = _refit(rows, torch.round((rows - offset) / step), step, offset, group_size, zero)
        ratio = (rows - offset) / step
        codes = torch.round(ratio)
        fits.append((float((ratio - codes).abs().max()), step, offset, codes))
    on_grid = [fit for fit in fits if fit[0] <= GRID_TOLERANCE]
    # the simplest description that fits: the fewest codes (a fine enough step fits a few values with zero on the grid
    # whatever their offset; the affine fit never needs more codes, so it wins only when it needs fewer)
    residual, step, offset, codes = (min(on_grid, key=lambda fit: _code_span(fit[3], group_size)) if on_grid
                                     else min(fits, key=lambda fit: fit[0]))

    def shaped(values: Tensor) -> Tensor:
        """Per-row values back in ``weight``'s layout; one per channel broadcastable, as the quantizers give it."""
        out = values.reshape(w.movedim(axis, 0).shape).movedim(0, axis) if w.ndim > 1 else values.reshape(w.shape)
        if group_size is None and w.ndim > 1:
            out = out[tuple(slice(None) if d == axis else slice(0, 1) for d in range(w.ndim))]
        return out.to(weight.dtype)

    qparams = QParams(shaped(step), shaped((0.0 - offset) / step), int(codes.min()), int(codes.max()))
    return InferredGrid(qparams, residual, _levels(rows, group_size))


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
                             f"{grid.levels} distinct values in a channel, with or without zero on the grid); pass group_size= if it was quantized per group, "
                             "or allow_off_grid=True")
        theta_q[target.spec.slice] = value.detach().reshape(-1).to(theta_q)
        qparams.append(QParams(grid.qparams.scale.to(theta_q), grid.qparams.zero_point.to(theta_q), grid.qparams.qmin, grid.qparams.qmax))
        residuals[target.name] = grid.residual
    return theta_q, qparams, PTQDiagnostics(calibration={"source": config.source, "grid_residual": residuals})
