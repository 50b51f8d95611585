"""Uncertainty over independent replicas for the teacher-student experiments (docs/theory.md §8).

Every replica of :func:`~riverscape.theory.teacher_student.simulate_ste` and
:func:`~riverscape.theory.binary_perceptron.train_binary_ste` is an independent unit (own teacher,
data and initialisation; docs/statistics.md §1). Per-replica numbers get a Student t interval
(:func:`replica_summary`); statistics of a whole design (a power-law exponent over d, the crossing
of a mean curve) get a percentile interval from a bootstrap that resamples the replicas within
each cell (:func:`bootstrap_estimates`, over :func:`riverscape.stats.stratified_bootstrap`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats

from .. import stats
from ..io.jsonable import Record
from .teacher_student import plateau_length

__all__ = [
    "BootstrapEstimate",
    "bootstrap_estimates",
    "replica_summary",
    "proportion_summary",
    "power_law_exponent",
    "power_law_fit_ci",
    "seed_slopes",
    "replica_final_errors",
    "replica_plateaus",
    "spread_rms",
    "spread_exponent",
]


@dataclass(frozen=True)
class BootstrapEstimate(Record):
    """A statistic of the whole design with its percentile bootstrap interval.

    Attributes
    ----------
    estimate : float
        The statistic on the data (NaN when undefined there).
    low, high : float
        The ``(1 -+ level)/2`` quantiles of the defined replicates (NaN when fewer than half of
        the replicates are defined: the interval would describe a different statistic).
    level : float
        Nominal coverage.
    n : int
        Independent units (replicas over all cells) the bootstrap resampled.
    n_boot, valid : int
        Resamples drawn, and those on which the statistic was defined (finite).
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int
    n_boot: int
    valid: int

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}] (n={self.n}, {self.valid}/{self.n_boot} resamples defined)"


