"""E8 (docs/experiments.md §4; arXiv 2509.00097): QAT gradient estimators compared at 2 and 3 bits.

STE, clipped STE, LSQ, EWGS and the PEGE placeholder (docs/theory.md §3.7: the paper's exact method is not
known here) on the digits MLP and the MNIST-1D CNN, each from the same FP reference model, over
``--seeds N`` seeds (default 1 quick, 3 full; seed = FP model and QAT mini-batches/masks; cells
ordered seeds-outer, so an interrupted sweep leaves complete seeds): final test accuracy and loss
(mean [95% t CI], n), the quantized training loss L(Q(theta_t)) vs step, the discretisation error
|theta_t - Q(theta_t)| and the alignment of the gradient at Q(theta_t) with the way back to
theta_fp (``gradients.alignment_along_qat`` on the latent trajectory). PTQ (min-max, round to
nearest) of the same FP model is the baseline. Paired by seed (BCa CI, Wilcoxon p, Holm over the
rows of a metric with the same reference): every estimator minus PTQ, minus STE and minus LSQ. Note: LSQ learns its step sizes, the
other estimators keep the min-max scales of theta_fp frozen.

    python experiments/estimators.py --out runs/estimators                      # full: 3 seeds
    python experiments/estimators.py --quick --seeds 5 --out /tmp/estimators     # digits MLP, 2 bits

results.json: cells ``params = {"model", "bits", "method", "seed"}`` with method ``ptq`` or an
estimator name; ``result``: accuracy, loss (test), train_loss (L(Q) on the QAT training set at the
end; for ptq at Q(theta_fp)), and for estimators best_train_loss, total_grid_flips, qat_seconds,
history {step, loss, discretization_error, eval_metric} and alignment {steps, cosine_to_fp,
cosine_hill, cosine_river, distance_to_fp, random_baseline} (alignment uses the calibrated min-max
scales at theta_fp for every estimator; LSQ deploys learned scales, so its alignment is approximate);
``summary``: ``rows`` (per model, bits, method: t interval of each metric over seeds) and ``contrasts``
(riverscape.stats.summary.contrast_rows).
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import numpy as np

from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.gradients import alignment_along_qat
from riverscape.quant import ESTIMATOR_REGISTRY, EstimatorConfig, ptq
from riverscape.report.experiment_figures import series_figures
from riverscape.stats.summary import by_seed, contrast_rows, format_interval, seed_band, summary_rows

NAME = "estimators"
ESTIMATORS = ("ste", "clipped_ste", "lsq", "ewgs", "pege")
GROUP = ("model", "bits", "method")
#: every estimator against PTQ of the same FP model, against STE (the default) and against LSQ (the README's "best at
#: 2 bits"); a minus b, paired by seed, one Holm family per reference b
CONTRASTS = (tuple((m, "ptq") for m in ESTIMATORS) + tuple((m, "ste") for m in ESTIMATORS if m != "ste")
             + tuple((m, "lsq") for m in ESTIMATORS if m != "lsq"))


def _mean_series(key: str, inner: str):
    """Metric: the mean over one run's recorded series ``result[key][inner]`` (undefined entries ignored)."""
    return lambda res: float(np.nanmean(np.asarray([np.nan if v is None else v for v in res[key][inner]], dtype=float))) if key in res else None


#: summarised over seeds: test accuracy and loss, L(Q) on the QAT training set, and for estimators the run's diagnostics
METRICS = {
    "accuracy": "accuracy", "loss": "loss", "train_loss": "train_loss",
    "final_disc_error": lambda res: res["history"]["discretization_error"][-1] if "history" in res else None,
    "mean_cosine_to_fp": _mean_series("alignment", "cosine_to_fp"),
    "grid_flips": "total_grid_flips", "qat_seconds": "qat_seconds",
}


def settings(quick: bool) -> dict:
    if quick:
        return {"models": {"digits_mlp": {"train_steps": 800, "qat_steps": 80}}, "bits": [2], "seeds": 1, "qat_options": {"digits_mlp": {}}}
    return {"models": {"digits_mlp": {}, "mnist1d_cnn": {"qat_steps": 150}}, "bits": [3, 2], "seeds": 3,
            "qat_options": {"digits_mlp": {}, "mnist1d_cnn": {"ewgs": {"update_every": 75, "matvecs": 3}}}}


def estimator(method: str, options: dict) -> EstimatorConfig:
    """The estimator config of ``method`` with the model's options (``qat_options[model][method]``: config fields)."""
    return ESTIMATOR_REGISTRY[method].config_cls(**options.get(method, {}))


def specs(cfg: dict) -> dict[str, st.StudyModel]:
    return {key: st.study_model(key, **overrides) for key, overrides in cfg["models"].items()}


def cells(cfg: dict, seed: int) -> list[dict]:
    """Seeds outer, so an interrupted sweep leaves complete seeds (every model, bit-width and method of one seed)."""
    return [{"model": key, "bits": b, "method": m, "seed": s}
            for s in range(seed, seed + cfg["seeds"]) for key in cfg["models"] for b in cfg["bits"] for m in ("ptq",) + ESTIMATORS]


