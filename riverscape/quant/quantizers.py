"""Uniform fake quantizers: grid, range calibration, and the rounding map.

Conventions (docs/theory.md §2.1-§2.5)::

    q_int(w) = clamp(round(w / s) + z, q_min, q_max)      # round half to even (torch.round)
    Q(w)     = s * (q_int(w) - z)

* symmetric (default): z = 0, restricted grid [-(2^(b-1) - 1), 2^(b-1) - 1] (2^b - 1 levels;
  2 bits is ternary {-s, 0, s}), s = M / (2^(b-1) - 1) for a range M;
* asymmetric: grid [0, 2^b - 1] (2^b levels), s = (beta - alpha) / (2^b - 1) with
  alpha <= 0 <= beta, z = round(-alpha / s);
* 1 bit: Q(w) = a * sgn(w), sgn(0) := +1, a = mean(|w|) per channel, the L2-optimal scale
  (XNOR-Net, Rastegari et al. 2016); the range method does not apply.

Per-channel scales run along ``channel_axis`` (axis 0 = output channels of Linear, Conv
and rows of Embedding); tensors with fewer than two dimensions get a per-tensor scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["UniformQuantizer", "QParams", "fake_quantize", "integer_grid", "RANGE_METHODS"]

RANGE_METHODS = ("minmax", "mse", "percentile")
MAX_BITS = 16


class QParams(NamedTuple):
    """Quantization parameters of one tensor, broadcastable against it.

    ``scale`` and ``zero_point`` have the tensor's number of dimensions (size 1 except
    along the channel axis). For ``bits == 1`` the grid is ``{-scale, +scale}`` and
    ``qmin, qmax = -1, 1`` name the two signs.
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int


def integer_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(q_min, q_max)`` of a ``bits``-bit grid (docs/theory.md §2.2 table).

    >>> integer_grid(2, True), integer_grid(2, False), integer_grid(8, True)
    ((-1, 1), (0, 3), (-127, 127))
    """
    if bits == 1:
        return -1, 1
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def fake_quantize(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``s * (clamp(round(w / s) + z, qmin, qmax) - z)``: the dequantized grid point of ``w``."""
    q = torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax)
    return scale * (q - zero_point)


def _sign(w: Tensor) -> Tensor:
    return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))


