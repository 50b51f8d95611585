"""One full analysis of a checkpoint: FP vs PTQ vs QAT with curvature, slices, paths and alignment.

This is what ``riverscape analyze`` and ``riverscape demo`` run. It composes the library
(Objective, quant, landscape, gradients) and returns an :class:`AnalysisResult`; drawing the
report is :func:`riverscape.report.analysis_page.write_report`'s job.

Conventions
-----------
* Landscape quantities are taken with respect to the quantized tensors only (docs/theory.md §1.2:
  ``d = dim theta_Q``); biases and normalisation parameters stay at their FP values.
* The *analysis set* (curvature, slices, gradients, QAT) is the training data, capped at
  ``options.max_samples``; accuracy and loss of FP, PTQ and QAT points are reported on the
  held-out split (the *evaluation set*) when the data have one.
"""
from __future__ import annotations

import dataclasses

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .batchnorm import batchnorm_preflight
from .budget import BUDGETS, Budget, RunShape, Timing, estimate, time_model
from .differentiability import ensure_twice_differentiable
from .distributed import agree, data_parallel, shard
from .errors import InputError
from .io.jsonable import Record, to_jsonable
from .landscape.curvature import hessian_eigs, hessian_trace, layer_curvature, spectral_density
from .landscape.paths import LinearPath, path_losses, river
from .objective import Objective
from .pipeline import (
    HILL_K,
    TAU,
    alignment_along,
    alignment_at,
    analysis_plane,
    build_reference,
    cap_samples,
    damage_at,
    measure_ptq,
    measure_qat,
    measurement_notes,
    plane_landscape,
    point_objectives,
)
from .precision import resolve_precision
from .quant import QuantMap, WeightStatus
from .quant.mixed_precision import layer_sensitivities, plan_bits, verify_plan
from .stage_cache import StageCache
from .stage_log import StageLog, format_seconds
from .threads import threads_for

__all__ = ["AnalysisResult", "BitsResult", "LayerRow", "run_analysis", "analyze"]


@dataclass
class BitsResult:
    """Everything measured at one bit-width (see :func:`run_analysis`)."""

    bits: int
    quantizer: str
    ptq: dict
    hessian_q: dict
    density_q: Any
    damage: Any
    alignment: Any
    qat: Optional[dict]
    qat_result: Any
    qat_alignment: Any
    slice_fp: Any
    slice_q: Any
    markers: dict
    paths: dict
    profiles: dict
    barrier_qat: Optional[dict]
    per_layer: list
    notes: list = field(default_factory=list)
    ptq_methods: dict = field(default_factory=dict)  # method name -> metrics of its point (the first is ``ptq``)

    def metrics(self) -> dict:
        """The JSON-friendly numbers of this bit-width."""
        dmg = self.damage.to_dict() if self.damage is not None else {}
        ali = self.alignment.to_dict() if self.alignment is not None else {}
        ali_layers = ali.pop("per_layer", None)
        ptq_metrics = dict(self.ptq)
        for key in ("predicted_loss_increase", "measured_loss_increase", "predicted_first_order", "ratio", "breakdown_scale", "inside_basin"):
            if key in dmg:
                ptq_metrics[key] = dmg[key]
        out = {
            "bits": self.bits,
            "quantizer": self.quantizer,
            "ptq": ptq_metrics,
            "hessian": {"quantized": self.hessian_q},
            "alignment": ali,
            "perturbation": {
                "hill_fraction": dmg.get("hill_fraction"),
                "hill_fraction_baseline": dmg.get("hill_energy_baseline"),
                "curvature_share": dmg.get("curvature_share"),
                "norm": dmg.get("delta_norm"),
                "rho_max": dmg.get("rho_max"),
            },
            "damage": {k: v for k, v in dmg.items() if k != "per_layer"},
            "per_layer": [row.to_dict() for row in self.per_layer],
            "notes": list(self.notes),
        }
        if len(self.ptq_methods) > 1:
            out["ptq_methods"] = {name: dict(values) for name, values in self.ptq_methods.items()}
        if ali_layers is not None:
            out["alignment_per_layer"] = ali_layers
        if self.qat is not None:
            out["qat"] = dict(self.qat)
            if self.barrier_qat is not None:
                out["qat"]["barrier_from_fp"] = self.barrier_qat
        return out


