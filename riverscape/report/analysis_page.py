"""The ``riverscape analyze`` report: one offline HTML page plus PNG twins of its figures."""
from __future__ import annotations

import math

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import static  # noqa: E402
from .figures import (  # noqa: E402
    accuracy_vs_bits_figure,
    alignment_figure,
    density_figure,
    path_figure,
    qat_curve_figure,
    side_by_side_slices,
    spectrum_figure,
)
from .html import ReportPage  # noqa: E402
from .reading import reading  # noqa: E402

__all__ = ["write_report"]


def _profile_tuple(profile: Any) -> tuple:
    if profile.quantized_loss is None:
        return (profile.t.numpy(), profile.loss.numpy())
    return (profile.t.numpy(), profile.loss.numpy(), profile.quantized_loss.numpy())


def _qat_history(history: dict, *, metric_is_accuracy: bool = True) -> dict:
    """QAT history columns under the report's names (the quantized loss is QAT's ``loss``).

    The recorded metric is drawn as accuracy only when it is one (a language model records
    perplexity, which an accuracy axis would mislabel; it stays in ``metrics.json``).
    """
    columns = {"step": history["step"], "quantized_loss": history["loss"], "flips": history["grid_flips"]}
    accuracy = history.get("eval_metric") or history.get("metric")
    if metric_is_accuracy and accuracy and all(a is not None for a in accuracy):
        columns["accuracy"] = accuracy
    return columns


MAX_SERIES_ROWS = 11
MAX_LAYER_ROWS = 30  # per-layer tables longer than this show the most damaging layers and collapse the rest


def _evenly_spaced(rows: list, limit: int) -> list:
    """At most ``limit`` rows, evenly spaced, first and last included (long series stay readable)."""
    if len(rows) <= limit:
        return rows
    picks = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in picks]


