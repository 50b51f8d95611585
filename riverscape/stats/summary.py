"""Seed-axis summaries of sweep records: intervals of means, paired contrasts, text (docs/statistics.md §6.1).

A sweep record is ``{"params": {..., "seed": int}, "result": {...}}`` (:mod:`riverscape.sweep`).
:func:`by_seed` groups records by some of their parameters and indexes each group by seed;
:func:`summary_rows` gives every metric of every group as a Student t interval of the mean over
seeds (docs/statistics.md §2.1); :func:`contrast_rows` compares two arms of a group paired by seed
(:func:`~riverscape.stats.paired_comparison`: BCa interval, Wilcoxon p) with Holm's adjustment over
the rows of each metric; :func:`format_interval` prints an interval as ``0.953 [0.941, 0.965] n=3``.
Plain Python and NumPy: like the rest of :mod:`riverscape.stats`, this module knows no model.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import stats as scipy_stats

from .intervals import mean_ci
from .nulls import holm
from .paired import paired_comparison

__all__ = ["Metric", "seed_interval", "seed_band", "format_interval", "by_seed", "metric_value", "summary_rows", "contrast_rows", "set_holm", "interval_series"]

#: a metric of a record's result: a key of the result dict, or a function of the result (``None``: undefined)
Metric = Union[str, Callable[[Mapping[str, Any]], Optional[float]]]


def seed_interval(values: Sequence[Optional[float]], level: float = 0.95) -> Optional[dict]:
    """Student t interval of the mean of one value per seed (docs/statistics.md §2.1).

    ``None`` entries (a metric undefined for that seed) are dropped and ``n`` counts the rest. With
    one value, or a non-finite one, the interval's ends are ``nan`` (no interval); with none, ``None``.

    Returns
    -------
    dict or None
        ``{"estimate", "low", "high", "level", "n"}`` (:meth:`Interval.to_dict`).

    Examples
    --------
    >>> seed_interval([1.0, 2.0, 3.0, None])["n"]
    3
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return None
    if x.size == 1 or not np.all(np.isfinite(x)):
        return {"estimate": float(np.mean(x)), "low": math.nan, "high": math.nan, "level": level, "n": int(x.size)}
    return mean_ci(x, level=level, method="t").to_dict()