@dataclass
class AnalysisResult:
    """The outcome of :func:`run_analysis`: FP facts plus one :class:`BitsResult` per bit-width."""

    n_params: int
    n_quantized: int
    quantized_layers: list
    analysis_samples: int
    eval_samples: int
    eval_split: str
    fp: dict
    hessian_fp: dict
    density_fp: Any
    layer_curvature: list
    by_bits: list
    options: dict
    timings: dict
    has_trajectory: bool
    weights: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # run-wide notes: BatchNorm check, how HVPs are computed
    plan: dict = field(default_factory=dict)  # budget knobs, skipped stages, timed gradient/forward, estimated seconds
    mixed_precision: Optional[dict] = None  # with options.bits_budget: the plan, its sensitivities and verification

    def metrics(self) -> dict:
        """``metrics.json`` content: the headline (lowest) bit-width at the top level, all under ``all_bits``.

        Keys include ``bits``, ``n_params``, ``fp.loss``, ``fp.accuracy``, ``ptq.loss``,
        ``ptq.accuracy``, ``ptq.predicted_loss_increase``, ``hessian.fp.top_eigenvalues``,
        ``hessian.fp.trace``, ``hessian.quantized.top_eigenvalues``, ``alignment.cosine_to_fp``,
        ``alignment.random_baseline``, ``perturbation.hill_fraction`` and, with QAT,
        ``qat.accuracy``; with a bit budget, ``mixed_precision`` (:func:`_mixed_precision`). ``weights`` lists every parameter of the model with its status
        (:class:`~riverscape.quant.WeightStatus`: quantized with bits/granularity/channel axis
        at the headline bit-width, or kept with a reason); ``n_quantized`` counts the quantized
        scalar weights, ``n_quantized_tensors`` the quantized tensors (``quantized_layers``);
        ``warnings`` holds the unsupported-weight warnings.
        """
        per_bits = {str(b.bits): b.metrics() for b in self.by_bits}
        headline = dict(per_bits[str(min(b.bits for b in self.by_bits))])
        headline["hessian"] = {"fp": self.hessian_fp, **headline["hessian"]}
        return to_jsonable(
            {
                **headline,
                "n_params": self.n_params,
                "n_quantized": self.n_quantized,
                "n_quantized_tensors": len(self.quantized_layers),
                "quantized_layers": self.quantized_layers,
                "weights": [w.to_dict() if isinstance(w, WeightStatus) else w for w in self.weights],
                "warnings": list(self.warnings),
                "analysis_samples": self.analysis_samples,
                "eval_samples": self.eval_samples,
                "eval_split": self.eval_split,
                "fp": self.fp,
                "layer_curvature": self.layer_curvature,
                "bits_analyzed": [b.bits for b in self.by_bits],
                "all_bits": per_bits,
                "timings": self.timings,
                "plan": self.plan,
                **({"mixed_precision": self.mixed_precision} if self.mixed_precision is not None else {}),
                "options": self.options,
                "notes": [*self.notes, *headline.get("notes", [])],
            }
        )


def _curvature_summary(obj: Objective, theta: Tensor, top_k: int, op, seed: int, values: Tensor | None = None, *,
                       budget: Budget = BUDGETS["standard"], density: bool = True) -> tuple[dict, Any]:
    """Top eigenvalues, Hutch++ trace and the SLQ density at ``theta`` (one shared operator).

    The smallest eigenvalue is read off the density's extreme Ritz values: Lanczos resolves the
    ends of the spectrum first, while ARPACK's ``which="SA"`` needs hundreds of HVPs when the
    bottom of the spectrum is a cluster near zero.
    """
    if values is None:
        values, _ = hessian_eigs(obj, theta, min(top_k, obj.dim - 1), operator=op, seed=seed)
    trace = hessian_trace(obj, theta, matvecs=budget.trace_matvecs, operator=op, seed=seed)
    spectrum = None
    if density:
        spectrum = spectral_density(obj, theta, lanczos_steps=min(budget.density_steps, obj.dim), probes=budget.density_probes,
                                    operator=op, seed=seed)
    summary = {
        "top_eigenvalues": values[:top_k].tolist(),
        "min_eigenvalue": None if spectrum is None else float(spectrum.ritz_values.min()),
        "trace": trace.value,
        "trace_stderr": trace.stderr,
        "trace_matvecs": trace.matvecs,
    }
    return summary, spectrum


@dataclass(frozen=True)
class LayerRow(Record):
    """One quantized tensor at one bit-width: sensitivity, its share of the perturbation, damage and alignment.

    Attributes
    ----------
    layer : str
    numel : int
    top_eigenvalue, mean_trace : float or None
        HAWQ-style sensitivity: top eigenvalue and trace per weight of the layer's Hessian
        block at ``theta_fp``.
    delta_norm : float
        ``|delta_l|`` of the layer's rounding perturbation.
    hill_fraction : float or None
        ``|V_k^T delta_l|^2 / |delta_l|^2`` (``None`` when ``delta_l = 0``).
    predicted_damage, measured_damage : float or None
        Second-order prediction and measured loss change of quantizing this layer alone.
    cosine_to_fp : float or None
        Alignment of the layer's gradient at ``Q(theta_fp)`` with ``-delta_l``.
    """

    layer: str
    numel: int
    top_eigenvalue: Optional[float]
    mean_trace: Optional[float]
    delta_norm: float
    hill_fraction: Optional[float]
    predicted_damage: Optional[float]
    measured_damage: Optional[float]
    cosine_to_fp: Optional[float]


def _by_layer(rows: list, names: list[str], key: str = "name") -> list[dict]:
    """``rows`` (one dict per quantized tensor, in map order) checked against ``names``; empty dicts when absent."""
    if not rows:
        return [{} for _ in names]
    found = [r[key] for r in rows]
    if found != names:
        raise AssertionError(f"per-layer rows out of order: {found} vs {names}")
    return list(rows)


