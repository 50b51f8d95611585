"""Statistics for multi-seed studies: intervals, paired comparisons, nulls, survival, seed summaries of sweeps (docs/statistics.md).

A leaf of the package: it imports numpy and scipy and nothing else of riverscape, so any layer may
use it. ``n`` is always the number of independent units (seeds), docs/statistics.md §1.
"""
from __future__ import annotations

from .intervals import CI_METHODS, Interval, bootstrap_ci, mean_ci
from .nulls import ALTERNATIVES, empirical_p, holm, null_z, stouffer
from .paired import PairedComparison, paired_comparison
from .resampling import stratified_bootstrap
from .summary import by_seed, contrast_rows, format_interval, interval_series, seed_band, seed_interval, set_holm, summary_rows
from .survival import LogRankResult, kaplan_meier, logrank

__all__ = [
    "Interval",
    "mean_ci",
    "bootstrap_ci",
    "stratified_bootstrap",
    "PairedComparison",
    "paired_comparison",
    "empirical_p",
    "null_z",
    "stouffer",
    "holm",
    "LogRankResult",
    "logrank",
    "kaplan_meier",
    "seed_interval",
    "seed_band",
    "format_interval",
    "by_seed",
    "summary_rows",
    "contrast_rows",
    "set_holm",
    "interval_series",
    "CI_METHODS",
    "ALTERNATIVES",
]
