"""Paired comparison of two arms run on the same seeds (docs/statistics.md §3)."""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

from . import _checks
from .intervals import Interval, mean_ci

__all__ = ["PairedComparison", "paired_comparison"]


@dataclass(frozen=True)
class PairedComparison:
    """Arm ``a`` minus arm ``b``, paired by seed.

    Attributes
    ----------
    a, b : str
        Names of the two arms.
    n : int
        Number of pairs (seeds).
    difference : Interval
        Mean of the paired differences ``a_i - b_i`` with its BCa bootstrap interval.
    wilcoxon_p : float
        Two-sided Wilcoxon signed-rank p-value of the differences (exact null distribution for
        small n, zero differences dropped); ``nan`` when every difference is 0.
    """

    a: str
    b: str
    n: int
    difference: Interval
    wilcoxon_p: float

    def to_dict(self) -> dict:
        """Fields as a plain dict, ``difference`` as a nested dict."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.a} - {self.b}: mean {self.difference} Wilcoxon p={self.wilcoxon_p:.3g}"


def paired_comparison(
    a_values,
    b_values,
    *,
    a: str = "A",
    b: str = "B",
    level: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Compare two arms measured on the same seeds through their per-seed differences.

    Entry ``i`` of both arrays must come from the same seed (same data order, initialisation);
    the analysis is of ``d_i = a_i - b_i`` only, which removes the seed-to-seed variation the two
    arms share (docs/statistics.md §3).

    Parameters
    ----------
    a_values, b_values : array_like, shape (n,)
        One number per seed for each arm; ``n >= 2``.
    a, b : str
        Arm names used in the result.
    level, n_boot, seed
        As in :func:`riverscape.stats.mean_ci` (BCa interval of the mean difference).

    Returns
    -------
    PairedComparison
    """
    first = _checks.sample(a_values, "a_values", min_size=2)
    second = _checks.sample(b_values, "b_values", min_size=2)
    _checks.same_length(first, second, ("a_values", "b_values"))
    differences = first - second
    interval = mean_ci(differences, level=level, n_boot=n_boot, seed=seed, method="bca")
    return PairedComparison(a=str(a), b=str(b), n=int(differences.size), difference=interval, wilcoxon_p=signed_rank_p(differences))


def signed_rank_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of ``differences`` (docs/statistics.md §3.2); nan if all are 0."""
    if not np.any(differences):
        return math.nan
    with warnings.catch_warnings():  # scipy warns that exact p is unavailable with ties/zeros; its fallback is documented
        warnings.simplefilter("ignore", UserWarning)
        return float(scipy_stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)
