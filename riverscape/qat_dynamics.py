"""The QAT-dynamics experiment: is it the gradient at ``Q(w)`` that makes QAT recover? (docs/qat_dynamics.md §1-§4)

Four QAT arms start at ``theta_fp`` with the same optimiser, learning rate, steps and batch order
and all deploy ``Q(w_t)``; they differ only in where the gradient is taken (registered estimators
of :mod:`riverscape.quant.estimator_configs`):

====  =======================  ==========================================
arm   estimator                gradient point
====  =======================  ==========================================
A     ``ste``                  ``Q(w_t)``
B     ``matched_noise``        ``w_t + |delta_t| * eps`` (fresh random signs)
C     ``stochastic_rounding``  ``SR(w_t)`` on the same grid
D     ``latent``               ``w_t`` (FP training, deployed quantized)
====  =======================  ==========================================

:func:`dynamics_cell` runs one ``(model, bits, range, arm, seed)`` and returns its raw series;
:func:`paired_comparisons` pairs the arms by seed (A-B, A-C, A-D) with the statistics of
:mod:`riverscape.stats` (imported lazily).

On a model with BatchNorm (``resnet20_digits32``) every deployed evaluation -- the held-out
series of ``Q(w_t)``, hence ``T_hit``, the best iterate and the tolerance line -- and the
alignment at ``Q(w_t)`` use running statistics re-estimated at ``Q(w_t)`` on a calibration split
of the training data (:func:`bn_calibration`; docs/qat_dynamics.md §2.3). QAT itself trains with
the FP statistics frozen.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Optional, Sequence

from .objective import Objective
from .pipeline import accuracy_tolerance, arm_alignments, deployed_evaluate, hitting, reestimates_bn
from .quant.bn_reestimate import has_batchnorm
from .studies import Study, calibration_split, run_qat

__all__ = ["ARMS", "ARM_LABELS", "COMPARISONS", "FP_CONTINUATION", "CALIBRATION_SAMPLES", "alignment_steps", "bn_calibration",
           "run_outcomes", "distances_to_fp", "dynamics_cell", "paired_comparisons", "drift_comparisons", "drift_rows", "group_key",
           "table_rows", "arm_means"]

#: arm letter -> registered estimator name
ARMS = {"A": "ste", "B": "matched_noise", "C": "stochastic_rounding", "D": "latent"}
#: estimator name -> arm letter
ARM_LABELS = {name: letter for letter, name in ARMS.items()}
#: the paired contrasts, STE minus each control
COMPARISONS = (("ste", "matched_noise"), ("ste", "stochastic_rounding"), ("ste", "latent"))
#: the FP-continuation control of every distance claim: arm D's latent trajectory *is* full-precision training
#: continued from ``theta_fp`` with the same optimiser, learning rate, steps and batches (the deployed ``Q(w_t)``
#: is only measured), so its latent endpoint measures plain optimizer drift
FP_CONTINUATION = "latent"
#: training rows BatchNorm statistics are re-estimated on (one batch: the exact statistics of the split; as ``ptq_methods``)
CALIBRATION_SAMPLES = 256
_TOLERANCES: dict[tuple, Any] = {}
_CALIBRATIONS: dict[tuple, Optional[Objective]] = {}


def alignment_steps(steps: int, record_every: int, fractions: Sequence[float]) -> list[int]:
    """Logged steps nearest to ``fractions`` of the run, on the recording grid (multiples of ``record_every``, and ``steps``).

    >>> alignment_steps(200, 10, [0.0, 0.1, 0.5, 1.0])
    [0, 20, 100, 200]
    """
    grid = sorted(set(range(0, steps + 1, record_every)) | {steps})
    return sorted({min(grid, key=lambda s: abs(s - f * steps)) for f in fractions})


def bn_calibration(study: Study, samples: int, seed: int) -> Optional[Objective]:
    """The calibration split BatchNorm statistics are re-estimated on, or ``None`` for a model without BatchNorm.

    ``samples`` training rows drawn with ``seed`` (:func:`~riverscape.studies.calibration_split`: the
    calibration split ``experiments/ptq_methods.py`` uses for the same seed and size); memoised per
    study, so the four arms of a seed share it.
    """
    key = (id(study), samples, seed)
    if key not in _CALIBRATIONS:
        _CALIBRATIONS[key] = calibration_split(study, samples, seed)[0] if has_batchnorm(study.analysis) else None
    return _CALIBRATIONS[key]


def _tolerance(study: Study, bits: int, range_method: str, drop: float, calibration: Optional[Objective]):
    key = (id(study), bits, range_method, drop, None if calibration is None else id(calibration))
    if key not in _TOLERANCES:
        _TOLERANCES[key] = accuracy_tolerance(study.reference, study.quant_map(bits, range_method), drop=drop, calibration=calibration)
    return _TOLERANCES[key]


def run_outcomes(study: Study, bits: int, range_method: str, run: Any, *, accuracy_drop: float = 0.01,
                 calibration: Optional[Objective] = None) -> dict:
    """Held-out outcomes of a QAT run from ``theta_fp`` (docs/qat_dynamics.md §2).

    Parameters
    ----------
    study : Study
    bits, range_method
        The quantizer of the run (they set the tolerance ``tau``).
    run : QATResult
        Run with an ``eval_objective`` (``history["eval_loss"]``, ``history["eval_metric"]``), e.g. :func:`riverscape.studies.run_qat`.
    accuracy_drop : float
        ``tau`` is the held-out loss increase that costs this much accuracy (:func:`~riverscape.pipeline.accuracy_tolerance`).
    calibration : Objective, optional
        On a BatchNorm model (e.g. :func:`bn_calibration`): every deployed point ``Q(w_t)`` and every
        point of the tolerance line is evaluated with statistics re-estimated there on its data
        (:func:`~riverscape.pipeline.deployed_evaluate`). Ignored without BatchNorm.

    Returns
    -------
    dict
        ``steps, deployed_loss, deployed_accuracy`` (held-out, at ``Q(w_t)``); ``final_loss, final_accuracy``;
        ``best_loss, best_step, best_accuracy`` (best iterate by held-out loss); ``tolerance``; ``hit``, ``hit_time``
        (``T_hit(tau)``, censored at the last step when not hit) and ``threshold`` ``L_eval(theta_fp) + tau``;
        ``bn_reestimation`` (``{"samples", "batches"}`` of the calibration data, or ``None``). With re-estimation
        also ``stale_bn_deployed_loss`` / ``stale_bn_deployed_accuracy``: the same points with the FP statistics.
    """
    tol = _tolerance(study, bits, range_method, accuracy_drop, calibration)
    losses, accs = run.history["eval_loss"], run.history["eval_metric"]
    extra: dict[str, Any] = {"bn_reestimation": None}
    if reestimates_bn(study.reference, calibration):
        extra = {"bn_reestimation": {"samples": calibration.n_samples, "batches": len(calibration.batches)},
                 "stale_bn_deployed_loss": losses, "stale_bn_deployed_accuracy": accs}
        fresh_losses, fresh_accs = deployed_evaluate(study.reference, run.quantized_trajectory, calibration=calibration)
        losses, accs = [float(v) for v in fresh_losses], [float(v) for v in fresh_accs]
    best = min(range(len(losses)), key=losses.__getitem__)
    tau = tol.tau if tol.tau is not None else float("inf")  # no one-point drop on the line: every run "hits" at once
    hit = hitting(run.trajectory_steps, losses, tol.fp_loss + tau)
    return {
        "steps": list(run.trajectory_steps), "deployed_loss": losses, "deployed_accuracy": accs,
        "final_loss": losses[-1], "final_accuracy": accs[-1], "best_loss": losses[best], "best_step": run.trajectory_steps[best],
        "best_accuracy": accs[best], "tolerance": tol.to_dict(), "hit": hit.hit, "hit_time": hit.time, "threshold": hit.threshold,
        **extra,
    }


def distances_to_fp(study: Study, run: Any) -> dict:
    """``|Q(w_T) - theta_fp|`` (``deployed_distance_to_fp``) and ``|w_T - theta_fp|`` (``latent_distance_to_fp``) of a run's end.

    For the :data:`FP_CONTINUATION` arm the latent distance is the drift of plain FP training over the same steps.
    """
    fp = study.theta_fp.double()
    return {"deployed_distance_to_fp": float((run.theta_q.double() - fp).norm()),
            "latent_distance_to_fp": float((run.theta.double() - fp).norm())}


def dynamics_cell(
    study: Study,
    bits: int,
    range_method: str,
    arm: str,
    *,
    seed: int,
    record_every: int,
    alignment_fractions: Sequence[float],
    n_null: int = 100,
    floor_steps: int = 50,
    accuracy_drop: float = 0.01,
    calibration_samples: int = CALIBRATION_SAMPLES,
    progress: bool = False,
) -> dict:
    """One QAT run of ``arm`` from ``theta_fp`` and its measurements (a JSON-friendly dict).

    On a BatchNorm model the deployed evaluations and the alignment re-estimate the statistics at
    each ``Q(w_t)`` on ``calibration_samples`` training rows drawn with ``seed``
    (:func:`bn_calibration`); the QAT run itself trains with the FP statistics.

    Returns
    -------
    dict
        ``model, bits, range, arm (letter), estimator, seed``; the :func:`run_outcomes` (raw held-out series,
        final and best iterate, tolerance, ``hit``/``hit_time``/``threshold``); ``train_loss`` (``L(Q(w_t))``
        on the QAT set), ``discretization_error``, ``grid_flips``; :func:`distances_to_fp`; ``alignment`` rows
        (:func:`~riverscape.pipeline.arm_alignments`) and their Stouffer-pooled ``alignment_z`` (fixed
        floor direction) and ``alignment_point_z`` (from the gradient point); ``qat_seconds``, ``alignment_seconds``.
    """
    if arm not in ARM_LABELS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {tuple(ARM_LABELS)}")
    calibration = bn_calibration(study, calibration_samples, seed)
    res = run_qat(study, bits, arm, seed=seed, record_every=record_every, progress=progress, range_method=range_method)
    outcomes = run_outcomes(study, bits, range_method, res, accuracy_drop=accuracy_drop, calibration=calibration)
    hist = res.history
    chosen = alignment_steps(study.spec.qat_steps, record_every, alignment_fractions)
    rows_index = [res.trajectory_steps.index(s) for s in chosen]
    started = time.perf_counter()
    rows = arm_alignments(study.reference, study.quant_map(bits, range_method), res.latent_trajectory[rows_index], chosen, res.qparams,
                          arm=arm, n_null=n_null, floor_steps=floor_steps, seed=seed, calibration=calibration)
    pooled = {key: _pooled([r[key] for r in rows]) for key in ("z", "point_z")}
    return {
        "model": study.spec.key, "bits": bits, "range": range_method, "arm": ARM_LABELS[arm], "estimator": arm, "seed": seed,
        **outcomes, "train_loss": hist["loss"], "discretization_error": hist["discretization_error"], "grid_flips": hist["grid_flips"],
        **distances_to_fp(study, res),
        "alignment": rows, "alignment_z": pooled["z"][0], "alignment_point_z": pooled["point_z"][0],
        "qat_seconds": res.wall_time, "alignment_seconds": time.perf_counter() - started,
    }


def _pooled(zs: Iterable[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Stouffer's pooled z and one-sided p of the non-``None`` z-scores (``(None, None)`` when there are none)."""
    from .stats import stouffer

    clean = [z for z in zs if z is not None]
    return stouffer(clean) if clean else (None, None)


