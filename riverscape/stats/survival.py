"""Time-to-event data with censoring: Kaplan-Meier and the log-rank test (docs/statistics.md §5).

A unit (seed) is followed until an event (e.g. a QAT run first reaches its target loss:
``event = 1`` at that step) or until it is censored (the run ended without it: ``event = 0`` at
the last step). A unit censored at ``t`` counts as at risk at ``t``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import chdtrc

from . import _checks

__all__ = ["LogRankResult", "logrank", "kaplan_meier"]


@dataclass(frozen=True)
class LogRankResult:
    """Result of :func:`logrank`.

    Attributes
    ----------
    statistic : float
        ``(O_a - E_a)^2 / V``, chi-square with 1 degree of freedom under the null (nan without events).
    p_value : float
        ``P(chi2_1 >= statistic)`` (two-sided).
    observed, expected : (float, float)
        Events observed in each group and expected under equal hazards.
    n : (int, int)
        Units in each group.
    """

    statistic: float
    p_value: float
    observed: tuple[float, float]
    expected: tuple[float, float]
    n: tuple[int, int]

    def to_dict(self) -> dict:
        """Fields as a plain dict (tuples kept as tuples)."""
        return asdict(self)


def _events(times, events, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(times, events)``: finite times, events in {0, 1}, equal lengths."""
    t = _checks.sample(times, names[0])
    e = _checks.sample(events, names[1])
    _checks.same_length(t, e, names)
    if not np.all((e == 0) | (e == 1)):
        raise ValueError(f"{names[1]} must be 1 (event observed) or 0 (censored)")
    return t, e.astype(bool)


def _risk_table(times: np.ndarray, events: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At each time of ``at``: units at risk (time >= t) and events at exactly t."""
    ordered = np.sort(times)
    at_risk = ordered.size - np.searchsorted(ordered, at, side="left")
    event_times = np.sort(times[events])
    deaths = np.searchsorted(event_times, at, side="right") - np.searchsorted(event_times, at, side="left")
    return at_risk.astype(np.float64), deaths.astype(np.float64)


def kaplan_meier(times, events) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate of the survival function (docs/statistics.md §5.1).

    ``S(t) = prod_{t_j <= t} (1 - d_j / n_j)`` over the distinct event times ``t_j`` with ``d_j`` events
    among the ``n_j`` units still at risk.

    Parameters
    ----------
    times : array_like, shape (n,)
        Event or censoring time of each unit.
    events : array_like, shape (n,)
        1 where the event was observed at that time, 0 where the unit was censored.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The distinct event times, ascending, and the survival just after each (empty arrays when
        there is no event).

    Examples
    --------
    >>> t, s = kaplan_meier([1, 2, 2, 3], [1, 1, 0, 1])
    >>> t.tolist(), s.tolist()
    ([1.0, 2.0, 3.0], [0.75, 0.5, 0.0])
    """
    t, e = _events(times, events, ("times", "events"))
    unique = np.unique(t[e])
    at_risk, deaths = _risk_table(t, e, unique)
    return unique, np.cumprod(1.0 - deaths / at_risk)


def logrank(times_a, events_a, times_b, events_b) -> LogRankResult:
    """Log-rank (Mantel-Cox) test of equal hazards in two groups (docs/statistics.md §5.2).

    At each distinct event time ``t`` of the pooled data, with ``n`` units at risk (``n_a`` in group a)
    and ``d`` events: ``E_a += d n_a / n`` and
    ``V += d (n_a / n)(1 - n_a / n)(n - d) / (n - 1)``; the statistic is ``(O_a - E_a)^2 / V``.

    Parameters
    ----------
    times_a, events_a : array_like, shape (n_a,)
        Times of group a and whether the event was observed (1) or the unit censored (0) there.
    times_b, events_b : array_like, shape (n_b,)
        The same for group b.

    Returns
    -------
    LogRankResult
        ``statistic`` and ``p_value`` are nan when no unit has an event (nothing to compare).
    """
    ta, ea = _events(times_a, events_a, ("times_a", "events_a"))
    tb, eb = _events(times_b, events_b, ("times_b", "events_b"))
    pooled_t, pooled_e = np.concatenate([ta, tb]), np.concatenate([ea, eb])
    unique = np.unique(pooled_t[pooled_e])
    risk, deaths = _risk_table(pooled_t, pooled_e, unique)
    risk_a, deaths_a = _risk_table(ta, ea, unique)
    share = risk_a / risk
    expected_a = float(np.sum(deaths * share))
    ties = np.divide(risk - deaths, risk - 1.0, out=np.zeros_like(risk), where=risk > 1)
    variance = float(np.sum(deaths * share * (1.0 - share) * ties))
    observed_a, observed_b = float(deaths_a.sum()), float(deaths.sum() - deaths_a.sum())
    if variance > 0:
        statistic = (observed_a - expected_a) ** 2 / variance
        p_value = float(chdtrc(1, statistic))
    else:
        statistic = p_value = math.nan
    return LogRankResult(
        statistic=float(statistic),
        p_value=p_value,
        observed=(observed_a, observed_b),
        expected=(expected_a, float(deaths.sum()) - expected_a),
        n=(int(ta.size), int(tb.size)),
    )