def _layer_rows(qmap: QuantMap, delta: Tensor, vectors: Tensor, curvature: list, dmg: Any, ali: Any) -> list[LayerRow]:
    """Per quantized tensor (map order): sensitivity (curvature), hill fraction of delta_l, damage and alignment."""
    layers = qmap.per_layer()
    names = [name for name, _ in layers]
    ali_rows = ali.to_dict().get("per_layer", []) if ali is not None else []
    rows = []
    sensitivity = {row["name"]: row for row in curvature}  # the budget may cover only the largest tensors
    unknown = set(sensitivity) - set(names)
    if unknown:
        raise AssertionError(f"per-layer curvature of tensors outside the map: {sorted(unknown)}")
    for (name, sl), dm, al in zip(layers, _by_layer(dmg.per_layer if dmg is not None else [], names),
                                  _by_layer(ali_rows, names)):
        curv = sensitivity.get(name, {})
        d_l = torch.zeros_like(delta)
        d_l[sl] = delta[sl]
        norm2 = float(d_l.pow(2).sum())
        hill = float((vectors.T @ d_l).pow(2).sum()) / norm2 if norm2 > 0 else None
        rows.append(LayerRow(name, sl.stop - sl.start, curv.get("top_eigenvalue"), curv.get("mean_trace"), math.sqrt(norm2), hill,
                             dm.get("predicted"), dm.get("measured"), al.get("cosine_to_fp")))
    return rows


def run_analysis(
    model: torch.nn.Module,
    loss: str,
    train_data: Any,
    eval_data: Any,
    options: Any,
    *,
    trajectory: Optional[Tensor] = None,
    eval_split: str = "test",
    progress: bool = True,
    emit: Optional[Callable[[str], None]] = None,
    cache: Optional[StageCache] = None,
    stored_dtype: Optional[str] = None,
) -> AnalysisResult:
    """Analyse a trained model at every bit-width of ``options``.

    Parameters
    ----------
    model : nn.Module
        Full-precision model (never modified).
    loss : str or callable
        The training loss.
    train_data, eval_data
        Analysis set and evaluation set: ``(inputs, targets)`` or iterables of batches.
    options : AnalyzeOptions
        Quantizer, layers, top-k, grid, sample cap, QAT steps/estimator, seed, device.
    trajectory : Tensor, shape (n, D_all), optional
        Recorded FP training trajectory (all trainable parameters); draws the river.
    progress : bool
        Progress bars.
    emit : callable, optional
        Receives the plan (budget, timed gradient and forward, estimated duration) before the
        heavy work and one line per finished stage with the estimated time left
        (:class:`riverscape.stage_log.StageLog`); the command line prints them to stderr.
    cache : StageCache, optional
        With ``options.resume``, every finished stage is stored there and the stages a
        previous run with the same inputs and resolved options stored are loaded instead of
        computed (their stage line says ``cached``; ``plan["resumed"]`` lists them). The
        numbers do not change.
    stored_dtype : str, optional
        The checkpoint's dtype (``"bfloat16"``) when ``model`` was loaded in a wider one; with
        ``options.dtype="native"`` the model then runs in it (:func:`riverscape.precision.resolve_precision`).

    Returns
    -------
    AnalysisResult
    """
    precision = resolve_precision(model, options.dtype, stored_dtype).objective_kwargs()
    with threads_for(model):
        return _run(model, loss, train_data, eval_data, options, trajectory, eval_split, progress, torch.device(options.device), emit,
                    cache, precision)


def _largest_layers(qmap: QuantMap, limit: Optional[int]) -> list[str]:
    """Names of the ``limit`` largest quantized tensors, in map order (all of them when ``limit`` is None)."""
    names = [t.name for t in qmap.targets]
    if limit is None or limit >= len(names):
        return names
    sizes = {t.name: t.spec.numel for t in qmap.targets}
    keep = set(sorted(names, key=lambda n: -sizes[n])[:limit])
    return [n for n in names if n in keep]


def _choose_preset(model, loss, train_data, options, device, log: StageLog, precision: dict):
    """The options resolved against their budget; a budget in minutes is matched to a preset by a timed probe."""
    if isinstance(options.budget, str):
        return options.resolve(BUDGETS[options.budget])
    # time on the smallest preset's sample cap (or on all samples when the user asked for all) and scale linearly
    probe_n = None if options.max_samples == 0 else (options.max_samples or BUDGETS["quick"].max_samples)
    probe = Objective(model, loss, cap_samples(train_data, probe_n), device=device, memory_limit=options.memory_limit,
                      chunk_size=options.chunk_size, **precision)
    measured = _time(probe)
    shape = _shape(options, probe, len(options.bits), 10)
    fits_any, chosen, seconds = False, BUDGETS["quick"], math.inf
    for budget in BUDGETS.values():
        cap = probe.n_samples if probe_n is None or options.max_samples else budget.max_samples
        scale = cap / probe.n_samples if probe.n_samples >= (probe_n or 0) else 1.0
        timing = Timing(measured.gradient * scale, measured.forward * scale)
        total = estimate(budget, shape, timing, options.skip)["total"]
        if total <= 60.0 * options.budget or budget.name == "quick":
            chosen, seconds, fits_any = budget, total, total <= 60.0 * options.budget
    verdict = "fits" if fits_any else "is the cheapest preset and does NOT fit; restrict --include/--bits or --skip stages"
    log.say(f"budget {options.budget:g} min: preset {chosen.name} (estimated {format_seconds(seconds)}) {verdict}")
    return options.resolve(chosen)


