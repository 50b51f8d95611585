"""The picture that explains it: the FP training river, the PTQ point off it, the QAT path back (digits MLP).

The FP training trajectory (40 checkpoints, EMA-smoothed: ``landscape.river``) is the river; along
it the loss L(gamma(t)) and the quantized loss L(Q(gamma(t))). The min-max PTQ point Q(theta_fp) lies
off the river (``project_onto_path`` distance), the QAT (STE) iterates Q(theta_t) are drawn on the
plane through theta_fp, the PTQ point and the QAT endpoint, with the river checkpoints projected on
the same plane, on the FP and the quantized slice side by side. The loss barrier theta_fp -> QAT
endpoint is measured on the straight line and on a fitted quadratic Bezier curve (Garipov et al.),
and compared with the straight line theta_fp -> PTQ point. Bit-widths 2 and 3, several seeds (a seed
fixes the FP model). Every distance is set against the FP continuation: the same optimiser continued
in full precision from theta_fp for the same steps (the ``latent`` QAT arm), paired by seed. QAT's
held-out first hitting time T_hit(tau) (tau = the loss increase costing one accuracy point,
``riverscape.qat_dynamics.run_outcomes``; censored when never hit) and best iterate are reported.

    python experiments/river.py --out runs/river              # full: 10 seeds x 2 bit-widths, 111 s CPU (25 min wall at load 18)
    python experiments/river.py --quick --out /tmp/river       # 2 bits, 6 seeds, short runs: 14 s CPU (2 min wall at load 15)

results.json: cells ``params = {"bits": b, "seed": s}``; ``result`` holds
  fp_loss, ptq_loss, qat_loss, fpc_loss       L(theta_fp), L(Q(theta_fp)), L(Q(theta_T)), L(w_T^FP) on the training split
  fp_accuracy, ptq_accuracy, qat_accuracy, fpc_accuracy   test accuracy of the same points
  river_distance_fp / _ptq / _qat / _fpc (+ _t)  distance to the river polyline and where it is closest (arc-length t)
  river_profile {t, loss, quantized_loss}     L and L(Q) along the river; river_min_quantized_loss (+ _t)
  distance_ptq_to_fp, distance_qat_to_fp      Euclidean distances in weight space: |Q(theta_fp) - theta_fp|, |Q(theta_T) - theta_fp|
  distance_qat_latent_to_fp                   |theta_T - theta_fp| (QAT's latent endpoint)
  distance_fpc_to_fp                          |w_T^FP - theta_fp|: the FP continuation's drift (same optimiser, lr, steps)
  hit, hit_time, threshold, tau               QAT's held-out T_hit(tau) (hit=False: censored at the last step)
  best_loss, best_step, best_accuracy         QAT's best iterate by held-out loss; final_loss, final_accuracy at the end
  qat_outcomes                                riverscape.qat_dynamics.run_outcomes (held-out series, tolerance)
  barrier_linear_qat, barrier_bezier_qat, barrier_linear_ptq   barrier heights B (Entezari et al.)
  barrier_profiles {label: {t, loss}}         losses along the three paths
  qat_history {step, loss, eval_metric, discretization_error, grid_flips}
  landscape                                   riverscape.studies.plane_landscape (first seed only)
``summary.distances``: per bit-width, paired by seed (``riverscape.stats.paired_comparison``): QAT deployed
minus FP continuation, QAT latent minus FP continuation, QAT deployed minus PTQ, river distance of QAT minus FP continuation.
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import torch

from riverscape import qat_dynamics as qd
from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.stats import kaplan_meier, paired_comparison
from riverscape.report.experiment_figures import landscape_figures
from riverscape.landscape import fit_bezier, loss_barrier, path_losses, project_onto_path, river
from riverscape.quant import ptq
from riverscape.report import path_figure, static

NAME = "river"


def settings(quick: bool) -> dict:
    if quick:
        return {"bits": [2], "seeds": 6, "train_steps": 800, "qat_steps": 100, "bezier_steps": 100, "checkpoints": 40, "grid": 21,
                "accuracy_drop": 0.01}
    return {"bits": [3, 2], "seeds": 10, "train_steps": 1500, "qat_steps": 300, "bezier_steps": 300, "checkpoints": 40, "grid": 41,
            "accuracy_drop": 0.01}


def run_cell(cell: dict, cfg: dict, out_dir, progress: bool) -> dict:
    seed, bits = cell["seed"], cell["bits"]
    spec = st.study_model("digits_mlp", train_steps=cfg["train_steps"], qat_steps=cfg["qat_steps"])
    study = st.load_study(spec, seed, out_dir / "fp_models", checkpoints=cfg["checkpoints"], progress=progress)
    obj, fp = study.analysis, study.theta_fp
    qmap = study.quant_map(bits)
    stream = river(study.trajectory)
    profile = path_losses(obj, stream, n=41, quantizer=qmap, progress=False)
    q = ptq(obj, qmap)
    res = st.run_qat(study, bits, "ste", seed=seed, record_every=10, progress=progress)
    fpc = st.run_qat(study, bits, qd.FP_CONTINUATION, seed=seed, record_every=10, progress=progress)  # FP continuation control
    qat_point, fpc_point = res.theta_q, fpc.theta
    bezier = fit_bezier(obj, fp, qat_point, steps=cfg["bezier_steps"], seed=seed, progress=False)
    barriers = {"θ_fp → QAT (line)": loss_barrier(obj, fp, qat_point, progress=False),
                "θ_fp → QAT (Bezier)": loss_barrier(obj, fp, qat_point, path=bezier, progress=False),
                "θ_fp → PTQ (line)": loss_barrier(obj, fp, q, progress=False)}
    out = {}
    for name, point in (("fp", fp), ("ptq", q), ("qat", qat_point), ("fpc", fpc_point)):
        projection = project_onto_path(point, stream)
        out[f"river_distance_{name}"], out[f"river_t_{name}"] = projection.distance, projection.t
        out[f"{name}_loss"] = obj.loss(point)
        out[f"{name}_accuracy"] = study.evaluation.metric(point)
    outcomes = qd.run_outcomes(study, bits, "minmax", res, accuracy_drop=cfg["accuracy_drop"])
    qat_distances, fpc_distances = qd.distances_to_fp(study, res), qd.distances_to_fp(study, fpc)
    i_min = int(torch.argmin(profile.quantized_loss))
    out.update({
        "distance_ptq_to_fp": float((q - fp).norm()), "distance_qat_to_fp": qat_distances["deployed_distance_to_fp"],
        "distance_qat_latent_to_fp": qat_distances["latent_distance_to_fp"], "distance_fpc_to_fp": fpc_distances["latent_distance_to_fp"],
        **{k: outcomes[k] for k in ("hit", "hit_time", "threshold", "best_loss", "best_step", "best_accuracy", "final_loss", "final_accuracy")},
        "tau": outcomes["tolerance"]["tau"], "qat_outcomes": outcomes,
        "river_length": stream.length, "river_profile": {"t": profile.t, "loss": profile.loss, "quantized_loss": profile.quantized_loss},
        "river_min_quantized_loss": float(profile.quantized_loss[i_min]), "river_min_quantized_t": float(profile.t[i_min]),
        "barrier_linear_qat": barriers["θ_fp → QAT (line)"].height, "barrier_bezier_qat": barriers["θ_fp → QAT (Bezier)"].height,
        "barrier_linear_ptq": barriers["θ_fp → PTQ (line)"].height,
        "barrier_profiles": {k: {"t": b.profile.t, "loss": b.profile.loss} for k, b in barriers.items()},
        "qat_history": {k: res.history[k] for k in ("step", "loss", "eval_metric", "discretization_error", "grid_flips")},
    })
    if seed == cfg["seed"]:  # the plane slices are the expensive part: drawn for the first seed only
        out["landscape"] = st.plane_landscape(study, qmap, fp, q, qat_point, quantized_path=res.quantized_trajectory,
                                              river_points=stream.vertices, steps=cfg["grid"], progress=progress)
    return out


#: the paired distance contrasts of the summary: (name, a, b), keys of a cell result
DISTANCE_CONTRASTS = (
    ("QAT deployed − FP continuation", "distance_qat_to_fp", "distance_fpc_to_fp"),
    ("QAT latent − FP continuation", "distance_qat_latent_to_fp", "distance_fpc_to_fp"),
    ("QAT deployed − PTQ", "distance_qat_to_fp", "distance_ptq_to_fp"),
    ("river: QAT − FP continuation", "river_distance_qat", "river_distance_fpc"),
)


def distance_summary(records: list[dict]) -> list[dict]:
    """Per bit-width, each contrast of :data:`DISTANCE_CONTRASTS` paired by seed (needs two seeds)."""
    rows = []
    for bits in sorted({r["params"]["bits"] for r in records}):
        cells_ = sorted((r for r in records if r["params"]["bits"] == bits), key=lambda r: r["params"]["seed"])
        if len(cells_) < 2:
            continue
        for name, a, b in DISTANCE_CONTRASTS:
            xs, ys = [c["result"][a] for c in cells_], [c["result"][b] for c in cells_]
            comparison = paired_comparison(xs, ys, a=a, b=b)
            d = comparison.difference
            rows.append({"bits": bits, "contrast": name, "n": comparison.n, "a": sum(xs) / len(xs), "b": sum(ys) / len(ys),
                         "diff": d.estimate, "ci_low": d.low, "ci_high": d.high, "wilcoxon_p": comparison.wilcoxon_p,
                         "comparison": comparison.to_dict()})
    return rows


def _means(records: list[dict]) -> list[dict]:
    """Per bit-width: means over seeds of the scalar results, hits as a count."""
    rows = []
    for bits in sorted({r["params"]["bits"] for r in records}, reverse=True):
        results = [r["result"] for r in records if r["params"]["bits"] == bits]
        row = {"bits": bits, "seeds": len(results), "hits": f"{sum(bool(r['hit']) for r in results)}/{len(results)}"}
        for key, value in results[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "hit_time":
                vals = [r[key] for r in results if r[key] is not None]
                row[key] = sum(vals) / len(vals) if vals else None
        times, survival = kaplan_meier([r["hit_time"] for r in results], [int(r["hit"]) for r in results])
        reached = [float(t) for t, s_ in zip(times, survival) if s_ <= 0.5]
        row["hit_time"] = reached[0] if reached else None  # Kaplan-Meier median T_hit (censored runs at risk to their end)
        rows.append(row)
    return rows


def figures(records: list[dict], out_dir) -> None:
    for r in records:
        b, res = r["params"]["bits"], r["result"]
        if "landscape" not in res:  # drawn for the first seed only
            continue
        fig, mfig = landscape_figures(res["landscape"], f"digits MLP, {b} bits: river (FP training), PTQ point and the QAT path")
        sw.write_figure(fig, out_dir / f"landscape_{b}bit", static=mfig)
        prof = res["river_profile"]
        profiles = {"river (FP training)": (prof["t"], prof["loss"], prof["quantized_loss"])}
        kwargs = dict(title=f"{b} bits: L(γ(t)) (solid) and L(Q(γ(t))) (dashed) along the river, init (t=0) → θ_fp (t=1)")
        sw.write_figure(path_figure(profiles, **kwargs), out_dir / f"river_profile_{b}bit", static=static.path_figure(profiles, **kwargs))
        profiles = {k: (v["t"], v["loss"]) for k, v in res["barrier_profiles"].items()}
        kwargs = dict(title=f"{b} bits: L(θ) on the paths from θ_fp to the QAT and PTQ points")
        sw.write_figure(path_figure(profiles, **kwargs), out_dir / f"barriers_{b}bit", static=static.path_figure(profiles, **kwargs))


def main(argv: list[str] | None = None) -> list[dict]:
    opts, cfg, sweep = st.open_sweep(NAME, __doc__.splitlines()[0], settings, argv, seeds_help="seeds (FP models) per bit-width (default: 6 quick, 10 full)")
    grid = [{"bits": b, "seed": opts.seed + i} for b in cfg["bits"] for i in range(cfg["seeds"])]
    records = sweep.run(grid, lambda c: run_cell(c, cfg, opts.out, opts.progress))
    distances = distance_summary(records)
    sweep.summary = {"distances": distances}
    rows = _means(records)
    md = [
        sw.print_table(rows, {"bits": "bits", "seeds": "n", "fp_loss": "L(θ_fp)", "ptq_loss": "L(Q(θ_fp))", "qat_loss": "L(Q(θ_T))",
                              "fpc_loss": "L(w_T^FP)", "ptq_accuracy": "PTQ acc", "qat_accuracy": "QAT acc", "fpc_accuracy": "FP cont. acc",
                              "river_min_quantized_loss": "min_t L(Q(γ(t)))", "river_min_quantized_t": "at t"},
                       title="Losses (training split) and test accuracy, means over seeds"),
        sw.print_table(rows, {"bits": "bits", "seeds": "n", "tau": "τ (1 acc. point)", "hits": "QAT hits", "hit_time": "median T_hit (KM)",
                              "best_loss": "best held-out L", "best_step": "at step", "best_accuracy": "best acc",
                              "final_loss": "final held-out L", "final_accuracy": "final acc"},
                       title="QAT on the held-out split: first hitting time of L(θ_fp) + τ (censored runs counted as misses) and the best iterate"),
        sw.print_table(rows, {"bits": "bits", "seeds": "n", "river_distance_fp": "dist θ_fp→river", "river_distance_ptq": "dist PTQ→river",
                              "river_distance_qat": "dist QAT→river", "river_distance_fpc": "dist FP cont.→river",
                              "distance_ptq_to_fp": "|PTQ-θ_fp|", "distance_qat_to_fp": "|QAT-θ_fp|", "distance_fpc_to_fp": "|FP cont.-θ_fp|",
                              "barrier_linear_ptq": "B line→PTQ", "barrier_linear_qat": "B line→QAT", "barrier_bezier_qat": "B Bezier→QAT"},
                       title="Distances to the river and loss barriers from θ_fp, means over seeds"),
        sw.print_table(distances, {"bits": "bits", "contrast": "contrast", "n": "n", "a": "mean a", "b": "mean b", "diff": "Δ",
                                   "ci_low": "95% CI low", "ci_high": "high", "wilcoxon_p": "Wilcoxon p"},
                       title="Distances paired by seed (BCa bootstrap CI of the mean difference, two-sided Wilcoxon signed-rank p)"),
    ]
    figures(records, opts.out)
    st.finish_sweep(sweep, opts.out, md)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
