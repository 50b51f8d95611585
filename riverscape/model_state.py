"""Model state as an axis: how PTQ damage and the alignment effect move with the sharpness of ``theta_fp`` (docs/model_state.md).

The seed paper ties the basin width to training (edge of stability, weight decay, training
length). This module trains the FP model in different *states* and measures, at each state's
``theta_fp`` and its round-to-nearest point ``q = Q(theta_fp)``:

* sharpness: ``lambda_max`` (top Hessian eigenvalue of the quantized weights, and of all trainable
  parameters, next to the edge-of-stability value ``2 / lr``) and the Hutch++ trace;
* PTQ damage: ``damage_ratio = (L(q) - L(theta_fp)) / L(theta_fp)`` and ``measured_over_predicted``,
  the measured increase over its second-order prediction ``g^T delta + delta^T H delta / 2``;
* the alignment effect against the matched null (docs/theory.md §7.4): ``A = cos(-grad L(q), theta_fp - q)``
  against ``A' = cos(-grad L(theta_fp + delta'), -delta')`` with ``delta' = delta * eps`` (random signs),
  and ``A_F = cos(-grad L(q), F - q)`` to the valley floor ``F`` below ``q`` against matched-noise
  gradient points (:func:`~riverscape.gradients.floor_alignment`); each with its z and empirical p.

Training is full-batch gradient descent without momentum (``optimizer="sgd", momentum=0``), so the
classical edge-of-stability bound ``lambda_max <= 2 / lr`` of the training loss applies (Cohen et al.
2021); the curvature is measured on the same training samples. One run per ``(model, weight decay,
lr, seed)`` records the iterates at every training length (the lengths are prefixes of one run).

:func:`state_cell` measures one ``(model, weight_decay, lr, steps, bits, range, seed)``;
:func:`summary_rows`, :func:`sharpness_correlations` and :func:`state_contrasts` give the statistics
(cell means with 95 % t intervals; Spearman across cells with a bootstrap over seeds; paired
contrasts between extreme states with Holm).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .checkpoint import load_checkpoint, save_checkpoint
from .data import load_dataset
from .gradients import damage, floor_alignment, matched_null
from .gradients.arms import NullComparison
from .io.jsonable import Record
from .landscape.curvature import hessian_eigs, hessian_trace
from .models import build_model
from .pipeline import HILL_K, Reference, alignment_at, build_reference, cap_samples, measure_ptq
from .ptq_study import seed_interval
from .quant import UniformQuantizer
from .quant.estimators import random_signs
from .training import train

__all__ = ["StateModel", "STATE_MODELS", "state_model", "StateReference", "load_state", "state_cell", "EFFECTS", "summary_rows",
           "sharpness_correlations", "state_contrasts"]


@dataclass(frozen=True)
class StateModel(Record):
    """What the model-state study trains and where it measures.

    Attributes
    ----------
    key : str
        The ``model`` field of every record (e.g. ``"digits_mlp"``).
    model, data : str
        Names for :func:`riverscape.build_model` and :func:`riverscape.load_dataset`.
    train_samples : int or None
        Training rows used for full-batch gradient descent and for every curvature, damage and
        alignment measurement (``None``: the whole training split).
    eval_samples : int or None
        Cap of the test split (held-out loss and accuracy).
    dtype : str
        ``"float64"`` or ``"float32"`` of the objectives (training runs in float32).
    k : int
        Hill subspace size (top-``k`` eigenpairs at ``theta_fp``: hill fraction of the damage, floor frame).
    trace_matvecs : int
        Hutch++ budget of ``tr H``.
    """

    key: str
    model: str
    data: str
    train_samples: Optional[int] = None
    eval_samples: Optional[int] = None
    dtype: str = "float32"
    k: int = HILL_K
    trace_matvecs: int = 60


STATE_MODELS: dict[str, StateModel] = {
    "digits_mlp": StateModel("digits_mlp", "mlp", "digits", dtype="float64", trace_matvecs=99),
    "mnist1d_cnn": StateModel("mnist1d_cnn", "cnn1d", "mnist1d", train_samples=512, eval_samples=1000, trace_matvecs=30),
}


def state_model(key: str, **overrides: Any) -> StateModel:
    """A registered :class:`StateModel` with some fields replaced."""
    if key not in STATE_MODELS:
        raise ValueError(f"unknown state model {key!r}; choose one of {tuple(STATE_MODELS)}")
    return replace(STATE_MODELS[key], **overrides)


# ---------------------------------------------------------------------- training (one run per wd, lr, seed)
def _run_path(spec: StateModel, weight_decay: float, lr: float, lengths: Sequence[int], seed: int, cache_dir: Path) -> Path:
    settings = {"model": spec.model, "data": spec.data, "samples": spec.train_samples, "wd": weight_decay, "lr": lr,
                "lengths": sorted(int(s) for s in lengths), "seed": seed, "optimizer": "gd"}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"{spec.model}-{spec.data}-gd-seed{seed}-{digest}.pt"


def _train_run(spec: StateModel, weight_decay: float, lr: float, lengths: Sequence[int], seed: int, cache_dir: Path):
    """The cached run of full-batch GD to ``max(lengths)`` steps with the iterates at ``lengths`` (trained first if missing)."""
    path = _run_path(spec, weight_decay, lr, lengths, seed, cache_dir)
    if not path.exists():
        dataset = load_dataset(spec.data)
        torch.manual_seed(seed)  # the built-in models initialise from the global RNG; scripts own their process
        model = build_model(spec.model, **dataset.model_kwargs(spec.model))
        result = train(model, cap_samples(dataset.train, spec.train_samples), loss_fn=dataset.loss, steps=max(lengths), lr=lr,
                       optimizer="sgd", momentum=0.0, batch_size=None, weight_decay=weight_decay, record_steps=list(lengths), seed=seed)
        save_checkpoint(path, result.model, model_spec={"name": spec.model, "kwargs": dataset.model_kwargs(spec.model)},
                        data_spec=spec.data, loss=dataset.loss, train_result=result,
                        train_config={"steps": max(lengths), "lr": lr, "optimizer": "sgd", "momentum": 0.0, "batch_size": None,
                                      "weight_decay": weight_decay, "seed": seed, "train_samples": spec.train_samples})
    return load_checkpoint(path)


@dataclass
class StateReference:
    """One training state: its :class:`~riverscape.pipeline.Reference` (analysis set = the GD training set) and settings."""

    spec: StateModel
    weight_decay: float
    lr: float
    steps: int
    seed: int
    reference: Reference
    final_train_loss: float

    _sharpness: Optional[dict] = None

    def sharpness(self) -> dict:
        """``top_eigenvalue`` and ``trace`` (quantized weights), ``top_eigenvalue_all`` (all trainable parameters),
        ``eos`` (``2 / lr``), ``lr_times_top`` (``lr * lambda_max_all / 2``: 1 at the edge of stability),
        ``weight_norm`` (quantized weights) and ``param_norm`` (all); computed once."""
        if self._sharpness is None:
            ref = self.reference
            values, _ = ref.hill(self.spec.k)
            trace = hessian_trace(ref.analysis, ref.theta_fp, matvecs=self.spec.trace_matvecs, operator=ref.fp_operator(), seed=ref.seed)
            everything = ref.full
            top_all, _ = hessian_eigs(everything, everything.theta0, 1, seed=ref.seed)
            self._sharpness = {
                "top_eigenvalue": float(values[0]), "trace": trace.value, "trace_stderr": trace.stderr,
                "top_eigenvalue_all": float(top_all[0]), "eos": 2.0 / self.lr, "lr_times_top": self.lr * float(top_all[0]) / 2.0,
                "weight_norm": float(ref.theta_fp.norm()), "param_norm": float(everything.theta0.norm()),
            }
        return self._sharpness


_LAST: dict[tuple, StateReference] = {}


def load_state(spec: StateModel, weight_decay: float, lr: float, steps: int, lengths: Sequence[int], seed: int, cache_dir: Path) -> StateReference:
    """The :class:`StateReference` of ``theta_fp`` after ``steps`` of the run ``(spec, weight_decay, lr, seed)`` to ``max(lengths)``.

    The last state is memoised in-process, so the cells of one state (bits, ranges) share its
    eigenpairs and sharpness; one state at a time is kept (its Hessian graph is large).
    """
    if steps not in lengths:
        raise ValueError(f"steps={steps} is not one of the recorded lengths {list(lengths)}")
    key = (spec, float(weight_decay), float(lr), int(steps), tuple(sorted(lengths)), int(seed), str(Path(cache_dir).resolve()))
    if key in _LAST:
        return _LAST[key]
    for old in _LAST.values():
        old.reference.release()
    _LAST.clear()
    run = _train_run(spec, weight_decay, lr, lengths, seed, cache_dir)
    model = run.model
    row = run.trajectory_steps.index(int(steps))
    torch.nn.utils.vector_to_parameters(run.trajectory[row].to(next(model.parameters())), [p for p in model.parameters() if p.requires_grad])
    dataset = load_dataset(spec.data)
    data = cap_samples(dataset.train, spec.train_samples)
    reference, _ = build_reference(model, dataset.loss, data, cap_samples(dataset.test, spec.eval_samples), quantizer=UniformQuantizer(8),
                                   dtype=getattr(torch, spec.dtype), seed=seed)
    state = StateReference(spec, float(weight_decay), float(lr), int(steps), int(seed), reference, reference.analysis.loss(reference.theta_fp))
    _LAST[key] = state
    return state


# ---------------------------------------------------------------------- one cell
def _static_alignment(ref: Reference, qmap, point: Tensor, n_null: int, seed: int) -> dict:
    """``A = cos(-grad L(q), theta_fp - q)`` against the matched sign-flip null (docs/theory.md §7.4), with z and empirical p."""
    static = alignment_at(ref, qmap, point, n_null=0, floor=False, per_layer=False)
    delta = point - ref.theta_fp
    generator = torch.Generator().manual_seed(1_000_003 * int(seed) + 17)
    signs = random_signs((n_null, ref.dim), generator, dtype=delta.dtype, device=delta.device)
    null = matched_null(ref.analysis, ref.theta_fp, delta, signs)
    comparison = NullComparison.of(static.cosine_to_fp, null.cosines).to_dict()
    return {"align_cosine": comparison["observed"], "align_null_mean": comparison["null_mean"], "align_null_sd": comparison["null_sd"],
            "align_z": comparison["z"], "align_p": comparison["p_value"], "cosine_hill": static.cosine_hill,
            "cosine_river": static.cosine_river, "random_baseline": static.random_baseline}


def _floor_alignment(ref: Reference, qmap, k: int, n_null: int, floor_steps: int, seed: int) -> dict:
    """STE's ``cos(-grad L(Q(theta_fp)), F - Q(theta_fp))`` against matched-noise gradient points (docs/qat_dynamics.md §3)."""
    generator = torch.Generator().manual_seed(1_000_003 * int(seed) + 29)
    result = floor_alignment(ref.analysis, qmap, ref.theta_fp, qmap.qparams(ref.theta_fp), ref.basis(k).vectors, arm="ste",
                             reference=ref.theta_fp, n_null=n_null, floor_steps=floor_steps, generator=generator).to_dict()
    return {"floor_cosine": result["cosine"], "floor_null_mean": result["null_mean"], "floor_z": result["z"], "floor_p": result["p_value"],
            "floor_loss_increase": result["floor_loss"] - result["deployed_loss"] if result["floor_loss"] is not None else None}


