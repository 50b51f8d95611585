"""Cells of ``experiments/ptq_methods.py``: is the PTQ of "PTQ fails at 2 bits, QAT recovers" strong enough?

One cell quantizes one study model (:mod:`riverscape.studies`, one FP model per seed) at one
bit-width and granularity (per channel, or per group of ``group_size`` input columns) with one
method, and reports the held-out (test split) accuracy and loss of the deployed point:

===============  ===========================================================================
method           the point
===============  ===========================================================================
``rtn_minmax``   round to nearest, min-max scales
``rtn_mse``      round to nearest, MSE-searched scales (the grid of the next three methods)
``gptq``         GPTQ on the MSE grid (docs/ptq_methods.md §4)
``adaround``     AdaRound on the MSE grid (docs/ptq_methods.md §5)
``nearby``       greedy code flips from ``rtn_mse`` (docs/ptq_search.md §3.1)
``qat_ste``      QAT with the STE from ``theta_fp`` (min-max scales; the study's QAT budget)
``qat_lsq``      QAT with LSQ (per channel only: LSQ learns one step per channel)
===============  ===========================================================================

Every data-aware PTQ method (GPTQ, AdaRound, the flip search) sees only the *calibration split*:
``calibration_samples`` rows of the study's **training** split drawn with the cell's seed; the
best PTQ method per seed is chosen on a disjoint *validation split* of the training split
(:func:`training_splits`: searching the calibration loss directly, the flip search would win
that choice by over-fitting the calibration rows). Nothing is searched or selected on the test
split. The record stores the drawn training indices so this can be checked.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .objective import Objective
from .pipeline import evaluate_point, measure_ptq, point_objectives
from .quant import UniformQuantizer
from .quant.bn_reestimate import objective_on_module
from .quant.nearby import greedy_flip_search
from .quant.ptq import GPTQ, RTN, AdaRound
from .stats import mean_ci, paired_comparison
from .stats.summary import format_interval, seed_interval  # re-exported: experiments/ptq_methods.py reads them from here
from .studies import STUDY_MODELS, Study, StudyModel, calibration_split, run_qat, study_model, training_permutation, training_rows

__all__ = [
    "RESNET_STUDY",
    "experiment_model",
    "PTQ_COMPARED",
    "QAT_COMPARED",
    "METHODS",
    "CONTRASTS",
    "TrainingSplits",
    "training_splits",
    "method_quantizer",
    "fp_point_cell",
    "ptq_method_cell",
    "granularity",
    "summary_rows",
    "paired_contrasts",
    "format_interval",
    "seed_interval",
]

#: CIFAR ResNet-20 with BatchNorm at width 8 (68,786 parameters; width 16 costs 2.6x more per step on CPU) on the
#: CIFAR-shaped digits (:func:`riverscape.data.digits32`). Not in :data:`riverscape.studies.STUDY_MODELS` (the other
#: experiments run every registered model); ``experiments/ptq_methods.py --models`` adds it.
RESNET_STUDY = StudyModel(
    "resnet20_digits32", "resnet20", "digits32", train_steps=500, train_lr=3e-3, train_batch=128, qat_steps=150, qat_lr=1e-3,
    qat_batch=128, analysis_samples=256, qat_samples=1024, trace_matvecs=20, floor=False, qat_record_every=50,
    model_options=(("width", 8),),
)


def experiment_model(key: str, **overrides) -> StudyModel:
    """A model of this experiment: a registered study model (:func:`~riverscape.studies.study_model`) or :data:`RESNET_STUDY`."""
    if key == RESNET_STUDY.key:
        return replace(RESNET_STUDY, **overrides)
    if key not in STUDY_MODELS:
        raise ValueError(f"unknown model {key!r}; choose from {(*STUDY_MODELS, RESNET_STUDY.key)}")
    return study_model(key, **overrides)


#: PTQ methods compared (cell method names)
PTQ_COMPARED = ("rtn_minmax", "rtn_mse", "gptq", "adaround", "nearby")
#: QAT methods (``qat_<estimator>``)
QAT_COMPARED = ("qat_ste", "qat_lsq")
METHODS = PTQ_COMPARED + QAT_COMPARED
#: paired contrasts ``(a, b)``: a minus b per seed; ``best_ptq`` is, per seed, the PTQ method with the lowest
#: loss on the validation split of the training data (disjoint from the calibration split; never the test split)
CONTRASTS = (("best_ptq", "qat_ste"), ("best_ptq", "qat_lsq"), ("qat_ste", "rtn_minmax"), ("gptq", "rtn_mse"),
             ("adaround", "rtn_mse"), ("nearby", "rtn_mse"))
# the scale calibration of each method's grid: the data-aware methods round on RTN-mse's grid
_RANGE = {"rtn_minmax": "minmax", "rtn_mse": "mse", "gptq": "mse", "adaround": "mse", "nearby": "mse", "qat_ste": "minmax", "qat_lsq": "minmax"}


def method_quantizer(method: str, bits: int, group_size: Optional[int]) -> UniformQuantizer:
    """The symmetric quantizer a method deploys: per channel (``group_size=None``) or per group, its range calibration."""
    if method not in _RANGE:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return UniformQuantizer(bits, range=_RANGE[method], group_size=group_size)


@dataclass(frozen=True)
class TrainingSplits:
    """Two disjoint subsets of a study's training split (never the test split).

    Attributes
    ----------
    calibration, validation : Objective
        Same model, loss, quantized tensors and dtype as ``study.analysis``. GPTQ, AdaRound and
        the flip search calibrate on ``calibration``; ``best_ptq`` is chosen on ``validation``.
    calibration_index, validation_index : Tensor
        Sorted row indices into ``study.dataset.train``.
    """

    calibration: Objective
    validation: Objective
    calibration_index: Tensor
    validation_index: Tensor


def training_splits(study: Study, calibration_samples: int, validation_samples: int, seed: int) -> TrainingSplits:
    """Draw ``calibration_samples`` and then ``validation_samples`` rows of the training split without replacement.

    One seeded permutation of the training rows (:func:`~riverscape.studies.training_permutation`):
    the first ``calibration_samples`` are the calibration split
    (:func:`~riverscape.studies.calibration_split`), the next ``validation_samples`` (capped at
    what is left) the validation split.
    """
    if isinstance(validation_samples, bool) or not isinstance(validation_samples, int) or validation_samples < 1:
        raise ValueError(f"validation_samples must be an integer in [1, inf] (training split of {len(study.dataset.train[0])} rows), "
                         f"got {validation_samples!r}")
    calibration, cal = calibration_split(study, calibration_samples, seed)
    val = training_permutation(study, seed)[calibration_samples:calibration_samples + validation_samples].sort().values
    return TrainingSplits(calibration, training_rows(study, val), cal, val)


def fp_point_cell(study: Study) -> dict:
    """Test accuracy and loss of ``theta_fp`` (and its analysis-set loss)."""
    return {**study.evaluate(study.theta_fp), "dim": study.analysis.dim, "eval_samples": study.evaluation.n_samples}


def _ptq_config(method: str, n_samples: int, seed: int, adaround_iterations: int):
    if method == "gptq":
        return GPTQ(calibration_samples=n_samples, seed=seed)
    if method == "adaround":
        return AdaRound(iterations=adaround_iterations, calibration_samples=n_samples, seed=seed)
    return RTN(calibration_samples=n_samples, seed=seed)  # same point; reports the reconstruction error too


def ptq_method_cell(
    study: Study,
    bits: int,
    group_size: Optional[int],
    method: str,
    *,
    seed: int,
    calibration_samples: int = 256,
    validation_samples: int = 1024,
    adaround_iterations: int = 500,
    flip_rounds: int = 50,
    flip_candidates: int = 16,
    flip_matvecs: int = 100,
    bn_reestimate: bool = False,
    progress: bool = False,
) -> dict:
    """Quantize the study's FP model with ``method`` and evaluate the point on the test split.

    Parameters
    ----------
    study : Study
    bits : int
    group_size : int or None
        Per-group scales over this many input columns; ``None``: per channel.
    method : str
        One of :data:`METHODS`.
    seed : int
        Seeds the calibration draw, GPTQ/AdaRound's subsample and QAT's mini-batches.
    calibration_samples, validation_samples : int
        Sizes of the calibration and validation splits of the training data (:func:`training_splits`).
    adaround_iterations : int
    flip_rounds, flip_candidates, flip_matvecs : int
        ``rounds``, ``candidates_per_round`` and ``diagonal_matvecs`` of
        :func:`~riverscape.quant.nearby.greedy_flip_search`.
    bn_reestimate : bool
        Evaluate every deployed point (PTQ and QAT alike) with BatchNorm running statistics
        re-estimated there on the calibration split (docs/ptq_search.md §2); the point itself is
        chosen as without (GPTQ/AdaRound/RTN do not look at the statistics; the flip search and
        QAT see the FP statistics). No effect without BatchNorm.
    progress : bool

    Returns
    -------
    dict
        ``accuracy``, ``loss`` (test), ``train_loss`` (analysis set), ``short_name``, ``range``,
        ``seconds``; PTQ methods add ``calibration_loss`` and ``validation_loss`` (on the two
        splits), ``calibration_samples``, ``calibration_indices``, ``validation_samples``,
        ``validation_indices`` (into the training split),
        ``calibration_source`` (``"train"``) and, where defined, ``reconstruction_error_mean``,
        ``rtn_fallback``, ``flips``, ``damage_removed``, ``evaluations``, ``stop_reason``;
        QAT methods add ``qat_steps`` and ``total_grid_flips``. With ``bn_reestimate`` on a
        BatchNorm model: ``bn_reestimation`` (samples) and ``stale_bn_accuracy``/``stale_bn_loss``
        (test, with the FP statistics).
    """
    quantizer = method_quantizer(method, bits, group_size)
    out = {"short_name": quantizer.short_name, "range": _RANGE[method]}
    start = time.perf_counter()
    splits = training_splits(study, calibration_samples, validation_samples, seed)
    calibration = splits.calibration
    qmap = study.reference.quant_map(quantizer)
    if method in QAT_COMPARED:
        res = run_qat(study, bits, method.split("_", 1)[1], seed=seed, progress=progress, group_size=group_size)
        out.update(_deployed(study, qmap, res.theta_q, splits, bn_reestimate, with_splits=False),
                   qat_steps=study.spec.qat_steps, total_grid_flips=int(sum(res.grid_flips)))
        return {**out, "seconds": time.perf_counter() - start}
    if method == "nearby":
        searched = calibration
        if bn_reestimate:  # search on the loss the point is deployed with: statistics re-estimated at the RTN start, then fixed
            start_objectives = point_objectives(study.reference, qmap, qmap(study.theta_fp), bn_reestimate=True, calibration=calibration)
            if start_objectives is not None:
                searched = objective_on_module(calibration, start_objectives.module)
                out["search_bn"] = "re-estimated at the RTN start"
        search = greedy_flip_search(searched, qmap, study.theta_fp, rounds=flip_rounds, candidates_per_round=flip_candidates,
                                    diagonal_matvecs=flip_matvecs, seed=seed, progress=progress)
        point = search.theta_best
        summary = search.to_dict()
        out.update(flips=search.flips, damage_removed=summary["damage_removed"], evaluations=search.evaluations,
                   stop_reason=search.stop_reason)
    else:
        measured = measure_ptq(study.reference, qmap, method=_ptq_config(method, calibration_samples, seed, adaround_iterations),
                               perplexity=study.spec.perplexity, calibration=calibration)
        point = measured.point
        out.update({k: v for k, v in measured.metrics.items()
                    if k not in ("method", "delta_norm", "relative_delta_norm", "reconstruction_error", "setting", "loss_measured")})
    out.update(_deployed(study, qmap, point, splits, bn_reestimate, with_splits=True), calibration_source="train",
               calibration_samples=len(splits.calibration_index), calibration_indices=splits.calibration_index.tolist(),
               validation_samples=len(splits.validation_index), validation_indices=splits.validation_index.tolist())
    return {**out, "seconds": time.perf_counter() - start}


def _deployed(study: Study, qmap, point: Tensor, splits: TrainingSplits, bn_reestimate: bool, *, with_splits: bool) -> dict:
    """Test metrics of a deployed point (and its calibration/validation losses), BatchNorm re-estimated on the calibration split when asked."""
    metrics, objectives = evaluate_point(study.reference, qmap, point, perplexity=study.spec.perplexity, bn_reestimate=bn_reestimate,
                                         calibration=splits.calibration)
    out = {k: metrics[k] for k in ("loss", "accuracy", "train_loss", "perplexity") if k in metrics}
    calibration, validation = splits.calibration, splits.validation
    if objectives is not None and objectives.bn_samples is not None:
        out.update(bn_reestimation=metrics["bn_reestimation"], stale_bn_loss=metrics["stale_bn"]["loss"],
                   stale_bn_accuracy=metrics["stale_bn"]["accuracy"])
        calibration, validation = (objective_on_module(obj, objectives.module) for obj in (calibration, validation))
    if with_splits:
        out.update(calibration_loss=calibration.loss(point), validation_loss=validation.loss(point))
    return out


# ---------------------------------------------------------------------- summaries over seeds
def granularity(group_size: Optional[int]) -> str:
    """``"channel"`` or ``"g<G>"``."""
    return "channel" if group_size is None else f"g{group_size}"


def _groups(records: Iterable[Mapping]) -> dict[tuple, dict[str, dict[int, dict]]]:
    """``{(model, bits, granularity): {method: {seed: result}}}`` of the quantized cells."""
    out: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in records:
        p = r["params"]
        if p["method"] == "fp":
            continue
        out.setdefault((p["model"], p["bits"], granularity(p["group_size"])), {}).setdefault(p["method"], {})[p["seed"]] = r["result"]
    return out


def _with_best_ptq(methods: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """Add ``best_ptq``: per seed (present for every PTQ method), the PTQ result with the lowest validation loss."""
    present = [m for m in PTQ_COMPARED if m in methods]
    if not present:
        return methods
    seeds = set.intersection(*(set(methods[m]) for m in present))
    best = {}
    for seed in sorted(seeds):
        method = min(present, key=lambda m: methods[m][seed]["validation_loss"])
        best[seed] = {**methods[method][seed], "selected": method}
    return {**methods, "best_ptq": best}


def summary_rows(records: Iterable[Mapping], *, level: float = 0.95) -> list[dict]:
    """One row per (model, bits, granularity, method) with ``accuracy`` and ``loss`` intervals over seeds.

    Also ``best_ptq`` rows (:data:`CONTRASTS`) with ``selected``: how often each PTQ method was picked. Cells
    evaluated with re-estimated BatchNorm statistics add ``stale_bn_accuracy`` and ``stale_bn_loss`` intervals.
    """
    rows = []
    for (model, bits, gran), methods in _groups(records).items():
        for method, by_seed in _with_best_ptq(methods).items():
            results = [by_seed[s] for s in sorted(by_seed)]
            row = {"model": model, "bits": bits, "granularity": gran, "method": method, "n": len(results),
                   "short_name": results[0]["short_name"] if method != "best_ptq" else None}
            for key in ("accuracy", "loss"):
                row[key] = seed_interval([res[key] for res in results], level)
            for key in ("stale_bn_accuracy", "stale_bn_loss"):  # BatchNorm models: the same points with the FP statistics
                if all(key in res for res in results):
                    row[key] = seed_interval([res[key] for res in results], level)
            if method == "best_ptq":
                picks = [res["selected"] for res in results]
                row["selected"] = {m: picks.count(m) for m in PTQ_COMPARED if m in picks}
            rows.append(row)
    return rows


def paired_contrasts(records: Iterable[Mapping], contrasts: Sequence[tuple[str, str]] = CONTRASTS, *, level: float = 0.95) -> list[dict]:
    """Paired-by-seed differences ``a - b`` of test accuracy and loss per (model, bits, granularity).

    Uses :func:`riverscape.stats.paired_comparison` (BCa interval of the mean difference, Wilcoxon
    p); contrasts with fewer than two common seeds (or a missing arm, e.g. LSQ per group) are skipped.
    """
    rows = []
    for (model, bits, gran), methods in _groups(records).items():
        methods = _with_best_ptq(methods)
        for a, b in contrasts:
            if a not in methods or b not in methods:
                continue
            seeds = sorted(set(methods[a]) & set(methods[b]))
            if len(seeds) < 2:
                continue
            row = {"model": model, "bits": bits, "granularity": gran, "a": a, "b": b, "n": len(seeds)}
            for key in ("accuracy", "loss"):
                cmp = paired_comparison([methods[a][s][key] for s in seeds], [methods[b][s][key] for s in seeds], a=a, b=b, level=level)
                row[key] = {**cmp.difference.to_dict(), "wilcoxon_p": cmp.wilcoxon_p}
            rows.append(row)
    return rows
