"""The per-seed tests behind the README's PTQ-vs-QAT claims (``experiments/ptq_vs_qat.py``, ``experiments/estimators.py``).

Every function takes sweep records whose ``params`` hold ``model``, ``bits``, ``method`` and ``seed``
(the FP reference: ``method="fp"``, ``bits=32``) and returns JSON-friendly rows, one per model (and
bit-width), each resting on one number per seed (docs/statistics.md §1):

* :func:`damage_ratio_rows` -- is the second-order model of the PTQ damage exact? ``r = measured /
  predicted`` loss increase (docs/theory.md §6) per seed, its t interval, and the one-sample t test
  of ``r = 1`` (Holm over the rows); and, since ``r`` is meaningless where the first- and
  second-order terms cancel (prediction near 0), the model's error as a share of its terms,
  ``(measured - predicted) / (|g.delta| + |delta.H.delta / 2|)``, tested against 0;
* :func:`recovery_rows` -- how much of the PTQ damage QAT recovers:
  ``(m_PTQ - m_QAT) / (m_PTQ - m_FP)`` of a metric m (test loss or accuracy) per seed and
  estimator, its t interval, and the estimators' paired difference (BCa, Wilcoxon);
* :func:`alignment_z_rows` -- does the gradient at ``Q(theta_fp)`` beat its matched null? The null
  z of every seed (docs/theory.md §7.4), pooled with Stouffer (docs/statistics.md §4.3), its sign
  count, and the two-sided pooled p (Holm over the models).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

from .stats import paired_comparison, stouffer
from .stats.summary import by_seed, seed_interval, set_holm

__all__ = ["GROUP", "damage_ratio_rows", "model_error", "recovery_rows", "alignment_z_rows", "recovery_fraction"]

#: the parameters that identify one arm of one model (the seed indexes inside a group)
GROUP = ("model", "bits", "method")


def _groups(records: Iterable[Mapping]) -> dict[tuple, dict[int, dict]]:
    return by_seed(records, GROUP)


def _t_test_p(values: Sequence[float], mu: float) -> float:
    """Two-sided one-sample t-test p of ``mean = mu`` (the test that matches the t interval); ``nan`` if undefined."""
    x = np.asarray(values, dtype=float)
    if x.size < 2 or not np.all(np.isfinite(x)) or float(np.std(x)) == 0.0:
        return math.nan
    return float(scipy_stats.ttest_1samp(x, mu).pvalue)


def model_error(result: Mapping[str, Any]) -> Optional[float]:
    """``(measured - predicted) / (|first-order term| + |second-order term|)`` of one damage result.

    0 when the second-order model is exact; its size compares the model's error with the terms the
    model adds up, so it stays meaningful where ``g.delta`` and ``delta.H.delta / 2`` cancel and the
    ratio ``measured / predicted`` divides by nearly 0. ``None`` when a field is missing or both terms are 0.

    >>> model_error({"measured_loss_increase": 0.9, "predicted_loss_increase": 1.0, "predicted_first_order": -1.0})
    -0.033333333333333326
    """
    measured, predicted, first = (result.get(k) for k in ("measured_loss_increase", "predicted_loss_increase", "predicted_first_order"))
    if measured is None or predicted is None or first is None:
        return None
    scale = abs(first) + abs(predicted - first)
    return None if scale == 0 else (measured - predicted) / scale


def damage_ratio_rows(records: Iterable[Mapping], *, method: str = "ptq_minmax", bits: Optional[Sequence[int]] = None,
                      level: float = 0.95) -> list[dict]:
    """Measured / second-order-predicted loss increase of ``method`` per model and bit-width, over seeds.

    Parameters
    ----------
    records : iterable of dict
        Sweep records with ``ratio``, ``measured_loss_increase`` and ``predicted_loss_increase`` in
        the results of ``method`` (``ratio`` ``None`` where the prediction is 0: that seed is dropped).
    method : str
    bits : sequence of int, optional
        Bit-widths to report (default: every one in the records).
    level : float

    Returns
    -------
    list of dict
        ``model``, ``bits``, ``n``, ``ratios`` (per seed, seed order), ``ratio`` (t interval of the
        mean r), ``one_inside`` (1 inside that interval), ``t_p`` (two-sided one-sample t test of
        mean r = 1) and ``holm_p`` (Holm over the rows); ``errors``, ``error`` (t interval) of
        :func:`model_error` per seed, ``error_t_p`` (t test of mean error = 0) and ``error_holm_p``.
    """
    rows = []
    for (model, b, m), seeds in _groups(records).items():
        if m != method or (bits is not None and b not in bits):
            continue
        ratios = [seeds[s]["ratio"] for s in sorted(seeds) if seeds[s].get("ratio") is not None]
        interval = seed_interval(ratios, level)
        inside = None if interval is None or not math.isfinite(interval["low"]) else bool(interval["low"] <= 1.0 <= interval["high"])
        errors = [e for e in (model_error(seeds[s]) for s in sorted(seeds)) if e is not None]
        rows.append({"model": model, "bits": b, "n": len(ratios), "ratios": ratios, "ratio": interval, "one_inside": inside,
                     "t_p": _t_test_p(ratios, 1.0), "errors": errors, "error": seed_interval(errors, level), "error_t_p": _t_test_p(errors, 0.0)})
    set_holm(rows, "t_p")
    set_holm(rows, "error_t_p", "error_holm_p")
    return rows


def recovery_fraction(fp: float, ptq: float, qat: float, *, higher_is_better: bool = False) -> Optional[float]:
    """``(m_PTQ - m_QAT) / (m_PTQ - m_FP)``: 1 when QAT gets back to the FP value, 0 when it stays at PTQ's.

    For a loss (``higher_is_better=False``) this is ``(L_PTQ - L_QAT) / (L_PTQ - L_FP)``; for an
    accuracy, ``(A_QAT - A_PTQ) / (A_FP - A_PTQ)``. ``None`` when PTQ did no damage (nothing to recover).

    >>> recovery_fraction(0.5, 2.5, 1.0)
    0.75
    >>> recovery_fraction(1.0, 0.5, 0.75, higher_is_better=True)
    0.5
    """
    damage = (fp - ptq) if higher_is_better else (ptq - fp)
    return None if damage <= 0 else (ptq - qat) / (ptq - fp)


def recovery_rows(records: Iterable[Mapping], *, bits: int = 2, ptq: str = "ptq_minmax", qat: Sequence[str] = ("qat_ste", "qat_lsq"),
                  metric: str = "loss", higher_is_better: Optional[bool] = None, level: float = 0.95) -> list[dict]:
    """Fraction of the PTQ damage to ``metric`` each QAT method recovers, per model, over seeds.

    Parameters
    ----------
    records : iterable of dict
        Sweep records with the FP cell (``method="fp"``) and the ``ptq`` and ``qat`` cells at ``bits``.
    bits : int
    ptq : str
        The PTQ arm on the grid QAT starts from (QAT uses the min-max scales of ``theta_fp``).
    qat : sequence of str
        QAT arms; their paired difference (last minus first) is reported when there are two.
    metric : str
        ``"loss"`` (held-out test loss), ``"train_loss"`` (analysis set) or ``"accuracy"`` (test).
    higher_is_better : bool, optional
        Direction of ``metric`` (default: True for ``"accuracy"`` only).
    level : float

    Returns
    -------
    list of dict
        ``model``, ``bits``, ``metric``, per QAT arm ``{arm: {"fractions", "interval"}}`` under
        ``fractions`` and, with two arms, ``difference`` (BCa interval of the paired difference of
        the fractions with ``wilcoxon_p``) and ``difference_arms`` ``[a, b]`` (a minus b).
    """
    groups = _groups(records)
    higher = metric == "accuracy" if higher_is_better is None else higher_is_better
    rows = []
    for model in dict.fromkeys(key[0] for key in groups):
        fp, base = groups.get((model, 32, "fp")), groups.get((model, bits, ptq))
        if fp is None or base is None:
            continue
        per_arm: dict[str, dict[int, float]] = {}
        for arm in qat:
            cells = groups.get((model, bits, arm), {})
            fractions = {s: recovery_fraction(fp[s][metric], base[s][metric], cells[s][metric], higher_is_better=higher)
                         for s in sorted(cells) if s in fp and s in base}
            per_arm[arm] = {s: f for s, f in fractions.items() if f is not None}
        row: dict[str, Any] = {"model": model, "bits": bits, "metric": metric, "fractions": {}}
        for arm, fractions in per_arm.items():
            if fractions:
                row["fractions"][arm] = {"seeds": sorted(fractions), "values": [fractions[s] for s in sorted(fractions)],
                                         "interval": seed_interval([fractions[s] for s in sorted(fractions)], level)}
        if len(qat) == 2:
            first, second = (per_arm[a] for a in qat)
            common = sorted(set(first) & set(second))
            if len(common) >= 2:
                cmp = paired_comparison([second[s] for s in common], [first[s] for s in common], a=qat[1], b=qat[0], level=level)
                row["difference"] = {**cmp.difference.to_dict(), "wilcoxon_p": cmp.wilcoxon_p}
                row["difference_arms"] = [qat[1], qat[0]]
        if row["fractions"]:
            rows.append(row)
    return rows


def alignment_z_rows(records: Iterable[Mapping], *, bits: int = 2, method: str = "ptq_minmax") -> list[dict]:
    """The matched-null z of the gradient alignment at ``Q(theta_fp)`` per model, pooled over seeds.

    Parameters
    ----------
    records : iterable of dict
        Sweep records whose ``method`` results at ``bits`` hold ``null_z`` (and ``null_draws``).
    bits : int
    method : str

    Returns
    -------
    list of dict
        ``model``, ``bits``, ``n`` (seeds with a finite z), ``z`` (per seed), ``positive`` (how many
        are > 0), ``stouffer_z`` (``sum z / sqrt(n)``), ``p_greater`` (one-sided, alignment above the
        null), ``p_two_sided`` and ``holm_p`` (Holm of ``p_two_sided`` over the models), and
        ``null_draws`` (per seed, when recorded). Stouffer treats each z as standard normal under
        the null; with few null draws a z is heavier-tailed than that, so the pooled p is approximate.
    """
    rows = []
    for (model, b, m), seeds in _groups(records).items():
        if m != method or b != bits:
            continue
        z = [float(seeds[s]["null_z"]) for s in sorted(seeds) if seeds[s].get("null_z") is not None and math.isfinite(seeds[s]["null_z"])]
        if not z:
            continue
        pooled, p_greater = stouffer(z)
        rows.append({"model": model, "bits": b, "n": len(z), "z": z, "positive": sum(v > 0 for v in z), "stouffer_z": pooled,
                     "p_greater": p_greater, "p_two_sided": float(min(1.0, 2.0 * min(p_greater, 1.0 - p_greater))),
                     "null_draws": [seeds[s].get("null_draws") for s in sorted(seeds)]})
    set_holm(rows, "p_two_sided")
    return rows
