"""One full analysis of a checkpoint: FP vs PTQ vs QAT with curvature, slices, paths and alignment.

This is what ``riverscape analyze`` and ``riverscape demo`` run. It composes the library
(Objective, quant, landscape, gradients) and returns an :class:`AnalysisResult`; drawing the
report is :func:`riverscape.report.analysis_page.write_report`'s job.

Conventions
-----------
* Landscape quantities are taken with respect to the quantized tensors only (THEORY.md 7:
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
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .batchnorm import batchnorm_preflight
from .differentiability import ensure_twice_differentiable
from .errors import InputError
from .gradients import alignment, alignment_along_qat, damage
from .gradients.damage import basin_widths
from .landscape.curvature import hessian_eigs, hessian_trace, layer_curvature, spectral_density
from .landscape.directions import plane_through, random_direction
from .landscape.paths import LinearPath, loss_barrier, path_losses, river
from .landscape.slices import slice_2d
from .objective import Objective
from .quant import LayerSelection, QuantMap, WeightStatus, ptq
from .quant.qat import qat
from .threads import threads_for

__all__ = ["AnalysisResult", "BitsResult", "run_analysis", "analyze"]

HILL_K = 10
TAU = 0.05


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
            "per_layer": self.per_layer,
            "notes": list(self.notes),
        }
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

    def metrics(self) -> dict:
        """``metrics.json`` content: the headline (lowest) bit-width at the top level, all under ``all_bits``.

        Keys include ``bits``, ``n_params``, ``fp.loss``, ``fp.accuracy``, ``ptq.loss``,
        ``ptq.accuracy``, ``ptq.predicted_loss_increase``, ``hessian.fp.top_eigenvalues``,
        ``hessian.fp.trace``, ``hessian.quantized.top_eigenvalues``, ``alignment.cosine_to_fp``,
        ``alignment.random_baseline``, ``perturbation.hill_fraction`` and, with QAT,
        ``qat.accuracy``. ``weights`` lists every parameter of the model with its status
        (:class:`~riverscape.quant.WeightStatus`: quantized with bits/granularity/channel axis
        at the headline bit-width, or kept with a reason); ``n_quantized`` counts the quantized
        scalar weights, ``n_quantized_tensors`` the quantized tensors (``quantized_layers``);
        ``warnings`` holds the unsupported-weight warnings.
        """
        per_bits = {str(b.bits): b.metrics() for b in self.by_bits}
        headline = dict(per_bits[str(min(b.bits for b in self.by_bits))])
        headline["hessian"] = {"fp": self.hessian_fp, **headline["hessian"]}
        return _json_ready(
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
                "notes": [*self.notes, *headline.get("notes", [])],
            }
        )


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Tensor):
        return _json_ready(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _cap(data: Any, max_samples: Optional[int]) -> Any:
    """At most ``max_samples`` samples of a tensor pair or an iterable of batches."""
    if max_samples is None:
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0][:max_samples], data[1][:max_samples]
    batches, seen = [], 0
    for x, y, *_ in data:
        if seen >= max_samples:
            break
        take = min(len(x), max_samples - seen)
        batches.append((x[:take], y[:take]))
        seen += take
    return batches


def _eigs(obj: Objective, theta: Tensor, k: int, op, seed: int) -> tuple[Tensor, Tensor]:
    return hessian_eigs(obj, theta, min(k, obj.dim - 1), operator=op, seed=seed)


def _curvature_summary(obj: Objective, theta: Tensor, top_k: int, op, seed: int, values: Tensor | None = None) -> tuple[dict, Any]:
    """Top eigenvalues, Hutch++ trace and the SLQ density at ``theta`` (one shared operator).

    The smallest eigenvalue is read off the density's extreme Ritz values: Lanczos resolves the
    ends of the spectrum first, while ARPACK's ``which="SA"`` needs hundreds of HVPs when the
    bottom of the spectrum is a cluster near zero.
    """
    if values is None:
        values, _ = _eigs(obj, theta, top_k, op, seed)
    trace = hessian_trace(obj, theta, matvecs=99, operator=op, seed=seed)
    density = spectral_density(obj, theta, lanczos_steps=min(60, obj.dim), probes=2, operator=op, seed=seed)
    summary = {
        "top_eigenvalues": values[:top_k].tolist(),
        "min_eigenvalue": float(density.ritz_values.min()),
        "trace": trace.value,
        "trace_stderr": trace.stderr,
        "trace_matvecs": trace.matvecs,
    }
    return summary, density


def _trajectory_in_layout(full: Objective, obj: Objective, trajectory: Optional[Tensor]) -> Optional[Tensor]:
    """Rows of a default-layout trajectory restricted to ``obj``'s parameters (``None`` if it does not fit)."""
    if trajectory is None or trajectory.ndim != 2 or trajectory.shape[1] != full.dim or trajectory.shape[0] < 2:
        return None
    spans = {s.name: s.slice for s in full.layout}
    index = torch.cat([torch.arange(spans[s.name].start, spans[s.name].stop) for s in obj.layout])
    return trajectory[:, index].to(dtype=obj.dtype, device=obj.device)