def _time(obj: Objective, n_points: int = 8) -> Timing:
    """One gradient and the per-point cost of a batched evaluation, at ``obj.theta0`` (see :func:`riverscape.budget.time_model`)."""
    points = obj.theta0.expand(n_points, -1).clone()
    return agree(time_model(lambda: obj.value_and_grad(obj.theta0), lambda: obj.losses(points), n_points))  # process 0's clock


def _shape(options, obj: Objective, n_bits: int, hill_k: int) -> RunShape:
    quantized = [s for s in obj.layout if s.quantizable]
    return RunShape(n_bits=n_bits, n_layers=len(quantized) or len(obj.layout), n_ptq_methods=len(options.ptq_methods), hill_k=hill_k)


def _plan_line(options, obj: Objective, timing: Timing, seconds: float) -> str:
    budget = options.preset
    layers = "all layers" if budget.max_layers is None else f"the {budget.max_layers} largest layers"
    skipped = f"; skipping {', '.join(options.skip)}" if options.skip else ""
    return (f"plan ({budget.name}): {len(options.bits)} bit-width(s) {list(options.bits)}, {obj.dim:,} quantized parameters, "
            f"{obj.n_samples} samples, top-{options.top_k} eigenpairs, trace {budget.trace_matvecs} HVPs, per-layer curvature on {layers}, "
            f"{options.grid_steps}x{options.grid_steps} slices, {options.qat_steps} QAT steps{skipped}. One gradient takes "
            f"{format_seconds(timing.gradient)}, one forward {format_seconds(timing.forward)}: estimated {format_seconds(seconds)} in all")


MIXED_PRECISION_RANDOM = 8
"""Random allocations the mixed-precision plan is compared with."""


def _mixed_precision(ref, options, budget: Budget) -> dict:
    """Per-layer bit-widths under ``options.bits_budget`` and their check (docs/ptq_search.md §4).

    Second-order sensitivities ``0.5 u_l^T H_ll u_l`` of every quantized tensor at ``theta_fp`` for
    each candidate of :data:`~riverscape.analysis_options.MIXED_PRECISION_BITS` (RTN with the
    run's quantizer, only the bit-width changed; layer traces with the budget's per-layer HVPs),
    the exact knapsack plan under the budget, and the analysis-set loss of the plan, of the HAWQ-V2
    plan at the same budget and of :data:`MIXED_PRECISION_RANDOM` random maximal allocations.
    """
    from .analysis_options import MIXED_PRECISION_BITS

    quantizer = options.quantizer(max(MIXED_PRECISION_BITS))
    qmap = ref.quant_map(quantizer)
    sens = layer_sensitivities(ref.analysis, qmap, ref.theta_fp, bits=MIXED_PRECISION_BITS, trace_matvecs=budget.layer_matvecs,
                               seed=options.seed)
    plan = plan_bits(sens, budget_bits=options.bits_budget)
    check = verify_plan(ref.analysis, plan, sens, qmap, ref.theta_fp, n_random=MIXED_PRECISION_RANDOM, seed=options.seed)
    return {"budget_bits": options.bits_budget, "candidate_bits": list(MIXED_PRECISION_BITS), "quantizer": quantizer.describe(),
            "loss_set": "analysis", "plan": plan.to_dict(), "verification": check.to_dict(), "sensitivities": sens.to_dict()}


def _mixed_precision_line(mp: dict) -> str:
    """One line: the plan's bits per layer, its average and its loss against HAWQ and random allocations."""
    plan, check = mp["plan"], mp["verification"]
    layers = ", ".join(f"{name}={bits}" for name, bits in plan["bits"].items())
    spread = f" ± {check['random_std']:.3g}" if check["random_std"] is not None else ""
    random = f"{check['random_mean']:.4g}{spread}" if check["random_mean"] is not None else "n/a"
    return (f"mixed precision (≤ {mp['budget_bits']:g} bits, average {plan['average_bits']:.4g}): {layers}; analysis loss "
            f"{check['loss_plan']:.4g} (HAWQ {check['loss_hawq']:.4g}, random {random}, FP {check['loss_fp']:.4g})")


def _external_point(options, names: list[str]):
    """The :class:`~riverscape.quant.ptq.External` config of ``--quantized-weights`` (``None`` without it)."""
    if options.quantized_weights is None:
        return None
    from .io.reading import read_checkpoint
    from .quant.ptq import External, dequantized_weights

    raw = read_checkpoint(options.quantized_weights)
    if raw.state_dict is None:
        raise InputError(f"{options.quantized_weights} holds no state dict of quantized weights")
    weights = dequantized_weights(raw.state_dict)
    missing = [n for n in names if n not in weights]
    if missing:
        packed = [k for k in raw.state_dict if k.startswith(f"{missing[0]}.")]  # e.g. optimum-quanto's '<name>._data._data'
        hint = (f"; it holds {packed[0]!r}: a library's serialized quantized tensor, so save the dequantized weights "
                "instead: torch.save(riverscape.quant.ptq.dequantized_weights(model), FILE)") if packed else ""
        raise InputError(f"{options.quantized_weights} lacks {len(missing)} of the quantized tensors: {', '.join(missing[:4])}"
                         + (" ..." if len(missing) > 4 else "") + hint)
    return External(weights, source=str(options.quantized_weights), group_size=options.group_size)