def _save_png(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png")
    plt.close(fig)


def _summary_rows(result: Any) -> list[dict]:
    rows = []
    for b in result.by_bits:
        dmg = b.damage
        rows.append(
            {
                "bits": b.bits,
                "FP acc": result.fp.get("accuracy"),
                "PTQ acc": b.ptq.get("accuracy"),
                "QAT acc": None if b.qat is None else b.qat.get("accuracy"),
                "FP loss": result.fp["loss"],
                "PTQ loss": b.ptq["loss"],
                "QAT loss": None if b.qat is None else b.qat["loss"],
                "ΔL predicted (2nd order)": None if dmg is None else dmg.predicted_loss_increase,
                "ΔL measured": None if dmg is None else dmg.measured_loss_increase,
                "ratio": None if dmg is None else dmg.ratio,
                "t_b": None if dmg is None else dmg.breakdown_scale,
            }
        )
    return rows


def _ptq_method_rows(result: Any) -> list[dict]:
    """One row per bit-width and PTQ method (empty when only one method was measured)."""
    return [
        {
            "bits": b.bits,
            "PTQ method": method,
            "loss": values.get("loss"),
            "accuracy": values.get("accuracy"),
            "train loss": values.get("train_loss"),
            "‖Q(θ) − θ‖": values.get("delta_norm"),
            "layer reconstruction error (mean)": values.get("reconstruction_error_mean"),
            "calibration samples": values.get("calibration_samples"),
        }
        for b in result.by_bits
        if len(getattr(b, "ptq_methods", {})) > 1
        for method, values in b.ptq_methods.items()
    ]


def _alignment_rows(result: Any) -> list[dict]:
    rows = []
    for b in result.by_bits:
        if b.alignment is None:
            continue
        a = b.alignment.to_dict()
        rows.append(
            {
                "bits": b.bits,
                "A(u_back)": a["cosine_to_fp"],
                "isotropic 1/√d": a["random_baseline"],
                "matched null": a.get("null_mean"),
                "null sd": a.get("null_sd"),
                "z (matched)": a.get("null_z"),
                "A(u_hill)": a.get("cosine_hill"),
                "A(u_river)": a.get("cosine_river"),
                "A(u_floor)": a.get("cosine_floor"),
                "A(u_qat)": a.get("cosine_qat"),
                "χ_k": a.get("chi_k"),
                "2nd-order cos": a.get("second_order_cosine"),
            }
        )
    return rows


def _weight_rows(result: Any) -> list[dict]:
    """One row per parameter tensor: quantized ones first (model order), then the kept ones with their reason."""
    bits = ", ".join(str(b.bits) for b in result.by_bits)
    rows = []
    for w in sorted(getattr(result, "weights", []), key=lambda w: w.status != "quantized"):  # stable: model order within each group
        quantized = w.status == "quantized"
        rows.append(
            {
                "tensor": w.name,
                "shape": "×".join(str(d) for d in w.shape) or "scalar",
                "numel": w.numel,
                "layer type": w.module_type,
                "status": w.status,
                "bits": bits if quantized else "",
                "granularity": w.granularity if quantized else "",
                "channel axis": "" if w.channel_axis is None else str(w.channel_axis),
                "kept because": "" if quantized else w.reason,
            }
        )
    return rows


def _top_layer_rows(rows: list[dict], limit: int = MAX_LAYER_ROWS) -> tuple[list[dict], str]:
    """At most ``limit`` rows: the layers with the largest measured damage (then predicted damage, then size), the rest collapsed.

    Returns the rows to show and a caption suffix ("" when nothing was left out).
    """
    if len(rows) <= limit:
        return rows, ""

    def severity(row: dict) -> tuple:
        return tuple(-(row.get(key) if isinstance(row.get(key), (int, float)) and row.get(key) == row.get(key) else -math.inf)
                     for key in ("measured_damage", "predicted_damage", "numel"))

    shown = sorted(rows, key=severity)[:limit]
    hidden = len(rows) - len(shown)
    rest = {key: "" for key in rows[0]}
    rest[next(iter(rows[0]))] = f"… {hidden} more layers"
    return [*shown, rest], (f" Sorted by measured damage: the {limit} most damaging of {len(rows)} layers; "
                            "every layer is in metrics.json (all_bits.<b>.per_layer).")


def _add_weights_section(page: ReportPage, result: Any) -> None:
    rows = _weight_rows(result)
    if not rows:
        return
    n_q = sum(1 for row in rows if row["status"] == "quantized")
    page.add_heading("Weights")
    page.add_table(
        rows,
        caption=f"Every parameter tensor and what the quantizer does with it: {n_q} of {len(rows)} tensors quantized "
        "(per-channel scales run along the channel axis); the others stay in full precision.",
    )


def _mixed_precision_rows(mp: dict) -> tuple[list[dict], list[dict]]:
    """Per-layer rows (bits of the plan and of HAWQ, predicted damage) and the measured-loss rows of ``mixed_precision``."""
    plan, check = mp["plan"], mp["verification"]
    hawq = check["hawq_plan"]["bits"]
    layers = {row["name"]: row for row in mp["sensitivities"]["layers"]}
    per_layer = []
    for name, bits in plan["bits"].items():
        row = layers[name]
        per_layer.append({"layer": name, "weights": row["size"], "bits (plan)": bits, "bits (HAWQ)": hawq[name],
                          "predicted damage ½uᵀHu": row["second_order"][row["bits"].index(bits)],
                          "tr H_ll": row["trace"]})
    n = len(check["random_losses"])
    random = None if check["random_mean"] is None else (
        f"{check['random_mean']:.4g} ± {check['random_std']:.2g} (sd, n={n})" if check["random_std"] is not None else f"{check['random_mean']:.4g} (n={n})")
    mean_bits = sum(check["random_average_bits"]) / n if n else None
    losses = [
        {"allocation": "full precision", "average bits": None, "predicted damage": None, "measured loss": f"{check['loss_fp']:.4g}"},
        {"allocation": "plan (second-order)", "average bits": plan["average_bits"], "predicted damage": plan["predicted_damage"],
         "measured loss": f"{check['loss_plan']:.4g}"},
        {"allocation": "HAWQ-V2 plan", "average bits": check["hawq_plan"]["average_bits"], "predicted damage": None,
         "measured loss": f"{check['loss_hawq']:.4g}"},
        {"allocation": "random allocations", "average bits": mean_bits, "predicted damage": None, "measured loss": random},
    ]
    return per_layer, losses


def _add_mixed_precision(page: ReportPage, mp: dict | None) -> None:
    if mp is None:
        return
    per_layer, losses = _mixed_precision_rows(mp)
    page.add_heading(f"Mixed precision under {mp['budget_bits']:g} bits")
    page.add_table(per_layer, caption=f"One bit-width per quantized tensor from {mp['candidate_bits']} minimising the summed second-order "
                   f"damage ½uᵀH_llu at θ_fp (exact knapsack, {mp['plan']['method']}) with parameter-weighted average "
                   f"{mp['plan']['average_bits']:.4g} ≤ {mp['budget_bits']:g} bits; HAWQ-V2 plan (tr H_ll / n · ‖u‖²) at the same budget "
                   "for comparison (docs/ptq_search.md §4).")
    page.add_table(losses, caption=f"Measured {mp['loss_set']}-set loss of each allocation (round to nearest per layer); random: maximal "
                   "random allocations within the budget, mean ± sd.")


def _add_notices(page: ReportPage, warnings: list, notes: list) -> None:
    """Warnings (what the numbers may not describe) and notes (how this run was computed)."""
    if warnings:
        page.add_heading("Warnings")
        page.add_text("\n".join(f"- {w}" for w in warnings))
    if notes:
        page.add_heading("How this run was computed")
        page.add_text("\n".join(f"- {n}" for n in notes))


def write_report(result: Any, out_dir: Path, *, title: str = "riverscape report") -> Path:
    """Write ``report.html`` and PNG figures for an :class:`~riverscape.analysis.AnalysisResult`.

    Parameters
    ----------
    result : AnalysisResult
    out_dir : Path
        Existing directory (the CLI passes a temporary one that is renamed on success).
    title : str

    Returns
    -------
    Path
        The report file.
    """
    out_dir = Path(out_dir)
    page = ReportPage(title, subtitle=f"{result.n_quantized:,} quantized weights · bits {', '.join(str(b.bits) for b in result.by_bits)}")
    _add_notices(page, list(getattr(result, "warnings", [])), list(getattr(result, "notes", [])))
    page.add_heading("Reading")
    for paragraph in reading(result):
        page.add_text(paragraph)

    page.add_heading("Summary")
    page.add_table(_summary_rows(result), caption=f"FP vs PTQ vs QAT on the {result.eval_split} split; ΔL is the training-loss increase of PTQ (analysis set).")
    methods = _ptq_method_rows(result)
    if methods:
        page.add_table(methods, caption=f"PTQ methods compared on the {result.eval_split} split (train loss: analysis set). The landscape below is analysed at the first method's point.")
    has_acc = result.fp.get("accuracy") is not None
    y = "accuracy" if has_acc else "loss"
    rows = []
    for b in result.by_bits:
        compared = getattr(b, "ptq_methods", None) or {}
        if len(compared) > 1:
            rows.extend({"method": f"PTQ ({method})", "bits": b.bits, y: values.get(y)} for method, values in compared.items())
        else:
            rows.append({"method": "PTQ", "bits": b.bits, y: b.ptq.get(y)})
        if b.qat is not None:
            rows.append({"method": "QAT", "bits": b.bits, y: b.qat.get(y)})
    reference = result.fp.get(y)
    estimators = sorted({b.qat["estimator"] for b in result.by_bits if b.qat is not None})
    page.add_figure(accuracy_vs_bits_figure(rows, y=y, reference=reference), caption="PTQ cliff vs QAT recovery" + (f" (QAT estimator: {', '.join(estimators)})." if estimators else "."))
    _save_png(static.accuracy_vs_bits_figure(rows, y=y, reference=reference), out_dir / "accuracy_vs_bits.png")

    page.add_heading("Hessian spectra")
    eigs = {"θ_fp": result.hessian_fp["top_eigenvalues"]}
    dens = {} if result.density_fp is None else {"θ_fp": (result.density_fp.grid.numpy(), result.density_fp.density.numpy())}
    for b in result.by_bits:
        if b.hessian_q:
            eigs[f"Q(θ_fp), {b.bits} bits"] = b.hessian_q["top_eigenvalues"]
        if b.density_q is not None:
            dens[f"Q(θ_fp), {b.bits} bits"] = (b.density_q.grid.numpy(), b.density_q.density.numpy())
    page.add_figure(spectrum_figure(eigs), caption="Top Hessian eigenvalues (Lanczos, exact HVPs) at the FP and PTQ points.")
    _save_png(static.spectrum_figure(eigs), out_dir / "spectrum.png")
    if dens:
        page.add_figure(density_figure(dens), caption="Spectral density by stochastic Lanczos quadrature (Gaussian broadening).")
        _save_png(static.density_figure(dens), out_dir / "density.png")

    sliced = [b for b in result.by_bits if b.slice_fp is not None]
    if sliced:
        page.add_heading("Landscapes: L(θ) and L(Q(θ)) side by side")
    for b in sliced:
        s_fp, s_q = b.slice_fp, b.slice_q
        args = (s_fp.alphas.numpy(), s_fp.betas.numpy(), s_fp.loss.numpy(), s_q.loss.numpy())
        labels = dict(xlabel="direction θ_fp → Q(θ_fp)", ylabel="orthogonal direction (toward QAT point)")
        page.add_figure(
            side_by_side_slices(*args, markers=b.markers, paths=b.paths, **labels),
            caption=f"{b.bits} bits: the plane through θ_fp, Q(θ_fp) and the QAT solution; left the full-precision loss, right the "
            "quantized loss of every point of the plane, on one colour scale.",
        )
        _save_png(static.side_by_side_slices(*args, markers=b.markers, paths=b.paths, **labels), out_dir / f"slices_{b.bits}bit.png")

    with_paths = [b for b in result.by_bits if b.profiles]
    if with_paths:
        page.add_heading("Loss along paths")
    for b in with_paths:
        profiles = {name: _profile_tuple(p) for name, p in b.profiles.items()}
        page.add_figure(path_figure(profiles), caption=f"{b.bits} bits: L(θ) solid, L(Q(θ)) dashed along each path (t from start to end).")
        _save_png(static.path_figure(profiles), out_dir / f"paths_{b.bits}bit.png")

    aligned = {f"{b.bits} bits": b.alignment.to_dict() for b in result.by_bits if b.alignment is not None}
    if aligned:
        page.add_heading("Gradient alignment at Q(θ)")
        page.add_figure(alignment_figure(aligned, dim=result.n_quantized), caption="Cosine of −∇L(Q(θ)) with the basin directions vs both null models.")
        _save_png(static.alignment_figure(aligned, dim=result.n_quantized), out_dir / "alignment.png")
        page.add_table(_alignment_rows(result), caption="Alignment metrics (docs/theory.md §7); z compares A(u_back) with the matched random-sign null.")

    qat_runs = [b for b in result.by_bits if b.qat_result is not None]
    if qat_runs:
        page.add_heading("QAT")
        for b in qat_runs:
            is_accuracy = result.fp.get("accuracy") is not None
            history = _qat_history(b.qat_result.history, metric_is_accuracy=is_accuracy)
            page.add_figure(
                qat_curve_figure(history, fp_loss=result.fp["train_loss"], fp_accuracy=result.fp.get("accuracy")),
                caption=f"{b.bits} bits: quantized training loss" + (" (and accuracy)" if is_accuracy else "")
                + " along QAT, grid flips per step.",
            )
            if b.qat_alignment is not None:
                series = b.qat_alignment
                rows = [
                    {"step": s, "L(Q(θ_t))": l, "A(u_back)": a, "A(u_hill)": h, "inward": i}
                    for s, l, a, h, i in zip(series.steps, series.loss_q, series.cosine_to_fp, series.cosine_hill, series.inward)
                ]
                shown = _evenly_spaced(rows, MAX_SERIES_ROWS)
                thinned = f" ({len(shown)} of {len(rows)} recorded steps, evenly spaced)" if len(shown) < len(rows) else ""
                page.add_table(shown, caption=f"{b.bits} bits: alignment along QAT (V_k and H at θ_fp){thinned}.")

    page.add_heading("Per layer")
    for b in result.by_bits:
        shown, note = _top_layer_rows([row.to_dict() for row in b.per_layer])
        page.add_table(shown, caption=f"{b.bits} bits: HAWQ-style sensitivity (top eigenvalue and trace per weight of the layer's Hessian block), hill fraction of the layer's rounding perturbation, damage and alignment.{note}")

    _add_mixed_precision(page, getattr(result, "mixed_precision", None))
    _add_weights_section(page, result)

    page.add_heading("Run")
    page.add_table([{"option": k, "value": str(v)} for k, v in result.options.items()], caption="Options.")
    page.add_table([{"stage": k, "seconds": v} for k, v in result.timings.items()], caption="Wall time per stage.")
    return page.save(out_dir / "report.html")