def seed_band(series: Sequence[Sequence[Optional[float]]], level: float = 0.95) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Mean over seeds and t half-width of a recorded series, point by point (figures' bands).

    Parameters
    ----------
    series : sequence of sequences, shape (n_seeds, n_points)
        One series per seed on common x values (``None``: undefined, ignored at that point).
    level : float

    Returns
    -------
    (mean, half_width)
        Arrays of length ``n_points``; ``half_width`` is ``t_{n-1} s / sqrt(n)`` with ``n`` the
        defined values at each point (``nan`` where ``n < 2``), or ``None`` for a single seed.
    """
    y = np.asarray([[np.nan if v is None else v for v in s] for s in series], dtype=float)
    if y.ndim != 2 or y.shape[0] == 0:
        raise ValueError(f"series must be a non-empty list of equally long series, got shape {y.shape}")
    mean = np.nanmean(y, axis=0)
    if y.shape[0] == 1:
        return mean, None
    n = np.sum(np.isfinite(y), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # points with fewer than 2 defined values: nan, masked below
        sd = np.nanstd(y, axis=0, ddof=1)
        half = scipy_stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)
    return mean, np.where(n >= 2, half, np.nan)


def format_interval(interval: Optional[Mapping], fmt: str = "{:.3f}", *, show_n: bool = True) -> Optional[str]:
    """``"0.953 [0.941, 0.965] n=3"`` (no brackets when the interval is undefined; ``show_n=False`` drops ``n=``)."""
    if interval is None:
        return None
    text = fmt.format(interval["estimate"])
    if math.isfinite(interval["low"]) and math.isfinite(interval["high"]):
        text += f" [{fmt.format(interval['low'])}, {fmt.format(interval['high'])}]"
    return f"{text} n={interval['n']}" if show_n else text


def by_seed(records: Iterable[Mapping], group: Sequence[str], *, where: Optional[Callable[[Mapping], bool]] = None) -> dict[tuple, dict[int, dict]]:
    """``{(params[g] for g in group): {seed: result}}`` of the records (``where(params)`` filters them).

    Groups and seeds keep the records' order. A record without ``params["seed"]``, or two records
    of one group with the same seed, raise ``ValueError`` (the second would silently replace the first).
    """
    out: dict[tuple, dict[int, dict]] = {}
    for r in records:
        p = r["params"]
        if where is not None and not where(p):
            continue
        if "seed" not in p:
            raise ValueError(f"record without a seed parameter: {p}")
        key = tuple(p[g] for g in group)
        seeds = out.setdefault(key, {})
        if p["seed"] in seeds:
            raise ValueError(f"two records of group {dict(zip(group, key))} have seed {p['seed']}")
        seeds[p["seed"]] = r["result"]
    return out


def metric_value(result: Mapping[str, Any], metric: Metric) -> Optional[float]:
    """The value of ``metric`` (a result key or a function of the result) in one result; ``None`` if undefined."""
    value = metric(result) if callable(metric) else result.get(metric)
    return None if value is None else float(value)


def summary_rows(groups: Mapping[tuple, Mapping[int, Mapping]], group: Sequence[str], metrics: Mapping[str, Metric], *,
                 level: float = 0.95) -> list[dict]:
    """One row per group: its parameters, ``n`` (seeds) and a :func:`seed_interval` per metric.

    Parameters
    ----------
    groups : mapping
        :func:`by_seed` output.
    group : sequence of str
        The parameter names of the group keys (row fields).
    metrics : mapping
        ``{row field: metric}``; a metric is a result key or a function of a result.
    level : float

    Returns
    -------
    list of dict
    """
    rows = []
    for key, seeds in groups.items():
        results = [seeds[s] for s in sorted(seeds)]
        row: dict[str, Any] = {**dict(zip(group, key)), "n": len(results)}
        for name, metric in metrics.items():
            row[name] = seed_interval([metric_value(res, metric) for res in results], level)
        rows.append(row)
    return rows


def contrast_rows(groups: Mapping[tuple, Mapping[int, Mapping]], group: Sequence[str], arm: str,
                  contrasts: Sequence[tuple[Any, Any]], metrics: Mapping[str, Metric], *, level: float = 0.95,
                  holm_by: Sequence[str] = ()) -> list[dict]:
    """Arm ``a`` minus arm ``b`` paired by seed within each group, Holm-adjusted over the rows of each metric.

    Parameters
    ----------
    groups : mapping
        :func:`by_seed` output whose ``group`` includes ``arm`` (the parameter naming the arm).
    group : sequence of str
        The parameter names of the group keys.
    arm : str
        The parameter whose values ``contrasts`` compare (e.g. ``"method"``).
    contrasts : sequence of (a, b)
        Pairs of arm values; a pair is skipped in a group where either arm is missing or fewer
        than two seeds have both (and a metric where fewer than two seeds define it).
    metrics : mapping
        ``{row field: metric}`` as in :func:`summary_rows`.
    level : float
    holm_by : sequence of str
        Row fields that split the rows into separate Holm families (e.g. ``("b",)``: one family
        per reference arm); default: one family per metric.

    Returns
    -------
    list of dict
        The group's other parameters, ``a``, ``b``, ``n`` (common seeds) and per metric
        ``{"estimate", "low", "high", "level", "n", "wilcoxon_p", "holm_p"}``: the BCa interval of
        the mean paired difference (docs/statistics.md §3), its Wilcoxon p and Holm's adjustment
        over the rows of its family where that metric is defined (§4.4).
    """
    if arm not in group:
        raise ValueError(f"arm {arm!r} must be one of the group parameters {tuple(group)}")
    position = list(group).index(arm)
    rest = [g for g in group if g != arm]
    cells: dict[tuple, dict[Any, Mapping[int, Mapping]]] = {}
    for key, seeds in groups.items():
        cells.setdefault(key[:position] + key[position + 1:], {})[key[position]] = seeds
    rows = []
    for key, arms in cells.items():
        for a, b in contrasts:
            common = sorted(set(arms.get(a, {})) & set(arms.get(b, {})))  # a missing arm has no seeds
            if len(common) < 2:
                continue
            row: dict[str, Any] = {**dict(zip(rest, key)), "a": a, "b": b, "n": len(common)}
            for name, metric in metrics.items():
                pairs = [(metric_value(arms[a][s], metric), metric_value(arms[b][s], metric)) for s in common]
                pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                if len(pairs) < 2:
                    row[name] = None
                    continue
                cmp = paired_comparison([x for x, _ in pairs], [y for _, y in pairs], a=str(a), b=str(b), level=level)
                row[name] = {**cmp.difference.to_dict(), "wilcoxon_p": cmp.wilcoxon_p}
            rows.append(row)
    families: dict[tuple, list[dict]] = {}
    for row in rows:
        families.setdefault(tuple(row[k] for k in holm_by), []).append(row)
    for family in families.values():
        for name in metrics:
            set_holm([row[name] for row in family if row.get(name) is not None], "wilcoxon_p")
    return rows


def set_holm(entries: Sequence[dict], p_key: str, out_key: str = "holm_p") -> None:
    """Set ``entry[out_key]``: Holm's adjustment (docs/statistics.md §4.4) of ``entry[p_key]`` over the entries.

    Entries whose p is ``None`` or ``nan`` (an undefined test) are left out of the family and get ``nan``.
    """
    defined = [e for e in entries if e[p_key] is not None and math.isfinite(e[p_key])]
    adjusted = holm([e[p_key] for e in defined]) if defined else []
    for e in entries:
        e[out_key] = math.nan
    for e, p in zip(defined, adjusted):
        e[out_key] = float(p)


def interval_series(rows: Sequence[Mapping], x: str, field: str) -> tuple[list, list, list]:
    """``(xs, estimates, half_widths)`` of the intervals ``row[field]`` sorted by ``row[x]`` (a figure's line and band).

    Rows whose interval is ``None`` are skipped; an undefined interval (one seed) has half-width 0.
    """
    usable = sorted((r for r in rows if r.get(field) is not None), key=lambda r: r[x])
    halves = [(r[field]["high"] - r[field]["low"]) / 2 if math.isfinite(r[field]["low"]) else 0.0 for r in usable]
    return [r[x] for r in usable], [r[field]["estimate"] for r in usable], halves