PER_BITS_STAGES = ("ptq", "curvature_quantized", "damage", "qat", "alignment", "slices", "paths")


class _Stages:
    """Runs the stages of one analysis, each loaded from the stage cache when an interrupted run finished it.

    ``run(stage, key, label, compute)`` returns ``compute()``'s dict of values, or the same
    values stored by a previous run with the same inputs (:class:`~riverscape.stage_cache.StageCache`,
    ``key`` names the entry: the stage and its bit-width), and emits the stage line.
    """

    def __init__(self, log: StageLog, cache: Optional[StageCache]) -> None:
        self.log = log
        self.cache = cache
        self.since = time.perf_counter()

    def run(self, stage: str, key: str, label: str, compute: Callable[[], dict], *, skipped: Callable[[dict], bool] = lambda v: False) -> dict:
        values = self.cache.load(key) if self.cache is not None else None
        cached = values is not None
        if values is None:
            values = compute()
            if self.cache is not None:
                self.cache.save(key, values)
        is_skipped = skipped(values)
        self.since = self.log.lap(stage, self.since, label, skipped=is_skipped, cached=cached and not is_skipped)
        return values


def _params_selection(model, loss, data, options, device, log: StageLog):
    """``options.params``: the tensors the selection quantizes on the whole model, narrowed to those matching the patterns.

    The analysis coordinates are the quantized tensors (everything else stays at full
    precision), so restricting curvature, slices, alignment and QAT to a block is narrowing the
    quantized set. Unlike ``include``, which quantizes every tensor it names (also biases and
    normalisation scales), ``params`` keeps the default choice of weights and only intersects it:
    ``include``/``exclude``/``keep_first_last`` are applied on the whole model first, then only
    the tensors whose name, layer name or glob matches a ``params`` pattern are kept. Returns the
    :class:`~riverscape.quant.LayerSelection` naming exactly those tensors (``options.selection()``
    without ``params``).
    """
    import glob

    from .quant import LayerSelection

    if not options.params:
        return options.selection()
    probe = Objective(model, loss, cap_samples(data, 1), device=device, memory_limit=options.memory_limit)  # the layout, on one sample
    chosen, _ = options.selection().select(probe.layout)
    for pattern in options.params:
        try:
            LayerSelection(include=pattern).select(chosen)
        except ValueError:
            shown = ", ".join(s.name for s in chosen[:6]) + (", ..." if len(chosen) > 6 else "")
            raise InputError(f"--params {pattern!r} matches none of the {len(chosen)} quantized tensors ({shown})") from None
    narrowed, _ = LayerSelection(include=list(options.params)).select(chosen)
    log.say(f"note: --params {' '.join(options.params)}: analysing {len(narrowed)} of {len(chosen)} quantized tensors "
            f"({sum(s.numel for s in narrowed):,} of {sum(s.numel for s in chosen):,} weights); everything else stays at full precision")
    return LayerSelection(include=[glob.escape(s.name) for s in narrowed])


def _streaming_note(obj: Objective, options) -> list[str]:
    """A note when the analysis set is read from its loader on every pass (over ``options.memory_limit``)."""
    if not obj.streaming:
        return []
    from .limits import format_bytes

    return [f"the analysis data are read from their loader on every evaluation ({obj.n_batches} batches): held in memory they "
            f"would exceed the memory limit of {format_bytes(options.memory_limit)} (--memory-limit)"]


def _cache_options(options) -> dict:
    """The resolved options that decide the numbers (the stage cache's key): all but ``resume`` and ``json``."""
    return {k: v for k, v in options.to_dict().items() if k not in ("resume", "json")}


