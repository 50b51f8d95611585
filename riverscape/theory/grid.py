"""The fixed scalar grid ``Q`` of the teacher-student theory (docs/theory.md §8.1)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..quant.quantizers import fake_quantize

__all__ = ["GridQuantizer", "QUANTIZER_KINDS"]

QUANTIZER_KINDS = ("mid_tread", "mid_rise")


@dataclass(frozen=True)
class GridQuantizer:
    """Scalar b-bit uniform quantizer of range R (docs/theory.md §8.1), per coordinate.

    * ``mid_tread``: levels ``k s``, ``|k| <= 2^(b-1) - 1``, ``s = R / (2^(b-1) - 1)``; 0 is a level,
      thresholds at ``(k + 1/2) s``; needs ``bits >= 2`` (2 bits = ternary ``{-R, 0, R}``).
    * ``mid_rise``: ``2^b`` levels ``(k + 1/2) s`` on ``[-R, R]``, ``s = 2R / 2^b``; thresholds at
      ``k s`` (0 is a threshold); ``bits = 1`` is ``(R/2) sign(w)``.

    Both are ``fake_quantize`` of :mod:`riverscape.quant.quantizers` (mid-rise shifted by ``s/2``).

    Why not :class:`riverscape.quant.UniformQuantizer`: the theory needs ``Q`` to be one fixed
    function of a scalar. UniformQuantizer calibrates its scale from the tensor it quantizes
    (min/max, MSE or percentile range, per channel, and ``mean|w|`` at 1 bit), so its ``Q(w_i)``
    depends on every other coordinate and moves as training moves them; the mean-field
    equation, the escape times and the dithering error assume the range ``R`` given a priori.
    UniformQuantizer also has no mid-rise grid at 2 or more bits (its asymmetric grid is affine
    with a data-dependent zero point). The mid-tread grid here equals UniformQuantizer's
    symmetric grid at scale ``s = R / (2^(b-1) - 1)``: both call the same ``fake_quantize``.

    >>> GridQuantizer(2, 1.5).levels
    (-1.5, 0.0, 1.5)
    >>> GridQuantizer(2, 2.0, "mid_rise").levels
    (-1.5, -0.5, 0.5, 1.5)
    """

    bits: int
    range: float
    kind: str = "mid_tread"

    def __post_init__(self) -> None:
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"unknown quantizer kind {self.kind!r}; choose one of {QUANTIZER_KINDS}")
        min_bits = 2 if self.kind == "mid_tread" else 1
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not min_bits <= self.bits <= 16:
            raise ValueError(f"bits must be an integer from {min_bits} to 16 for {self.kind}, got {self.bits!r}")
        if not self.range > 0:
            raise ValueError(f"range must be positive, got {self.range}")

    @property
    def _kmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.kind == "mid_tread" else 2 ** (self.bits - 1)

    @property
    def step(self) -> float:
        """Grid step ``s``."""
        return self.range / self._kmax if self.kind == "mid_tread" else 2.0 * self.range / 2**self.bits

    @property
    def levels(self) -> tuple[float, ...]:
        """All grid values, ascending."""
        s, k = self.step, self._kmax
        if self.kind == "mid_tread":
            return tuple(float(j * s) for j in range(-k, k + 1))
        return tuple(float((j + 0.5) * s) for j in range(-k, k))

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Decision boundaries between adjacent levels, ascending."""
        lv = self.levels
        return tuple(0.5 * (a + b) for a, b in zip(lv[:-1], lv[1:]))

    def __call__(self, w: Tensor) -> Tensor:
        """``Q(w)`` elementwise (any shape, any float dtype)."""
        s, k = self.step, self._kmax  # python scalars: no tensor allocation per call (hot loop)
        if self.kind == "mid_tread":
            return fake_quantize(w, s, 0.0, -k, k)
        return fake_quantize(w - 0.5 * s, s, 0.0, -k, k - 1) + 0.5 * s

    def quantize_(self, w: Tensor, out: Tensor) -> Tensor:
        """``Q(w)`` written into ``out`` with in-place ops (the simulator's hot loop); equals ``self(w)``."""
        s, k = self.step, self._kmax
        if self.kind == "mid_tread":
            torch.mul(w, 1.0 / s, out=out).round_().clamp_(-k, k)
            return out.mul_(s)
        torch.mul(w, 1.0 / s, out=out).sub_(0.5).round_().clamp_(-k, k - 1)
        return out.add_(0.5).mul_(s)

    def numpy(self, w: np.ndarray) -> np.ndarray:
        """``Q(w)`` for a float64 numpy array."""
        return self(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64))).numpy()