def state_cell(state: StateReference, bits: int, range_method: str, *, n_null: int = 50, floor_steps: int = 30) -> dict:
    """Sharpness of ``theta_fp``, PTQ damage at ``Q(theta_fp)`` and the alignment effect there, for one state.

    Parameters
    ----------
    state : StateReference
    bits : int
    range_method : {"minmax", "mse", "percentile"}
        Range calibration of the per-channel symmetric quantizer.
    n_null : int
        Draws of each matched null (at least 2; one gradient each).
    floor_steps : int
        L-BFGS iterations of the valley-floor solve of the floor alignment.

    Returns
    -------
    dict
        The axis values ``model, weight_decay, lr, steps, bits, range, seed``; the state's
        :meth:`StateReference.sharpness`; ``train_loss_fp`` (the GD training set), ``test_loss_fp``,
        ``test_accuracy_fp``; at the PTQ point ``ptq_train_loss``, ``ptq_test_loss``, ``ptq_test_accuracy``,
        ``measured_loss_increase``, ``predicted_loss_increase``, ``damage_ratio``, ``measured_over_predicted``,
        ``hill_fraction``, ``breakdown_scale``, ``delta_norm``; the static alignment
        (``align_cosine, align_null_mean, align_null_sd, align_z, align_p``, hill and river cosines) and the
        floor alignment (``floor_cosine, floor_null_mean, floor_z, floor_p``); ``n_null``.
    """
    if n_null < 2:
        raise ValueError(f"n_null must be at least 2, got {n_null}")
    ref, spec = state.reference, state.spec
    qmap = ref.quant_map(UniformQuantizer(bits, range=range_method))
    fp = ref.evaluate(ref.theta_fp)
    measured = measure_ptq(ref, qmap)
    point = measured.point
    # no basin widths (rho): half the cost of a quick CNN cell, and not an effect of this study
    dmg = damage(ref.analysis, ref.theta_fp, qmap, theta_q=point, basis=ref.basis(spec.k), widths=False, floor=False, random_control=False,
                 rtn_matvecs=0, seed=ref.seed, progress=False)
    loss_fp = dmg.loss_fp
    return {
        "model": spec.key, "weight_decay": state.weight_decay, "lr": state.lr, "steps": state.steps, "bits": bits, "range": range_method,
        "seed": state.seed, **state.sharpness(),
        "train_loss_fp": loss_fp, "test_loss_fp": fp["loss"], "test_accuracy_fp": fp["accuracy"],
        "ptq_train_loss": measured.metrics["train_loss"], "ptq_test_loss": measured.metrics["loss"], "ptq_test_accuracy": measured.metrics["accuracy"],
        "measured_loss_increase": dmg.measured_loss_increase, "predicted_loss_increase": dmg.predicted_loss_increase,
        "damage_ratio": dmg.measured_loss_increase / loss_fp if loss_fp > 0 else None, "measured_over_predicted": dmg.ratio,
        "hill_fraction": dmg.hill_fraction, "breakdown_scale": dmg.breakdown_scale if math.isfinite(dmg.breakdown_scale) else None,
        "delta_norm": dmg.delta_norm,
        **_static_alignment(ref, qmap, point, n_null, state.seed),
        **_floor_alignment(ref, qmap, spec.k, n_null, floor_steps, state.seed),
        "n_null": n_null,
    }