def group_key(result: Mapping) -> tuple:
    """``(model, bits, range)`` of a cell result."""
    return result["model"], result["bits"], result["range"]


def paired_comparisons(results: Iterable[Mapping], *, metrics: Sequence[str] = ("final_loss", "best_loss", "final_accuracy"),
                       n_boot: int = 10_000, seed: int = 0) -> list[dict]:
    """A-B, A-C, A-D per ``(model, bits, range)``, paired by seed.

    For each group and contrast ``(a, b)`` only seeds present for both arms enter. Returns one
    dict per group and contrast: ``model, bits, range, a, b, seeds`` (the paired seeds),
    ``{metric: PairedComparison.to_dict()}`` for each metric, ``logrank`` (``T_hit`` of the two
    arms' runs, censored runs as such), ``alignment`` (Stouffer-pooled z and one-sided p of each
    arm over all its runs' logged steps: ``z, p`` for the fixed floor direction, ``point_z, point_p`` from
    the gradient point) and ``holm_final_loss`` (Holm-adjusted Wilcoxon p of
    ``final_loss`` over every group and contrast of the call).
    """
    from .stats import holm, logrank, paired_comparison

    by_group: dict[tuple, dict[str, dict[int, Mapping]]] = {}
    for r in results:
        by_group.setdefault(group_key(r), {}).setdefault(r["estimator"], {})[r["seed"]] = r
    rows = []
    for (model, bits, range_method), arms in by_group.items():
        for a, b in COMPARISONS:
            if a not in arms or b not in arms:
                continue
            seeds = sorted(set(arms[a]) & set(arms[b]))
            if not seeds:
                continue
            ra, rb = [arms[a][s] for s in seeds], [arms[b][s] for s in seeds]
            row: dict[str, Any] = {"model": model, "bits": bits, "range": range_method, "a": a, "b": b, "seeds": seeds}
            for metric in metrics:
                row[metric] = paired_comparison([r[metric] for r in ra], [r[metric] for r in rb], a=ARM_LABELS[a], b=ARM_LABELS[b],
                                                n_boot=n_boot, seed=seed).to_dict()
            row["logrank"] = logrank([r["hit_time"] for r in ra], [int(r["hit"]) for r in ra],
                                     [r["hit_time"] for r in rb], [int(r["hit"]) for r in rb]).to_dict()
            row["hits"] = {ARM_LABELS[a]: sum(bool(r["hit"]) for r in ra), ARM_LABELS[b]: sum(bool(r["hit"]) for r in rb)}
            row["alignment"] = {}
            for name, runs in ((a, ra), (b, rb)):
                entry = {}
                for key in ("z", "point_z"):
                    zs = [x[key] for r in runs for x in r["alignment"]]
                    entry[key], entry[key.replace("z", "p")] = _pooled(zs)
                    entry[f"n_{key}"] = sum(z is not None for z in zs)
                row["alignment"][ARM_LABELS[name]] = entry
            rows.append(row)
    if rows:
        ps = [r["final_loss"]["wilcoxon_p"] for r in rows]
        finite = [i for i, p in enumerate(ps) if p == p]
        adjusted = holm([ps[i] for i in finite]) if finite else []
        for r in rows:
            r["holm_final_loss"] = None
        for i, p in zip(finite, adjusted):
            rows[i]["holm_final_loss"] = float(p)
    return rows


