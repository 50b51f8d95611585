"""Grid points near the full-precision weights that rounding misses.

Round-to-nearest picks, coordinate by coordinate, the grid point closest to ``theta_fp`` in
weight space; the grid points closest in *loss* may be a few code flips away (Nagel et al.
2020, AdaRound, arXiv 2004.10568, section 2: stochastic rounding beats nearest rounding on
ResNet18 in a sizeable fraction of draws). Two searches test that claim on an Objective, with
the quantization parameters frozen at ``theta``:

* :func:`greedy_flip_search`: from RTN, move one code at a time to a neighbouring grid level,
  ranking all moves by their second-order predicted loss change and measuring the best few;
* :func:`best_of_stochastic_rounding`: ``n`` stochastic roundings, the best one kept.

Both return a :class:`NearbySearchResult` (docs/ptq_search.md §3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..linalg import estimate_diagonal
from ..objective import Objective
from .grid import CoordinateGrid
from .qmap import QuantizerLike, resolve_quant_map

__all__ = ["NearbySearchResult", "greedy_flip_search", "best_of_stochastic_rounding"]


@dataclass(frozen=True)
class NearbySearchResult:
    """The best grid point a search found, next to the FP and RTN points.

    Attributes
    ----------
    method : {"greedy_flip", "stochastic_rounding"}
    theta_best : Tensor, shape (D,)
        The best point (on the grid of the frozen quantization parameters); not in :meth:`to_dict`.
    loss_fp, loss_rtn, loss_best : float
        Measured losses at ``theta``, at ``RTN(theta)`` and at ``theta_best``.
    flips : int
        Hamming distance in codes between ``theta_best`` and RTN.
    trajectory : tuple of float
        Greedy: measured loss at the start point, then after every accepted flip (strictly
        decreasing). Stochastic rounding: empty.
    sample_losses : tuple of float
        Stochastic rounding: the loss of every draw. Greedy: empty.
    evaluations : int
        Points whose loss was measured (besides FP, RTN and the start point).
    curvature : str or None
        Greedy: how the Hessian diagonal of the score was computed (``"exact"``, from unit
        vectors, or ``"hutchinson"``). ``None`` for stochastic rounding.
    stop_reason : str
        Why the search ended.
    """

    method: str
    theta_best: Tensor
    loss_fp: float
    loss_rtn: float
    loss_best: float
    flips: int
    trajectory: tuple[float, ...] = ()
    sample_losses: tuple[float, ...] = ()
    evaluations: int = 0
    curvature: Optional[str] = None
    stop_reason: str = ""

    @property
    def damage_removed(self) -> float:
        """``(L_rtn - L_best) / (L_rtn - L_fp)``: the fraction of the PTQ damage removed (NaN when RTN does no damage)."""
        damage = self.loss_rtn - self.loss_fp
        return (self.loss_rtn - self.loss_best) / damage if damage > 0 else math.nan

    def to_dict(self) -> dict:
        """JSON-friendly summary (no ``theta_best``; NaN as ``None``)."""
        removed = self.damage_removed
        out = {
            "method": self.method,
            "loss_fp": self.loss_fp,
            "loss_rtn": self.loss_rtn,
            "loss_best": self.loss_best,
            "damage_removed": None if math.isnan(removed) else removed,
            "flips": self.flips,
            "trajectory": list(self.trajectory),
            "sample_losses": list(self.sample_losses),
            "evaluations": self.evaluations,
            "curvature": self.curvature,
            "stop_reason": self.stop_reason,
        }
        if self.sample_losses:
            samples = torch.tensor(self.sample_losses, dtype=torch.float64)
            out["sample_mean"] = float(samples.mean())
            out["sample_std"] = float(samples.std()) if samples.numel() > 1 else 0.0
            out["fraction_below_rtn"] = float((samples < self.loss_rtn).double().mean())
        return out


def _start(objective: Objective, quantizer: QuantizerLike, theta: Optional[Tensor]) -> tuple[Tensor, CoordinateGrid, Tensor]:
    qmap = resolve_quant_map(objective, quantizer)
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    grid = CoordinateGrid.build(qmap, theta)
    return theta, grid, grid.codes(theta)


def greedy_flip_search(
    objective: Objective,
    quantizer: QuantizerLike,
    theta: Optional[Tensor] = None,
    *,
    theta_q: Optional[Tensor] = None,
    max_flips: Optional[int] = None,
    candidates_per_round: int = 16,
    rounds: int = 50,
    diagonal_matvecs: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> NearbySearchResult:
    """Greedy descent over single code flips from the RTN point, ranked by a second-order score.

    The quantization parameters are frozen at ``theta``. Each round, at the current grid point
    ``p``, every move of one quantized coordinate ``j`` to a neighbouring level (one step up or
    down within ``[q_min, q_max]``; at one bit the sign flip) changes it by ``d_j`` and is
    scored by ``g_j d_j + 0.5 H_jj d_j^2`` (``g = grad L(p)``, ``H_jj`` the Hessian diagonal at
    ``p``); the ``candidates_per_round`` lowest scores are measured in one batched
    ``objective.losses`` call and the best is accepted when it lowers the measured loss.
    The search stops when no measured move lowers the loss, when no move is allowed, or after
    ``rounds`` rounds. For a quadratic loss the score is the exact loss change of the move.
    Cost per round: one gradient, ``min(D, diagonal_matvecs)`` HVPs and
    ``candidates_per_round`` losses. docs/ptq_search.md §3.1.

    Parameters
    ----------
    objective : Objective
    quantizer : int, UniformQuantizer or QuantMap
    theta : Tensor, optional
        Full-precision point (default ``objective.theta0``); sets the grid and RTN.
    theta_q : Tensor, optional
        Start point on the same grid (e.g. another PTQ method's output); default RTN.
    max_flips : int, optional
        Only visit points within this Hamming distance (in codes) of the start point.
    candidates_per_round : int
        Moves measured per round.
    rounds : int
        Maximum number of rounds (accepted flips).
    diagonal_matvecs : int
        The Hessian diagonal is exact (``D`` unit-vector HVPs) when ``D <= diagonal_matvecs``,
        else Hutchinson's estimate with this many Rademacher probes
        (:func:`riverscape.linalg.estimate_diagonal`, seeded by ``seed + round``).
    seed : int
    progress : bool
        Show a tqdm bar over the rounds.

    Returns
    -------
    NearbySearchResult
    """
    for name, value, low in (("candidates_per_round", candidates_per_round, 1), ("rounds", rounds, 0),
                             ("diagonal_matvecs", diagonal_matvecs, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_flips is not None and (isinstance(max_flips, bool) or not isinstance(max_flips, int) or max_flips < 0):
        raise ValueError(f"max_flips must be None or an integer >= 0, got {max_flips!r}")
    theta, grid, rtn_codes = _start(objective, quantizer, theta)
    rtn = grid.point(theta, rtn_codes)
    if theta_q is None:
        point, codes = rtn, rtn_codes
    else:
        point = objective.check_theta(theta_q)
        codes = grid.codes(point)
        if not torch.allclose(grid.point(point, codes), point, rtol=1e-12, atol=0.0):
            raise ValueError("theta_q is not on the grid of the quantization parameters chosen at theta")
    start_codes = codes.clone()
    fp_loss, rtn_loss, loss = (float(v) for v in objective.losses(torch.stack([theta, rtn, point])))
    trajectory, evaluations, curvature = [loss], 0, None
    stop = f"round limit ({rounds})"
    bar = tqdm(range(rounds), desc="greedy flips", disable=not progress, leave=False)
    for r in bar:
        positions, new_codes = grid.neighbours(codes)
        if max_flips is not None:
            distance = int((codes != start_codes).sum())
            after = distance - (codes[positions] != start_codes[positions]).long() + (new_codes != start_codes[positions]).long()
            positions, new_codes = positions[after <= max_flips], new_codes[after <= max_flips]
        if positions.numel() == 0:
            stop = "no allowed move"
            break
        coords = grid.index[positions]
        new_values = (grid.scale[positions] * (new_codes.to(point.dtype) - grid.zero[positions])).to(point.dtype)
        d = new_values - point[coords]
        diagonal = estimate_diagonal(objective.hessian(point), matvecs=diagonal_matvecs, seed=seed + r)
        curvature = diagonal.method
        h = diagonal.values.to(device=point.device, dtype=point.dtype)[coords]
        score = objective.grad(point)[coords] * d + 0.5 * h * d**2
        top = torch.argsort(score)[:candidates_per_round]
        trials = point.repeat(top.numel(), 1)
        trials[torch.arange(top.numel(), device=point.device), coords[top]] = new_values[top]
        losses = objective.losses(trials)
        evaluations += top.numel()
        best = int(torch.argmin(losses))
        if not float(losses[best]) < loss:
            stop = "no measured move lowers the loss"
            break
        point, loss = trials[best].clone(), float(losses[best])
        codes = codes.clone()
        codes[positions[top[best]]] = new_codes[top[best]]
        trajectory.append(loss)
        bar.set_postfix(loss=f"{loss:.4g}")
    bar.close()
    return NearbySearchResult(
        "greedy_flip", point, fp_loss, rtn_loss, loss, int((codes != rtn_codes).sum()), tuple(trajectory),
        (), evaluations, curvature, stop,
    )


def best_of_stochastic_rounding(
    objective: Objective,
    quantizer: QuantizerLike,
    theta: Optional[Tensor] = None,
    *,
    n: int = 64,
    seed: int = 0,
) -> NearbySearchResult:
    """The best of ``n`` stochastic roundings of ``theta`` (one batched loss evaluation).

    Each quantized coordinate rounds up with probability equal to its fractional part on the
    grid (:meth:`CoordinateGrid.stochastic_codes`), independently, with the quantization
    parameters frozen at ``theta``; the unquantized coordinates keep ``theta``'s values.
    docs/ptq_search.md §3.2.

    Parameters
    ----------
    objective : Objective
    quantizer : int, UniformQuantizer or QuantMap
    theta : Tensor, optional
        Full-precision point (default ``objective.theta0``).
    n : int
        Number of draws.
    seed : int
        Seeds a private ``torch.Generator``.

    Returns
    -------
    NearbySearchResult
        With every draw's loss in ``sample_losses``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    theta, grid, rtn_codes = _start(objective, quantizer, theta)
    codes = grid.stochastic_codes(theta, n, torch.Generator().manual_seed(seed))
    points = grid.point(theta.expand(n, -1), codes)
    fp_loss, rtn_loss = (float(v) for v in objective.losses(torch.stack([theta, grid.point(theta, rtn_codes)])))
    losses = objective.losses(points)
    best = int(torch.argmin(losses))
    return NearbySearchResult(
        "stochastic_rounding", points[best].clone(), fp_loss, rtn_loss, float(losses[best]),
        int((codes[best] != rtn_codes).sum()), (), tuple(float(v) for v in losses), n, None, f"{n} draws",
    )