def _run(model, loss, train_data, eval_data, options, trajectory, eval_split, progress, device, emit=None,
         cache: Optional[StageCache] = None, precision: Optional[dict] = None) -> AnalysisResult:
    precision = precision or {}
    started = time.perf_counter()
    log = StageLog(emit)
    options = _choose_preset(model, loss, train_data, options, device, log, precision)
    budget, skip = options.preset, set(options.skip)
    cache = cache.start(_cache_options(options)) if cache is not None and options.resume else None

    train_data = cap_samples(train_data, options.sample_cap)
    eval_data = cap_samples(eval_data, options.sample_cap)
    selection = _params_selection(model, loss, train_data, options, device, log)
    model, run_notes, run_warnings = batchnorm_preflight(model, train_data, recalibrate=options.bn_recalibrate)
    # several processes (torchrun, srun): each holds a strided shard of the analysis and evaluation sets, and QAT
    # and PTQ calibration run on all of the training data in every process (see riverscape.distributed)
    all_train, train_data, eval_data = train_data, shard(train_data), shard(eval_data)
    # the tensors are chosen once, on the full model; every map of the reference uses exactly them
    ref, chosen = build_reference(model, loss, train_data, eval_data, quantizer=options.quantizer(min(options.bits)),
                                  selection=selection, trajectory=trajectory, device=device, seed=options.seed,
                                  memory_limit=options.memory_limit, chunk_size=options.chunk_size,
                                  training_data=None if train_data is all_train else all_train, **precision)
    data_parallel(ref.analysis), data_parallel(ref.evaluation)
    obj, eval_obj, fp, names = ref.analysis, ref.evaluation, ref.theta_fp, list(ref.names)
    external = _external_point(options, names)
    run_notes += [*obj.notes, *_streaming_note(obj, options), *ensure_twice_differentiable(obj)]
    fp_metrics = ref.evaluate(fp)
    fp_loss, fp_train_loss = fp_metrics["loss"], fp_metrics["train_loss"]
    if not math.isfinite(fp_loss) or not math.isfinite(fp_train_loss):
        raise InputError(f"the loss at the checkpoint's weights is {fp_train_loss if not math.isfinite(fp_train_loss) else fp_loss}; nothing to analyse (check the data and --loss)")
    if options.top_k >= obj.dim:
        raise InputError(f"--top-k {options.top_k} asks for more eigenpairs than the {obj.dim} quantized parameters allow; use at most {obj.dim - 1}")
    k_hill = max(1, min(max(HILL_K, options.top_k), obj.dim - 1))
    timing = _time(obj)
    estimates = estimate(budget, _shape(options, obj, len(options.bits), k_hill), timing, options.skip)
    log = StageLog(emit, estimates, {stage: len(options.bits) for stage in PER_BITS_STAGES})
    log.say(_plan_line(options, obj, timing, estimates["total"]))
    if cache is not None and cache.stages():
        log.say(f"resuming: {len(cache.stages())} finished stage(s) of an interrupted run are in {cache.folder}")
    plan = {"budget": budget.to_dict(), "skip": list(options.skip), "timing": timing.to_dict(),
            "estimated_seconds": {k: round(v, 3) for k, v in estimates.items()}}
    stages = _Stages(log, cache)

    def curvature_fp() -> dict:
        values, vectors = ref.hill(k_hill)
        hessian, density = _curvature_summary(obj, fp, options.top_k, ref.fp_operator(), options.seed, values, budget=budget,
                                              density="density" not in skip)
        return {"values": values, "vectors": vectors, "hessian": hessian, "density": density}

    done = stages.run("curvature_fp", "curvature_fp", "curvature at θ_fp", curvature_fp)
    ref.restore_hill(k_hill, done["values"], done["vectors"])
    vectors, hessian_fp, density_fp = done["vectors"], done["hessian"], done["density"]

    def per_layer() -> dict:
        probe_qmap = ref.quant_map(options.quantizer(options.bits[0]))
        layer_names = _largest_layers(probe_qmap, budget.max_layers)
        rows = [c.to_dict() for c in layer_curvature(obj, fp, names=layer_names, trace_matvecs=budget.layer_matvecs,
                                                     operator=ref.fp_operator(), seed=options.seed, progress=progress)]
        notes = ([f"per-layer curvature on the {len(layer_names)} largest of {len(probe_qmap.targets)} quantized tensors (budget {budget.name})"]
                 if len(layer_names) < len(probe_qmap.targets) else [])
        return {"rows": rows, "notes": notes}

    done = stages.run("layer_curvature", "layer_curvature", "per-layer curvature",
                      per_layer if "layers" not in skip else lambda: {"rows": [], "notes": []}, skipped=lambda v: "layers" in skip)
    curvature_rows = done["rows"]
    run_notes += done["notes"]
    mixed = None
    if options.bits_budget is not None:
        mixed = stages.run("mixed_precision", "mixed_precision", "mixed-precision plan",
                           lambda: {"plan": _mixed_precision(ref, options, budget)})["plan"]
        log.say(_mixed_precision_line(mixed))
    done = stages.run("basin_widths", "basin_widths", "basin widths", lambda: {"widths": ref.widths(k_hill, TAU)})
    ref.restore_widths(k_hill, TAU, done["widths"])
    river_path = river(ref.trajectory) if ref.trajectory is not None else None

    results = []
    bar = tqdm(options.bits, desc="bit-widths", disable=not progress, leave=False)
    for bits in bar:
        bar.set_postfix_str(f"{bits} bits")
        results.append(_analyse_bits(ref, options, bits, external, k_hill, vectors, curvature_rows, river_path, stages, progress))
    ref.release()
    timings = dict(log.timings)
    if "perplexity" in fp_metrics:
        run_notes.append(_perplexity_note(fp_metrics, results, eval_split))
    timings["total"] = time.perf_counter() - started
    if cache is not None:
        plan["resumed"] = list(cache.loaded)
    return AnalysisResult(
        n_params=sum(p.numel() for p in model.parameters()),
        n_quantized=obj.dim,
        quantized_layers=names,
        analysis_samples=obj.n_samples,
        eval_samples=eval_obj.n_samples,
        eval_split=eval_split,
        fp=fp_metrics,
        hessian_fp=hessian_fp,
        density_fp=density_fp,
        layer_curvature=curvature_rows,
        by_bits=results,
        options=options.to_dict(),
        timings=timings,
        has_trajectory=river_path is not None,
        weights=chosen.status(),
        warnings=[*run_warnings, *chosen.warnings()],
        notes=run_notes,
        plan=plan,
        mixed_precision=mixed,
    )