# ---------------------------------------------------------------------- statistics
#: effects whose relation to sharpness the study reports (record key -> label)
EFFECTS = {
    "damage_ratio": "PTQ ΔL / L_fp",
    "measured_loss_increase": "PTQ ΔL",
    "measured_over_predicted": "measured / predicted ΔL",
    "align_z": "alignment z (to θ_fp)",
    "floor_z": "alignment z (to floor)",
}

_AXES = ("weight_decay", "lr", "steps")


def _state_key(r: Mapping) -> tuple:
    return tuple(r[a] for a in _AXES)


def _groups(records: Iterable[Mapping]) -> dict[tuple, dict[tuple, dict[int, Mapping]]]:
    """``{(model, bits, range): {(weight_decay, lr, steps): {seed: record}}}``."""
    out: dict[tuple, dict[tuple, dict[int, Mapping]]] = {}
    for r in records:
        out.setdefault((r["model"], r["bits"], r["range"]), {}).setdefault(_state_key(r), {})[r["seed"]] = r
    return out


def _values(by_seed: Mapping[int, Mapping], key: str) -> list[float]:
    return [float(by_seed[s][key]) for s in sorted(by_seed) if by_seed[s].get(key) is not None]


def summary_rows(records: Iterable[Mapping], *, level: float = 0.95,
                 keys: Sequence[str] = ("top_eigenvalue", "top_eigenvalue_all", "trace", "weight_norm", "train_loss_fp", "test_accuracy_fp",
                                        "ptq_test_accuracy", *EFFECTS)) -> list[dict]:
    """One row per (model, bits, range, weight_decay, lr, steps): ``n`` seeds, the mean with its 95 % t interval of
    each of ``keys`` (``{estimate, low, high, level, n}``), ``eos`` (``2 / lr``) and the Stouffer-pooled alignment
    z over seeds (``align_pooled_z``, ``floor_pooled_z``) with one-sided p."""
    from .stats import stouffer

    rows = []
    for (model, bits, range_method), states in _groups(records).items():
        for (wd, lr, steps), by_seed in sorted(states.items()):
            row: dict[str, Any] = {"model": model, "bits": bits, "range": range_method, "weight_decay": wd, "lr": lr, "steps": steps,
                                   "n": len(by_seed), "eos": 2.0 / lr}
            for key in keys:
                row[key] = seed_interval(_values(by_seed, key), level)
            for name in ("align", "floor"):
                zs = [z for z in _values(by_seed, f"{name}_z") if math.isfinite(z)]
                row[f"{name}_pooled_z"], row[f"{name}_pooled_p"] = stouffer(zs) if zs else (None, None)
            rows.append(row)
    return rows


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of the rows of ``x`` and ``y`` (shape ``(..., n)``; average ranks for ties): the Pearson
    correlation of the ranks, ``nan`` for a row with a non-finite entry or without spread."""
    from scipy.stats import rankdata

    x, y = np.atleast_2d(x), np.atleast_2d(y)
    bad = ~(np.isfinite(x).all(-1) & np.isfinite(y).all(-1))
    rx = rankdata(np.where(np.isfinite(x), x, 0.0), axis=-1)
    ry = rankdata(np.where(np.isfinite(y), y, 0.0), axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    denominator = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(-1) / denominator
    rho[bad | (denominator == 0) | (x.shape[-1] < 3)] = np.nan
    return rho


def sharpness_correlations(records: Iterable[Mapping], *, sharpness: str = "top_eigenvalue", effects: Sequence[str] = tuple(EFFECTS),
                           level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Spearman correlation across states between the state-mean sharpness and the state-mean effect.

    Per (model, bits, range) and effect: ``rho`` of the cell means over seeds, and a percentile
    bootstrap interval over seeds (the seeds are resampled with replacement, the same draw for every
    state, since one seed shares its initialisation across states; cell means and ``rho`` recomputed).
    Only seeds present in every state enter. ``n_states``, ``n_seeds``; ``per_seed``: the mean over
    seeds of the per-seed Spearman across states with its t interval (seeds are the independent units).
    """
    rng = np.random.default_rng(seed)
    alpha = (1.0 - level) / 2
    rows = []
    for (model, bits, range_method), states in _groups(records).items():
        seeds = sorted(set.intersection(*(set(s) for s in states.values())))
        if len(seeds) < 2 or len(states) < 3:
            continue
        keys = sorted(states)

        def matrix(key: str) -> np.ndarray:  # (states, seeds)
            return np.array([[np.nan if states[k][s].get(key) is None else float(states[k][s][key]) for s in seeds] for k in keys])

        x = matrix(sharpness)
        draws = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
        for effect in effects:
            y = matrix(effect)
            with warnings.catch_warnings():  # a state whose resampled seeds all lack the effect: nan, dropped below
                warnings.simplefilter("ignore", RuntimeWarning)
                rho = float(_spearman(np.nanmean(x, 1), np.nanmean(y, 1))[0])
                boot = _spearman(np.nanmean(x[:, draws], 2).T, np.nanmean(y[:, draws], 2).T)  # (n_boot,)
            boot = boot[np.isfinite(boot)]
            low, high = (np.quantile(boot, [alpha, 1 - alpha]).tolist() if boot.size else (math.nan, math.nan))
            per_seed = _spearman(x.T, y.T)  # one rho per seed, across states
            rows.append({"model": model, "bits": bits, "range": range_method, "sharpness": sharpness, "effect": effect, "rho": rho,
                         "low": low, "high": high, "level": level, "n_states": len(keys), "n_seeds": len(seeds),
                         "per_seed": seed_interval(per_seed[np.isfinite(per_seed)].tolist(), level)})
    return rows


