"""E1/E3/E10 (docs/experiments.md §2): PTQ collapses at low bit-widths, QAT from the same FP point recovers.

Models: digits MLP, MNIST-1D CNN (``cnn1d``), tiny text transformer (perplexity = exp(test loss),
accuracy = next-character accuracy). Bits 8/6/4/3/2/1; PTQ by round-to-nearest with min-max and
MSE range calibration, QAT (STE, LSQ) from the FP point. For every point: test accuracy / loss,
top Hessian eigenvalue and Hutch++ trace of L(theta) there (weights-only objective, capped
analysis set of the training split), hill fraction and measured vs second-order-predicted loss
increase of the displacement from theta_fp (``gradients.damage``), and the alignment of the
gradient at the min-max PTQ point Q(theta_fp) with the way back (``gradients.alignment``: cosine,
isotropic baseline 1/sqrt(d), matched sign-flip null mean/sd/z).

Seeds are an axis of the sweep (``--seeds N``, default 1 quick / 3 full; seed = FP model, QAT
mini-batches, null draws), ordered seeds-outer so an interrupted sweep leaves complete seeds.
Every table shows mean [95% Student t CI] and n over seeds; the claims tables (from
``riverscape.ptq_qat_claims``) give the PTQ damage ratio r with its t CI and the t test of r = 1,
the fraction of the PTQ loss increase QAT recovers, QAT/PTQ contrasts paired by seed (BCa CI,
Wilcoxon p, Holm), and the alignment null z per seed pooled with Stouffer.

    python experiments/ptq_vs_qat.py --out runs/ptq_vs_qat                # full, 3 seeds
    python experiments/ptq_vs_qat.py --out runs/ptq_vs_qat_62 --bits 6 2   # only the bit-widths the claims need
    python experiments/ptq_vs_qat.py --quick --out /tmp/ptq_vs_qat         # digits MLP, bits 8/2, 1 seed: ~20 s

results.json (see riverscape.sweep): ``config``, ``cells`` and ``summary``; each cell is
``{"key", "params", "result", "seconds"}`` with
``params = {"model": "digits_mlp"|"mnist1d_cnn"|"text_transformer", "bits": int, "method": str, "seed": int}``,
method one of ``fp`` (bits 32: the FP reference), ``ptq_minmax``, ``ptq_mse``, ``qat_ste``, ``qat_lsq``, and
``result`` a flat dict:
  accuracy, loss, train_loss, perplexity (text only)       test metrics of the point (train_loss: analysis set)
  top_eigenvalue, trace, trace_stderr                      curvature of L(theta) at the point
  hill_fraction, hill_energy_baseline, curvature_share     of delta = point - theta_fp (top-10 eigvecs at theta_fp)
  predicted_loss_increase, measured_loss_increase, ratio   g.delta + delta.H.delta/2 vs L(point) - L(theta_fp)
  breakdown_scale, inside_basin, rho_max, delta_norm       (plus floor_recovery, ... for PTQ where computed)
  cosine_to_fp, random_baseline, null_mean, null_sd, null_z, z_iso, cosine_hill, cosine_river, inward, chi_k,
  null_draws                                               alignment at the min-max PTQ point (QAT cells too)
  distance_to_fp                                           |point - theta_fp|
QAT cells add cosine_qat, ptq_distance_to_fp, barrier_from_fp, hit_step, total_grid_flips, qat_steps,
qat_seconds, history {step, loss, eval_metric, discretization_error}, and for the MLP at 4/2/1 bits
(qat_ste, first seed only) ``landscape`` (see riverscape.studies.plane_landscape). ``fp`` cells hold accuracy, loss,
perplexity, train_loss, top_eigenvalue, trace, dim, analysis_samples, eval_samples.
Damage/alignment numbers are None where undefined (e.g. ratio when the prediction is 0).
``summary``: ``rows`` (per model, bits, method: a t interval per metric), ``damage_ratio``, ``recovery``,
``contrasts`` and ``alignment_z`` (see riverscape.ptq_qat_claims and riverscape.stats.summary).
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

from riverscape import ptq_qat_claims as claims
from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.report.experiment_figures import landscape_figures, series_figures
from riverscape.stats.summary import by_seed, contrast_rows, format_interval, interval_series, summary_rows

NAME = "ptq_vs_qat"
METHOD_LABELS = {"ptq_minmax": "PTQ min-max", "ptq_mse": "PTQ MSE", "qat_ste": "QAT STE", "qat_lsq": "QAT LSQ"}
#: scalar metrics summarised over seeds (result keys; perplexity only for text)
METRICS = ("accuracy", "perplexity", "loss", "top_eigenvalue", "trace", "hill_fraction", "measured_loss_increase", "predicted_loss_increase",
           "ratio", "cosine_to_fp", "random_baseline", "null_mean", "null_z")
#: paired by seed at every bit-width (a minus b), Holm over all rows of a metric
CONTRASTS = (("qat_lsq", "qat_ste"), ("qat_ste", "ptq_minmax"), ("qat_lsq", "ptq_minmax"), ("ptq_mse", "ptq_minmax"))


def settings(quick: bool) -> dict:
    if quick:
        return {"models": {"digits_mlp": {"train_steps": 800, "qat_steps": 80, "trace_matvecs": 30}}, "bits": [8, 2], "landscape_bits": [2],
                "seeds": 1}
    return {"models": {key: {} for key in st.STUDY_MODELS}, "bits": [8, 6, 4, 3, 2, 1], "landscape_bits": [4, 2, 1], "seeds": 3}


def arguments(parser) -> None:
    parser.add_argument("--bits", type=int, nargs="+", default=None, help="bit-widths to run (default: 8 2 quick, 8 6 4 3 2 1 full)")
    parser.add_argument("--models", nargs="+", choices=tuple(st.STUDY_MODELS), default=None, help="study models to run (default: all; quick: digits_mlp)")


def overrides(opts) -> dict:
    out = {}
    if opts.bits is not None:
        out["bits"] = sorted(set(opts.bits), reverse=True)
    if opts.models is not None:
        base = settings(opts.quick)["models"]
        out["models"] = {key: base.get(key, {}) for key in dict.fromkeys(opts.models)}
    return out


def specs(cfg: dict) -> dict[str, st.StudyModel]:
    return {key: st.study_model(key, **overrides) for key, overrides in cfg["models"].items()}


def cells(cfg: dict, seed: int) -> list[dict]:
    """Seeds outer, so an interrupted sweep leaves complete seeds (every model, bit-width and method of one seed)."""
    out = []
    for s in range(seed, seed + cfg["seeds"]):
        for key, spec in specs(cfg).items():
            out.append({"model": key, "bits": 32, "method": "fp", "seed": s})
            for bits in cfg["bits"]:
                out += [{"model": key, "bits": bits, "method": f"ptq_{r}", "seed": s} for r in st.PTQ_RANGES]
                if spec.qat_bits is None or bits in spec.qat_bits:
                    out += [{"model": key, "bits": bits, "method": f"qat_{e}", "seed": s} for e in st.QAT_ESTIMATORS]
    return out


def run_cell(cell: dict, cfg: dict, out_dir, progress: bool) -> dict:
    seed = cell["seed"]
    study = st.load_study(specs(cfg)[cell["model"]], seed, out_dir / "fp_models", progress=progress)
    method, bits = cell["method"], cell["bits"]
    if method == "fp":
        return st.fp_cell(study)
    kind, name = method.split("_", 1)
    if kind == "ptq":
        return st.ptq_cell(study, bits, name)
    landscape = cell["model"] == "digits_mlp" and name == "ste" and bits in cfg["landscape_bits"] and seed == cfg["seed"]
    return st.qat_cell(study, bits, name, seed=seed, landscape=landscape, progress=progress)


def summarise(records: list[dict], cfg: dict) -> dict:
    """Every derived result stored under ``summary`` in results.json."""
    group = ("model", "bits", "method")
    groups = by_seed(records, group)
    low = min(cfg["bits"])
    return {
        "rows": summary_rows(groups, group, {m: m for m in METRICS}),
        "damage_ratio": claims.damage_ratio_rows(records),
        "recovery": claims.recovery_rows(records, bits=low) + claims.recovery_rows(records, bits=low, metric="accuracy"),
        "contrasts": contrast_rows(groups, group, "method", CONTRASTS, {"accuracy": "accuracy", "loss": "loss"}),
        "alignment_z": claims.alignment_z_rows(records, bits=low),
    }


def _p(value) -> str | None:
    return None if value is None else f"{value:.3g}"


def tables(summary: dict, cfg: dict) -> list[str]:
    md = []
    fmt = "{:.3g}"
    for key, spec in specs(cfg).items():
        rows = [r for r in summary["rows"] if r["model"] == key]
        rows.sort(key=lambda r: (-r["bits"], r["method"] != "fp", r["method"]))
        metric = "perplexity" if spec.perplexity else "accuracy"
        text = [{"bits": "FP" if r["method"] == "fp" else r["bits"], "method": r["method"], "n": r["n"],
                 **{m: format_interval(r.get(m), fmt, show_n=False) for m in METRICS}} for r in rows]
        points = {"bits": "bits", "method": "method", "n": "n", metric: metric, **({"accuracy": "next-char acc"} if spec.perplexity else {}),
                  "loss": "test loss", "top_eigenvalue": "λ_max", "trace": "tr H"}
        md.append(sw.print_table(text, points, title=f"{key}: test metrics and curvature, mean [95% t CI] over n seeds"))
        geometry = {"bits": "bits", "method": "method", "n": "n", "hill_fraction": "hill frac", "measured_loss_increase": "ΔL meas",
                    "predicted_loss_increase": "ΔL pred", "ratio": "r", "cosine_to_fp": "cos", "random_baseline": "1/√d",
                    "null_mean": "null μ", "null_z": "null z"}
        md.append(sw.print_table([t for t in text if t["method"] != "fp"], geometry,
                                 title=f"{key}: damage of δ = point - θ_fp (training analysis set) and alignment at the min-max Q(θ_fp), mean [95% t CI]"))
    ratio = [{"model": r["model"], "bits": r["bits"], "n": r["n"], "r": format_interval(r["ratio"], fmt, show_n=False),
              "per_seed": ", ".join(f"{v:.3g}" for v in r["ratios"]), "t_p": _p(r["t_p"]), "holm_p": _p(r["holm_p"]),
              "error": format_interval(r["error"], "{:+.3f}", show_n=False), "error_holm_p": _p(r["error_holm_p"])} for r in summary["damage_ratio"]]
    md.append(sw.print_table(sorted(ratio, key=lambda r: (r["model"], -r["bits"])),
                             {"model": "model", "bits": "bits", "n": "n", "r": "r = meas/pred [95% t CI]", "per_seed": "r per seed",
                              "t_p": "t p (r=1)", "holm_p": "Holm p", "error": "(meas−pred)/(|1st|+|2nd|) [95% t CI]", "error_holm_p": "Holm p (=0)"},
                             title="PTQ min-max: is the second-order damage model exact? (per-seed r and relative error, t intervals, one-sample t tests)"))
    recovery = []
    for r in summary["recovery"]:
        entry = {"model": r["model"], "bits": r["bits"], "metric": f"test {r['metric']}"}
        for arm, got in r["fractions"].items():
            entry[arm] = format_interval(got["interval"], "{:.2f}")
        if "difference" in r:
            entry["diff"] = format_interval(r["difference"], "{:.2f}")
            entry["diff_p"] = _p(r["difference"]["wilcoxon_p"])
        recovery.append(entry)
    md.append(sw.print_table(recovery, {"model": "model", "bits": "bits", "metric": "of", "qat_ste": "STE", "qat_lsq": "LSQ",
                                        "diff": "LSQ − STE [BCa]", "diff_p": "Wilcoxon p"},
                             title="Fraction of the PTQ (min-max) damage QAT recovers, (m_PTQ − m_QAT)/(m_PTQ − m_FP), mean [95% t CI]"))
    contrasts = [{"model": c["model"], "bits": c["bits"], "contrast": f"{c['a']} − {c['b']}", "n": c["n"],
                  "acc": format_interval(c["accuracy"], "{:+.3f}", show_n=False), "acc_p": _p(c["accuracy"]["holm_p"]) if c["accuracy"] else None,
                  "loss": format_interval(c["loss"], "{:+.3g}", show_n=False), "loss_p": _p(c["loss"]["holm_p"]) if c["loss"] else None}
                 for c in summary["contrasts"]]
    md.append(sw.print_table(sorted(contrasts, key=lambda c: (c["model"], -c["bits"])),
                             {"model": "model", "bits": "bits", "contrast": "a − b", "n": "n", "acc": "Δ test acc [95% BCa]", "acc_p": "Holm p",
                              "loss": "Δ test loss [95% BCa]", "loss_p": "Holm p"},
                             title="Paired by seed (same FP model): a minus b; Wilcoxon p Holm-adjusted over all rows of a metric"))
    align = [{"model": r["model"], "bits": r["bits"], "n": r["n"], "z": ", ".join(f"{z:+.2f}" for z in r["z"]), "positive": f"{r['positive']}/{r['n']}",
              "stouffer": f"{r['stouffer_z']:+.2f}", "p": _p(r["p_two_sided"]), "holm_p": _p(r["holm_p"]),
              "draws": r["null_draws"][0]} for r in summary["alignment_z"]]
    md.append(sw.print_table(align, {"model": "model", "bits": "bits", "n": "n", "z": "null z per seed", "positive": "z > 0",
                                     "stouffer": "Stouffer Z", "p": "two-sided p", "holm_p": "Holm p", "draws": "null draws"},
                             title="Gradient alignment at the min-max Q(θ_fp) vs the matched sign-flip null, pooled over seeds"))
    return md


def figures(records: list[dict], summary: dict, cfg: dict, out_dir) -> None:
    for key, spec in specs(cfg).items():
        rows = [r for r in summary["rows"] if r["model"] == key]
        fp = next(r for r in rows if r["method"] == "fp")
        quantized = [r for r in rows if r["method"] != "fp"]
        bits = sorted({r["bits"] for r in quantized})
        chance = 1.0 / st.load_study(spec, cfg["seed"], out_dir / "fp_models").dataset.num_classes
        ys = [("accuracy", "test accuracy" if not spec.perplexity else "next-character accuracy")] + ([("perplexity", "test perplexity")] if spec.perplexity else [])
        for y, label in ys:
            series = {lab: interval_series([r for r in quantized if r["method"] == m], "bits", y) for m, lab in METHOD_LABELS.items()}
            half = (fp[y]["high"] - fp[y]["low"]) / 2 if fp[y]["n"] > 1 else 0.0
            series[f"FP ({fp[y]['estimate']:.3g})"] = (bits, [fp[y]["estimate"]] * len(bits), [half] * len(bits))
            if y == "accuracy":
                series[f"chance ({chance:.2g})"] = (bits, [chance] * len(bits))
            fig, mfig = series_figures({f"{key}: {label} (mean ± 95% t, n = {fp['n']})": series},
                                       f"{key}: {label} vs bits, mean ± 95% t half-width over {fp['n']} seed(s)", xlabel="bits", markers=True)
            sw.write_figure(fig, out_dir / f"{y}_vs_bits_{key}", static=mfig)
        ptq = [r for r in quantized if r["method"] == "ptq_minmax"]
        panels = {
            # means only: on the log axis a band reaching below 0 (tiny 8-bit increases) would be clipped to nonsense
            "PTQ (min-max) loss increase": {"measured": interval_series(ptq, "bits", "measured_loss_increase")[:2],
                                            "2nd-order prediction": interval_series(ptq, "bits", "predicted_loss_increase")[:2]},
            "top Hessian eigenvalue at the point": {lab: interval_series([r for r in quantized if r["method"] == m], "bits", "top_eigenvalue")
                                                    for m, lab in METHOD_LABELS.items() if any(r["method"] == m for r in quantized)},
            "alignment at Q(θ_fp)": {"cos(-g_Q, θ_fp - Q)": interval_series(ptq, "bits", "cosine_to_fp"),
                                     "matched null mean": interval_series(ptq, "bits", "null_mean"),
                                     "isotropic 1/sqrt(d)": interval_series(ptq, "bits", "random_baseline")},
        }
        fig, mfig = series_figures(panels, f"{key}: damage, curvature and gradient alignment vs bits (mean ± 95% t half-width, n = {fp['n']})",
                                   xlabel="bits", log_y=(True, True, False), markers=True)
        sw.write_figure(fig, out_dir / f"geometry_{key}", static=mfig)
    for r in records:
        land = r["result"].get("landscape")
        if land is not None:
            b = r["params"]["bits"]
            fig, mfig = landscape_figures(land, f"{r['params']['model']}, {b} bits, seed {r['params']['seed']}: θ_fp, PTQ point and QAT (STE) point")
            sw.write_figure(fig, out_dir / f"landscape_{r['params']['model']}_{b}bit", static=mfig)


def main(argv: list[str] | None = None) -> dict:
    opts, cfg, sweep = st.open_sweep(NAME, __doc__.splitlines()[0], settings, argv, models=specs, arguments=arguments, overrides=overrides,
                                     seeds_help="seeds (FP models) per configuration (default: 1 quick, 3 full)")
    records = sweep.run(cells(cfg, opts.seed), lambda c: run_cell(c, cfg, opts.out, opts.progress))
    summary = summarise(records, cfg)
    sweep.summary = summary
    md = tables(summary, cfg)
    figures(records, summary, cfg, opts.out)
    st.finish_sweep(sweep, opts.out, md)
    return {"records": records, "summary": summary}


if __name__ == "__main__":
    main(sys.argv[1:])
