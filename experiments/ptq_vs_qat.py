"""E1/E3/E10 (docs/experiments.md §2): PTQ collapses at low bit-widths, QAT from the same FP point recovers.

Models: digits MLP, MNIST-1D CNN (``cnn1d``), tiny text transformer (perplexity = exp(test loss),
accuracy = next-character accuracy). Bits 8/6/4/3/2/1; PTQ by round-to-nearest with min-max and
MSE range calibration, QAT (STE, LSQ) from the FP point. For every point: test accuracy / loss,
top Hessian eigenvalue and Hutch++ trace of L(theta) there (weights-only objective, capped
analysis set of the training split), hill fraction and measured vs second-order-predicted loss
increase of the displacement from theta_fp (``gradients.damage``), and the alignment of the
gradient at the min-max PTQ point Q(theta_fp) with the way back (``gradients.alignment``: cosine,
isotropic baseline 1/sqrt(d), matched sign-flip null mean/sd/z).

    python experiments/ptq_vs_qat.py --out runs/ptq_vs_qat            # full: ~5 min on 2 shared cores
    python experiments/ptq_vs_qat.py --quick --out /tmp/ptq_vs_qat     # digits MLP, bits 8/2: ~20 s

results.json (see riverscape.sweep): ``config`` and ``cells``; each cell is
``{"key", "params", "result", "seconds"}`` with
``params = {"model": "digits_mlp"|"mnist1d_cnn"|"text_transformer", "bits": int, "method": str}``,
method one of ``fp`` (bits 32: the FP reference), ``ptq_minmax``, ``ptq_mse``, ``qat_ste``, ``qat_lsq``, and
``result`` a flat dict:
  accuracy, loss, train_loss, perplexity (text only)       test metrics of the point (train_loss: analysis set)
  top_eigenvalue, trace, trace_stderr                      curvature of L(theta) at the point
  hill_fraction, hill_energy_baseline, curvature_share     of delta = point - theta_fp (top-10 eigvecs at theta_fp)
  predicted_loss_increase, measured_loss_increase, ratio   g.delta + delta.H.delta/2 vs L(point) - L(theta_fp)
  breakdown_scale, inside_basin, rho_max, delta_norm       (plus floor_recovery, ... for PTQ where computed)
  cosine_to_fp, random_baseline, null_mean, null_sd, null_z, z_iso, cosine_hill, cosine_river, inward, chi_k
                                                           alignment at the min-max PTQ point (QAT cells too)
  distance_to_fp                                           |point - theta_fp|
QAT cells add cosine_qat, ptq_distance_to_fp, barrier_from_fp, hit_step, total_grid_flips, qat_steps,
qat_seconds, history {step, loss, eval_metric, discretization_error}, and for the MLP at 4/2/1 bits
(qat_ste) ``landscape`` (see riverscape.studies.plane_landscape). ``fp`` cells hold accuracy, loss,
perplexity, train_loss, top_eigenvalue, trace, dim, analysis_samples, eval_samples.
Damage/alignment numbers are None where undefined (e.g. ratio when the prediction is 0).
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.report.experiment_figures import landscape_figures, series_figures
from riverscape.report import accuracy_vs_bits_figure, static

NAME = "ptq_vs_qat"
METHOD_LABELS = {"ptq_minmax": "PTQ min-max", "ptq_mse": "PTQ MSE", "qat_ste": "QAT STE", "qat_lsq": "QAT LSQ"}


def settings(quick: bool) -> dict:
    if quick:
        return {"models": {"digits_mlp": {"train_steps": 800, "qat_steps": 80, "trace_matvecs": 30}}, "bits": [8, 2], "landscape_bits": [2]}
    return {"models": {key: {} for key in st.STUDY_MODELS}, "bits": [8, 6, 4, 3, 2, 1], "landscape_bits": [4, 2, 1]}


def specs(cfg: dict) -> dict[str, st.StudyModel]:
    return {key: st.study_model(key, **overrides) for key, overrides in cfg["models"].items()}


def cells(cfg: dict) -> list[dict]:
    out = []
    for key, spec in specs(cfg).items():
        out.append({"model": key, "bits": 32, "method": "fp"})
        for bits in cfg["bits"]:
            out += [{"model": key, "bits": bits, "method": f"ptq_{r}"} for r in st.PTQ_RANGES]
            if spec.qat_bits is None or bits in spec.qat_bits:
                out += [{"model": key, "bits": bits, "method": f"qat_{e}"} for e in st.QAT_ESTIMATORS]
    return out


def run_cell(cell: dict, cfg: dict, seed: int, out_dir, progress: bool) -> dict:
    study = st.load_study(specs(cfg)[cell["model"]], seed, out_dir / "fp_models", progress=progress)
    method, bits = cell["method"], cell["bits"]
    if method == "fp":
        return st.fp_cell(study)
    kind, name = method.split("_", 1)
    if kind == "ptq":
        return st.ptq_cell(study, bits, name)
    landscape = cell["model"] == "digits_mlp" and name == "ste" and bits in cfg["landscape_bits"]
    return st.qat_cell(study, bits, name, seed=seed, landscape=landscape, progress=progress)


def model_rows(records: list[dict], model: str) -> tuple[dict, list[dict]]:
    fp = next(r["result"] for r in records if r["params"]["model"] == model and r["params"]["method"] == "fp")
    rows = [{**r["params"], **{k: v for k, v in r["result"].items() if not isinstance(v, (dict, list))}}
            for r in records if r["params"]["model"] == model and r["params"]["method"] != "fp"]
    return fp, rows


def figures(records: list[dict], cfg: dict, out_dir) -> None:
    for key, spec in specs(cfg).items():
        fp, rows = model_rows(records, key)
        labelled = [{**r, "method": METHOD_LABELS[r["method"]]} for r in rows]
        ys = [("accuracy", "test accuracy" if not spec.perplexity else "next-character accuracy")]
        if spec.perplexity:
            ys.append(("perplexity", "test perplexity"))
        for y, label in ys:
            usable = [r for r in labelled if r.get(y) is not None]
            kwargs = dict(y=y, reference=fp[y], chance=1.0 / st.load_study(spec, cfg["seed"], out_dir / "fp_models").dataset.num_classes
                          if y == "accuracy" else None, title=f"{key}: {label} vs bits (PTQ cliff, QAT recovery)", ylabel=label)
            sw.write_figure(accuracy_vs_bits_figure(usable, **kwargs), out_dir / f"{y}_vs_bits_{key}", static=static.accuracy_vs_bits_figure(usable, **kwargs))
        ptq = sorted((r for r in rows if r["method"] == "ptq_minmax"), key=lambda r: r["bits"])
        bits = [r["bits"] for r in ptq]
        panels = {
            "PTQ (min-max) loss increase": {"measured": (bits, [r["measured_loss_increase"] for r in ptq]),
                                            "2nd-order prediction": (bits, [r["predicted_loss_increase"] for r in ptq])},
            "top Hessian eigenvalue at the point": {
                METHOD_LABELS[m]: ([r["bits"] for r in rs_], [r["top_eigenvalue"] for r in rs_])
                for m in METHOD_LABELS for rs_ in [sorted((r for r in rows if r["method"] == m), key=lambda r: r["bits"])] if rs_},
            "alignment at Q(θ_fp)": {"cos(-g_Q, θ_fp - Q)": (bits, [r["cosine_to_fp"] for r in ptq]),
                                     "matched null mean": (bits, [r["null_mean"] for r in ptq], [r["null_sd"] for r in ptq]),
                                     "isotropic 1/sqrt(d)": (bits, [r["random_baseline"] for r in ptq])},
        }
        fig, mfig = series_figures(panels, f"{key}: damage, curvature and gradient alignment vs bits", xlabel="bits", log_y=(True, True, False))
        sw.write_figure(fig, out_dir / f"geometry_{key}", static=mfig)
    for r in records:
        land = r["result"].get("landscape")
        if land is not None:
            b = r["params"]["bits"]
            fig, mfig = landscape_figures(land, f"{r['params']['model']}, {b} bits: θ_fp, PTQ point and QAT (STE) point")
            sw.write_figure(fig, out_dir / f"landscape_{r['params']['model']}_{b}bit", static=mfig)


def main(argv: list[str] | None = None) -> list[dict]:
    opts, cfg, sweep = st.open_sweep(NAME, __doc__.splitlines()[0], settings, argv, models=specs)
    records = sweep.run(cells(cfg), lambda c: run_cell(c, cfg, opts.seed, opts.out, opts.progress))
    md = []
    for key, spec in specs(cfg).items():
        fp, rows = model_rows(records, key)
        metric = "perplexity" if spec.perplexity else "accuracy"
        rows = [{"bits": "FP", "method": "fp", **fp}] + sorted(rows, key=lambda r: (-r["bits"], r["method"]))
        columns = {"bits": "bits", "method": "method", metric: metric, "loss": "test loss", "top_eigenvalue": "λ_max", "trace": "tr H",
                   "hill_fraction": "hill frac", "measured_loss_increase": "ΔL meas", "predicted_loss_increase": "ΔL pred", "ratio": "ratio",
                   "cosine_to_fp": "cos", "random_baseline": "1/√d", "null_mean": "null μ", "null_z": "null z"}
        if spec.perplexity:
            columns = {"bits": "bits", "method": "method", "perplexity": "perplexity", "accuracy": "next-char acc", **{k: v for k, v in columns.items() if k not in ("bits", "method", "perplexity")}}
        md.append(sw.print_table(rows, columns, title=f"{key} (FP {metric} {fp[metric]:.4g}; ΔL on the training analysis set)"))
    figures(records, cfg, opts.out)
    st.finish_sweep(sweep, opts.out, md)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
