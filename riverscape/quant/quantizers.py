"""Uniform fake quantizers: grids, granularity, range calibration, and the rounding map.

Conventions (docs/theory.md §2.1-§2.5; per-group and ternary grids: docs/ptq_methods.md §1-§2)::

    q_int(w) = clamp(round(w / s) + z, q_min, q_max)      # round half to even (torch.round)
    Q(w)     = s * (q_int(w) - z)

Grids (``grid=``; ``symmetric=True/False`` is the older spelling of ``"symmetric"``/``"asymmetric"``):

* ``"symmetric"`` (default): z = 0, restricted ("narrow") grid [-(2^(b-1) - 1), 2^(b-1) - 1]
  (2^b - 1 levels; 2 bits is {-s, 0, s}), s = M / (2^(b-1) - 1) for a range M = max|w|;
* ``"full"``: z = 0, full signed grid [-2^(b-1), 2^(b-1) - 1] (2^b levels), the smallest s that
  covers the range without clipping: s = max(-alpha / 2^(b-1), beta / (2^(b-1) - 1));
* ``"unsigned"``: z = 0, grid [0, 2^b - 1], s = beta / (2^b - 1), for non-negative tensors
  (negative values are clipped to 0);
* ``"asymmetric"``: grid [0, 2^b - 1] (2^b levels), s = (beta - alpha) / (2^b - 1) with
  alpha <= 0 <= beta, z = round(-alpha / s);
* ``"ternary"`` (2 bits only; TWN, Li & Liu 2016, arXiv 1605.04711): Q(w) = a * sgn(w) * 1[|w| > Delta]
  with Delta = 0.7 mean|w| and a = mean of |w| over |w| > Delta, per channel (group, tensor);
  ``QParams.threshold`` holds Delta and ``scale`` holds a; the range method does not apply;
* 1 bit (any of "symmetric"/"asymmetric"): Q(w) = a * sgn(w), sgn(0) := +1, a = mean(|w|) per
  channel, the L2-optimal scale (XNOR-Net, Rastegari et al. 2016); the range method does not apply.

Granularity: per-channel scales run along ``channel_axis`` (axis 0 = output channels of Linear,
Conv and rows of Embedding); ``per_channel=False`` or a tensor with fewer than two dimensions gets
one scale; ``group_size=G`` gives one scale per group of G consecutive input weights of each
output channel (the tensor seen as ``(C, n)`` with the channel axis first, e.g. ``(out, in*kh*kw)``
for a Conv2d weight; when ``n`` is not a multiple of G the last group is shorter, and ``n <= G``
is exactly per-channel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["UniformQuantizer", "QParams", "fake_quantize", "integer_grid", "tensor_eps", "expand_groups", "RANGE_METHODS", "GRIDS"]

RANGE_METHODS = ("minmax", "mse", "percentile")
GRIDS = ("symmetric", "full", "unsigned", "asymmetric", "ternary")
MAX_BITS = 16
TWN_THRESHOLD = 0.7
"""Ternary threshold factor: Delta = 0.7 mean|w| (Li & Liu 2016, the approximation of their eq. 8)."""

_ZERO_POINT_FREE = ("symmetric", "full", "unsigned", "ternary")


class QParams(NamedTuple):
    """Quantization parameters of one tensor, broadcastable against it.

    Shapes: per channel, ``scale`` and ``zero_point`` have the tensor's number of dimensions
    (size 1 except along the channel axis); per tensor they are scalars shaped like that;
    **per group** they have the tensor's full shape (each group's value repeated over its
    ``group_size`` elements), so ``w / scale`` broadcasts for every consumer (the QAT
    estimators included). For ``bits == 1`` the grid is ``{-scale, +scale}`` and
    ``qmin, qmax = -1, 1`` name the two signs.

    Attributes
    ----------
    scale, zero_point : Tensor
    qmin, qmax : int
        Integer range of the grid.
    threshold : Tensor or None
        Ternary grids only: the dead-zone half-width Delta (same shape as ``scale``); the
        code is ``sgn(w) * 1[|w| > Delta]`` and ``Q(w) = scale * code``.
    group_size : int or None
        The group size when the parameters are per group (``None`` per channel/tensor).
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    threshold: Optional[Tensor] = None
    group_size: Optional[int] = None