@dataclass(frozen=True)
class UniformQuantizer:
    """A uniform fake quantizer ``w -> Q(w)`` for 1 to 16 bits.

    Parameters
    ----------
    bits : int
        Bit-width, 1 to 16. ``bits=1`` is sign quantization with a per-channel scale.
    symmetric : bool
        Symmetric restricted grid with zero point 0 (default), or asymmetric (affine)
        with a zero point.
    per_channel : bool
        One scale per slice along ``channel_axis`` (default) or one per tensor.
    range : {"minmax", "mse", "percentile"}
        How the clipping range is chosen: the full min/max, the shrink factor that
        minimises ``||Q(w) - w||^2`` over a grid of ``mse_grid`` candidates (as in
        BRECQ/LAPQ with p = 2), or the ``percentile`` quantile of ``|w|``.
    percentile : float
        Quantile in percent for ``range="percentile"``.
    channel_axis : int
        Axis holding output channels.
    mse_grid : int
        Number of shrink factors ``r in (0, 1]`` tried by ``range="mse"``.

    Examples
    --------
    >>> q = UniformQuantizer(2, per_channel=False)
    >>> q(torch.tensor([-1.0, -0.4, 0.2, 0.6, 1.0]))
    tensor([-1., -0.,  0.,  1.,  1.])
    """

    bits: int
    symmetric: bool = True
    per_channel: bool = True
    range: str = "minmax"
    percentile: float = 99.9
    channel_axis: int = 0
    mse_grid: int = 100

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

    # ------------------------------------------------------------------ grid
    @property
    def grid(self) -> tuple[int, int]:
        """Integer range ``(q_min, q_max)``."""
        return integer_grid(self.bits, self.symmetric)

    @property
    def levels(self) -> int:
        """Number of distinct values a channel can take."""
        lo, hi = self.grid
        return 2 if self.bits == 1 else hi - lo + 1

    def describe(self) -> str:
        """Short human-readable name, e.g. ``"2-bit sym per-channel mse"``."""
        return (
            f"{self.bits}-bit {'sym' if self.symmetric else 'asym'} "
            f"{'per-channel' if self.per_channel else 'per-tensor'} {self.range}"
        )

    # ------------------------------------------------------------------ ranges
    def _reduce_dims(self, w: Tensor) -> tuple[int, ...]:
        if not self.per_channel or w.ndim < 2:
            return tuple(range(w.ndim))
        axis = self.channel_axis % w.ndim
        return tuple(d for d in range(w.ndim) if d != axis)

    def _channels_first(self, w: Tensor) -> Tensor:
        """``w`` as ``(C, rest)`` (C = 1 when per-tensor)."""
        if not self.per_channel or w.ndim < 2:
            return w.reshape(1, -1)
        return w.movedim(self.channel_axis % w.ndim, 0).reshape(w.shape[self.channel_axis % w.ndim], -1)

    def _to_broadcast(self, per_channel: Tensor, w: Tensor) -> Tensor:
        shape = [1] * w.ndim
        if self.per_channel and w.ndim >= 2:
            shape[self.channel_axis % w.ndim] = -1
        return per_channel.reshape(shape) if w.ndim else per_channel.reshape(())

    def _base_range(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, beta) per channel of ``flat`` (C, n) before any search."""
        if self.range == "percentile":
            p = self.percentile / 100.0
            if self.symmetric:
                m = torch.quantile(flat.abs(), p, dim=1)
                return -m, m
            return torch.quantile(flat, 1 - p, dim=1), torch.quantile(flat, p, dim=1)
        if self.symmetric:
            m = flat.abs().amax(dim=1)
            return -m, m
        return flat.amin(dim=1), flat.amax(dim=1)

    def _params_from_range(self, alpha: Tensor, beta: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = self.grid
        if self.symmetric:
            scale = torch.maximum(torch.maximum(-alpha, beta) / hi, eps)
            return scale, torch.zeros_like(scale)
        alpha = torch.clamp(alpha, max=0.0)
        beta = torch.clamp(beta, min=0.0)
        scale = torch.maximum((beta - alpha) / (hi - lo), eps)
        zero = torch.clamp(torch.round(-alpha / scale), lo, hi)
        return scale, zero

    def qparams(self, w: Tensor) -> QParams:
        """Choose scale and zero point for ``w`` with this quantizer's range method.

        Returns
        -------
        QParams
            ``scale`` and ``zero_point`` shaped to broadcast against ``w``.
        """
        w = w.detach()
        flat = self._channels_first(w)
        lo, hi = self.grid
        eps = 1e-8 * flat.abs().amax() + 1e-12
        if self.bits == 1:
            scale = torch.maximum(flat.abs().mean(dim=1), eps)
            return QParams(self._to_broadcast(scale, w), self._to_broadcast(torch.zeros_like(scale), w), -1, 1)
        alpha, beta = self._base_range(flat)
        scale, zero = self._params_from_range(alpha, beta, eps)
        if self.range == "mse":
            scale, zero = self._mse_search(flat, alpha, beta, scale, zero, eps)
        return QParams(self._to_broadcast(scale, w), self._to_broadcast(zero, w), lo, hi)

    def _mse_search(self, flat: Tensor, alpha: Tensor, beta: Tensor, scale: Tensor, zero: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Shrink factors ``r = 1 - i / mse_grid`` minimising ``||Q_r(w) - w||^2`` per channel.

        Candidates are evaluated in vectorised blocks (about 4e6 numbers at a time); ties keep
        the larger range (the first candidate), as a sequential scan would.
        """
        lo, hi = self.grid
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
        if self.bits == 1:
            return params.scale * _sign(w)
        return fake_quantize(w, params.scale, params.zero_point, params.qmin, params.qmax)

    def codes(self, w: Tensor, params: QParams | None = None) -> Tensor:
        """Integer grid codes of ``w`` (signs ``-1/+1`` at 1 bit): used to count grid flips."""
        params = params or self.qparams(w)
        if self.bits == 1:
            return _sign(w).to(torch.int64)
        q = torch.clamp(torch.round(w / params.scale) + params.zero_point, params.qmin, params.qmax)
        return q.to(torch.int64)

    def __call__(self, w: Tensor) -> Tensor:
        """Fake-quantized copy of ``w`` (same shape and dtype)."""
        with torch.no_grad():
            return self.quantize_with(w, self.qparams(w))


