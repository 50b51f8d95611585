"""E6 (docs/theory.md §8.1-§8.4, arXiv 2510.10693): STE teacher-student dynamics, plateau and fixed point.

Online STE-SGD of a linear student with b-bit deployed weights learning a +-1 (or Gaussian) linear
teacher, simulated exactly (one fresh Gaussian sample per step) and compared with riverscape's
own mean-field limit: the per-coordinate McKean-Vlasov diffusion

    dw = eta (w* - Q(w)) g(w) dtau + eta sqrt(2 eps(tau) g(w)) dB,   eps = E(w* - Q(w))^2 / 2 + sigma^2 / 2

(derivation in ``riverscape/theory/teacher_student.py``; consistent with the paper's abstract, not its
equations, which we do not have), integrated as a Fokker-Planck PDE.

Shows: (1) eps(tau) = plateau, then drop; final error = the dithering fixed point
(w* - l_k)(l_{k+1} - w*)/2, not the rounding error; (2) plateau length grows linearly with the
range R (slope vs the drift-only escape time R / (2 eta (2^(b-1) - 1)) and a noisy-escape
prediction); (3) trajectories concentrate on the PDE as d grows (spread over seeds ~ 1/sqrt d).

Uncertainty (every seed of a cell is an independent run; docs/statistics.md §1): per configuration
the final error and the plateau length of each seed's own curve, with mean, Student t 95% CI and n;
the plateau-vs-R slope fitted per seed (seed i shares teacher and initialisation across R) with a t
interval over seeds; the d-exponent of the spread with a percentile bootstrap over the seeds of each
d. The per-seed curves are in ``results.json`` (cells), the per-seed values under ``summary``.

    python experiments/ste_dynamics.py --out runs/ste_dynamics          # full: ~110 s CPU (21 min wall on a shared, loaded 2-core machine)
    python experiments/ste_dynamics.py --quick --out /tmp/ste           # ~6 s CPU
"""
from __future__ import annotations

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import numpy as np
import plotly.graph_objects as go
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from riverscape import sweep as sw
from riverscape.ptq_study import format_interval
from riverscape.report.theme import PALETTE, base_layout, mpl_style
from riverscape.theory import teacher_student as ts
from riverscape.theory import uncertainty as uq

NAME = "ste_dynamics"


def settings(quick: bool) -> dict:
    """Every size of the experiment (stored as the sweep's config)."""
    if quick:
        return {
            "dim": 150, "lr": 0.05, "replicas": 2, "points_per_tau": 2,
            "ranges_2bit": [0.5, 1.0, 1.5], "ranges_3bit": [], "variants": [],
            "concentration": {"range": 1.0, "tau_max": 12, "dims": [50, 150, 450], "replicas": [6, 6, 6]},
            "grid_step": 0.01,
        }
    return {
        "dim": 1000, "lr": 0.05, "replicas": 4, "points_per_tau": 2,
        "ranges_2bit": [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0], "ranges_3bit": [0.75, 1.5, 3.0, 4.5],
        "variants": [
            {"bits": 2, "range": 0.5, "estimator": "clipped"},
            {"bits": 2, "range": 1.5, "estimator": "clipped"},
            {"bits": 1, "range": 2.0, "quantizer": "mid_rise"},
            {"bits": 1, "range": 4.0, "quantizer": "mid_rise"},
            {"bits": 2, "range": 2.0, "quantizer": "mid_rise"},
            {"bits": 2, "range": 1.0, "teacher": "gaussian"},
        ],
        "concentration": {"range": 1.0, "tau_max": 16, "dims": [100, 300, 1000, 3000, 10000], "replicas": [8, 8, 8, 8, 4]},
        "grid_step": 0.005,
    }


