"""Tests against a null distribution and their combination (docs/statistics.md §4)."""
from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

from . import _checks

__all__ = ["empirical_p", "null_z", "stouffer", "holm", "ALTERNATIVES"]

#: the sides :func:`empirical_p` can test
ALTERNATIVES = ("greater", "less", "two-sided")


def empirical_p(observed: float, null_draws, *, alternative: str = "greater") -> float:
    """Monte Carlo p-value of ``observed`` against draws from its null distribution (docs/statistics.md §4.1).

    ``greater``: ``(1 + #{null >= observed}) / (1 + N)``; ``less``: ``(1 + #{null <= observed}) / (1 + N)``;
    ``two-sided``: twice the smaller of the two, capped at 1. The +1 counts the observed value as
    one draw of the null, which makes the p-value valid (``P(p <= alpha) <= alpha`` under the null,
    ties included) and never 0: the smallest attainable value is ``1 / (N + 1)``.

    Parameters
    ----------
    observed : float
    null_draws : array_like, shape (N,)
        Independent draws of the statistic under the null (N >= 1).
    alternative : {"greater", "less", "two-sided"}

    Returns
    -------
    float

    Examples
    --------
    >>> empirical_p(2.0, [0.0, 1.0, 2.0, 3.0])
    0.6
    """
    _checks.choice(alternative, ALTERNATIVES, "alternative")
    value = _checks.scalar(observed, "observed")
    null = _checks.sample(null_draws, "null_draws")
    upper = (1 + np.count_nonzero(null >= value)) / (null.size + 1)
    lower = (1 + np.count_nonzero(null <= value)) / (null.size + 1)
    if alternative == "greater":
        return float(upper)
    if alternative == "less":
        return float(lower)
    return float(min(1.0, 2.0 * min(upper, lower)))


def null_z(observed: float, null_draws) -> float:
    """``(observed - mean(null)) / std(null, ddof=1)`` (docs/statistics.md §4.2).

    A null with zero spread gives ``+-inf`` (or ``nan`` when ``observed`` equals it).

    Parameters
    ----------
    observed : float
    null_draws : array_like, shape (N,), N >= 2

    Returns
    -------
    float
    """
    value = _checks.scalar(observed, "observed")
    null = _checks.sample(null_draws, "null_draws", min_size=2)
    shift = value - float(null.mean())
    spread = float(null.std(ddof=1))
    if spread == 0.0:
        return math.copysign(math.inf, shift) if shift else math.nan
    return shift / spread


def stouffer(z_scores, weights=None) -> tuple[float, float]:
    """Stouffer's pooled z of independent z-scores and its one-sided p (docs/statistics.md §4.3).

    ``Z = sum_i w_i z_i / sqrt(sum_i w_i^2)`` (equal weights: ``sum z_i / sqrt(k)``), standard normal
    under the joint null; ``p = P(N(0, 1) >= Z)``.

    Parameters
    ----------
    z_scores : array_like, shape (k,)
        Finite z-scores of independent tests (e.g. one per seed).
    weights : array_like, shape (k,), optional
        Non-negative weights, not all zero (default: all 1).

    Returns
    -------
    (float, float)
        The pooled z and its one-sided p-value.

    Examples
    --------
    >>> stouffer([2.0, 2.0, 2.0, 2.0])[0]
    4.0
    """
    z = _checks.sample(z_scores, "z_scores")
    w = np.ones_like(z) if weights is None else _checks.sample(weights, "weights")
    _checks.same_length(z, w, ("z_scores", "weights"))
    if np.any(w < 0) or not np.any(w):
        raise ValueError("weights must be non-negative and not all zero")
    pooled = float(np.dot(w, z) / math.sqrt(float(np.dot(w, w))))
    return pooled, float(ndtr(-pooled))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order (docs/statistics.md §4.4).

    With ``p_(1) <= ... <= p_(m)``: ``p~_(j) = min(1, max_{i <= j} (m - i + 1) p_(i))``. Rejecting
    every hypothesis with ``p~ <= alpha`` controls the family-wise error rate at ``alpha`` under any
    dependence between the tests.

    Parameters
    ----------
    p_values : array_like, shape (m,)
        p-values in [0, 1].

    Returns
    -------
    numpy.ndarray, shape (m,)

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03]).tolist()
    [0.03, 0.06, 0.06]
    """
    p = _checks.sample(p_values, "p_values")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("p_values must lie in [0, 1]")
    order = np.argsort(p, kind="stable")
    scaled = (p.size - np.arange(p.size)) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted
