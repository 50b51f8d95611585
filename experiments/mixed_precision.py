"""E13 (docs/experiments.md §9): does the second-order mixed-precision plan beat HAWQ-V2 and random allocations?

For the digits MLP and the MNIST-1D CNN (one FP model per seed, the study budgets) and average-bit
budgets of 2.5 and 3 bits (candidates 2/3/4/8 per layer, RTN with MSE scales per channel): the
per-layer sensitivities (exact second-order damage u^T H u and HAWQ-V2's tr(H)/n ||u||^2) are
measured on 256 training rows drawn with the seed; the optimal plan of the additive model (an exact
knapsack) is compared, on the test split, with the HAWQ-V2 plan at the same budget, 20 random
allocations within it (their mean, and the one with the lowest loss on the calibration rows) and the
uniform allocation at floor(budget) bits.
Paired by seed: plan minus each other arm (BCa interval, Wilcoxon p, wins).

    python experiments/mixed_precision.py --quick --out /tmp/mixed   # 3 seeds
    python experiments/mixed_precision.py --out runs/mixed_precision  # 10 seeds

results.json: cells ``params = {"model", "budget", "seed"}``, ``result``: the record of
``riverscape.mixed_precision_study.mixed_precision_cell``; ``summary``: ``rows`` and ``contrasts``.
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

from riverscape import mixed_precision_study as mp
from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.report.experiment_figures import series_figures
from riverscape.stats.summary import format_interval

NAME = "mixed_precision"
MODELS = ("digits_mlp", "mnist1d_cnn")
LABELS = {"loss_plan": "second-order plan", "loss_hawq": "HAWQ-V2 plan", "random_mean": "random (mean of 20)",
          "random_best": "random (best of 20 on calibration)", "loss_uniform": "uniform floor(budget)"}


def settings(quick: bool) -> dict:
    """Every size of the experiment (stored as the sweep's config)."""
    return {"models": {key: {} for key in MODELS}, "budgets": [2.5, 3.0], "calibration_samples": 256, "n_random": 20,
            "trace_matvecs": 100, "seeds": 3 if quick else 10}


def specs(cfg: dict) -> dict[str, st.StudyModel]:
    return {key: st.study_model(key, **overrides) for key, overrides in cfg["models"].items()}


def cells(cfg: dict, seed: int) -> list[dict]:
    return [{"model": key, "budget": budget, "seed": seed + i} for key in cfg["models"] for i in range(cfg["seeds"])
            for budget in cfg["budgets"]]


def run_cell(cell: dict, cfg: dict, out_dir, progress: bool) -> dict:
    study = st.load_study(specs(cfg)[cell["model"]], cell["seed"], out_dir / "fp_models", progress=progress)
    return mp.mixed_precision_cell(study, cell["budget"], seed=cell["seed"], calibration_samples=cfg["calibration_samples"],
                                   n_random=cfg["n_random"], trace_matvecs=cfg["trace_matvecs"])


def tables(rows: list[dict], contrasts: list[dict]) -> list[str]:
    loss_rows = [{"model": r["model"], "budget": r["budget"], "fp": format_interval(r["loss_fp"]),
                  **{arm: format_interval(r[arm]) for arm in LABELS}} for r in rows]
    md = [sw.print_table(loss_rows, {"model": "model", "budget": "budget (bits)", "fp": "FP", **LABELS},
                         title="Test loss: mean [95% t CI] n=seeds")]
    crow = [{"model": c["model"], "budget": c["budget"], "contrast": f"{LABELS[c['a']]} - {LABELS[c['b']]}", "n": c["n"],
             "wins": f"{c['wins']}/{c['n']}", "diff": format_interval(c["difference"]), "p": c["difference"]["wilcoxon_p"]}
            for c in contrasts]
    md.append(sw.print_table(crow, {"model": "model", "budget": "budget", "contrast": "a - b", "n": "n", "wins": "a lower",
                                    "diff": "Δ test loss [95% BCa]", "p": "Wilcoxon p"},
                             title="Paired by seed (same FP model and calibration rows): a minus b"))
    return md


def figures(rows: list[dict], out_dir) -> None:
    """Test loss of every arm against the budget, one panel per model (mean ± 95% t half-width)."""
    panels: dict[str, dict] = {}
    for model in sorted({r["model"] for r in rows}):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["budget"])
        panels[f"{model}: test loss"] = {
            label: ([r["budget"] for r in mine], [r[arm]["estimate"] for r in mine],
                    [0.0 if r[arm]["n"] < 2 else (r[arm]["high"] - r[arm]["low"]) / 2 for r in mine])
            for arm, label in LABELS.items()}
    fig, static = series_figures(panels, "Mixed-precision plans: test loss at the same average bit budget (mean ± 95% t half-width)",
                                 xlabel="average bits per weight", log_y=[True] * len(panels))
    sw.write_figure(fig, out_dir / "mixed_precision", static=static)


def main(argv: list[str] | None = None) -> dict:
    opts, cfg, sweep = st.open_sweep(NAME, __doc__.splitlines()[0], settings, argv, models=specs,
                                     seeds_help="seeds (FP models) per model (default: 3 quick, 10 full)")
    records = sweep.run(cells(cfg, opts.seed), lambda c: run_cell(c, cfg, opts.out, opts.progress))
    rows, contrasts = mp.mixed_summary_rows(records), mp.mixed_contrasts(records)
    sweep.summary = {"rows": rows, "contrasts": contrasts}
    figures(rows, opts.out)
    st.finish_sweep(sweep, opts.out, tables(rows, contrasts))
    return {"rows": rows, "contrasts": contrasts, "records": records}


if __name__ == "__main__":
    main(sys.argv[1:])