def traversal_time(config: ts.STEConfig) -> float:
    """Drift-only time for a coordinate with w* = 1 to climb from 0 to its last threshold."""
    grid, total = config.grid, 0.0
    levels, thresholds = grid.levels, grid.thresholds
    for k, threshold in enumerate(thresholds):
        start = max(thresholds[k - 1] if k else -math.inf, 0.0)
        if threshold <= 0.0 or levels[k] >= 1.0:
            continue
        total += (threshold - start) / (config.lr * (1.0 - levels[k]))
        if levels[k + 1] >= 1.0:
            break
    return total


def tau_max_for(config: ts.STEConfig) -> float:
    """Long enough to see the plateau, the drop and the fixed point: twice the climb + 15 (30 to 100)."""
    return float(min(100.0, max(30.0, math.ceil(2.0 * traversal_time(config) + 15.0))))


def curve_cells(cfg: dict, seed: int) -> list[dict]:
    base = {"kind": "curve", "dim": cfg["dim"], "lr": cfg["lr"], "replicas": cfg["replicas"], "seed": seed,
            "bits": 2, "quantizer": "mid_tread", "estimator": "identity", "teacher": "binary"}
    cells = [{**base, "range": r} for r in cfg["ranges_2bit"]]
    cells += [{**base, "bits": 3, "range": r} for r in cfg["ranges_3bit"]]
    cells += [{**base, **variant} for variant in cfg["variants"]]
    return cells


def concentration_cells(cfg: dict, seed: int) -> list[dict]:
    conc = cfg["concentration"]
    return [
        {"kind": "concentration", "dim": d, "replicas": r, "range": conc["range"], "tau_max": conc["tau_max"],
         "lr": cfg["lr"], "bits": 2, "seed": seed + 1000 + i}
        for i, (d, r) in enumerate(zip(conc["dims"], conc["replicas"]))
    ]


def ste_config(cell: dict) -> ts.STEConfig:
    fields = {k: cell[k] for k in ("dim", "bits", "range", "lr")}
    fields.update({k: cell[k] for k in ("quantizer", "estimator", "teacher") if k in cell})
    return ts.STEConfig(**fields)


def run_cell(cell: dict, cfg: dict, progress: bool) -> dict:
    config = ste_config(cell)
    tau_max = cell.get("tau_max") or tau_max_for(config)
    taus = np.linspace(0.0, tau_max, int(tau_max * cfg["points_per_tau"]) + 1)
    sim = ts.simulate_ste(config, taus, replicas=cell["replicas"], seed=cell["seed"], progress=progress)
    mf = ts.ste_mean_field(config, taus, grid_step=cfg["grid_step"])
    tail = slice(int(0.8 * len(taus)), None)  # last 20 % of the run: the fixed point
    return {
        "taus": taus, "eps": sim.eps, "eps_mean": sim.eps_mean, "eps_std": sim.eps_std, "eps_pde": mf.eps,
        "pde_mass_error": float(np.max(np.abs(np.asarray(mf.mass) - 1.0))), "pde_edge_mass": mf.edge_mass,
        "final_sim": float(sim.eps_mean[tail].mean()), "final_pde": float(np.mean(mf.eps[tail])),
        "dithering": ts.dithering_error(config), "rounding": ts.rounding_error(config),
        "plateau_sim": ts.plateau_length(taus, sim.eps_mean), "plateau_pde": ts.plateau_length(taus, mf.eps),
        "plateau_noisy_escape": ts.plateau_prediction(config), "escape_time": ts.escape_time(config),
        "overlap": float(np.mean(sim.overlap)),
    }


# ---------------------------------------------------------------------- analysis
def label(p: dict) -> str:
    extra = "" if p.get("quantizer", "mid_tread") == "mid_tread" else " mid-rise"
    extra += "" if p.get("estimator", "identity") == "identity" else " clipped"
    extra += "" if p.get("teacher", "binary") == "binary" else " gauss"
    return f"b={p['bits']} R={p['range']:g}{extra}"


def is_base(p: dict) -> bool:
    """Mid-tread grid, identity STE, +-1 teacher: the configurations of the plateau-vs-R sweep."""
    return p["quantizer"] == "mid_tread" and p["estimator"] == "identity" and p["teacher"] == "binary"