def drift_comparisons(results: Iterable[Mapping], *, n_boot: int = 10_000, seed: int = 0) -> list[dict]:
    """Distance from ``theta_fp`` of every arm's end against the FP continuation's, paired by seed.

    Per ``(model, bits, range)`` and arm, over the seeds present for the arm and for :data:`FP_CONTINUATION`:
    ``deployed`` is ``|Q(w_T) - theta_fp|`` of the arm minus ``|w_T^FP - theta_fp|`` of the FP continuation
    (the latent endpoint of arm D), ``latent`` the same with the arm's latent ``|w_T - theta_fp|``; each a
    :class:`~riverscape.stats.PairedComparison` dict. A claim "QAT lands farther from ``theta_fp``" is about
    quantization only where ``deployed`` is positive with a CI excluding 0; otherwise it is optimizer drift.
    Records without distances (older results) are skipped.
    """
    from .stats import paired_comparison

    by_group: dict[tuple, dict[str, dict[int, Mapping]]] = {}
    for r in results:
        if "latent_distance_to_fp" in r:
            by_group.setdefault(group_key(r), {}).setdefault(r["estimator"], {})[r["seed"]] = r
    rows = []
    for (model, bits, range_method), arms in by_group.items():
        control = arms.get(FP_CONTINUATION, {})
        for arm in ARMS.values():
            seeds = sorted(set(arms.get(arm, {})) & set(control))
            if len(seeds) < 2:
                continue
            fp_drift = [control[s]["latent_distance_to_fp"] for s in seeds]
            row: dict[str, Any] = {"model": model, "bits": bits, "range": range_method, "arm": ARM_LABELS[arm], "estimator": arm,
                                   "seeds": seeds, "fp_continuation": sum(fp_drift) / len(fp_drift)}
            for kind in ("deployed", "latent"):
                values = [arms[arm][s][f"{kind}_distance_to_fp"] for s in seeds]
                row[f"{kind}_mean"] = sum(values) / len(values)
                row[kind] = paired_comparison(values, fp_drift, a=f"{ARM_LABELS[arm]} {kind}", b="FP continuation",
                                              n_boot=n_boot, seed=seed).to_dict()
            rows.append(row)
    return rows