def _analyse_bits(ref, options, bits: int, external, k_hill: int, vectors: Tensor, curvature_rows: list, river_path,
                  stages: _Stages, progress: bool) -> BitsResult:
    """Every per-bit-width stage at ``bits``: PTQ, curvature at Q(θ), damage, QAT, alignment, slices, paths."""
    obj, fp, budget, skip = ref.analysis, ref.theta_fp, options.preset, set(options.skip)
    quantizer = options.quantizer(bits)
    qmap = ref.quant_map(quantizer)

    def ptq() -> dict:
        methods = [*([external] if external is not None else []), *options.ptq_methods]
        try:
            measured = measure_ptq(ref, qmap, method=methods[0], calibration=ref.training, **options.ptq_measure_options())
        except ValueError as exc:  # the external weights do not fit the model or lie on no uniform grid
            if external is None:
                raise
            raise InputError(f"--quantized-weights {options.quantized_weights}: {exc}") from None
        metrics = dict(measured.metrics)
        compared = {metrics["ptq_method"]: metrics}
        for method in methods[1:]:
            compared[method] = dict(measure_ptq(ref, qmap, method=method, calibration=ref.training, **options.ptq_measure_options()).metrics)
        return {"point": measured.point, "metrics": metrics, "compared": compared, "finite": measured.finite}

    done = stages.run("ptq", f"ptq-{bits}", f"PTQ, {bits} bits", ptq)
    q, ptq_metrics, compared, finite = done["point"], done["metrics"], done["compared"], done["finite"]
    notes: list[str] = measurement_notes(ptq_metrics)

    def curvature_q() -> dict:
        if not finite:
            return {"hessian": {}, "density": None}
        # BatchNorm statistics re-estimated at Q(theta) when the PTQ numbers were (weights only: curvature of the weights)
        objectives = point_objectives(ref, qmap, q, bn_reestimate=options.bn_reestimate, calibration=ref.training)
        obj_q = obj if objectives is None else objectives.reference.analysis
        op_q = obj_q.hessian(q)
        hessian_q, density_q = _curvature_summary(obj_q, q, options.top_k, op_q, options.seed, budget=budget, density="density" not in skip)
        op_q.release()
        return {"hessian": hessian_q, "density": density_q}

    done = stages.run("curvature_quantized", f"curvature_quantized-{bits}", f"curvature at Q(θ), {bits} bits", curvature_q)
    hessian_q, density_q = done["hessian"], done["density"]
    if not finite:
        notes.append(f"the loss at Q(theta) is {ptq_metrics['train_loss']}: damage, alignment and curvature at the quantized point were skipped")
    dmg = stages.run("damage", f"damage-{bits}", f"second-order damage, {bits} bits",
                     lambda: {"damage": damage_at(ref, qmap, q, k=k_hill, floor_steps=budget.floor_steps, rtn_matvecs=budget.rtn_matvecs)
                              if finite and "damage" not in skip else None},
                     skipped=lambda v: v["damage"] is None)["damage"]

    def qat_stage() -> dict:
        if options.qat_steps <= 0:
            return {"metrics": None, "result": None, "alignment": None, "barrier": None, "point": None, "notes": []}
        run = measure_qat(ref, qmap, estimator=options.qat_estimator, steps=options.qat_steps, lr=options.qat_lr, seed=options.seed,
                          progress=progress, bn_reestimate=options.bn_reestimate)
        result = run.result
        metrics = {
            "loss": run.metrics["loss"],
            "accuracy": run.metrics["accuracy"],
            **({"perplexity": run.metrics["perplexity"]} if "perplexity" in run.metrics else {}),
            **({"bn_reestimation": run.metrics["bn_reestimation"]} if "bn_reestimation" in run.metrics else {}),
            "train_loss": result.last_loss,
            "best_train_loss": result.best_loss,
            "best_step": result.best_step,
            "hit_step": result.hit_step,
            "steps": options.qat_steps,
            "estimator": result.estimator,
            "scale_mode": result.scale_mode,
            "total_grid_flips": int(sum(result.grid_flips)),
            "distance_to_fp": run.metrics["delta_norm"],
            "distance_ptq_to_fp": ptq_metrics["delta_norm"],
        }
        barrier = {k: v for k, v in run.barrier.to_dict().items() if not isinstance(v, (list, dict))}
        along, qat_notes = None, []
        if finite and "alignment" not in skip:
            along = alignment_along(ref, qmap, result, k=k_hill, n_null=budget.qat_null_draws)
            if along is None:
                qat_notes.append("alignment along QAT was skipped: with learned step sizes (LSQ) the grid of each recorded iterate is not stored")
        return {"metrics": metrics, "result": result, "alignment": along, "barrier": barrier, "point": run.point, "notes": qat_notes}

    done = stages.run("qat", f"qat-{bits}", f"QAT, {bits} bits", qat_stage, skipped=lambda v: v["result"] is None)
    qat_metrics, qat_result, qat_ali, barrier, qat_point = done["metrics"], done["result"], done["alignment"], done["barrier"], done["point"]
    notes += done["notes"]
    ali = stages.run("alignment", f"alignment-{bits}", f"gradient alignment, {bits} bits",
                     lambda: {"alignment": alignment_at(ref, qmap, q, k=k_hill, theta_qat=qat_point, floor_steps=budget.floor_steps,
                                                         n_null=budget.null_draws, floor_null=budget.floor_null)
                              if finite and "alignment" not in skip else None},
                     skipped=lambda v: v["alignment"] is None)["alignment"]

    def slices() -> dict:
        if "slices" in skip:
            return {"land": None, "markers": {}}
        plane = analysis_plane(ref, qmap, q, qat_point)
        markers = {"θ_fp": (0.0, 0.0), "Q(θ_fp) (PTQ)": tuple(plane.coordinates(q))}
        trajectories = {}
        if qat_point is not None:
            markers["QAT Q(θ_T)"] = tuple(plane.coordinates(qat_point))
            trajectories["QAT iterates Q(θ_t)"] = qat_result.quantized_trajectory
        reach = max(max(abs(x), abs(y)) for x, y in markers.values()) or 1.0
        land = plane_landscape(ref, qmap, plane, markers, paths=trajectories, span=options.grid_span * 1.3 * reach,
                               steps=options.grid_steps, clip=False, progress=progress)
        return {"land": land, "markers": markers}

    done = stages.run("slices", f"slices-{bits}", f"2D slices, {bits} bits", slices, skipped=lambda v: v["land"] is None)
    land, markers = done["land"], done["markers"]

    def paths() -> dict:
        profiles = {}
        if "paths" not in skip:
            profiles["θ_fp → Q(θ_fp)"] = path_losses(obj, LinearPath(fp, q), n=33, quantizer=qmap, progress=False)
            if qat_point is not None:
                profiles["θ_fp → QAT Q(θ_T)"] = path_losses(obj, LinearPath(fp, qat_point), n=33, quantizer=qmap, progress=False)
            if river_path is not None:
                profiles["river (FP training)"] = path_losses(obj, river_path, n=41, quantizer=qmap, progress=False)
        return {"profiles": profiles}

    profiles = stages.run("paths", f"paths-{bits}", f"loss along paths, {bits} bits", paths, skipped=lambda v: not v["profiles"])["profiles"]
    rows = _layer_rows(qmap, q - fp, vectors, curvature_rows, dmg, ali)
    return BitsResult(bits, quantizer.describe(), ptq_metrics, hessian_q, density_q, dmg, ali, qat_metrics, qat_result, qat_ali,
                      None if land is None else land.fp_slice, None if land is None else land.quantized_slice,
                      land.markers if land is not None else markers, land.paths if land is not None else {}, profiles, barrier, rows,
                      notes, compared)


