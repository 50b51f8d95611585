"""E12 (docs/model_state.md; issue 17 item 4): do PTQ damage and the alignment effect move with the sharpness of theta_fp?

The seed paper ties the basin width to training (edge of stability, weight decay, training length).
Each state trains the FP model by full-batch gradient descent (no momentum, so 2/lr is the
edge-of-stability value of lambda_max) at one weight decay and learning rate and stops after one of
the training lengths (prefixes of one run). At theta_fp: lambda_max (quantized weights and all
parameters), Hutch++ trace; at Q(theta_fp) (2 bits, min-max and MSE ranges): PTQ loss increase over
the FP loss, measured over the second-order prediction, and the alignment of the STE gradient with
the way back to theta_fp and to the valley floor, each against a matched null (z, empirical p).
Statistics: per state mean, 95 % t CI and n over seeds; Spearman across states of sharpness vs each
effect with a bootstrap over seeds; paired by seed, high minus low level of each axis (BCa CI,
Wilcoxon p, Holm over all contrasts).

    python experiments/model_state.py --quick --seeds 5 --out /tmp/model_state   # see docs/model_state.md for the timing
    python experiments/model_state.py --out runs/model_state                     # full: 3x3x2 states, 10 seeds

results.json: cells ``params = {"model", "weight_decay", "lr", "steps", "bits", "range", "seed"}``; ``result``:
the record of ``riverscape.model_state.state_cell``; ``summary``: ``rows``, ``correlations``, ``contrasts``.
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

from riverscape import model_state as mst
from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.ptq_study import format_interval

NAME = "model_state"


def settings(quick: bool) -> dict:
    """Every size of the experiment (stored as the sweep's config)."""
    if quick:
        return {"seeds": 5, "bits": [2], "ranges": ["minmax", "mse"], "n_null": 24, "floor_steps": 20,
                "models": {"digits_mlp": {"weight_decays": [0.0, 1e-4, 1e-3], "lrs": [0.2, 2.0], "lengths": [200, 1000], "overrides": {}},
                           "mnist1d_cnn": {"weight_decays": [0.0, 1e-3], "lrs": [0.05, 0.2], "lengths": [100, 400],
                                           "overrides": {"k": 5}}}}
    return {"seeds": 10, "bits": [2], "ranges": ["minmax", "mse"], "n_null": 60, "floor_steps": 30,
            "models": {"digits_mlp": {"weight_decays": [0.0, 1e-4, 1e-3], "lrs": [0.2, 2.0], "lengths": [200, 1000, 3000], "overrides": {}},
                       "mnist1d_cnn": {"weight_decays": [0.0, 1e-4, 1e-3], "lrs": [0.05, 0.2], "lengths": [150, 600, 1500],
                                       "overrides": {"train_samples": 1024}}}}


def specs(cfg: dict) -> dict:
    return {key: mst.state_model(key, **m["overrides"]) for key, m in cfg["models"].items()}


def cells(cfg: dict, seed: int) -> list[dict]:
    """Seeds outer (an interrupted sweep leaves complete seeds), then one training run, its lengths, the quantizers."""
    return [{"model": key, "weight_decay": wd, "lr": lr, "steps": steps, "bits": b, "range": r, "seed": seed + i}
            for key, m in cfg["models"].items() for i in range(cfg["seeds"]) for wd in m["weight_decays"] for lr in m["lrs"]
            for steps in m["lengths"] for r in cfg["ranges"] for b in cfg["bits"]]


def run_cell(cell: dict, cfg: dict, out_dir) -> dict:
    m = cfg["models"][cell["model"]]
    state = mst.load_state(specs(cfg)[cell["model"]], cell["weight_decay"], cell["lr"], cell["steps"], m["lengths"], cell["seed"],
                           out_dir / "fp_models")
    return mst.state_cell(state, cell["bits"], cell["range"], n_null=cfg["n_null"], floor_steps=cfg["floor_steps"])


def tables(rows: list[dict], correlations: list[dict], contrasts: list[dict]) -> list[str]:
    fmt = lambda iv: format_interval(iv, "{:.3g}")  # noqa: E731
    state_rows = [{**{k: r[k] for k in ("model", "range", "weight_decay", "lr", "steps", "n")}, "eos": r["eos"],
                   **{k: fmt(r[k]) for k in ("top_eigenvalue_all", "trace", "train_loss_fp", *mst.EFFECTS)},
                   "align_pooled_z": r["align_pooled_z"], "floor_pooled_z": r["floor_pooled_z"]} for r in rows]
    md = [sw.print_table(state_rows, {"model": "model", "range": "range", "weight_decay": "wd", "lr": "lr", "steps": "steps", "n": "n",
                                      "eos": "2/lr", "top_eigenvalue_all": "λ_max (all)", "trace": "tr H", "train_loss_fp": "L_fp",
                                      **mst.EFFECTS, "align_pooled_z": "Stouffer z (θ_fp)", "floor_pooled_z": "Stouffer z (floor)"},
                         title="Per state, 2 bits: mean [95% t CI] n=seeds")]
    corr = [{"model": c["model"], "range": c["range"], "effect": mst.EFFECTS[c["effect"]], "rho": c["rho"], "low": c["low"], "high": c["high"],
             "states": c["n_states"], "seeds": c["n_seeds"], "per_seed": fmt(c["per_seed"])} for c in correlations]
    md.append(sw.print_table(corr, {"model": "model", "range": "range", "effect": "effect", "rho": "Spearman ρ (λ_max, state means)",
                                    "low": "95% bootstrap low", "high": "high", "states": "states", "seeds": "seeds",
                                    "per_seed": "per-seed ρ [t CI]"},
                             title="Sharpness (λ_max of the quantized weights) vs each effect across states"))
    crow = [{"model": c["model"], "range": c["range"], "contrast": f"{c['a']} - {c['b']}", "metric": c["metric"], "n": c["n"],
             "diff": fmt(c["difference"]), "p": c["wilcoxon_p"], "holm": c["holm_p"]} for c in contrasts]
    md.append(sw.print_table(crow, {"model": "model", "range": "range", "contrast": "high - low (mean over the other axes)", "metric": "metric",
                                    "n": "n", "diff": "Δ [95% BCa]", "p": "Wilcoxon p", "holm": "Holm p"},
                             title="Paired by seed: extreme levels of each axis"))
    return md


def figures(rows: list[dict], out_dir) -> None:
    """Per model: each effect against λ_max, one point per state (mean ± CI over seeds), 2/lr marked in the hover text."""
    import plotly.graph_objects as go
    from matplotlib.figure import Figure
    from plotly.subplots import make_subplots

    from riverscape.report.theme import PALETTE, base_layout

    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        groups = sorted({(r["range"], r["lr"]) for r in mine})
        fig = make_subplots(rows=1, cols=len(mst.EFFECTS), subplot_titles=list(mst.EFFECTS.values()))
        mfig = Figure(figsize=(4.2 * len(mst.EFFECTS), 4.0))
        axes = mfig.subplots(1, len(mst.EFFECTS))
        for g, (range_method, lr) in enumerate(groups):
            pts = sorted((r for r in mine if (r["range"], r["lr"]) == (range_method, lr)), key=lambda r: r["top_eigenvalue"]["estimate"])
            x = [r["top_eigenvalue"]["estimate"] for r in pts]
            label = f"{range_method}, lr {lr:g} (2/lr = {2 / lr:.3g})"
            hover = [f"wd {r['weight_decay']:g}, {r['steps']} steps, n={r['n']}" for r in pts]
            for col, effect in enumerate(mst.EFFECTS):
                y = [r[effect]["estimate"] if r[effect] else None for r in pts]
                err = [(r[effect]["high"] - r[effect]["estimate"]) if r[effect] and r[effect]["n"] > 1 else 0.0 for r in pts]
                fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=label, legendgroup=label, showlegend=col == 0, text=hover,
                                         marker=dict(color=PALETTE[g % len(PALETTE)], size=9), error_y=dict(type="data", array=err, visible=True)),
                              row=1, col=col + 1)
                axes[col].errorbar(x, y, yerr=err, fmt="o", color=PALETTE[g % len(PALETTE)], label=label if col == 0 else None, ms=4)
                axes[col].set(xscale="log", xlabel="λ_max at θ_fp (quantized weights)", title=mst.EFFECTS[effect])
                fig.update_xaxes(type="log", title_text="λ_max at θ_fp (quantized weights)", row=1, col=col + 1)
        mfig.legend(loc="lower center", ncol=len(groups), fontsize=8)
        mfig.subplots_adjust(bottom=0.25, wspace=0.35)
        fig.update_layout(**base_layout(f"{model}: effects vs sharpness (one point per state, mean ± 95% t half-width)", height=460,
                                        subplot_titles=True))
        sw.write_figure(fig, out_dir / f"sharpness_{model}", static=mfig)


def main(argv: list[str] | None = None) -> dict:
    opts, cfg, sweep = st.open_sweep(NAME, __doc__.splitlines()[0], settings, argv, models=specs,
                                     seeds_help="seeds (initialisations) per state (default: 5 quick, 10 full)")
    records = sweep.run(cells(cfg, opts.seed), lambda c: run_cell(c, cfg, opts.out))
    results = [r["result"] for r in records]
    rows, correlations, contrasts = mst.summary_rows(results), mst.sharpness_correlations(results), mst.state_contrasts(results)
    sweep.summary = {"rows": rows, "correlations": correlations, "contrasts": contrasts}
    md = tables(rows, correlations, contrasts)
    figures(rows, opts.out)
    st.finish_sweep(sweep, opts.out, md)
    return {"rows": rows, "correlations": correlations, "contrasts": contrasts, "records": records}


if __name__ == "__main__":
    main(sys.argv[1:])
