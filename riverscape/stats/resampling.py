"""Stratified bootstrap: resample the units of each group separately (docs/statistics.md §1, §2.2).

For studies whose units fall into fixed groups (replicas of each dimension d, seeds of each
configuration) and whose statistic is a function of all groups at once (a fitted exponent, a
crossing point of a mean curve). Each group keeps its size, so the design is preserved.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from . import _checks

__all__ = ["stratified_bootstrap"]


def stratified_bootstrap(
    groups: Sequence,
    statistic: Callable[[list[np.ndarray]], float | np.ndarray],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Bootstrap replicates of ``statistic(groups)`` with the rows of each group resampled within it.

    Resample ``b`` draws, for every group ``g`` independently, ``n_g`` row indices with replacement
    from ``0..n_g-1`` and evaluates ``statistic`` on the resampled groups. Rows are the independent
    units (docs/statistics.md §1); the columns of a row travel together, so measurements paired on
    one unit (two arms run on the same seed) stay paired. A percentile interval of the replicates
    is the interval of docs/statistics.md §2.2 applied to the whole design; like it, it is too
    narrow by roughly ``sqrt((n_g - 1) / n_g)`` for small groups.

    Parameters
    ----------
    groups : sequence of array_like
        Group ``g`` has shape ``(n_g,)`` or ``(n_g, ...)`` with ``n_g >= 1`` finite numbers per row.
        A group of one row contributes no resampling variation.
    statistic : callable
        Maps a list of arrays (the groups, in order, each with its original trailing shape) to a
        number or a 1-D array of ``k`` numbers. It may return NaN where it is undefined on a
        resample (e.g. a curve that never crosses a level); those replicates stay NaN.
    n_boot : int
        Number of resamples B.
    seed : int
        Seed of the private generator (the global NumPy state is untouched).

    Returns
    -------
    numpy.ndarray
        Shape ``(B,)`` for a scalar statistic, ``(B, k)`` for a vector one; float64.

    Examples
    --------
    >>> reps = stratified_bootstrap([[1.0, 1.0], [2.0, 4.0]], lambda g: g[1].mean() - g[0].mean(), n_boot=200)
    >>> sorted(set(reps.tolist()))
    [1.0, 2.0, 3.0]
    """
    n_boot = _checks.positive_int(n_boot, "n_boot")
    if isinstance(groups, np.ndarray) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise TypeError("groups must be a non-empty sequence (list or tuple) of arrays")
    arrays = []
    for i, group in enumerate(groups):
        try:
            array = np.asarray(group, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"groups[{i}] must be an array of numbers, got {type(group).__name__}") from exc
        if array.ndim == 0 or array.shape[0] == 0:
            raise ValueError(f"groups[{i}] needs at least one row, got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"groups[{i}] holds NaN or infinite values")
        arrays.append(array)
    rng = np.random.default_rng(seed)
    out = None
    for b in range(n_boot):
        value = np.asarray(statistic([a[rng.integers(0, a.shape[0], size=a.shape[0])] for a in arrays]), dtype=np.float64)
        if value.ndim > 1:
            raise ValueError(f"statistic must return a number or a 1-D array, got shape {value.shape}")
        if out is None:
            out = np.empty((n_boot,) + value.shape)
        elif value.shape != out.shape[1:]:
            raise ValueError(f"statistic returned shape {value.shape} on resample {b}, {out.shape[1:]} before")
        out[b] = value
    return out