def config_rows(curves: list[dict]) -> list[dict]:
    """Per configuration: per-seed final error and plateau (mean, t 95% CI, n, raw values) next to the PDE and predictions."""
    rows = []
    for c in curves:
        res = c["result"]
        rows.append({"config": label(c["params"]), "params": c["params"],
                     "final": uq.replica_summary(uq.replica_final_errors(res["taus"], res["eps"])),
                     "plateau": uq.replica_summary(uq.replica_plateaus(res["taus"], res["eps"])),
                     **{k: res[k] for k in ("final_pde", "dithering", "rounding", "plateau_pde", "plateau_noisy_escape",
                                            "escape_time", "pde_mass_error")}})
    return rows


def plateau_fits(rows: list[dict], lr: float) -> list[dict]:
    """Plateau length vs R: per-seed least-squares slopes (seeds share teacher and init across R), t interval over seeds."""
    fits = []
    for bits in (2, 3):
        pts = sorted((r for r in rows if r["params"]["bits"] == bits and is_base(r["params"]) and r["plateau"]["n"] > 0),
                     key=lambda r: r["params"]["range"])  # R where eps never moves (w* on a threshold) has no plateau
        if len(pts) < 2:
            continue
        ranges = np.array([r["params"]["range"] for r in pts])
        per_seed = np.array([r["plateau"]["values"] for r in pts])  # (R values, seeds)
        mean_curve = np.nanmean(per_seed, axis=1)
        slope, intercept = np.polyfit(ranges, mean_curve, 1)
        resid = mean_curve - (slope * ranges + intercept)
        deterministic = {key: float(uq.seed_slopes(ranges, np.array([[r[key]] for r in pts]))[0])
                         for key in ("plateau_pde", "plateau_noisy_escape")}
        fits.append({"bits": bits, "ranges": ranges.tolist(), "slope_seeds": uq.replica_summary(uq.seed_slopes(ranges, per_seed)),
                     "slope_mean_curve": float(slope), "intercept": float(intercept),
                     "r2": float(1.0 - resid.var() / mean_curve.var()) if mean_curve.var() > 0 else float("nan"),
                     "slope_pde": deterministic["plateau_pde"], "slope_noisy_escape": deterministic["plateau_noisy_escape"],
                     "drift_slope": 1.0 / (2 * lr * (2 ** (bits - 1) - 1))})
    return fits


def concentration_rows(records: list[dict], seed: int) -> tuple[list[dict], dict]:
    """Spread of eps over seeds per d (bootstrap over replicas within d) and its d-exponent with a CI."""
    dims = [rec["params"]["dim"] for rec in records]
    fit = uq.spread_exponent(dims, [rec["result"]["eps"] for rec in records], seed=seed)
    rows = []
    for rec, spread in zip(records, fit["spread"]):
        res, d = rec["result"], rec["params"]["dim"]
        eps = np.asarray(res["eps"])
        rows.append({"dim": d, "replicas": rec["params"]["replicas"], "spread_rms": spread.to_dict(),
                     "spread_max": float(eps.std(axis=0, ddof=1).max()),
                     "mean_vs_pde_max": float(np.abs(eps.mean(0) - np.asarray(res["eps_pde"])).max()),
                     "spread_rms_x_sqrt_d": spread.estimate * math.sqrt(d)})
    exponent = fit["exponent"]
    return rows, {"spread_exponent": exponent.estimate, "spread_exponent_ci": exponent.to_dict(),
                  "spread_exponent_regression": fit["exponent_regression"], "expected": -0.5}