def _extremes(values: Iterable[float]) -> tuple[float, float]:
    ordered = sorted(set(values))
    return ordered[0], ordered[-1]


def state_contrasts(records: Iterable[Mapping], *, metrics: Sequence[str] = ("top_eigenvalue", "trace", "weight_norm", *EFFECTS),
                    n_boot: int = 10_000, seed: int = 0) -> list[dict]:
    """Paired by seed: the largest minus the smallest level of each axis, averaged over the other axes' levels.

    Per (model, bits, range), axis (``weight_decay``, ``lr``, ``steps``) and metric: for every seed,
    ``d_s = mean over the other axes' levels of [m(high) - m(low)]``, then
    :func:`riverscape.stats.paired_comparison` of the two per-seed means (BCa interval of the mean of
    ``d_s``, Wilcoxon p). Only seeds present at every state of the contrast enter. ``holm_p``: Holm's
    adjustment of the Wilcoxon p over every contrast and metric of the call that has one.
    """
    from .stats import holm, paired_comparison

    rows = []
    for (model, bits, range_method), states in _groups(records).items():
        for axis in _AXES:
            i = _AXES.index(axis)
            low, high = _extremes(k[i] for k in states)
            if low == high:
                continue
            others = sorted({k[:i] + k[i + 1:] for k in states})
            pairs = [(k[:i] + (low,) + k[i:], k[:i] + (high,) + k[i:]) for k in others]
            pairs = [(a, b) for a, b in pairs if a in states and b in states]
            seeds = sorted(set.intersection(*(set(states[a]) & set(states[b]) for a, b in pairs))) if pairs else []
            if len(seeds) < 2:
                continue
            for metric in metrics:
                hi_vals = [np.mean([states[b][s][metric] for _, b in pairs]) if all(states[b][s].get(metric) is not None for _, b in pairs) else None
                           for s in seeds]
                lo_vals = [np.mean([states[a][s][metric] for a, _ in pairs]) if all(states[a][s].get(metric) is not None for a, _ in pairs) else None
                           for s in seeds]
                kept = [(h, lo) for h, lo in zip(hi_vals, lo_vals) if h is not None and lo is not None]
                if len(kept) < 2:
                    continue
                comparison = paired_comparison([h for h, _ in kept], [lo for _, lo in kept], a=f"{axis}={high:g}", b=f"{axis}={low:g}",
                                               n_boot=n_boot, seed=seed).to_dict()
                rows.append({"model": model, "bits": bits, "range": range_method, "axis": axis, "low": low, "high": high, "metric": metric,
                             "n_states": len(pairs), **comparison})
    ps = [r["wilcoxon_p"] for r in rows]
    finite = [j for j, p in enumerate(ps) if p == p]
    adjusted = holm([ps[j] for j in finite]).tolist() if finite else []
    for r in rows:
        r["holm_p"] = None
    for j, p in zip(finite, adjusted):
        rows[j]["holm_p"] = float(p)
    return rows