def _perplexity_note(fp: dict, results: list, split: str) -> str:
    """One line with the perplexities ``exp(loss)`` of a language model (FP, PTQ and QAT per bit-width)."""

    def fmt(value: Optional[float]) -> str:
        return "overflow" if value is None else f"{value:.4g}"

    parts = [f"FP {fmt(fp['perplexity'])}"]
    for b in results:
        parts.append(f"{b.bits}-bit PTQ {fmt(b.ptq.get('perplexity'))}" + ("" if b.qat is None else f", QAT {fmt(b.qat.get('perplexity'))}"))
    return f"language model: perplexity exp(loss) on the {split} set: " + "; ".join(parts)


def analyze(loaded: Any, data: Any, options: Any, *, progress: Optional[bool] = None,
            emit: Optional[Callable[[str], None]] = None, cache: Optional[StageCache] = None) -> AnalysisResult:
    """Analyse a loaded checkpoint: :func:`run_analysis` on its model, data and trajectory.

    Parameters
    ----------
    loaded : LoadedCheckpoint
    data : ResolvedData
    options : AnalyzeOptions
    progress : bool, optional
        Progress bars (default: only when stderr is a terminal).
    emit : callable, optional
        Plan and stage lines, see :func:`run_analysis`.
    cache : StageCache, optional
        Finished stages of an interrupted run, see :func:`run_analysis`.

    Returns
    -------
    AnalysisResult
        With a note on the checkpoint's stored precision and the precision it was analysed in.
        Drawing it is :func:`riverscape.report.analysis_page.write_report`'s job; the command
        line writes every file.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    result = run_analysis(
        loaded.model,
        loaded.loss,
        data.train,
        data.evaluation,
        options,
        trajectory=loaded.trajectory,
        eval_split="test" if data.test is not None else "train",
        progress=progress,
        emit=emit,
        cache=cache,
        stored_dtype=loaded.checkpoint_dtype,
    )
    precision = resolve_precision(loaded.model, options.dtype, loaded.checkpoint_dtype).describe()
    note = f"checkpoint weights stored as {loaded.checkpoint_dtype}; analysed in {precision} on {options.device}"
    return dataclasses.replace(result, notes=[note, *result.notes])