def _plane_points(obj: Objective, qmap: QuantMap, fp: Tensor, q: Tensor, third: Optional[Tensor], seed: int):
    """An orthonormal plane through theta_fp, Q(theta_fp) and the QAT point (or a random direction)."""
    if third is not None and float((third - q).norm()) > 1e-12 * float(q.norm()):
        try:
            return plane_through(fp, q, third)
        except ValueError:
            pass
    direction = random_direction(obj, seed=seed, mask=qmap, theta=fp)
    scaled = fp + direction * (float((q - fp).norm()) / max(float(direction.norm()), 1e-30))
    return plane_through(fp, q, scaled)


def _layer_rows(qmap: QuantMap, delta: Tensor, vectors: Tensor, curvature: list, dmg: Any, ali: Any) -> list:
    """Per quantized tensor: sensitivity (curvature), hill fraction of delta_l, damage and alignment."""
    by_name_curv = {c["name"]: c for c in curvature}
    by_name_dmg = {r["name"]: r for r in (dmg.per_layer if dmg is not None else [])}
    ali_rows = ali.to_dict().get("per_layer", []) if ali is not None else []
    by_name_ali = {r["name"]: r for r in ali_rows}
    rows = []
    for name, sl in qmap.per_layer():
        d_l = torch.zeros_like(delta)
        d_l[sl] = delta[sl]
        norm2 = float(d_l.pow(2).sum())
        hill = float((vectors.T @ d_l).pow(2).sum()) / norm2 if norm2 > 0 else None
        curv, dm, al = by_name_curv.get(name, {}), by_name_dmg.get(name, {}), by_name_ali.get(name, {})
        rows.append(
            {
                "layer": name,
                "numel": sl.stop - sl.start,
                "top_eigenvalue": curv.get("top_eigenvalue"),
                "mean_trace": curv.get("mean_trace"),
                "delta_norm": math.sqrt(norm2),
                "hill_fraction": hill,
                "predicted_damage": dm.get("predicted"),
                "measured_damage": dm.get("measured"),
                "cosine_to_fp": al.get("cosine_to_fp"),
            }
        )
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

    Returns
    -------
    AnalysisResult
    """
    with threads_for(model):
        return _run(model, loss, train_data, eval_data, options, trajectory, eval_split, progress, torch.device(options.device))


def _run(model, loss, train_data, eval_data, options, trajectory, eval_split, progress, device) -> AnalysisResult:
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - since
        return now

    train_data = _cap(train_data, options.max_samples)
    eval_data = _cap(eval_data, options.max_samples)
    model, run_notes, run_warnings = batchnorm_preflight(model, train_data, recalibrate=options.bn_recalibrate)
    full = Objective(model, loss, train_data, device=device)
    first_quantizer = options.quantizer(options.bits[0])
    # the tensors are chosen once, on the full model; every map of the restricted objectives uses exactly them
    chosen = QuantMap(full, options.quantizer(min(options.bits)), selection=options.selection())
    names = [t.name for t in chosen.targets]
    selection = LayerSelection.exactly(names)
    obj = Objective(model, loss, train_data, params=names, device=device, batch_size=512)
    eval_obj = Objective(model, loss, eval_data, params=names, device=device, batch_size=512)
    run_notes += ensure_twice_differentiable(obj)
    fp = obj.theta0
    fp_loss, fp_acc = eval_obj.loss_and_metric(fp)
    fp_train_loss = obj.loss(fp)
    if not math.isfinite(fp_loss) or not math.isfinite(fp_train_loss):
        raise InputError(f"the loss at the checkpoint's weights is {fp_train_loss if not math.isfinite(fp_train_loss) else fp_loss}; nothing to analyse (check the data and --loss)")
    if options.top_k >= obj.dim:
        raise InputError(f"--top-k {options.top_k} asks for more eigenpairs than the {obj.dim} quantized parameters allow; use at most {obj.dim - 1}")
    k_hill = max(1, min(max(HILL_K, options.top_k), obj.dim - 1))
    t0 = time.perf_counter()
    op_fp = obj.hessian(fp)
    values, vectors = _eigs(obj, fp, k_hill, op_fp, options.seed)
    hessian_fp, density_fp = _curvature_summary(obj, fp, options.top_k, op_fp, options.seed, values)
    probe_qmap = QuantMap(obj, first_quantizer, selection=selection)
    curvature_rows = [c.to_dict() for c in layer_curvature(obj, fp, names=probe_qmap, trace_matvecs=30, operator=op_fp, seed=options.seed, progress=False)]
    t0 = lap("curvature_fp", t0)
    widths = basin_widths(obj, fp, values, vectors, TAU)
    t0 = lap("basin_widths", t0)
    river_path = None
    river_points = _trajectory_in_layout(full, obj, trajectory)
    if river_points is not None:
        river_path = river(river_points)

    results = []
    bar = tqdm(options.bits, desc="bit-widths", disable=not progress, leave=False)
    for bits in bar:
        bar.set_postfix_str(f"{bits} bits")
        quantizer = options.quantizer(bits)
        qmap = QuantMap(obj, quantizer, selection=selection)
        q = ptq(obj, qmap)
        delta = q - fp
        q_loss, q_acc = eval_obj.loss_and_metric(q)
        ptq_metrics = {
            "loss": q_loss,
            "accuracy": q_acc,
            "train_loss": obj.loss(q),
            "delta_norm": float(delta.norm()),
            "relative_delta_norm": float(delta.norm() / fp.norm()),
        }
        notes: list[str] = []
        finite = math.isfinite(ptq_metrics["train_loss"])
        t0 = time.perf_counter()
        op_q = obj.hessian(q)
        hessian_q, density_q = _curvature_summary(obj, q, options.top_k, op_q, options.seed) if finite else ({}, None)
        op_q.release()
        t0 = lap("curvature_quantized", t0)
        dmg = None
        if finite:
            dmg = damage(obj, fp, qmap, theta_q=q, k=k_hill, values=values, vectors=vectors, tau=TAU, widths=widths, operator=op_fp, seed=options.seed, progress=False)
        else:
            notes.append(f"the loss at Q(theta) is {ptq_metrics['train_loss']}: damage, alignment and curvature at the quantized point were skipped")
        t0 = lap("damage", t0)

        qat_metrics = qat_result = qat_ali = barrier = None
        qat_point = None
        if options.qat_steps > 0:
            qat_result = qat(obj, qmap, estimator=options.qat_estimator, steps=options.qat_steps, eval_objective=eval_obj, seed=options.seed, progress=progress)
            qat_point = qat_result.theta_q
            qat_loss, qat_acc = eval_obj.loss_and_metric(qat_point)
            qat_metrics = {
                "loss": qat_loss,
                "accuracy": qat_acc,
                "train_loss": qat_result.last_loss,
                "best_train_loss": qat_result.best_loss,
                "best_step": qat_result.best_step,
                "hit_step": qat_result.hit_step,
                "steps": options.qat_steps,
                "estimator": qat_result.estimator,
                "scale_mode": qat_result.scale_mode,
                "total_grid_flips": int(sum(qat_result.grid_flips)),
                "distance_to_fp": float((qat_point - fp).norm()),
                "distance_ptq_to_fp": float(delta.norm()),
            }
            b = loss_barrier(obj, fp, qat_point, n=25, progress=False)
            barrier = {k: v for k, v in b.to_dict().items() if not isinstance(v, (list, dict))}
            if finite and qat_result.scale_mode == "learned":
                notes.append("alignment along QAT was skipped: with learned step sizes (LSQ) the grid of each recorded iterate is not stored")
            elif finite:
                # frozen scales: quantize every latent iterate with QAT's own grid, not one recomputed from it
                frozen = qat_result.qparams if qat_result.scale_mode == "frozen" else None
                qat_ali = alignment_along_qat(obj, fp, qmap, qat_result.latent_trajectory, steps=qat_result.trajectory_steps, k=k_hill, values=values, vectors=vectors, qparams=frozen, operator=op_fp, seed=options.seed, progress=False)
            t0 = lap("qat", t0)
        ali = None
        if finite:
            ali = alignment(obj, fp, qmap, theta_q=q, k=k_hill, values=values, vectors=vectors, theta_qat=qat_point, operator=op_fp, seed=options.seed, progress=False)
        t0 = lap("alignment", t0)

        plane = _plane_points(obj, qmap, fp, q, qat_point, options.seed)
        markers = {"θ_fp": (0.0, 0.0), "Q(θ_fp) (PTQ)": plane.coordinates(q)}
        paths = {}
        if qat_point is not None:
            markers["QAT Q(θ_T)"] = plane.coordinates(qat_point)
            coords = [plane.coordinates(p) for p in qat_result.quantized_trajectory]
            paths["QAT iterates Q(θ_t)"] = ([c[0] for c in coords], [c[1] for c in coords])
        reach = max(max(abs(x), abs(y)) for x, y in markers.values()) or 1.0
        span = options.grid_span * 1.3 * reach
        slice_fp = slice_2d(obj, fp, plane.d1, plane.d2, span=span, steps=options.grid_steps, progress=progress)
        slice_q = slice_2d(obj, fp, plane.d1, plane.d2, span=span, steps=options.grid_steps, quantizer=qmap, progress=progress)
        t0 = lap("slices", t0)

        profiles = {"θ_fp → Q(θ_fp)": path_losses(obj, LinearPath(fp, q), n=33, quantizer=qmap, progress=False)}
        if qat_point is not None:
            profiles["θ_fp → QAT Q(θ_T)"] = path_losses(obj, LinearPath(fp, qat_point), n=33, quantizer=qmap, progress=False)
        if river_path is not None:
            profiles["river (FP training)"] = path_losses(obj, river_path, n=41, quantizer=qmap, progress=False)
        t0 = lap("paths", t0)

        rows = _layer_rows(qmap, delta, vectors, curvature_rows, dmg, ali)
        results.append(
            BitsResult(bits, quantizer.describe(), ptq_metrics, hessian_q, density_q, dmg, ali, qat_metrics, qat_result, qat_ali,
                       slice_fp, slice_q, markers, paths, profiles, barrier, rows, notes)
        )
    op_fp.release()
    timings["total"] = time.perf_counter() - started
    return AnalysisResult(
        n_params=sum(p.numel() for p in model.parameters()),
        n_quantized=obj.dim,
        quantized_layers=names,
        analysis_samples=obj.n_samples,
        eval_samples=eval_obj.n_samples,
        eval_split=eval_split,
        fp={"loss": fp_loss, "accuracy": fp_acc, "train_loss": fp_train_loss},
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
    )


def analyze(loaded: Any, data: Any, options: Any, out_dir: Path, *, progress: Optional[bool] = None) -> dict:
    """The ``riverscape analyze`` seam: analyse a loaded checkpoint and write the report into ``out_dir``.

    Parameters
    ----------
    loaded : LoadedCheckpoint
    data : ResolvedData
    options : AnalyzeOptions
    out_dir : Path
        Directory (a temporary one, renamed by the caller on success) for ``report.html`` and PNGs.
    progress : bool, optional
        Progress bars (default: only when stderr is a terminal).

    Returns
    -------
    dict
        JSON-friendly metrics (see :meth:`AnalysisResult.metrics`).
    """
    from .report.analysis_page import write_report

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
    )
    precision = next((str(p.dtype).removeprefix("torch.") for p in loaded.model.parameters() if p.is_floating_point()), "?")
    stored = getattr(loaded, "checkpoint_dtype", precision)
    result = dataclasses.replace(
        result, notes=[f"checkpoint weights stored as {stored}; analysed in {precision}", *result.notes]
    )
    write_report(result, Path(out_dir), title=f"riverscape report: {Path(str(loaded.path)).name if loaded.path else 'model'}")
    return result.metrics()