# ---------------------------------------------------------------------- figures
def curves_figure(curves: list[dict]) -> tuple[go.Figure, Figure]:
    first = [c["params"]["bits"] == 2 and is_base(c["params"]) for c in curves]
    groups = [[c for c, f in zip(curves, first) if f], [c for c, f in zip(curves, first) if not f]]
    titles = ("2-bit mid-tread, +-1 teacher: range R", "3 bits, clipped STE, mid-rise, Gaussian teacher")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.08)
    mfig = Figure(figsize=(12, 4.5))
    with matplotlib.rc_context(mpl_style()):
        axes = mfig.subplots(1, 2)
        for col, group in enumerate(groups):
            for i, c in enumerate(group):
                res, color, name = c["result"], PALETTE[i % len(PALETTE)], label(c["params"])
                t, m, sd = np.asarray(res["taus"]), np.asarray(res["eps_mean"]), np.asarray(res["eps_std"])
                fig.add_trace(go.Scatter(x=t, y=m, mode="markers", marker=dict(color=color, size=4), name=f"{name} sim",
                                         legendgroup=name, error_y=dict(array=sd, thickness=0.5, width=0)), row=1, col=col + 1)
                fig.add_trace(go.Scatter(x=t, y=res["eps_pde"], mode="lines", line=dict(color=color), name=f"{name} PDE",
                                         legendgroup=name, showlegend=False), row=1, col=col + 1)
                fig.add_trace(go.Scatter(x=[t[0], t[-1]], y=[res["dithering"]] * 2, mode="lines", line=dict(color=color, dash="dot", width=1),
                                         name=f"{name} dithering", legendgroup=name, showlegend=False), row=1, col=col + 1)
                ax = axes[col]
                ax.plot(t, m, "o", ms=2.5, color=color, label=name)
                ax.plot(t, res["eps_pde"], "-", lw=1.2, color=color)
                ax.axhline(res["dithering"], ls=":", lw=0.8, color=color)
            axes[col].set(title=titles[col], xlabel="tau = t/d", ylabel="generalisation error eps")
            if group:
                axes[col].legend(fontsize=7, ncol=2)
    fig.update_layout(**base_layout("STE dynamics: simulation (markers, mean ± sd over seeds) vs mean-field PDE (lines); dotted = dithering fixed point", height=520))
    fig.update_xaxes(title_text="tau = t/d")
    fig.update_yaxes(title_text="eps", col=1)
    return fig, mfig


def plateau_figure(rows: list[dict], lr: float) -> tuple[go.Figure, Figure]:
    fig = go.Figure()
    mfig = Figure(figsize=(6.5, 4.5))
    with matplotlib.rc_context(mpl_style()):
        ax = mfig.subplots()
        for i, bits in enumerate((2, 3)):
            pts = sorted((r for r in rows if r["params"]["bits"] == bits and is_base(r["params"])), key=lambda r: r["params"]["range"])
            if not pts:
                continue
            r = np.array([p["params"]["range"] for p in pts])
            get = lambda key: np.array([np.nan if p[key] is None else p[key] for p in pts])  # noqa: E731
            mean = np.array([p["plateau"]["estimate"] for p in pts])
            low, high = mean - np.array([p["plateau"]["low"] for p in pts]), np.array([p["plateau"]["high"] for p in pts]) - mean
            color = PALETTE[i]
            fig.add_trace(go.Scatter(x=r, y=mean, mode="markers", marker=dict(color=color, size=9), name=f"{bits}-bit simulation (mean, 95% CI)",
                                     error_y=dict(type="data", symmetric=False, array=high, arrayminus=low)))
            fig.add_trace(go.Scatter(x=r, y=get("plateau_pde"), mode="lines", line=dict(color=color), name=f"{bits}-bit PDE"))
            fig.add_trace(go.Scatter(x=r, y=get("plateau_noisy_escape"), mode="lines", line=dict(color=color, dash="dash"), name=f"{bits}-bit noisy escape"))
            fig.add_trace(go.Scatter(x=r, y=r / (2 * lr * (2 ** (bits - 1) - 1)), mode="lines", line=dict(color=color, dash="dot"),
                                     name=f"{bits}-bit drift only R/(2 eta (2^(b-1)-1))"))
            ax.errorbar(r, mean, yerr=np.nan_to_num(np.vstack([low, high])), fmt="o", color=color, label=f"{bits}-bit sim (95% CI)")
            ax.plot(r, get("plateau_pde"), "-", color=color, label=f"{bits}-bit PDE")
            ax.plot(r, get("plateau_noisy_escape"), "--", color=color, label=f"{bits}-bit noisy escape")
            ax.plot(r, r / (2 * lr * (2 ** (bits - 1) - 1)), ":", color=color, label=f"{bits}-bit drift only")
        ax.set(xlabel="quantization range R", ylabel="plateau length (10 % of the change)", title="Plateau length vs range")
        ax.legend(fontsize=7)
    fig.update_layout(**base_layout("Plateau length (time to 10 % of the total change of eps) vs quantization range R; simulation: mean over seeds, 95% CI"))
    fig.update_xaxes(title_text="range R")
    fig.update_yaxes(title_text="plateau length tau")
    return fig, mfig