def run_cell(cell: dict, cfg: dict, out_dir, progress: bool) -> dict:
    key, bits, method, seed = cell["model"], cell["bits"], cell["method"], cell["seed"]
    study = st.load_study(specs(cfg)[key], seed, out_dir / "fp_models", progress=progress)
    qmap = study.quant_map(bits)
    if method == "ptq":
        q = ptq(study.analysis, qmap)
        loss, acc = study.evaluation.loss_and_metric(q)
        return {"accuracy": acc, "loss": loss, "train_loss": study.training.loss(q)}
    res = st.run_qat(study, bits, estimator(method, cfg["qat_options"][key]), seed=seed, progress=progress)
    loss, acc = study.evaluation.loss_and_metric(res.theta_q)
    ali = alignment_along_qat(study.analysis, study.theta_fp, qmap, res.latent_trajectory, steps=res.trajectory_steps,
                              basis=study.basis(), qparams=qmap.qparams(study.theta_fp), seed=seed, progress=False)
    return {
        "accuracy": acc, "loss": loss, "train_loss": res.last_loss, "best_train_loss": res.best_loss,
        "total_grid_flips": int(sum(res.grid_flips)), "qat_seconds": res.wall_time,
        "history": {k: res.history[k] for k in ("step", "loss", "discretization_error", "eval_metric")},
        "alignment": {"steps": ali.steps, "cosine_to_fp": ali.cosine_to_fp, "cosine_hill": ali.cosine_hill, "cosine_river": ali.cosine_river,
                      "distance_to_fp": ali.distance_to_fp, "random_baseline": ali.random_baseline},
    }


def summarise(records: list[dict]) -> dict:
    """``rows`` (t interval of every metric per model, bits, method) and ``contrasts`` (paired by seed, Holm)."""
    groups = by_seed(records, GROUP)
    return {"rows": summary_rows(groups, GROUP, METRICS),
            "contrasts": contrast_rows(groups, GROUP, "method", CONTRASTS, {"accuracy": "accuracy", "loss": "loss"}, holm_by=("b",))}


def _p(value) -> str | None:
    return None if value is None else f"{value:.3g}"


def tables(summary: dict) -> list[str]:
    order = ("ptq",) + ESTIMATORS
    rows = sorted(summary["rows"], key=lambda r: (r["model"], -r["bits"], order.index(r["method"])))
    text = [{**{k: r[k] for k in GROUP}, "n": r["n"], **{m: format_interval(r[m], "{:.3g}", show_n=False) for m in METRICS}} for r in rows]
    md = [sw.print_table(text, {"model": "model", "bits": "bits", "method": "method", "n": "n", "accuracy": "test acc", "loss": "test loss",
                                "train_loss": "L(Q) train", "final_disc_error": "|θ-Q(θ)| end", "mean_cosine_to_fp": "mean cos",
                                "grid_flips": "flips", "qat_seconds": "s/run"},
                         title="QAT estimators vs PTQ: mean [95% t CI] over n seeds")]
    contrasts = sorted(summary["contrasts"], key=lambda c: (order.index(c["b"]), c["model"], -c["bits"], order.index(c["a"])))
    crow = [{"model": c["model"], "bits": c["bits"], "contrast": f"{c['a']} − {c['b']}", "n": c["n"],
             "acc": format_interval(c["accuracy"], "{:+.3f}", show_n=False), "acc_p": _p(c["accuracy"]["wilcoxon_p"]),
             "acc_holm": _p(c["accuracy"]["holm_p"]), "loss": format_interval(c["loss"], "{:+.3g}", show_n=False),
             "loss_holm": _p(c["loss"]["holm_p"])} for c in contrasts]
    md.append(sw.print_table(crow, {"model": "model", "bits": "bits", "contrast": "a − b", "n": "n", "acc": "Δ test acc [95% BCa]",
                                    "acc_p": "Wilcoxon p", "acc_holm": "Holm p", "loss": "Δ test loss [95% BCa]", "loss_holm": "Holm p"},
                             title="Paired by seed (same FP model): a minus b; Holm over the rows of a metric with the same b"))
    return md


def _curve(results: list[dict], path: tuple[str, str]) -> tuple:
    """Mean over seeds and 95% t half-width of one recorded series (steps from the first seed)."""
    outer, inner = path
    steps = results[0][outer]["step" if outer == "history" else "steps"]
    mean, half = seed_band([res[outer][inner] for res in results])
    return steps, mean, half


def figures(records: list[dict], cfg: dict, out_dir) -> None:
    groups = by_seed(records, GROUP)
    for key in cfg["models"]:
        for bits in cfg["bits"]:
            panels: dict[str, dict] = {"L(Q(θ_t)) (training set)": {}, "discretisation error |θ_t - Q(θ_t)|": {}, "cos(-g at Q(θ_t), θ_fp - Q(θ_t))": {}}
            n = 0
            for method in ESTIMATORS:
                by = groups.get((key, bits, method), {})
                results = [by[s] for s in sorted(by)]
                n = max(n, len(results))
                for panel, path in zip(panels, (("history", "loss"), ("history", "discretization_error"), ("alignment", "cosine_to_fp"))):
                    panels[panel][method] = _curve(results, path)
            fig, mfig = series_figures(panels, f"{key}, {bits} bits: QAT estimators (mean ± 95% t half-width over {n} seed(s))", log_y=(True, False, False))
            sw.write_figure(fig, out_dir / f"curves_{key}_{bits}bit", static=mfig)


def main(argv: list[str] | None = None) -> dict:
    opts, cfg, sweep = st.open_sweep(NAME, __doc__.splitlines()[0], settings, argv, models=specs,
                                     seeds_help="seeds (FP models) per configuration (default: 1 quick, 3 full)")
    records = sweep.run(cells(cfg, opts.seed), lambda c: run_cell(c, cfg, opts.out, opts.progress))
    summary = summarise(records)
    sweep.summary = summary
    md = tables(summary)
    figures(records, cfg, opts.out)
    st.finish_sweep(sweep, opts.out, md)
    return {"records": records, "summary": summary}


if __name__ == "__main__":
    main(sys.argv[1:])
