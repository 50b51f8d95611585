"""E7 (docs/theory.md §8.5, arXiv 2505.18113): 1-bit STE perceptron, sample complexity and recurrence.

Teacher ``y = sign(w*.x / sqrt d)``, ``w*`` in {-1, +1}^d, Gaussian inputs, ``n = alpha d`` fixed
samples. A 1-bit student ``sign(w)`` trained by the full-batch STE-gradient method (squared loss on
the sign output with the hardtanh' surrogate, identity STE through sign(w)) against a
full-precision student on the same sphere trained by the same rule. Generalisation error is exact:
``arccos(overlap) / pi``.

Shows: error and teacher overlap vs alpha (binary vs full precision, several d); the samples
needed to reach a target error (and exact recovery of w*) as a function of d, with a fitted
exponent; with label noise, the Hamming distance of sign(w_t) to w* over training (recurrence:
repeated returns to 0 followed by escapes).

Uncertainty (every replica is an independent teacher, data set and initialisation; the binary and
full-precision students of a cell share them, so they are paired): per (d, alpha) mean, Student t
95% CI and n (P(exact): Wilson interval); samples needed per d, the fitted exponents and the paired
difference binary - FP with percentile bootstrap intervals that resample the replicas within each
(d, alpha) cell and refit; recurrence counts with a t interval over seeds. Per-replica values are in
``results.json`` (cells) and under its ``summary``.

    python experiments/binary_ste.py --out runs/binary_ste          # full: ~110 s CPU (21 min wall on a shared, loaded 2-core machine)
    python experiments/binary_ste.py --quick --out /tmp/binary      # ~6 s CPU
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import numpy as np
import plotly.graph_objects as go
import torch
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from riverscape import sweep as sw
from riverscape.ptq_study import format_interval
from riverscape.report.theme import PALETTE, base_layout, mpl_style
from riverscape.theory import binary_perceptron as bp
from riverscape.theory import uncertainty as uq

NAME = "binary_ste"
STUDENTS = ("binary", "full_precision")


def settings(quick: bool) -> dict:
    if quick:
        return {"dims": [25, 50, 100], "replicas": [6, 6, 6], "alphas": [1, 2, 4, 8], "steps": 150, "lr": 0.5,
                "target_error": 0.15, "noise": {"dim": 50, "alpha": 32, "levels": [0.0, 0.05], "steps": 300, "replicas": 2},
                "dtype": "float32"}
    return {"dims": [50, 100, 200, 400], "replicas": [16, 16, 8, 4], "alphas": [0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24],
            "steps": 300, "lr": 0.5, "target_error": 0.1,
            "noise": {"dim": 100, "alpha": 32, "levels": [0.0, 0.05, 0.1], "steps": 2000, "replicas": 4}, "dtype": "float32"}


def cells(cfg: dict, seed: int) -> list[dict]:
    out = [{"kind": "alpha", "dim": d, "alpha": a, "student": s, "replicas": r, "steps": cfg["steps"], "lr": cfg["lr"],
            "seed": seed + 7919 * i + 104729 * j}
           for i, (d, r) in enumerate(zip(cfg["dims"], cfg["replicas"])) for j, a in enumerate(cfg["alphas"]) for s in STUDENTS]
    noise = cfg["noise"]
    out += [{"kind": "noise", "dim": noise["dim"], "alpha": noise["alpha"], "student": "binary", "replicas": noise["replicas"],
             "steps": noise["steps"], "lr": cfg["lr"], "label_noise": p, "seed": seed + 31 * k}
            for k, p in enumerate(noise["levels"])]
    return out


def run_cell(cell: dict, dtype: torch.dtype) -> dict:
    config = bp.BinarySTEConfig(dim=cell["dim"], alpha=cell["alpha"], student=cell["student"], steps=cell["steps"],
                                lr=cell["lr"], label_noise=cell.get("label_noise", 0.0))
    record_every = 5 if cell["kind"] == "noise" else max(1, cell["steps"] // 30)
    res = bp.train_binary_ste(config, replicas=cell["replicas"], seed=cell["seed"], record_every=record_every, dtype=dtype)
    out = {"error": res.error, "overlap": res.overlap, "best_error": res.best_error, "exact": res.exact, "train_error": res.train_error,
           "mean_error": float(np.mean(res.error)), "mean_overlap": float(np.mean(res.overlap)), "p_exact": float(np.mean(res.exact))}
    if cell["kind"] == "noise":
        out.update({"record_steps": res.record_steps, "hamming": res.hamming})
    return out


# ---------------------------------------------------------------------- analysis
def curve(records: list[dict], dim: int, student: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r["params"]["alpha"], r["result"][key]) for r in records
                 if r["params"]["kind"] == "alpha" and r["params"]["dim"] == dim and r["params"]["student"] == student)
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def replica_table(records: list[dict], dims: list[int], alphas: list[float]) -> tuple[list[dict], list[list[np.ndarray]]]:
    """Per (d, alpha): mean, 95% CI and n of each student's error and overlap, P(exact) (Wilson), and the replica rows.

    The two students of a cell share the cell's seed, hence teacher, data and initialisation, so
    replica i of the binary student and replica i of the full-precision one form a pair.
    """
    rows, replicas = [], []
    for d in dims:
        per_d = []
        for a in alphas:
            res = {r["params"]["student"]: r["result"] for r in records
                   if r["params"]["kind"] == "alpha" and r["params"]["dim"] == d and r["params"]["alpha"] == a}
            binary, full = res["binary"], res["full_precision"]
            rows.append({"dim": d, "alpha": a, "err_bin": uq.replica_summary(binary["error"]), "best_err_bin": uq.replica_summary(binary["best_error"]),
                         "p_exact": uq.proportion_summary(binary["exact"]), "err_fp": uq.replica_summary(full["error"]),
                         "m_bin": uq.replica_summary(binary["overlap"]), "m_fp": uq.replica_summary(full["overlap"])})
            per_d.append(np.column_stack([binary["error"], full["error"], np.asarray(binary["exact"], dtype=float)]))
        replicas.append(per_d)
    return rows, replicas


# ---------------------------------------------------------------------- figures
def alpha_figure(records: list[dict], cfg: dict) -> tuple[go.Figure, Figure]:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("generalisation error arccos(m)/pi", "teacher overlap m"))
    mfig = Figure(figsize=(12, 4.5))
    with matplotlib.rc_context(mpl_style()):
        axes = mfig.subplots(1, 2)
        for i, d in enumerate(cfg["dims"]):
            color = PALETTE[i % len(PALETTE)]
            for student, dash, ls in (("binary", "solid", "-"), ("full_precision", "dash", "--")):
                for col, key in enumerate(("mean_error", "mean_overlap")):
                    a, v = curve(records, d, student, key)
                    fig.add_trace(go.Scatter(x=a, y=v, mode="lines+markers", line=dict(color=color, dash=dash), name=f"d={d} {student}",
                                             legendgroup=f"{d}{student}", showlegend=col == 0), row=1, col=col + 1)
                    axes[col].plot(a, v, ls, marker="o", ms=3, color=color, label=f"d={d} {student}" if col == 0 else None)
        for ax, title in zip(axes, ("error", "overlap")):
            ax.set(xscale="log", xlabel="alpha = n/d", ylabel=title)
        axes[0].legend(fontsize=7, ncol=2)
    fig.update_layout(**base_layout("1-bit STE (solid) vs full-precision student (dashed): final iterate, mean over seeds", height=500))
    fig.update_xaxes(type="log", title_text="alpha = n/d")
    return fig, mfig


def complexity_figure(samples: list[dict], exponents: list[dict]) -> tuple[go.Figure, Figure]:
    fig = go.Figure()
    mfig = Figure(figsize=(6.5, 4.5))
    with matplotlib.rc_context(mpl_style()):
        ax = mfig.subplots()
        for i, fit in enumerate(e for e in exponents if any(r["target"] == e["target"] for r in samples)):
            pts = [(r["dim"], r["n_star"]) for r in samples if r["target"] == fit["target"] and np.isfinite(r["n_star"].estimate)]
            if not pts:
                continue
            d = np.array([p[0] for p in pts], dtype=float)
            n = np.array([p[1].estimate for p in pts])
            low = n - np.array([p[1].low for p in pts])
            high = np.array([p[1].high for p in pts]) - n
            color = PALETTE[i % len(PALETTE)]
            name = f"{fit['target']} (n ~ d^{format_interval(fit['exponent'].to_dict(), '{:.2f}')})"
            fig.add_trace(go.Scatter(x=d, y=n, mode="markers+lines", marker=dict(color=color, size=9), line=dict(color=color), name=name,
                                     error_y=dict(type="data", symmetric=False, array=high, arrayminus=low)))
            ax.errorbar(d, n, yerr=np.nan_to_num(np.vstack([low, high])), fmt="o-", color=color, label=name)
        ax.set(xscale="log", yscale="log", xlabel="d", ylabel="samples n needed", title="samples to target vs dimension (95% bootstrap CI)")
        ax.legend(fontsize=6)
    fig.update_layout(**base_layout("Samples needed to reach the target vs dimension d (percentile bootstrap over replicas, 95%)"))
    fig.update_xaxes(type="log", title_text="d")
    fig.update_yaxes(type="log", title_text="samples n")
    return fig, mfig


def recurrence_figure(noise_records: list[dict]) -> tuple[go.Figure, Figure]:
    fig = go.Figure()
    mfig = Figure(figsize=(8, 4.2))
    with matplotlib.rc_context(mpl_style()):
        ax = mfig.subplots()
        for i, rec in enumerate(noise_records):
            res, p = rec["result"], rec["params"]["label_noise"]
            color = PALETTE[i % len(PALETTE)]
            for j, run in enumerate(res["hamming"]):
                fig.add_trace(go.Scatter(x=res["record_steps"], y=run, mode="lines", line=dict(color=color, width=1), opacity=0.8,
                                         name=f"label noise {p:g}", legendgroup=str(p), showlegend=j == 0))
                ax.plot(res["record_steps"], run, color=color, lw=0.7, alpha=0.8, label=f"label noise {p:g}" if j == 0 else None)
        ax.set(xlabel="STE-gradient step", ylabel="Hamming distance of sign(w) to w* (fraction)", title="recurrence under label noise")
        ax.legend()
    fig.update_layout(**base_layout("Hamming distance to the teacher over training (each line one seed)"))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="Hamming distance / d")
    return fig, mfig


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    opts = sw.experiment_parser(__doc__.splitlines()[0], name=NAME).parse_args(argv)
    torch.set_num_threads(1)  # small batched matmuls: threads cost more in barriers than they save on a shared CPU
    cfg = settings(opts.quick)
    dtype = getattr(torch, cfg["dtype"])
    sweep = sw.Sweep(opts.out, NAME, {**cfg, "quick": opts.quick, "seed": opts.seed}, fresh=opts.fresh, progress=opts.progress)
    records = sweep.run(cells(cfg, opts.seed), lambda c: run_cell(c, dtype))
    alpha_records = [r for r in records if r["params"]["kind"] == "alpha"]
    noise_records = [r for r in records if r["params"]["kind"] == "noise"]

    ci = lambda interval, fmt="{:.3g}": format_interval(interval, fmt)  # noqa: E731
    table, replicas = replica_table(alpha_records, cfg["dims"], cfg["alphas"])
    keys = ("err_bin", "best_err_bin", "p_exact", "err_fp", "m_bin", "m_fp")
    md = [sw.print_table([{**row, **{k: ci(row[k]) for k in keys}} for row in table],
                         {"dim": "d", "alpha": "alpha", "err_bin": "error 1-bit STE", "best_err_bin": "best-iterate error 1-bit",
                          "p_exact": "P(exact) [Wilson]", "err_fp": "error FP", "m_bin": "overlap 1-bit", "m_fp": "overlap FP"},
                         title="Final-iterate generalisation error and overlap vs alpha: mean [95% CI] n over seeds (Student t; P(exact): Wilson)")]
    complexity = bp.sample_complexity(cfg["dims"], cfg["alphas"], replicas, target_error=cfg["target_error"], seed=opts.seed)
    samples, exponents = complexity["samples"], complexity["exponents"]
    md.append(sw.print_table([{**r, "n_star": ci(r["n_star"].to_dict(), "{:.4g}"), "valid": f"{r['n_star'].valid}/{r['n_star'].n_boot}"} for r in samples],
                             {"target": "target", "dim": "d", "alpha_star": "alpha*", "n_star": "n* = alpha* d [95% CI] n", "valid": "resamples defined"},
                             title="Samples to reach the target (mean curve over seeds crossed; percentile bootstrap over seeds within each (d, alpha))"))
    md.append(sw.print_table([{**f, "exponent": ci(f["exponent"].to_dict()), "valid": f"{f['exponent'].valid}/{f['exponent'].n_boot}"} for f in exponents],
                             {"target": "target", "dims_used": "d used", "exponent": "exponent p [95% CI] n", "valid": "resamples defined"},
                             title="Fit n* ~ d^p (least squares on logs); binary - FP paired on the same resamples (the students share seeds)"))
    recurrence = [{"label_noise": r["params"]["label_noise"], **bp.recurrence_statistics(r["result"]["record_steps"], r["result"]["hamming"])}
                  for r in noise_records]
    md.append(sw.print_table([{"label_noise": r["label_noise"], "returns": ci(r["returns_summary"]), "time_at_zero": ci(r["time_at_zero_summary"]),
                               "per_seed": str(r["returns"]), "escape": str([None if e is None else round(e, 3) for e in r["max_escape_after_hit"]]),
                               "mean_hamming": float(np.mean(r["mean_hamming"]))} for r in recurrence],
                             {"label_noise": "label noise", "returns": "returns to w*: mean [95% CI] n", "time_at_zero": "time at w* [95% CI] n",
                              "per_seed": "returns per seed", "escape": "max escape after a hit", "mean_hamming": "mean Hamming"},
                             title=f"Recurrence: d={cfg['noise']['dim']}, alpha={cfg['noise']['alpha']}, after step 200 (Student t over seeds)"))

    for name, (fig, mfig) in {"error_vs_alpha": alpha_figure(alpha_records, cfg), "samples_vs_dim": complexity_figure(samples, exponents),
                              "recurrence": recurrence_figure(noise_records)}.items():
        sw.write_figure(fig, opts.out / name, static=mfig)
    summary = {"table": table, "sample_complexity": samples, "fits": exponents, "replicas": complexity["replicas"], "recurrence": recurrence}
    sweep.summary = summary
    sw.write_text_atomic(opts.out / "tables.md", "\n\n".join(md) + "\n")
    sw.write_text_atomic(opts.out / "summary.json", json.dumps(sw.to_jsonable(summary), indent=1))
    print(f"runtime {sweep.runtime_seconds:.1f} s wall, {sweep.cpu_seconds:.1f} s CPU; wrote {opts.out}/results.json, tables.md, *.html, *.png", flush=True)
    sweep.save()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