def drift_rows(comparisons: Sequence[Mapping]) -> list[dict]:
    """Flat table rows of :func:`drift_comparisons`."""
    out = []
    for c in comparisons:
        d = c["deployed"]["difference"]
        out.append({"model": c["model"], "bits": c["bits"], "range": c["range"], "arm": c["arm"], "n": c["deployed"]["n"],
                    "fp_continuation": c["fp_continuation"], "deployed": c["deployed_mean"], "latent": c["latent_mean"],
                    "diff": d["estimate"], "ci_low": d["low"], "ci_high": d["high"], "wilcoxon_p": c["deployed"]["wilcoxon_p"]})
    return out


def table_rows(comparisons: Sequence[Mapping]) -> list[dict]:
    """Flat rows of the main table: one per group and contrast."""
    out = []
    for c in comparisons:
        d = c["final_loss"]["difference"]
        a, b = ARM_LABELS[c["a"]], ARM_LABELS[c["b"]]
        out.append({
            "model": c["model"], "bits": c["bits"], "range": c["range"], "contrast": f"{a}-{b}", "n": c["final_loss"]["n"],
            "diff": d["estimate"], "ci_low": d["low"], "ci_high": d["high"], "wilcoxon_p": c["final_loss"]["wilcoxon_p"],
            "holm_p": c.get("holm_final_loss"), "hits": f"{c['hits'][a]}/{c['hits'][b]}", "logrank_p": c["logrank"]["p_value"],
            "z_A": c["alignment"][a]["z"], "z_ctrl": c["alignment"][b]["z"],
            "pz_A": c["alignment"][a]["point_z"], "pz_ctrl": c["alignment"][b]["point_z"],
        })
    return out


