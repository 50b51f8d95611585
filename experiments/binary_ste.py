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

    python experiments/binary_ste.py --out runs/binary_ste          # full: ~3 min on 2 cores
    python experiments/binary_ste.py --quick --out /tmp/binary      # ~10 s
"""
from __future__ import annotations

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import numpy as np
import plotly.graph_objects as go
import torch
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from riverscape import sweep as sw
from riverscape.report.theme import PALETTE, base_layout, mpl_style
from riverscape.theory import binary_perceptron as bp

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
        out.update({"record_steps": res.record_steps, "hamming": res.hamming, **recurrence_stats(res.record_steps, res.hamming)})
    return out


def recurrence_stats(steps: list[int], hamming: list[list[float]], burn_in: int = 200) -> dict:
    """After ``burn_in`` steps: share of time at Hamming distance 0, returns to 0, largest escape after a hit."""
    h = np.asarray(hamming)[:, np.asarray(steps) >= burn_in]
    at_zero = h == 0
    returns = (at_zero[:, 1:] & ~at_zero[:, :-1]).sum(1)
    escapes = [float(row[np.argmax(z):].max()) if z.any() else None for row, z in zip(h, at_zero)]
    return {"time_at_zero": float(at_zero.mean()), "returns": returns.tolist(), "max_escape_after_hit": escapes,
            "mean_hamming": float(h.mean())}


# ---------------------------------------------------------------------- analysis
def curve(records: list[dict], dim: int, student: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r["params"]["alpha"], r["result"][key]) for r in records
                 if r["params"]["kind"] == "alpha" and r["params"]["dim"] == dim and r["params"]["student"] == student)
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def crossing(alphas: np.ndarray, values: np.ndarray, level: float, *, decreasing: bool = True) -> float:
    """First alpha where ``values`` crosses ``level`` (log-linear interpolation), nan if never."""
    ok = values <= level if decreasing else values >= level
    if not ok.any():
        return float("nan")
    i = int(np.argmax(ok))
    if i == 0:
        return float(alphas[0])
    a0, a1, v0, v1 = math.log(alphas[i - 1]), math.log(alphas[i]), values[i - 1], values[i]
    return float(math.exp(a0 + (level - v0) / (v1 - v0) * (a1 - a0)))


def sample_complexity(records: list[dict], cfg: dict) -> tuple[list[dict], list[dict]]:
    rows, fits = [], []
    targets = [("binary", "mean_error", cfg["target_error"], True, f"binary: error <= {cfg['target_error']}"),
               ("full_precision", "mean_error", cfg["target_error"], True, f"FP: error <= {cfg['target_error']}"),
               ("binary", "p_exact", 0.5, False, "binary: P(exact recovery) >= 0.5")]
    for student, key, level, decreasing, what in targets:
        ns = []
        for d in cfg["dims"]:
            a, v = curve(records, d, student, key)
            alpha_star = crossing(a, v, level, decreasing=decreasing)
            ns.append(alpha_star * d)
            rows.append({"target": what, "dim": d, "alpha_star": alpha_star, "n_star": alpha_star * d})
        ns = np.asarray(ns)
        ok = np.isfinite(ns)
        if ok.sum() >= 2:
            slope, intercept = np.polyfit(np.log(np.asarray(cfg["dims"], float)[ok]), np.log(ns[ok]), 1)
            fits.append({"target": what, "dims_used": int(ok.sum()), "exponent": float(slope), "prefactor": float(math.exp(intercept))})
        else:
            fits.append({"target": what, "dims_used": int(ok.sum()), "exponent": None, "prefactor": None})
    return rows, fits


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


def complexity_figure(rows: list[dict], fits: list[dict]) -> tuple[go.Figure, Figure]:
    fig = go.Figure()
    mfig = Figure(figsize=(6.5, 4.5))
    with matplotlib.rc_context(mpl_style()):
        ax = mfig.subplots()
        for i, fit in enumerate(fits):
            pts = [(r["dim"], r["n_star"]) for r in rows if r["target"] == fit["target"] and r["n_star"] is not None and np.isfinite(r["n_star"])]
            if not pts:
                continue
            d, n = np.array(pts, dtype=float).T
            color = PALETTE[i % len(PALETTE)]
            name = fit["target"] + ("" if fit["exponent"] is None else f" (n ~ d^{fit['exponent']:.2f})")
            fig.add_trace(go.Scatter(x=d, y=n, mode="markers+lines", marker=dict(color=color, size=9), line=dict(color=color), name=name))
            ax.loglog(d, n, "o-", color=color, label=name)
        ax.set(xlabel="d", ylabel="samples n needed", title="samples to target vs dimension")
        ax.legend(fontsize=7)
    fig.update_layout(**base_layout("Samples needed to reach the target vs dimension d"))
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

    table = []
    for d in cfg["dims"]:
        for a in cfg["alphas"]:
            row = {"dim": d, "alpha": a}
            for student, short in (("binary", "bin"), ("full_precision", "fp")):
                res = next(r["result"] for r in alpha_records if r["params"]["dim"] == d and r["params"]["alpha"] == a and r["params"]["student"] == student)
                row.update({f"err_{short}": res["mean_error"], f"m_{short}": res["mean_overlap"]})
                if student == "binary":
                    row.update({"best_err_bin": float(np.mean(res["best_error"])), "p_exact": res["p_exact"]})
            table.append(row)
    md = [sw.print_table(table, {"dim": "d", "alpha": "alpha", "err_bin": "error 1-bit STE", "best_err_bin": "best-iterate error 1-bit",
                                 "p_exact": "P(exact)", "err_fp": "error FP", "m_bin": "overlap 1-bit", "m_fp": "overlap FP"},
                         title="Final-iterate generalisation error and overlap vs alpha (mean over seeds)")]
    rows, fits = sample_complexity(alpha_records, cfg)
    md.append(sw.print_table(rows, ["target", "dim", "alpha_star", "n_star"], title="Samples to reach the target"))
    md.append(sw.print_table(fits, ["target", "dims_used", "exponent", "prefactor"], title="Fit n* = prefactor * d^exponent"))
    noise_rows = [{"label_noise": r["params"]["label_noise"], "time_at_zero": r["result"]["time_at_zero"],
                   "returns": str(r["result"]["returns"]), "mean_hamming": r["result"]["mean_hamming"],
                   "max_escape_after_hit": str([None if e is None else round(e, 3) for e in r["result"]["max_escape_after_hit"]])}
                  for r in noise_records]
    md.append(sw.print_table(noise_rows, ["label_noise", "time_at_zero", "returns", "max_escape_after_hit", "mean_hamming"],
                             title=f"Recurrence: d={cfg['noise']['dim']}, alpha={cfg['noise']['alpha']}, after step 200 (per seed)"))

    for name, (fig, mfig) in {"error_vs_alpha": alpha_figure(alpha_records, cfg), "samples_vs_dim": complexity_figure(rows, fits),
                              "recurrence": recurrence_figure(noise_records)}.items():
        sw.write_figure(fig, opts.out / name, static=mfig)
    summary = {"table": table, "sample_complexity": rows, "fits": fits, "recurrence": noise_rows}
    sw.write_text_atomic(opts.out / "tables.md", "\n\n".join(md) + "\n")
    sw.write_text_atomic(opts.out / "summary.json", json.dumps(sw.to_jsonable(summary), indent=1))
    print(f"runtime {sweep.runtime_seconds:.1f} s wall, {sweep.cpu_seconds:.1f} s CPU; wrote {opts.out}/results.json, tables.md, *.html, *.png", flush=True)
    sweep.save()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