def concentration_figure(records: list[dict], rows: list[dict]) -> tuple[go.Figure, Figure]:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("eps(tau): every seed (thin) and the PDE (black)", "spread over seeds vs d"))
    mfig = Figure(figsize=(12, 4.5))
    with matplotlib.rc_context(mpl_style()):
        ax, ax2 = mfig.subplots(1, 2)
        for i, rec in enumerate(records):
            res, d, color = rec["result"], rec["params"]["dim"], PALETTE[i % len(PALETTE)]
            for j, run in enumerate(res["eps"]):
                fig.add_trace(go.Scatter(x=res["taus"], y=run, mode="lines", line=dict(color=color, width=1), opacity=0.6,
                                         name=f"d={d}", legendgroup=f"d={d}", showlegend=j == 0), row=1, col=1)
                ax.plot(res["taus"], run, color=color, lw=0.7, alpha=0.6, label=f"d={d}" if j == 0 else None)
        pde = records[-1]["result"]
        fig.add_trace(go.Scatter(x=pde["taus"], y=pde["eps_pde"], mode="lines", line=dict(color="black", width=2.5), name="PDE (d = inf)"), row=1, col=1)
        ax.plot(pde["taus"], pde["eps_pde"], color="black", lw=2, label="PDE")
        ax.set(xlabel="tau = t/d", ylabel="eps", title="trajectories concentrate on the PDE")
        ax.legend(fontsize=7)
        d = np.array([r["dim"] for r in rows], dtype=float)
        s = np.array([r["spread_rms"]["estimate"] for r in rows])
        low = s - np.array([r["spread_rms"]["low"] for r in rows])
        high = np.array([r["spread_rms"]["high"] for r in rows]) - s
        ref = s[0] * np.sqrt(d[0] / d)
        fig.add_trace(go.Scatter(x=d, y=s, mode="markers+lines", name="rms sd over seeds (95% bootstrap CI)",
                                 error_y=dict(type="data", symmetric=False, array=high, arrayminus=low)), row=1, col=2)
        fig.add_trace(go.Scatter(x=d, y=ref, mode="lines", line=dict(dash="dot", color="gray"), name="∝ 1/sqrt(d)"), row=1, col=2)
        ax2.errorbar(d, s, yerr=np.nan_to_num(np.vstack([low, high])), fmt="o-", label="rms sd over seeds (95% CI)")
        ax2.set(xscale="log", yscale="log")
        ax2.loglog(d, ref, ":", color="gray", label="∝ 1/sqrt(d)")
        ax2.set(xlabel="d", ylabel="spread of eps over seeds", title="spread vs d")
        ax2.legend()
    fig.update_layout(**base_layout("Concentration: STE trajectories at growing d", height=500))
    fig.update_xaxes(type="log", title_text="d", row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="tau", row=1, col=1)
    return fig, mfig


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = sw.experiment_parser(__doc__.splitlines()[0], name=NAME)
    opts = parser.parse_args(argv)
    cfg = settings(opts.quick)
    sweep = sw.Sweep(opts.out, NAME, {**cfg, "quick": opts.quick, "seed": opts.seed}, fresh=opts.fresh, progress=opts.progress)
    curves = sweep.run(curve_cells(cfg, opts.seed), lambda c: run_cell(c, cfg, opts.progress), desc="curves")
    conc = sweep.run(concentration_cells(cfg, opts.seed), lambda c: run_cell(c, cfg, opts.progress), desc="concentration")

    rows = config_rows(curves)
    ci = lambda interval: format_interval(interval, "{:.4g}")  # noqa: E731
    table = [{"config": r["config"], "final": ci(r["final"]), "plateau": ci(r["plateau"]),
              **{k: r[k] for k in ("final_pde", "dithering", "rounding", "plateau_pde", "plateau_noisy_escape", "escape_time", "pde_mass_error")}}
             for r in rows]
    md = [sw.print_table(table, {"config": "config", "final": "eps final sim: mean [95% CI] n", "final_pde": "eps final (PDE)",
                                 "dithering": "dithering pred.", "rounding": "rounding (RTN)", "plateau": "plateau sim: mean [95% CI] n",
                                 "plateau_pde": "plateau PDE", "plateau_noisy_escape": "noisy-escape pred.",
                                 "escape_time": "drift-only escape", "pde_mass_error": "PDE |mass-1|"},
                         title=f"STE teacher-student, d = {cfg['dim']}, eta = {cfg['lr']}; sim: mean over seeds, Student t 95% CI, n = seeds")]
    fits = plateau_fits(rows, cfg["lr"])
    md.append(sw.print_table([{**f, "ranges": " ".join(f"{r:g}" for r in f["ranges"]), "slope_seeds": ci(f["slope_seeds"])} for f in fits],
                             {"bits": "bits", "ranges": "R", "slope_seeds": "slope sim: mean [95% CI] n", "slope_pde": "slope PDE",
                              "slope_noisy_escape": "slope noisy-escape pred.", "drift_slope": "slope drift-only",
                              "intercept": "intercept (mean curve)", "r2": "R^2 (mean curve)"},
                             title="Plateau length = intercept + slope * R; sim slope fitted per seed, Student t 95% CI over seeds"))
    conc_rows, exponent = concentration_rows(conc, opts.seed)
    exp_ci = exponent["spread_exponent_ci"]
    md.append(sw.print_table([{**r, "spread_rms": ci(r["spread_rms"])} for r in conc_rows],
                             {"dim": "d", "replicas": "seeds", "spread_rms": "rms sd over seeds [95% CI] n", "spread_max": "max sd",
                              "spread_rms_x_sqrt_d": "rms sd * sqrt(d)", "mean_vs_pde_max": "max |mean - PDE|"},
                             title=(f"Concentration (b=2, R={cfg['concentration']['range']}): spread ~ d^{exponent['spread_exponent']:.3f} "
                                    f"[{exp_ci['low']:.3f}, {exp_ci['high']:.3f}] (expected d^-0.5; percentile bootstrap over seeds within each d, "
                                    f"{exp_ci['valid']}/{exp_ci['n_boot']} resamples defined, n = {exp_ci['n']} seeds; regression t interval over "
                                    f"the {len(conc_rows)} d: {format_interval(exponent['spread_exponent_regression'])})")))

    for name, (fig, mfig) in {"curves": curves_figure(curves), "plateau": plateau_figure(rows, cfg["lr"]),
                              "concentration": concentration_figure(conc, conc_rows)}.items():
        sw.write_figure(fig, opts.out / name, static=mfig)
    summary = {"configs": rows,
               "plateau_fits": fits, "concentration": conc_rows, **exponent}
    sweep.summary = summary
    sw.write_text_atomic(opts.out / "tables.md", "\n\n".join(md) + "\n")
    sw.write_text_atomic(opts.out / "summary.json", json.dumps(sw.to_jsonable(summary), indent=1))
    print(f"runtime {sweep.runtime_seconds:.1f} s wall, {sweep.cpu_seconds:.1f} s CPU; wrote {opts.out}/results.json, tables.md, *.html, *.png", flush=True)
    sweep.save()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