def _grid_range(bits: int, grid: str) -> tuple[int, int]:
    if bits == 1 or grid == "ternary":
        return -1, 1
    if grid == "symmetric":
        top = 2 ** (bits - 1) - 1
        return -top, top
    if grid == "full":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def integer_grid(bits: int, symmetric: bool | str) -> tuple[int, int]:
    """Integer range ``(q_min, q_max)`` of a ``bits``-bit grid (docs/theory.md §2.2 table).

    ``symmetric`` is ``True``/``False`` (restricted symmetric / asymmetric) or a grid name of
    :data:`GRIDS`.

    >>> integer_grid(2, True), integer_grid(2, False), integer_grid(8, True), integer_grid(4, "full")
    ((-1, 1), (0, 3), (-127, 127), (-8, 7))
    """
    if isinstance(symmetric, str):
        if symmetric not in GRIDS:
            raise ValueError(f"unknown grid {symmetric!r}; choose one of {GRIDS}")
        return _grid_range(bits, symmetric)
    return _grid_range(bits, "symmetric" if symmetric else "asymmetric")


def fake_quantize(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``s * (clamp(round(w / s) + z, qmin, qmax) - z)``: the dequantized grid point of ``w``."""
    q = torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax)
    return scale * (q - zero_point)


def _sign(w: Tensor) -> Tensor:
    return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))


def _ternary_codes(w: Tensor, threshold: Tensor) -> Tensor:
    """``sgn(w) * 1[|w| > Delta]`` in ``{-1, 0, 1}`` (same dtype as ``w``)."""
    return torch.sign(w) * (w.abs() > threshold).to(w.dtype)


def tensor_eps(w: Tensor) -> Tensor:
    """Smallest scale used for ``w``: ``1e-8 max|w| + 1e-12`` (keeps all-zero channels finite)."""
    return 1e-8 * w.detach().abs().amax() + 1e-12


def expand_groups(per_group: Tensor, n: int, group_size: int) -> Tensor:
    """``(C, n_groups)`` values repeated over their groups: ``(C, n)`` (the last group may be short)."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :n]


@dataclass(frozen=True)
class UniformQuantizer:
    """A uniform fake quantizer ``w -> Q(w)`` for 1 to 16 bits.

    Parameters
    ----------
    bits : int
        Bit-width, 1 to 16. ``bits=1`` is sign quantization with a per-channel scale.
    symmetric : bool, optional
        Older spelling of the grid: ``True`` is ``grid="symmetric"``, ``False`` is
        ``grid="asymmetric"``. After construction it is ``True`` for the zero-point-free
        signed grids (``"symmetric"``, ``"full"``, ``"ternary"``) and ``False`` otherwise.
    per_channel : bool
        One scale per slice along ``channel_axis`` (default) or one per tensor.
    range : {"minmax", "mse", "percentile"}
        How the clipping range is chosen: the full min/max, the shrink factor that
        minimises ``||Q(w) - w||^2`` over a grid of ``mse_grid`` candidates (as in
        BRECQ/LAPQ with p = 2), or the ``percentile`` quantile of ``|w|`` (of ``w`` for the
        ``"full"``, ``"unsigned"`` and ``"asymmetric"`` grids).
    percentile : float
        Quantile in percent for ``range="percentile"``.
    channel_axis : int
        Axis holding output channels.
    mse_grid : int
        Number of shrink factors ``r in (0, 1]`` tried by ``range="mse"``.
    grid : {"symmetric", "full", "unsigned", "asymmetric", "ternary"}, optional
        The integer grid (module docstring); default from ``symmetric`` (``"symmetric"``).
        ``"ternary"`` needs ``bits=2``; ``"full"`` and ``"unsigned"`` need ``bits >= 2``.
    group_size : int, optional
        One scale per group of ``group_size`` consecutive input weights of each output
        channel (needs ``per_channel=True``); tensors with fewer than two dimensions stay
        per tensor. A last group shorter than ``group_size`` is allowed (ragged), and a
        tensor whose input size is at most ``group_size`` is quantized exactly per channel.

    Examples
    --------
    >>> q = UniformQuantizer(2, per_channel=False)
    >>> q(torch.tensor([-1.0, -0.4, 0.2, 0.6, 1.0]))
    tensor([-1.,  0.,  0.,  1.,  1.])
    >>> UniformQuantizer(4, group_size=128).short_name, UniformQuantizer(2, grid="ternary").short_name
    ('W4g128', 'W2t')
    """

    bits: int
    symmetric: Optional[bool] = None
    per_channel: bool = True
    range: str = "minmax"
    percentile: float = 99.9
    channel_axis: int = 0
    mse_grid: int = 100
    grid: Optional[str] = None
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be an integer from 1 to {MAX_BITS}, got {self.bits!r}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be from 1 to {MAX_BITS}, got {self.bits}")
        if self.range not in RANGE_METHODS:
            raise ValueError(f"unknown range method {self.range!r}; choose one of {RANGE_METHODS}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.mse_grid < 1:
            raise ValueError("mse_grid must be at least 1")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be True, False or None, got {self.symmetric!r}")
        self._init_grid()
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size must be None or a positive integer, got {self.group_size!r}")
            if not self.per_channel:
                raise ValueError("group_size needs per_channel=True (groups lie inside each output channel)")

    def _init_grid(self) -> None:
        grid = self.grid
        if grid is None:
            grid = "asymmetric" if self.symmetric is False else "symmetric"
        elif grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; choose one of {GRIDS}")
        symmetric = grid in ("symmetric", "full", "ternary")
        if self.symmetric is not None and self.symmetric != symmetric and self.grid is not None:
            raise ValueError(f"symmetric={self.symmetric} contradicts grid={grid!r}; give only grid=")
        if grid == "ternary" and self.bits != 2:
            raise ValueError(f"grid='ternary' is a 2-bit grid {{-a, 0, a}}; got bits={self.bits}")
        if self.bits == 1 and grid in ("full", "unsigned"):
            raise ValueError(f"1-bit quantization is sign quantization; grid={grid!r} needs bits >= 2")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "symmetric", symmetric)

    # ------------------------------------------------------------------ grid
    @property
    def integer_range(self) -> tuple[int, int]:
        """Integer range ``(q_min, q_max)`` (``(-1, 1)`` at 1 bit and for ternary)."""
        return _grid_range(self.bits, self.grid)

    @property
    def levels(self) -> int:
        """Number of distinct values a channel (group) can take."""
        lo, hi = self.integer_range
        return 2 if self.bits == 1 else hi - lo + 1

    @property
    def _sign_grid(self) -> bool:
        return self.bits == 1

    @property
    def granularity(self) -> str:
        """``"per-group"``, ``"per-channel"`` or ``"per-tensor"`` (for tensors of two or more dimensions)."""
        if not self.per_channel:
            return "per-tensor"
        return "per-channel" if self.group_size is None else "per-group"

    def describe(self) -> str:
        """Human-readable name, e.g. ``"2-bit sym per-channel mse"`` or ``"4-bit sym per-group(128) minmax"``.

        Symmetric and asymmetric per-channel/per-tensor quantizers keep the historical text.
        """
        grid = {"symmetric": "sym", "asymmetric": "asym"}.get(self.grid, self.grid)
        granularity = self.granularity if self.group_size is None else f"per-group({self.group_size})"
        text = f"{self.bits}-bit {grid} {granularity}"
        return text if self.grid == "ternary" else f"{text} {self.range}"

    @property
    def short_name(self) -> str:
        """Compact name ``W{b}[g{G}|pt][f|u|a|t]``.

        ``W4`` is 4-bit symmetric per channel, ``W4g128`` per group of 128, ``W8pt`` per
        tensor; a final letter names a grid other than the restricted symmetric one:
        ``f`` full, ``u`` unsigned, ``a`` asymmetric, ``t`` ternary (``W2t``). The range
        method is not part of the short name.
        """
        granularity = "" if self.granularity == "per-channel" else ("pt" if not self.per_channel else f"g{self.group_size}")
        suffix = {"symmetric": "", "full": "f", "unsigned": "u", "asymmetric": "a", "ternary": "t"}[self.grid]
        return f"W{self.bits}{granularity}{suffix}"

    # ------------------------------------------------------------------ layout
    def _per_channel(self, w: Tensor) -> bool:
        return self.per_channel and w.ndim >= 2

    def _channels_first(self, w: Tensor) -> Tensor:
        """``w`` as ``(C, n)`` (C = 1 when per-tensor)."""
        if not self._per_channel(w):
            return w.reshape(1, -1)
        axis = self.channel_axis % w.ndim
        return w.movedim(axis, 0).reshape(w.shape[axis], -1)

    def _to_broadcast(self, per_channel: Tensor, w: Tensor) -> Tensor:
        shape = [1] * w.ndim
        if self._per_channel(w):
            shape[self.channel_axis % w.ndim] = -1
        return per_channel.reshape(shape) if w.ndim else per_channel.reshape(())

    def _from_channels_first(self, m: Tensor, w: Tensor) -> Tensor:
        """Inverse of :meth:`_channels_first` for a full ``(C, n)`` matrix (per-channel layout)."""
        axis = self.channel_axis % w.ndim
        moved = list(w.shape)
        moved.insert(0, moved.pop(axis))
        return m.reshape(moved).movedim(0, axis)

    def as_matrix(self, w: Tensor) -> Tensor:
        """``w`` as ``(C, n)``: output channels (along ``channel_axis``) by flattened inputs.

        The layout in which groups are consecutive columns (``(out, in*kh*kw)`` for a Conv2d).
        """
        if w.ndim < 2:
            raise ValueError(f"as_matrix needs a tensor with at least two dimensions, got shape {tuple(w.shape)}")
        axis = self.channel_axis % w.ndim
        return w.movedim(axis, 0).reshape(w.shape[axis], -1)

    def from_matrix(self, m: Tensor, like: Tensor) -> Tensor:
        """Inverse of :meth:`as_matrix`: ``m`` of shape ``(C, n)`` back to the shape of ``like``."""
        return self._from_channels_first(m, like)

    def granularity_of(self, shape: tuple[int, ...]) -> str:
        """Granularity actually used for a tensor of ``shape``.

        ``"per-tensor"`` below two dimensions; ``"per-channel"`` when the input size is at most
        ``group_size`` (one group per channel).
        """
        if not self.per_channel or len(shape) < 2:
            return "per-tensor"
        axis = self.channel_axis % len(shape)
        n = 1
        for d, size in enumerate(shape):
            n *= 1 if d == axis else size
        return "per-group" if self.group_size is not None and n > self.group_size else "per-channel"

    def _grouped(self, w: Tensor) -> bool:
        return self.granularity_of(tuple(w.shape)) == "per-group"

    # ------------------------------------------------------------------ ranges
    def _base_range(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, beta) per row of ``flat`` (R, n) before any search."""
        p = self.percentile / 100.0
        if self.grid == "symmetric":
            m = torch.quantile(flat.abs(), p, dim=1) if self.range == "percentile" else flat.abs().amax(dim=1)
            return -m, m
        if self.range == "percentile":
            alpha, beta = torch.quantile(flat, 1 - p, dim=1), torch.quantile(flat, p, dim=1)
        else:
            alpha, beta = flat.amin(dim=1), flat.amax(dim=1)
        if self.grid == "unsigned":
            alpha = torch.zeros_like(alpha)
        return alpha, beta

    def _params_from_range(self, alpha: Tensor, beta: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = self.integer_range
        if self.grid == "symmetric":
            scale = torch.maximum(torch.maximum(-alpha, beta) / hi, eps)
            return scale, torch.zeros_like(scale)
        alpha = torch.clamp(alpha, max=0.0)
        beta = torch.clamp(beta, min=0.0)
        if self.grid == "full":
            scale = torch.maximum(torch.maximum(alpha / lo, beta / hi), eps)
            return scale, torch.zeros_like(scale)
        if self.grid == "unsigned":
            scale = torch.maximum(beta / hi, eps)
            return scale, torch.zeros_like(scale)
        scale = torch.maximum((beta - alpha) / (hi - lo), eps)
        zero = torch.clamp(torch.round(-alpha / scale), lo, hi)
        return scale, zero

    def row_qparams(self, rows: Tensor, eps: Tensor | float | None = None) -> QParams:
        """Parameters of each row of a 2-D tensor (one row = one channel, group or tensor).

        Parameters
        ----------
        rows : Tensor, shape (R, n)
        eps : Tensor or float, optional
            Smallest scale (default :func:`tensor_eps` of ``rows``); pass the whole tensor's
            so that per-group parameters match those of :meth:`qparams`.

        Returns
        -------
        QParams
            ``scale``, ``zero_point`` (and ``threshold`` for ternary) of shape ``(R, 1)``.
        """
        rows = rows.detach()
        if rows.ndim != 2:
            raise ValueError(f"row_qparams needs a 2-D tensor, got shape {tuple(rows.shape)}")
        eps = tensor_eps(rows) if eps is None else torch.as_tensor(eps, dtype=rows.dtype, device=rows.device)
        lo, hi = self.integer_range
        threshold = None
        if self._sign_grid:
            scale = torch.maximum(rows.abs().mean(dim=1), eps)
            zero = torch.zeros_like(scale)
        elif self.grid == "ternary":
            magnitude = rows.abs()
            threshold = TWN_THRESHOLD * magnitude.mean(dim=1)
            above = magnitude > threshold[:, None]
            count = above.sum(dim=1).clamp(min=1).to(rows.dtype)
            scale = torch.maximum((magnitude * above).sum(dim=1) / count, eps)
            zero = torch.zeros_like(scale)
            threshold = threshold[:, None]
        else:
            alpha, beta = self._base_range(rows)
            scale, zero = self._params_from_range(alpha, beta, eps)
            if self.range == "mse":
                scale, zero = self._mse_search(rows, alpha, beta, scale, zero, eps)
        return QParams(scale[:, None], zero[:, None], lo, hi, threshold)

    def qparams(self, w: Tensor) -> QParams:
        """Choose scale and zero point for ``w`` with this quantizer's range method.

        Returns
        -------
        QParams
            ``scale`` and ``zero_point`` shaped to broadcast against ``w`` (full shape of
            ``w`` per group; see :class:`QParams`).
        """
        w = w.detach()
        flat = self._channels_first(w)
        eps = tensor_eps(flat)
        if not self._grouped(w):
            return self.from_rows(self.row_qparams(flat, eps), w)
        channels, n = flat.shape
        size = self.group_size
        full = n // size * size
        parts = [self.row_qparams(flat[:, :full].reshape(-1, size), eps)]
        if full < n:
            parts.append(self.row_qparams(flat[:, full:], eps))
        return self.grouped_qparams(parts, w)

    def from_rows(self, rows: QParams, like: Tensor) -> QParams:
        """Per-channel (one row per channel) or per-tensor (one row) parameters shaped to broadcast against ``like``."""
        fields = [None if t is None else self._to_broadcast(t.reshape(-1), like) for t in (rows.scale, rows.zero_point, rows.threshold)]
        return QParams(fields[0], fields[1], rows.qmin, rows.qmax, fields[2])

    def grouped_qparams(self, parts: list[QParams], like: Tensor) -> QParams:
        """Assemble per-group row parameters into a :class:`QParams` for ``like``.

        Parameters
        ----------
        parts : list of QParams
            Row parameters (:meth:`row_qparams`) of the groups in order: each entry holds the
            groups of one or more whole group columns, channel-major (``C * k`` rows for ``k``
            group columns), the last group possibly short.
        like : Tensor
            The quantized tensor (for shape and channel axis).
        """
        channels, n = self._channels_first(like).shape

        def assemble(field: int) -> Optional[Tensor]:
            values = [p[field] for p in parts]
            if values[0] is None:
                return None
            per_group = torch.cat([v.reshape(channels, -1) for v in values], dim=1)
            return self._from_channels_first(expand_groups(per_group, n, self.group_size), like)

        return QParams(assemble(0), assemble(1), parts[0].qmin, parts[0].qmax, assemble(4), self.group_size)

    def _mse_search(self, flat: Tensor, alpha: Tensor, beta: Tensor, scale: Tensor, zero: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Shrink factors ``r = 1 - i / mse_grid`` minimising ``||Q_r(w) - w||^2`` per row.

        Candidates are evaluated in vectorised blocks (about 4e6 numbers at a time); ties keep
        the larger range (the first candidate), as a sequential scan would.
        """
        lo, hi = self.integer_range
        ratios = 1.0 - torch.arange(self.mse_grid, dtype=flat.dtype, device=flat.device) / self.mse_grid
        block = max(1, int(4e6 // max(1, flat.numel())))
        best_err = best_scale = best_zero = None
        for start in range(0, self.mse_grid, block):
            r = ratios[start : start + block, None]  # (R, 1)
            s_r, z_r = self._params_from_range(alpha[None] * r, beta[None] * r, eps)  # (R, C)
            q = fake_quantize(flat[None], s_r[..., None], z_r[..., None], lo, hi)
            err = ((q - flat[None]) ** 2).sum(dim=2)  # (R, C)
            idx = err.argmin(dim=0)  # first minimum = largest range among ties
            cols = torch.arange(err.shape[1], device=flat.device)
            err_b, s_b, z_b = err[idx, cols], s_r[idx, cols], z_r[idx, cols]
            if best_err is None:
                best_err, best_scale, best_zero = err_b, s_b, z_b
            else:
                better = err_b < best_err
                best_err = torch.where(better, err_b, best_err)
                best_scale = torch.where(better, s_b, best_scale)
                best_zero = torch.where(better, z_b, best_zero)
        return best_scale, best_zero

    # ------------------------------------------------------------------ maps
    def quantize_with(self, w: Tensor, params: QParams) -> Tensor:
        """Fake-quantize ``w`` with given parameters (differentiable only through STE wrappers)."""
        if self._sign_grid:
            return params.scale * _sign(w)
        if self.grid == "ternary":
            return params.scale * _ternary_codes(w, params.threshold)
        return fake_quantize(w, params.scale, params.zero_point, params.qmin, params.qmax)

    def codes(self, w: Tensor, params: QParams | None = None) -> Tensor:
        """Integer grid codes of ``w`` (signs ``-1/+1`` at 1 bit, ``-1/0/1`` ternary): used to count grid flips."""
        params = params or self.qparams(w)
        if self._sign_grid:
            return _sign(w).to(torch.int64)
        if self.grid == "ternary":
            return _ternary_codes(w, params.threshold).to(torch.int64)
        q = torch.clamp(torch.round(w / params.scale) + params.zero_point, params.qmin, params.qmax)
        return q.to(torch.int64)

    def __call__(self, w: Tensor) -> Tensor:
        """Fake-quantized copy of ``w`` (same shape and dtype)."""
        with torch.no_grad():
            return self.quantize_with(w, self.qparams(w))
