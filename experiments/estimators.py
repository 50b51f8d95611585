"""E8 (docs/experiments.md §4; arXiv 2509.00097): QAT gradient estimators compared at 2 and 3 bits.

STE, clipped STE, LSQ, EWGS and the PEGE placeholder (docs/theory.md §3.7: the paper's exact method is not
known here) on the digits MLP and the MNIST-1D CNN, each from the same FP reference model, over 3
seeds (seed = FP model and QAT mini-batches/masks): final test accuracy (mean and spread), the
quantized training loss L(Q(theta_t)) vs step, the discretisation error |theta_t - Q(theta_t)| and
the alignment of the gradient at Q(theta_t) with the way back to theta_fp
(``gradients.alignment_along_qat`` on the latent trajectory). PTQ (min-max, round to nearest) of
the same FP model is the baseline.

    python experiments/estimators.py --out runs/estimators           # full: ~5 min on 2 shared cores
    python experiments/estimators.py --quick --out /tmp/estimators    # digits MLP, 2 bits, 1 seed: ~15 s

results.json: cells ``params = {"model", "bits", "method", "seed"}`` with method ``ptq`` or an
estimator name; ``result``: accuracy, loss (test), train_loss (L(Q) on the QAT training set at the
end; for ptq at Q(theta_fp)), and for estimators best_train_loss, total_grid_flips, qat_seconds,
history {step, loss, discretization_error, eval_metric} and alignment {steps, cosine_to_fp,
cosine_hill, cosine_river, distance_to_fp, random_baseline} (alignment uses the calibrated min-max
scales at theta_fp for every estimator; LSQ deploys learned scales, so its alignment is approximate).
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import numpy as np

from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.report.experiment_figures import series_figures
from riverscape.gradients import alignment_along_qat
from riverscape.quant import ESTIMATOR_REGISTRY, EstimatorConfig, ptq

NAME = "estimators"
ESTIMATORS = ("ste", "clipped_ste", "lsq", "ewgs", "pege")


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
    return [{"model": key, "bits": b, "method": m, "seed": seed + i}
            for key in cfg["models"] for b in cfg["bits"] for i in range(cfg["seeds"]) for m in ("ptq",) + ESTIMATORS]


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


def _mean_sd(values: list) -> tuple[float, float]:
    a = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    return float(np.nanmean(a)), float(np.nanstd(a, ddof=1)) if len(a) > 1 else 0.0


def summary_rows(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        p = r["params"]
        groups.setdefault((p["model"], p["bits"], p["method"]), []).append(r["result"])
    rows = []
    for (model, bits, method), results in groups.items():
        row = {"model": model, "bits": bits, "method": method, "seeds": len(results)}
        for key in ("accuracy", "loss", "train_loss"):
            row[key], row[f"{key}_sd"] = _mean_sd([res[key] for res in results])
        if method != "ptq":
            row["final_disc_error"], _ = _mean_sd([res["history"]["discretization_error"][-1] for res in results])
            row["mean_cosine_to_fp"], _ = _mean_sd([np.nanmean(np.asarray(res["alignment"]["cosine_to_fp"], dtype=float)) for res in results])
            row["grid_flips"], _ = _mean_sd([res["total_grid_flips"] for res in results])
            row["qat_seconds"], _ = _mean_sd([res["qat_seconds"] for res in results])
        rows.append(row)
    return rows


def _curve(results: list[dict], path: tuple[str, str]) -> tuple:
    """Mean and sd over seeds of one recorded series (steps from the first seed)."""
    outer, inner = path
    steps = results[0][outer]["step" if outer == "history" else "steps"]
    ys = np.asarray([[np.nan if v is None else v for v in res[outer][inner]] for res in results], dtype=float)
    return steps, np.nanmean(ys, 0), np.nanstd(ys, 0) if len(results) > 1 else None


def figures(records: list[dict], cfg: dict, out_dir) -> None:
    for key in cfg["models"]:
        for bits in cfg["bits"]:
            panels: dict[str, dict] = {"L(Q(θ_t)) (training set)": {}, "discretisation error |θ_t - Q(θ_t)|": {}, "cos(-g at Q(θ_t), θ_fp - Q(θ_t))": {}}
            for method in ESTIMATORS:
                results = [r["result"] for r in records if r["params"]["model"] == key and r["params"]["bits"] == bits and r["params"]["method"] == method]
                for panel, path in zip(panels, (("history", "loss"), ("history", "discretization_error"), ("alignment", "cosine_to_fp"))):
                    panels[panel][method] = _curve(results, path)
            fig, mfig = series_figures(panels, f"{key}, {bits} bits: QAT estimators (mean ± sd over seeds)", log_y=(True, False, False))
            sw.write_figure(fig, out_dir / f"curves_{key}_{bits}bit", static=mfig)


def main(argv: list[str] | None = None) -> list[dict]:
    opts, cfg, sweep = st.open_sweep(NAME, __doc__.splitlines()[0], settings, argv, models=specs)
    records = sweep.run(cells(cfg, opts.seed), lambda c: run_cell(c, cfg, opts.out, opts.progress))
    rows = summary_rows(records)
    md = [sw.print_table(rows, {"model": "model", "bits": "bits", "method": "method", "accuracy": "test acc", "accuracy_sd": "± sd",
                                "loss": "test loss", "train_loss": "L(Q) train", "final_disc_error": "|θ-Q(θ)| end",
                                "mean_cosine_to_fp": "mean cos", "grid_flips": "flips", "qat_seconds": "s/run"},
                         title=f"QAT estimators vs PTQ (mean over {cfg['seeds']} seed(s))")]
    figures(records, cfg, opts.out)
    st.finish_sweep(sweep, opts.out, md)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
