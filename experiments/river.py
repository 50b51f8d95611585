"""The picture that explains it: the FP training river, the PTQ point off it, the QAT path back (digits MLP).

The FP training trajectory (40 checkpoints, EMA-smoothed: ``landscape.river``) is the river; along
it the loss L(gamma(t)) and the quantized loss L(Q(gamma(t))). The min-max PTQ point Q(theta_fp) lies
off the river (``project_onto_path`` distance), the QAT (STE) iterates Q(theta_t) are drawn on the
plane through theta_fp, the PTQ point and the QAT endpoint, with the river checkpoints projected on
the same plane, on the FP and the quantized slice side by side. The loss barrier theta_fp -> QAT
endpoint is measured on the straight line and on a fitted quadratic Bezier curve (Garipov et al.),
and compared with the straight line theta_fp -> PTQ point. Bit-widths 2 and 3.

    python experiments/river.py --out runs/river              # full: ~1 min on 2 shared cores
    python experiments/river.py --quick --out /tmp/river       # 2 bits, short runs: ~15 s

results.json: cells ``params = {"bits": b}``; ``result`` holds
  fp_loss, ptq_loss, qat_loss                 L(theta_fp), L(Q(theta_fp)), L(Q(theta_T)) on the training split
  fp_accuracy, ptq_accuracy, qat_accuracy     test accuracy of the same points
  river_distance_fp / _ptq / _qat (+ _t)      distance to the river polyline and where it is closest (arc-length t)
  river_profile {t, loss, quantized_loss}     L and L(Q) along the river; river_min_quantized_loss (+ _t)
  distance_ptq_to_fp, distance_qat_to_fp      Euclidean distances in weight space (quantized tensors)
  barrier_linear_qat, barrier_bezier_qat, barrier_linear_ptq   barrier heights B (Entezari et al.)
  barrier_profiles {label: {t, loss}}         losses along the three paths
  qat_history {step, loss, eval_metric, discretization_error, grid_flips}
  landscape                                   riverscape.studies.plane_landscape (slices, markers, projected paths)
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import torch

from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.report.experiment_figures import landscape_figures
from riverscape.landscape import fit_bezier, loss_barrier, path_losses, project_onto_path, river
from riverscape.quant import ptq
from riverscape.report import path_figure, static

NAME = "river"


def settings(quick: bool) -> dict:
    if quick:
        return {"bits": [2], "train_steps": 800, "qat_steps": 100, "bezier_steps": 100, "checkpoints": 40, "grid": 21}
    return {"bits": [3, 2], "train_steps": 1500, "qat_steps": 300, "bezier_steps": 300, "checkpoints": 40, "grid": 41}


def run_cell(cell: dict, cfg: dict, seed: int, out_dir, progress: bool) -> dict:
    spec = st.study_model("digits_mlp", train_steps=cfg["train_steps"], qat_steps=cfg["qat_steps"])
    study = st.load_study(spec, seed, out_dir / "fp_models", checkpoints=cfg["checkpoints"], progress=progress)
    obj, fp, bits = study.analysis, study.theta_fp, cell["bits"]
    qmap = study.quant_map(bits)
    stream = river(study.trajectory)
    profile = path_losses(obj, stream, n=41, quantizer=qmap, progress=False)
    q = ptq(obj, qmap)
    res = st.run_qat(study, bits, "ste", seed=seed, record_every=10, progress=progress)
    qat_point = res.theta_q
    bezier = fit_bezier(obj, fp, qat_point, steps=cfg["bezier_steps"], seed=seed, progress=False)
    barriers = {"θ_fp → QAT (line)": loss_barrier(obj, fp, qat_point, progress=False),
                "θ_fp → QAT (Bezier)": loss_barrier(obj, fp, qat_point, path=bezier, progress=False),
                "θ_fp → PTQ (line)": loss_barrier(obj, fp, q, progress=False)}
    out = {}
    for name, point in (("fp", fp), ("ptq", q), ("qat", qat_point)):
        projection = project_onto_path(point, stream)
        out[f"river_distance_{name}"], out[f"river_t_{name}"] = projection.distance, projection.t
        out[f"{name}_loss"] = obj.loss(point)
        out[f"{name}_accuracy"] = study.evaluation.metric(point)
    i_min = int(torch.argmin(profile.quantized_loss))
    out.update({
        "distance_ptq_to_fp": float((q - fp).norm()), "distance_qat_to_fp": float((qat_point - fp).norm()),
        "river_length": stream.length, "river_profile": {"t": profile.t, "loss": profile.loss, "quantized_loss": profile.quantized_loss},
        "river_min_quantized_loss": float(profile.quantized_loss[i_min]), "river_min_quantized_t": float(profile.t[i_min]),
        "barrier_linear_qat": barriers["θ_fp → QAT (line)"].height, "barrier_bezier_qat": barriers["θ_fp → QAT (Bezier)"].height,
        "barrier_linear_ptq": barriers["θ_fp → PTQ (line)"].height,
        "barrier_profiles": {k: {"t": b.profile.t, "loss": b.profile.loss} for k, b in barriers.items()},
        "qat_history": {k: res.history[k] for k in ("step", "loss", "eval_metric", "discretization_error", "grid_flips")},
        "landscape": st.plane_landscape(study, qmap, fp, q, qat_point, quantized_path=res.quantized_trajectory,
                                        river_points=stream.vertices, steps=cfg["grid"], progress=progress),
    })
    return out


def figures(records: list[dict], out_dir) -> None:
    for r in records:
        b, res = r["params"]["bits"], r["result"]
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
    opts, cfg, sweep = st.open_sweep(NAME, __doc__.splitlines()[0], settings, argv)
    records = sweep.run([{"bits": b} for b in cfg["bits"]], lambda c: run_cell(c, cfg, opts.seed, opts.out, opts.progress))
    rows = [{"bits": r["params"]["bits"], **{k: v for k, v in r["result"].items() if not isinstance(v, (dict, list))}} for r in records]
    md = [
        sw.print_table(rows, {"bits": "bits", "fp_loss": "L(θ_fp)", "ptq_loss": "L(Q(θ_fp))", "qat_loss": "L(Q(θ_T))",
                              "ptq_accuracy": "PTQ acc", "qat_accuracy": "QAT acc", "river_min_quantized_loss": "min_t L(Q(γ(t)))",
                              "river_min_quantized_t": "at t"}, title="Losses (training split) and test accuracy"),
        sw.print_table(rows, {"bits": "bits", "river_distance_fp": "dist θ_fp→river", "river_distance_ptq": "dist PTQ→river",
                              "river_distance_qat": "dist QAT→river", "distance_ptq_to_fp": "|PTQ-θ_fp|", "distance_qat_to_fp": "|QAT-θ_fp|",
                              "barrier_linear_ptq": "B line→PTQ", "barrier_linear_qat": "B line→QAT", "barrier_bezier_qat": "B Bezier→QAT"},
                       title="Distances to the river and loss barriers from θ_fp"),
    ]
    figures(records, opts.out)
    st.finish_sweep(sweep, opts.out, md)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
