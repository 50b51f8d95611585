"""The quantization grid of every quantized coordinate of ``theta``, as flat tensors.

A :class:`CoordinateGrid` fixes the quantization parameters (e.g. calibrated at the
full-precision point) and describes, for each quantized coordinate ``j``, its step ``s_j``,
zero point ``z_j`` and integer range ``[q_min, q_max]``: the grid points are
``s_j (q - z_j)``, and at one bit ``{-s_j, +s_j}`` with codes ``-1, +1``. Searches over grid
points (:mod:`riverscape.quant.nearby`) move codes and dequantize them here. It is built only
from the public :class:`~riverscape.quant.qmap.QuantMap` API (``targets``, ``qparams``,
``codes``, ``__call__``) and checks itself against ``qmap(theta, qparams)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .qmap import QuantMap
from .quantizers import QParams

__all__ = ["CoordinateGrid"]


@dataclass(frozen=True)
class CoordinateGrid:
    """Per-coordinate grids of a :class:`QuantMap` with frozen quantization parameters.

    Attributes
    ----------
    qmap : QuantMap
    qparams : list of QParams
        One per target of ``qmap`` (fixed).
    index : Tensor of int64, shape (M,)
        Positions in ``theta`` of the quantized coordinates, in ``qmap.codes`` order.
    scale, zero : Tensor, shape (M,)
        Step and zero point of each quantized coordinate.
    qmin, qmax : Tensor of int64, shape (M,)
        Integer range of each coordinate.
    binary : Tensor of bool, shape (M,)
        Coordinates of 1-bit targets (codes ``-1, +1``, no zero code).
    """

    qmap: QuantMap
    qparams: tuple[QParams, ...]
    index: Tensor
    scale: Tensor
    zero: Tensor
    qmin: Tensor
    qmax: Tensor
    binary: Tensor

    @classmethod
    def build(cls, qmap: QuantMap, theta: Tensor, qparams: Sequence[QParams] | None = None) -> "CoordinateGrid":
        """The grid of ``qmap`` with ``qparams`` (default: calibrated at ``theta``).

        Raises
        ------
        ValueError
            When the quantization parameters do not broadcast to per-coordinate values that
            reproduce ``qmap(theta, qparams)`` (a quantizer whose grid is not ``s (q - z)``).
        """
        qparams = tuple(qmap.qparams(theta) if qparams is None else qparams)
        if len(qparams) != len(qmap.targets):
            raise ValueError(f"got {len(qparams)} qparams for {len(qmap.targets)} quantized tensors")
        parts: dict[str, list[Tensor]] = {k: [] for k in ("index", "scale", "zero", "qmin", "qmax", "binary")}
        for i, (target, params) in enumerate(zip(qmap.targets, qparams)):
            shape, n = target.spec.shape, target.spec.numel
            try:
                scale = torch.broadcast_to(params.scale, shape).reshape(-1)
                zero = torch.broadcast_to(params.zero_point, shape).reshape(-1)
            except RuntimeError:
                raise ValueError(f"the quantization parameters of {target.name} do not broadcast to its shape {shape}") from None
            parts["index"].append(torch.arange(target.spec.offset, target.spec.offset + n, device=theta.device))
            parts["scale"].append(scale.to(theta.dtype))
            parts["zero"].append(zero.to(theta.dtype))
            parts["qmin"].append(torch.full((n,), int(params.qmin), dtype=torch.int64, device=theta.device))
            parts["qmax"].append(torch.full((n,), int(params.qmax), dtype=torch.int64, device=theta.device))
            parts["binary"].append(torch.full((n,), qmap.quantizer_for(i).bits == 1, dtype=torch.bool, device=theta.device))
        grid = cls(qmap, qparams, **{k: torch.cat(v) for k, v in parts.items()})
        expected = qmap(theta, list(qparams))
        if not torch.allclose(grid.point(expected, grid.codes(theta)), expected, rtol=1e-12, atol=0.0):
            raise ValueError("the quantizer's grid is not s * (q - z) per coordinate; the grid search does not apply")
        return grid

    @property
    def size(self) -> int:
        """Number of quantized coordinates ``M``."""
        return int(self.index.numel())

    def codes(self, theta: Tensor) -> Tensor:
        """Integer codes of ``theta``'s quantized coordinates with the frozen parameters, shape ``(M,)``."""
        return self.qmap.codes(theta, list(self.qparams))

    def values(self, codes: Tensor) -> Tensor:
        """Dequantized grid values ``s (q - z)`` of ``codes`` (shape ``(..., M)``)."""
        return self.scale * (codes.to(self.scale.dtype) - self.zero)

    def point(self, theta: Tensor, codes: Tensor) -> Tensor:
        """``theta`` with its quantized coordinates set to the grid values of ``codes`` (a copy)."""
        out = theta.clone()
        out[..., self.index] = self.values(codes).to(theta.dtype)
        return out

    def neighbours(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Every single-coordinate move to a neighbouring grid level.

        One step up and one step down within ``[q_min, q_max]``; at one bit the sign flip.

        Returns
        -------
        positions : Tensor of int64, shape (K,)
            Which quantized coordinate (``0..M-1``) moves.
        new_codes : Tensor of int64, shape (K,)
            Its code after the move.
        """
        m = torch.arange(self.size, device=codes.device)
        up_ok = (codes + 1 <= self.qmax) & ~self.binary
        down_ok = (codes - 1 >= self.qmin) & ~self.binary
        positions = torch.cat([m[up_ok], m[down_ok], m[self.binary]])
        new_codes = torch.cat([codes[up_ok] + 1, codes[down_ok] - 1, -codes[self.binary]])
        return positions, new_codes

    def stochastic_codes(self, theta: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """``n`` stochastic roundings of ``theta``'s quantized coordinates, codes of shape ``(n, M)``.

        With ``u = w / s + z``: code ``floor(u) + 1`` with probability ``u - floor(u)`` (the
        fractional part), else ``floor(u)``, then clamped to ``[q_min, q_max]``; unbiased
        (``E[s (q - z)] = w``) inside the range (Gupta et al. 2015, arXiv 1502.02551). At one bit
        the grid ``{-s, +s}`` has spacing ``2 s``: code ``+1`` with probability
        ``clamp((w / s + 1) / 2, 0, 1)``. Uniform draws come from ``generator`` on the CPU.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        u = theta[self.index] / self.scale + self.zero
        draws = torch.rand(n, self.size, generator=generator, dtype=u.dtype).to(u.device)
        low = torch.floor(u)
        stepped = (low + (draws < (u - low)).to(u.dtype)).to(torch.int64)
        stepped = torch.maximum(torch.minimum(stepped, self.qmax), self.qmin)
        p_plus = torch.clamp((u + 1.0) / 2.0, 0.0, 1.0)
        signs = torch.where(draws < p_plus, 1, -1).to(torch.int64)
        return torch.where(self.binary, signs, stepped)