def arm_means(results: Iterable[Mapping], keys: Sequence[str] = ("final_loss", "final_accuracy", "best_loss")) -> list[dict]:
    """Per ``(model, bits, range, arm)``: mean of ``keys`` over seeds, runs hitting, seconds, the mean FP and PTQ
    accuracy of the seeds' FP models; on BatchNorm models also ``stale_bn_final_accuracy`` (the final deployed point
    with the FP statistics)."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in results:
        groups.setdefault((*group_key(r), r["arm"]), []).append(r)
    rows = []
    for (model, bits, range_method, arm), runs in sorted(groups.items()):
        row: dict[str, Optional[float]] = {"model": model, "bits": bits, "range": range_method, "arm": arm, "seeds": len(runs)}
        for key in keys:
            row[key] = sum(r[key] for r in runs) / len(runs)
        if all("stale_bn_deployed_accuracy" in r for r in runs):
            row["stale_bn_final_accuracy"] = sum(r["stale_bn_deployed_accuracy"][-1] for r in runs) / len(runs)
        row["hit"] = f"{sum(bool(r['hit']) for r in runs)}/{len(runs)}"
        for key in ("ptq_accuracy", "fp_accuracy"):  # every seed has its own FP model (and PTQ point): their mean
            row[key] = sum(r["tolerance"][key] for r in runs) / len(runs)
        row["s/run"] = sum(r["qat_seconds"] + r["alignment_seconds"] for r in runs) / len(runs)
        rows.append(row)
    return rows
