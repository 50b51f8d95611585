"""AdaRound (Nagel, Amjad, van Baalen, Louizos, Blankevoort 2020, arXiv 2004.10568): learned rounding per layer.

Every weight is rounded down or up, ``W_q = s * (clamp(floor(W/s) + z + h(V), q_min, q_max) - z)``
(docs/ptq_methods.md §5), with the rectified sigmoid ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``,
``zeta = 1.1``, ``gamma = -0.1``. ``V`` starts where ``h(V)`` is the fractional part of ``W/s``
(the soft weight equals ``W``) and minimises, with Adam,

    tr(D H D^T) + lambda * sum(1 - |2 h(V) - 1|^beta),   D = W - W_soft(V),

where ``H`` is the mean input second moment of the layer (:mod:`.calibration`), so the first term
is the layer's output reconstruction error ``||X W^T - X W_soft^T||_F^2`` per input row, exactly
(for layers linear in their weight) and without storing ``X``. ``beta`` is annealed linearly from
``beta_start`` to ``beta_end`` after a warm-up without the regulariser (BRECQ's schedule); at the
end the rounding is made hard (``h >= 1/2``, i.e. ``V >= 0``), so the result lies on the grid.
Scales and zero points are those of round-to-nearest at ``theta``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...objective import Objective
from ..qmap import QuantMap
from ..quantizers import QParams, UniformQuantizer
from .base import PTQConfig
from .layerwise import quantize_layerwise
from .options import check_calibration_options, check_fraction, check_integer

__all__ = ["AdaRound", "adaround_quantize", "adaround", "rectified_sigmoid", "ZETA", "GAMMA"]

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (Louizos et al. 2018 stretch)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_rectified_sigmoid(p: Tensor) -> Tensor:
    """``V`` with ``h(V) = p`` for ``p`` in ``[0, 1)`` (inside the unclamped part of ``h``)."""
    return torch.logit((p - GAMMA) / (ZETA - GAMMA))


@dataclass(frozen=True)
class AdaRound(PTQConfig):
    """AdaRound options (docs/ptq_methods.md §5).

    Parameters
    ----------
    iterations : int
        Adam steps per layer (the paper uses 10k-20k; the default is small for quick runs).
    lr : float
        Adam learning rate of ``V``.
    reg_weight : float
        ``lambda`` of the rounding regulariser (0.01 in the paper).
    beta_start, beta_end : float
        Annealing range of ``beta`` (20 to 2), ``beta_start >= beta_end > 0``.
    warmup : float
        Fraction of iterations without the regulariser before ``beta`` starts to decay, in ``[0, 1)``.
    calibration_samples, seed : int
        Size and seed of the calibration draw from the objective's data (docs/ptq_methods.md §3).
    """

    method: ClassVar[str] = "adaround"
    iterations: int = 500
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    calibration_samples: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer(self.iterations, "AdaRound iterations", 1)
        check_fraction(self.lr, "AdaRound lr", 0.0, math.inf, open_low=True)
        check_fraction(self.reg_weight, "AdaRound reg_weight", 0.0, math.inf)
        check_fraction(self.beta_end, "AdaRound beta_end", 0.0, math.inf, open_low=True)
        check_fraction(self.beta_start, "AdaRound beta_start (>= beta_end)", self.beta_end, math.inf)
        check_fraction(self.warmup, "AdaRound warmup", 0.0, 1.0)
        if self.warmup == 1.0:
            raise ValueError("AdaRound warmup must be below 1 (the regulariser must act), got 1.0")
        check_calibration_options(self, allow_none=False)

    def beta(self, step: int) -> float:
        """``beta`` at ``step`` (``0 <= step < iterations``): ``beta_start`` through the warm-up, then linear to ``beta_end``."""
        start = self.warmup * self.iterations
        progress = max(0.0, (step - start) / max(self.iterations - start, 1.0))
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - progress)

    def regularised(self, step: int) -> bool:
        """Whether the rounding regulariser is on at ``step`` (after the warm-up)."""
        return step >= self.warmup * self.iterations


def _gram_factor(hessian: Tensor) -> Tensor:
    """``L`` of shape ``(n, r)`` with ``L L^T = H`` on its range (``r`` = numerical rank of ``H``).

    ``tr(D H D^T) = ||D L||_F^2`` then costs ``O(C n r)`` per step instead of ``O(C n^2)`` when
    ``H`` has low rank (fewer calibration rows than inputs).
    """
    evals, evecs = torch.linalg.eigh(hessian)
    keep = evals > evals.max().clamp(min=0) * hessian.shape[0] * torch.finfo(hessian.dtype).eps
    return evecs[:, keep] * evals[keep].sqrt()


def _check_grid(quantizer: UniformQuantizer) -> None:
    if quantizer.bits == 1 or quantizer.grid == "ternary":
        raise ValueError("AdaRound learns whether w / s is rounded down or up; it does not apply to the 1-bit sign grid "
                         f"or the ternary grid (got {quantizer.describe()})")


def adaround_quantize(weight: Tensor, hessian: Tensor, quantizer: UniformQuantizer, like: Tensor | None = None,
                      config: AdaRound = AdaRound()) -> tuple[Tensor, QParams]:
    """AdaRound of one weight matrix.

    Parameters
    ----------
    weight : Tensor, shape (out, n)
        The layer's weight as a matrix (``quantizer.as_matrix``); computed in float64.
    hessian : Tensor, shape (n, n)
        The (mean) input second moment ``H``.
    quantizer : UniformQuantizer
        Grid and granularity; its round-to-nearest parameters at ``weight`` are kept.
    like : Tensor, optional
        The weight in its own shape (default ``weight``), for the shape of the parameters.
    config : AdaRound
        Iterations, learning rate and regulariser schedule.

    Returns
    -------
    quantized : Tensor, shape (out, n), float64
        Every entry rounded down or up from ``W/s`` and clamped to the grid.
    qparams : QParams
        Round-to-nearest parameters shaped for ``like``.
    """
    _check_grid(quantizer)
    like = weight if like is None else like
    W = weight.detach().to(torch.float64)
    H = hessian.detach().to(torch.float64)
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"hessian must have shape ({W.shape[1]}, {W.shape[1]}), got {tuple(H.shape)}")
    qparams = quantizer.qparams(like.detach())  # round-to-nearest's parameters, in like's dtype

    def matrix(t: Tensor) -> Tensor:
        return quantizer.as_matrix(t.to(torch.float64).expand(like.shape))

    scale, zero = matrix(qparams.scale), matrix(qparams.zero_point)
    factor = _gram_factor(H)
    floor = torch.floor(W / scale)
    v = _inverse_rectified_sigmoid(W / scale - floor).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=config.lr)

    def soft_weight(rounding: Tensor) -> Tensor:
        return scale * (torch.clamp(floor + zero + rounding, qparams.qmin, qparams.qmax) - zero)

    with torch.enable_grad():
        for step in range(config.iterations):
            optimizer.zero_grad()
            h = rectified_sigmoid(v)
            loss = ((W - soft_weight(h)) @ factor).pow(2).sum()  # tr(D H D^T) = ||D L||_F^2
            if config.regularised(step):
                loss = loss + config.reg_weight * (1 - (2 * h - 1).abs().pow(config.beta(step))).sum()
            loss.backward()
            optimizer.step()
    hard = (v.detach() >= 0).to(torch.float64)
    return soft_weight(hard), qparams


def adaround(config: AdaRound, objective: Objective, qmap: QuantMap, theta: Tensor) -> tuple:
    """Handler of :class:`AdaRound`: learned rounding of every Linear/Conv1d/Conv2d weight with inputs, RTN elsewhere."""
    _check_grid(qmap.quantizer)

    def layer(weight: Tensor, hessian: Tensor, quantizer: UniformQuantizer, like: Tensor) -> tuple[Tensor, QParams]:
        return adaround_quantize(weight, hessian, quantizer, like, config)

    return quantize_layerwise(objective, qmap, theta, layer, calibration_samples=config.calibration_samples, seed=config.seed)
