"""The mixed-precision study (docs/experiments.md §9): is the second-order bit plan better than HAWQ and chance?

One cell: a study's FP model, an average-bit budget and a seed. The per-layer sensitivities are
measured on a calibration split of the *training* data (:func:`~riverscape.studies.calibration_split`);
the plan, the HAWQ-V2 plan at the same budget, ``n_random`` random allocations within it
(:func:`~riverscape.quant.verify_plan`) and the uniform allocation at ``floor(budget)`` bits are then
measured on the *test* split; the best random allocation is the one with the lowest loss on the
calibration rows (measured, not predicted), so no arm is chosen on test data. Every allocation is RTN with MSE scales per channel at each layer's
bit-width. Summaries over seeds pair the arms by seed (:func:`riverscape.stats.paired_comparison`).
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Mapping, Sequence

from .ptq_study import method_quantizer
from .quant import layer_sensitivities, plan_bits, verify_plan
from .stats import paired_comparison
from .stats.summary import seed_interval
from .studies import Study, calibration_split

__all__ = ["CANDIDATE_BITS", "PLAN_ARMS", "MIXED_CONTRASTS", "mixed_precision_cell", "mixed_summary_rows", "mixed_contrasts"]

CANDIDATE_BITS = (2, 3, 4, 8)
"""Bit-widths a layer may get."""
PLAN_ARMS = ("loss_plan", "loss_hawq", "random_mean", "random_best", "loss_uniform")
"""Test losses of a cell: the second-order plan, HAWQ-V2, the mean of the random allocations and the one with
the lowest calibration loss (a search over measured allocations), uniform."""
MIXED_CONTRASTS = (("loss_plan", "loss_hawq"), ("loss_plan", "random_mean"), ("loss_hawq", "random_mean"),
                   ("loss_plan", "random_best"), ("loss_plan", "loss_uniform"))


def mixed_precision_cell(study: Study, budget_bits: float, *, seed: int, calibration_samples: int = 256, n_random: int = 20,
                         trace_matvecs: int = 100, bits: Sequence[int] = CANDIDATE_BITS) -> dict:
    """Plan bits per layer on calibration rows, then measure the plan, HAWQ, random and uniform allocations on test.

    Parameters
    ----------
    study : Study
    budget_bits : float
        Parameter-weighted average bit-width the allocations may not exceed.
    seed : int
        Draws the calibration rows, the Hutch++ probes of the layer traces and the random allocations.
    calibration_samples : int
        Training rows the sensitivities are measured on.
    n_random : int
        Random allocations within the budget.
    trace_matvecs : int
        Probe budget per layer trace (exact for layers with at most this many weights).
    bits : sequence of int
        Candidate bit-widths; ``floor(budget_bits)`` must be one of them (the uniform arm).

    Returns
    -------
    dict
        ``loss_fp`` and the :data:`PLAN_ARMS` (test losses), ``plan_bits``/``hawq_bits`` (layer ->
        bits), ``plan_average_bits``, ``hawq_average_bits``, ``random_losses`` (test),
        ``random_calibration_losses``, ``random_best_index``,
        ``random_average_bits``, ``uniform_bits``, ``calibration_samples``, ``seconds``.
    """
    uniform = math.floor(budget_bits)
    if uniform not in bits:
        raise ValueError(f"floor(budget_bits) = {uniform} must be a candidate bit-width {tuple(bits)} (the uniform allocation)")
    start = time.perf_counter()
    quantizer = method_quantizer("rtn_mse", uniform, None)
    calibration, _ = calibration_split(study, calibration_samples, seed)
    sensitivities = layer_sensitivities(calibration, quantizer, study.theta_fp, bits=bits, trace_matvecs=trace_matvecs, seed=seed)
    plan = plan_bits(sensitivities, budget_bits=budget_bits)
    verified = verify_plan(study.evaluation, plan, sensitivities, quantizer, study.theta_fp, n_random=n_random, seed=seed)
    # the same random allocations (same seed) on the calibration rows: the "best" one is chosen there, never on test
    searched = verify_plan(calibration, plan, sensitivities, quantizer, study.theta_fp, n_random=n_random, seed=seed)
    best = min(range(n_random), key=lambda i: searched.random_losses[i])
    qmap = study.reference.quant_map(quantizer)
    return {
        "budget_bits": budget_bits, "loss_fp": verified.loss_fp, "loss_plan": verified.loss_plan, "loss_hawq": verified.loss_hawq,
        "random_mean": verified.random_mean, "random_best": verified.random_losses[best], "random_best_index": best,
        "random_calibration_losses": list(searched.random_losses),
        "loss_uniform": study.evaluation.loss(qmap(study.theta_fp)), "uniform_bits": uniform,
        "plan_bits": dict(plan.bits), "plan_average_bits": plan.average_bits,
        "hawq_bits": dict(verified.hawq_plan.bits), "hawq_average_bits": verified.hawq_plan.average_bits,
        "random_losses": list(verified.random_losses), "random_average_bits": list(verified.random_average_bits),
        "calibration_samples": calibration.n_samples, "seconds": time.perf_counter() - start,
    }


def _by_setting(records: Iterable[Mapping]) -> dict[tuple, dict[int, dict]]:
    """``{(model, budget): {seed: result}}``."""
    out: dict[tuple, dict[int, dict]] = {}
    for r in records:
        p = r["params"]
        out.setdefault((p["model"], p["budget"]), {})[p["seed"]] = r["result"]
    return out


def mixed_summary_rows(records: Iterable[Mapping], *, level: float = 0.95) -> list[dict]:
    """Per (model, budget): the mean test loss of every arm over seeds with a Student t interval."""
    rows = []
    for (model, budget), cells in sorted(_by_setting(records).items()):
        results = [cells[s] for s in sorted(cells)]
        rows.append({"model": model, "budget": budget, "n": len(results),
                     **{arm: seed_interval([r[arm] for r in results], level) for arm in ("loss_fp",) + PLAN_ARMS}})
    return rows


def mixed_contrasts(records: Iterable[Mapping], contrasts: Sequence[tuple[str, str]] = MIXED_CONTRASTS, *,
                    level: float = 0.95) -> list[dict]:
    """Paired-by-seed differences ``a - b`` of test loss per (model, budget): BCa interval and Wilcoxon p (n >= 2 seeds)."""
    rows = []
    for (model, budget), cells in sorted(_by_setting(records).items()):
        seeds = sorted(cells)
        if len(seeds) < 2:
            continue
        for a, b in contrasts:
            cmp = paired_comparison([cells[s][a] for s in seeds], [cells[s][b] for s in seeds], a=a, b=b, level=level)
            wins = sum(cells[s][a] < cells[s][b] for s in seeds)
            rows.append({"model": model, "budget": budget, "a": a, "b": b, "n": len(seeds), "wins": wins,
                         "difference": {**cmp.difference.to_dict(), "wilcoxon_p": cmp.wilcoxon_p}})
    return rows