def bootstrap_estimates(
    groups: Sequence,
    statistic: Callable[[list[np.ndarray]], float | np.ndarray],
    *,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[BootstrapEstimate]:
    """``statistic(groups)`` with percentile intervals from a bootstrap within groups.

    Parameters
    ----------
    groups : sequence of array_like
        One array per cell; its rows are the cell's independent replicas (columns of a row stay
        together, which keeps paired measurements paired). See :func:`riverscape.stats.stratified_bootstrap`.
    statistic : callable
        List of arrays -> number or 1-D array of ``k`` numbers; NaN where undefined.
    level, n_boot, seed
        Coverage, resamples, seed of the private generator.

    Returns
    -------
    list of BootstrapEstimate
        One per component of the statistic (length 1 for a scalar statistic).
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    estimate = np.atleast_1d(np.asarray(statistic(arrays), dtype=np.float64))
    reps = stats.stratified_bootstrap(arrays, statistic, n_boot=n_boot, seed=seed).reshape(n_boot, -1)
    units = int(sum(a.shape[0] for a in arrays))
    alpha = (1.0 - level) / 2
    out = []
    for j, value in enumerate(estimate):
        finite = reps[np.isfinite(reps[:, j]), j]
        if finite.size * 2 >= n_boot:
            low, high = (float(q) for q in np.quantile(finite, [alpha, 1.0 - alpha]))
        else:
            low = high = math.nan
        out.append(BootstrapEstimate(float(value), low, high, float(level), units, int(n_boot), int(finite.size)))
    return out


def replica_summary(values, *, level: float = 0.95) -> dict:
    """Mean (``estimate``), Student t interval and n of the finite per-replica ``values`` (docs/statistics.md §2.1).

    NaN entries (e.g. a replica whose plateau is undefined) are left out of ``n`` and counted in
    ``undefined``; with fewer than two finite values the interval is NaN. Equal values give a
    zero-width interval. ``values`` is returned too, so tables and JSON carry the raw numbers the
    interval rests on.

    >>> s = replica_summary([1.0, 2.0, 3.0])
    >>> round(s["low"], 3), s["n"]
    (-0.484, 3)
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = x[np.isfinite(x)]
    row = {"estimate": float(finite.mean()) if finite.size else math.nan, "low": math.nan, "high": math.nan, "level": float(level),
           "n": int(finite.size), "undefined": int(x.size - finite.size), "values": x.tolist()}
    if finite.size >= 2:
        interval = stats.mean_ci(finite, level=level, method="t")
        row.update(low=interval.low, high=interval.high)
    return row


def proportion_summary(successes, *, level: float = 0.95) -> dict:
    """Share of successes with its Wilson score interval (scipy), n and the raw 0/1 values.

    Unlike a t interval on 0/1 data it does not collapse to zero width when every replica agrees
    (16 of 16 successes: [0.806, 1]).

    >>> s = proportion_summary([1, 1, 1, 1])
    >>> s["estimate"], round(s["low"], 3), s["high"], s["n"]
    (1.0, 0.51, 1.0, 4)
    """
    x = np.asarray(successes, dtype=np.float64).reshape(-1)
    if x.size == 0 or not np.all((x == 0) | (x == 1)):
        raise ValueError("successes must be a non-empty sequence of 0/1 (or bool) values")
    k = int(x.sum())
    ci = scipy_stats.binomtest(k, x.size).proportion_ci(confidence_level=level, method="wilson")
    return {"estimate": k / x.size, "low": float(ci.low), "high": float(ci.high), "level": float(level), "n": int(x.size),
            "undefined": 0, "values": x.tolist()}


def power_law_exponent(x, y) -> float:
    """Least-squares slope of ``log y`` on ``log x``: the exponent ``p`` of ``y ~ c x^p``.

    Pairs with a non-finite or non-positive ``y`` are left out; NaN with fewer than two pairs left.

    >>> round(power_law_exponent([1, 2, 4], [3.0, 12.0, 48.0]), 12)
    2.0
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if np.any(x <= 0):
        raise ValueError("x must be positive")
    ok = np.isfinite(y) & (y > 0)
    if ok.sum() < 2:
        return math.nan
    lx, ly = np.log(x[ok]), np.log(y[ok])
    lx = lx - lx.mean()
    return float(np.dot(lx, ly - ly.mean()) / np.dot(lx, lx))


def power_law_fit_ci(x, y, *, level: float = 0.95) -> dict:
    """Exponent of ``y ~ c x^p`` by least squares on logs, with the regression's Student t interval.

    ``p +- t_{m-2} se(p)`` over the ``m`` points (``scipy.stats.linregress``): valid when the
    scatter of ``log y`` about the line is independent with constant variance. NaN interval for
    ``m < 3``; an exact power law gives a zero-width interval.

    >>> fit = power_law_fit_ci([1, 2, 4, 8], [5.0, 2.5, 1.25, 0.625])
    >>> round(fit["estimate"], 12), round(fit["high"] - fit["low"], 12), fit["n"]
    (-1.0, 0.0, 4)
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or np.any(x <= 0) or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("x and y must be 1-D of the same length with positive finite values")
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("need at least two distinct x")
    fit = scipy_stats.linregress(np.log(x), np.log(y))
    row = {"estimate": float(fit.slope), "low": math.nan, "high": math.nan, "level": float(level), "n": int(x.size),
           "prefactor": float(math.exp(fit.intercept))}
    if x.size >= 3:
        half = float(scipy_stats.t.ppf(0.5 + level / 2, x.size - 2)) * float(fit.stderr)
        row.update(low=float(fit.slope) - half, high=float(fit.slope) + half)
    return row


def seed_slopes(x, y) -> np.ndarray:
    """Least-squares slope of ``y[:, i]`` on ``x`` for every seed ``i`` (NaN rows of a seed left out).

    Parameters
    ----------
    x : array_like, shape (m,)
        The regressor (e.g. the quantization range R of m configurations).
    y : array_like, shape (m, seeds)
        One column per seed; entry ``(j, i)`` is seed i measured at ``x[j]``.

    Returns
    -------
    numpy.ndarray, shape (seeds,)
        NaN for a seed with fewer than two defined points.

    >>> seed_slopes([0.0, 1.0, 2.0], [[1.0, 0.0], [3.0, 1.0], [5.0, 2.0]]).tolist()
    [2.0, 1.0]
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 2 or y.shape[0] != x.size:
        raise ValueError(f"need x of shape (m,) and y of shape (m, seeds), got {x.shape} and {y.shape}")
    out = np.full(y.shape[1], math.nan)
    for i in range(y.shape[1]):
        ok = np.isfinite(y[:, i])
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            xc = x[ok] - x[ok].mean()
            out[i] = float(np.dot(xc, y[ok, i]) / np.dot(xc, xc))
    return out


# ---------------------------------------------------------------------- the linear STE model
def _curves(taus, eps) -> tuple[np.ndarray, np.ndarray]:
    t, e = np.asarray(taus, dtype=np.float64), np.asarray(eps, dtype=np.float64)
    if t.ndim != 1 or e.ndim != 2 or e.shape[1] != t.size or t.size == 0:
        raise ValueError(f"need taus of shape (T,) and eps of shape (replicas, T), got {t.shape} and {e.shape}")
    return t, e


def replica_final_errors(taus, eps, *, tail: float = 0.2) -> np.ndarray:
    """Final error of each replica: the mean of its ``eps`` over the last ``tail`` share of the samples.

    The same window as the experiment's mean curve (``int((1 - tail) T)`` onwards), so the mean of
    these values is the final value of the mean curve.

    >>> replica_final_errors([0, 1, 2, 3, 4], [[1, 1, 1, 0.5, 0.25], [1, 1, 1, 0.75, 0.25]], tail=0.4).tolist()
    [0.375, 0.5]
    """
    t, e = _curves(taus, eps)
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    start = min(int((1.0 - tail) * t.size), t.size - 1)
    return e[:, start:].mean(axis=1)


def replica_plateaus(taus, eps, *, fraction: float = 0.1) -> np.ndarray:
    """:func:`~riverscape.theory.teacher_student.plateau_length` of each replica's own curve (NaN where undefined)."""
    t, e = _curves(taus, eps)
    return np.array([plateau_length(t, row, fraction) for row in e])


def spread_rms(eps) -> np.ndarray | float:
    """Root mean square over time of the standard deviation (ddof=1) of ``eps`` across replicas.

    ``eps`` has shape ``(..., replicas, T)``; the result drops the last two axes. Two or more
    replicas are needed.

    >>> float(spread_rms([[0.0, 1.0], [0.0, 3.0]]))
    1.0
    """
    e = np.asarray(eps, dtype=np.float64)
    if e.ndim < 2 or e.shape[-2] < 2:
        raise ValueError(f"eps needs shape (..., replicas >= 2, T), got {e.shape}")
    sd = e.std(axis=-2, ddof=1)
    return np.sqrt(np.mean(sd**2, axis=-1))


def spread_exponent(dims: Sequence[int], eps_by_dim: Sequence, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Exponent ``p`` of ``spread_rms ~ d^p`` over seeds, with a bootstrap interval over replicas.

    The replicas of each d are resampled within that d (they are independent runs), the spread of
    every d recomputed, and ``p`` refitted (:func:`power_law_exponent`). The mean-field limit
    predicts ``p = -1/2`` (docs/theory.md §8.1: fluctuations of ``eps`` are ``O(1/sqrt d)``).
    Resamples in which a d draws one replica only have zero spread and leave ``p`` undefined;
    ``valid`` counts the others.

    Parameters
    ----------
    dims : sequence of int
        The dimensions, at least two distinct.
    eps_by_dim : sequence of array_like
        ``eps`` of shape ``(replicas_d, T)`` for each d (same T not required; ``replicas_d >= 2``).

    Returns
    -------
    dict
        ``exponent`` (:class:`BootstrapEstimate`, n = all replicas), ``exponent_regression`` (the
        same slope with the regression's t interval over the d, :func:`power_law_fit_ci`),
        ``spread`` (one :class:`BootstrapEstimate` of ``spread_rms`` per d, n = its replicas),
        ``replicas`` (per d).

    Notes
    -----
    The percentile bootstrap of a standard deviation from a few replicas is biased low (a
    resample repeats replicas) and its interval too narrow; the bias grows as the replica count
    falls, so d with fewer replicas pull the bootstrap exponents slightly down. Compare with the
    regression interval, which instead assumes independent scatter of ``log spread`` about the line.
    """
    if len(dims) != len(eps_by_dim) or len(set(dims)) < 2:
        raise ValueError("need one eps array per dimension and at least two distinct dimensions")
    arrays = [np.asarray(e, dtype=np.float64) for e in eps_by_dim]
    for d, e in zip(dims, arrays):
        spread_rms(e)  # validates the shape
    x = np.asarray(dims, dtype=np.float64)

    def statistic(groups: list[np.ndarray]) -> np.ndarray:
        spreads = np.array([float(spread_rms(g)) for g in groups])
        exponent = power_law_exponent(x, spreads) if np.all(spreads > 0) else math.nan
        return np.append(spreads, exponent)

    estimates = bootstrap_estimates(arrays, statistic, level=level, n_boot=n_boot, seed=seed)
    spreads = [replace(e, n=int(a.shape[0])) for e, a in zip(estimates[:-1], arrays)]  # each rests on its own d's replicas
    spreads_at = np.array([e.estimate for e in spreads])
    return {"exponent": estimates[-1], "exponent_regression": power_law_fit_ci(x, spreads_at, level=level),
            "spread": spreads, "replicas": [int(a.shape[0]) for a in arrays]}
