"""Confidence intervals for one sample: Student t, bootstrap percentile and BCa (docs/statistics.md §2).

The bootstrap is riverscape's own (vectorised over resamples, seeded by a private generator, no
dependence on the scipy version); ``tests/test_stats.py`` checks it against
``scipy.stats.bootstrap`` and checks the coverage of all three intervals by simulation.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
from scipy import stats as scipy_stats
from scipy.special import ndtr, ndtri

from . import _checks

__all__ = ["Interval", "mean_ci", "bootstrap_ci", "CI_METHODS"]

#: interval methods of :func:`mean_ci` (:func:`bootstrap_ci` takes the first two)
CI_METHODS = ("bca", "percentile", "t")
_BOOTSTRAP = CI_METHODS[:2]
# statistic evaluations per vectorised call: bounds the (rows, n) resample matrix to ~8 MB
_BLOCK_VALUES = 1 << 20


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval.

    Attributes
    ----------
    estimate : float
        The statistic on the data.
    low, high : float
        The interval's ends (``low <= high``; a bootstrap interval need not contain ``estimate``).
    level : float
        Nominal coverage, e.g. 0.95.
    n : int
        Number of independent units the interval rests on (seeds, not steps; docs/statistics.md §1).
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int

    def __post_init__(self) -> None:
        _checks.level(self.level)
        if not self.low <= self.high:
            raise ValueError(f"interval ends out of order: low={self.low} > high={self.high}")

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-friendly)."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}] (n={self.n})"


def mean_ci(values, *, level: float = 0.95, n_boot: int = 10_000, seed: int = 0, method: str = "bca") -> Interval:
    """Confidence interval for the mean of ``values`` (docs/statistics.md §2).

    Parameters
    ----------
    values : array_like, shape (n,)
        Independent observations, one per unit (e.g. one per seed); ``n >= 2``.
    level : float
        Nominal two-sided coverage.
    n_boot, seed : int
        Bootstrap resamples and the seed of their private generator (ignored by ``method="t"``).
    method : {"bca", "percentile", "t"}
        Bias-corrected and accelerated bootstrap, percentile bootstrap, or the Student t interval
        ``mean +- t_{n-1} s / sqrt(n)`` (exact for normal data).

    Returns
    -------
    Interval

    Examples
    --------
    >>> print(mean_ci([1.0, 2.0, 3.0], method="t"))
    2 [-0.484, 4.48] (n=3)
    """
    _checks.choice(method, CI_METHODS, "method")
    if method != "t":
        return bootstrap_ci(values, np.mean, level=level, n_boot=n_boot, seed=seed, method=method)
    x = _checks.sample(values, "values", min_size=2)
    level = _checks.level(level)
    mean = float(x.mean())
    half = float(scipy_stats.t.ppf(0.5 + level / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, level, int(x.size))


def bootstrap_ci(
    values,
    statistic: Callable[..., float] = np.mean,
    *,
    level: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    method: str = "bca",
) -> Interval:
    """Bootstrap confidence interval for ``statistic(values)`` (docs/statistics.md §2.2-§2.3).

    Parameters
    ----------
    values : array_like, shape (n,)
        Independent observations; ``n >= 2``.
    statistic : callable
        Maps a 1-D sample to a number. If it takes an ``axis`` keyword (``np.mean``, ``np.median``)
        it is called once per block of resamples with ``axis=-1``, otherwise once per resample.
    level : float
        Nominal two-sided coverage.
    n_boot : int
        Number of resamples B.
    seed : int
        Seed of the private generator (the global NumPy state is untouched).
    method : {"bca", "percentile"}
        Percentile: the ``(1-level)/2`` and ``(1+level)/2`` quantiles of the B resampled statistics.
        BCa: the same quantiles moved by the bias correction ``z0`` and the jackknife acceleration ``a``.

    Returns
    -------
    Interval
    """
    _checks.choice(method, _BOOTSTRAP, "method")
    x = _checks.sample(values, "values", min_size=2)
    level = _checks.level(level)
    n_boot = _checks.positive_int(n_boot, "n_boot")
    estimate = _checks.scalar(statistic(x), "statistic(values)")
    rng = np.random.default_rng(seed)
    boot = _evaluate(statistic, _resamples(x, n_boot, rng), n_boot)
    alpha = (1.0 - level) / 2
    probabilities = np.array([alpha, 1.0 - alpha])
    if method == "bca":
        probabilities = _bca_probabilities(x, statistic, estimate, boot, probabilities)
    low, high = np.quantile(boot, probabilities)
    return Interval(estimate, float(low), float(high), level, int(x.size))


def _bca_probabilities(x: np.ndarray, statistic: Callable, estimate: float, boot: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Efron's BCa levels ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))`` for the nominal ``probabilities``."""
    below = np.count_nonzero(boot < estimate) + 0.5 * np.count_nonzero(boot == estimate)
    share = np.clip(below / boot.size, 0.5 / boot.size, 1.0 - 0.5 / boot.size)  # z0 finite
    z0 = float(ndtri(share))
    jack = _evaluate(statistic, _leave_one_out(x), x.size)
    spread = jack.mean() - jack
    denominator = 6.0 * float(np.sum(spread**2)) ** 1.5
    accel = float(np.sum(spread**3)) / denominator if denominator > 0 else 0.0
    z = ndtri(probabilities)
    return np.clip(ndtr(z0 + (z0 + z) / (1.0 - accel * (z0 + z))), 0.0, 1.0)


def _resamples(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Blocks of bootstrap resamples (rows drawn with replacement from ``x``)."""
    rows = max(1, _BLOCK_VALUES // x.size)
    for start in range(0, n_boot, rows):
        yield x[rng.integers(0, x.size, size=(min(rows, n_boot - start), x.size))]


def _leave_one_out(x: np.ndarray) -> Iterator[np.ndarray]:
    """Blocks of the jackknife samples (row i is ``x`` without entry i)."""
    n = x.size
    rows = max(1, _BLOCK_VALUES // n)
    for start in range(0, n, rows):
        index = np.arange(start, min(start + rows, n))
        keep = np.arange(n)[None, :] != index[:, None]
        yield np.broadcast_to(x, keep.shape)[keep].reshape(index.size, n - 1)


def _evaluate(statistic: Callable, blocks: Iterator[np.ndarray], expected: int) -> np.ndarray:
    """``statistic`` of every row of every block, as one float64 array of length ``expected``."""
    vectorised = _takes_axis(statistic)
    parts = []
    for block in blocks:
        if vectorised:
            parts.append(np.asarray(statistic(block, axis=-1), dtype=np.float64).reshape(-1))
        else:
            parts.append(np.array([float(statistic(row)) for row in block]))
    out = np.concatenate(parts)
    if out.shape != (expected,):
        raise ValueError(f"statistic must return one number per sample, got {out.size} values for {expected} samples")
    if not np.all(np.isfinite(out)):
        raise ValueError("statistic returned NaN or infinity on a resample")
    return out


def _takes_axis(statistic: Callable) -> bool:
    try:
        return "axis" in inspect.signature(statistic).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
