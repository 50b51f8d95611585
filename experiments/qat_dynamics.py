"""E11 (docs/qat_dynamics.md §1-§5; seed paper arXiv 2606.09012): is it the gradient at Q(w) that makes QAT recover?

Four QAT arms start at theta_fp with the same optimiser, lr, steps and batch order and all deploy
Q(w_t); only the gradient point differs: A ste (Q(w_t)), B matched_noise (w_t + |delta_t| * random
signs), C stochastic_rounding (SR(w_t), same grid), D latent (w_t). Per (model, bits, range, arm,
seed): held-out deployed loss and accuracy along training, first hitting time of
L_eval(theta_fp) + tau (tau = the loss increase costing one accuracy point on the line to the PTQ
point; censored runs kept), best iterate, and at logged steps cos(-g, F - p) with F the valley floor
below Q(w_t) against a matched null of random-sign perturbations (empirical p, z). Paired by seed:
A-B, A-C, A-D differences of the final deployed loss (bootstrap CI, Wilcoxon p, Holm), log-rank p of
T_hit, Stouffer-pooled alignment z; the distance from theta_fp of every arm's end against the FP
continuation (arm D's latent endpoint: the same optimiser continued in full precision), paired by seed.

    python experiments/qat_dynamics.py --quick --out /tmp/qat_dynamics            # ~6-8 min on 2 idle cores
    python experiments/qat_dynamics.py --out runs/qat_dynamics                    # full (settings(quick=False)): ~1 h on a loaded 2-core machine
    python experiments/qat_dynamics.py --quick --models resnet20_digits32 --out /tmp/qd_resnet   # one model, its quick grid
    python experiments/qat_dynamics.py --out runs/qat_dynamics --tables-only      # tables of the cells stored so far (interrupted run)

Models: the digits MLP and the MNIST-1D CNN (quick), plus the character transformer and the CIFAR ResNet-20 with
BatchNorm on the CIFAR-shaped digits (full, or ``--models``). On the ResNet every deployed evaluation (the held-out
series of Q(w_t), hence T_hit, the best iterate and the tolerance line) and the alignment at Q(w_t) use BatchNorm
statistics re-estimated at that point on 256 training rows drawn with the seed (docs/qat_dynamics.md §2.3); QAT
itself trains with the FP statistics. A rerun with the same options resumes the stored cells.

results.json: cells ``params = {"model", "bits", "range", "arm", "seed"}`` (arm = estimator name);
``result``: the record of ``riverscape.qat_dynamics.dynamics_cell`` (raw series included);
``summary.comparisons``: ``riverscape.qat_dynamics.paired_comparisons``; ``summary.drift``:
``riverscape.qat_dynamics.drift_comparisons``.
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import numpy as np

from riverscape import ptq_study as ps
from riverscape import qat_dynamics as qd
from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.report.experiment_figures import series_figures

NAME = "qat_dynamics"
# digits MLP over-trained (4000 Adam steps) with weight decay; QAT in mini-batches so seeds change the batch order
_DIGITS = {"train_steps": 4000, "train_weight_decay": 1e-4, "qat_batch": 128, "qat_steps": 200, "qat_record_every": 10}
#: models run without ``--models``, in this order (an interrupted full run has complete seeds of the first ones: the two models
#: the quick run lacks come first, the MLP, whose 2- and 3-bit cells the quick run has at n = 10, last)
DEFAULT_MODELS = {True: ("digits_mlp", "mnist1d_cnn"), False: ("resnet20_digits32", "text_transformer", "mnist1d_cnn", "digits_mlp")}
# every model's budget overrides and grid, quick (True) and full (False); a grid may set ``max_seeds`` (at most that many of the
# ``--seeds``) and its own ``alignment_fractions`` (logged alignment steps, fractions of the run; [] logs none)
_CATALOGUE = {
    True: {
        "digits_mlp": (_DIGITS, {"bits": [2, 3], "ranges": ["minmax", "mse"]}),
        "mnist1d_cnn": ({"qat_steps": 150, "qat_record_every": 10}, {"bits": [2], "ranges": ["minmax"]}),
        "text_transformer": ({"qat_record_every": 10}, {"bits": [2], "ranges": ["minmax"]}),
        "resnet20_digits32": ({"qat_batch": 64, "qat_record_every": 50}, {"bits": [2], "ranges": ["minmax"], "max_seeds": 3,
                                                                          "alignment_fractions": [1.0]}),
    },
    # The full run, sized to about an hour of one thread on the shared 2-core machine (load 7-9: wall ~2.5x CPU), from per-cell CPU
    # costs measured there: MLP 0.3 s of QAT + 0.4 s per logged alignment step; CNN (250 steps) 2.7 s + 1.9 s per step; transformer
    # ~10 s + 3 s per step; ResNet-20 ~65 s of QAT at batch 128 + ~125 s per logged step (101 gradients and a floor solve on 256
    # images), and 3.5 min to train one FP model. Hence: the MLP on the whole grid (bits 2/3/4 x min-max/MSE, 10 seeds, alignment
    # at the start and the end); the CNN at 2 bits min-max, 10 seeds, alignment at the end; the transformer and the ResNet at
    # 2 bits min-max with 5 seeds (n = 5: the smallest n at which the exact two-sided Wilcoxon p can reach 0.0625 and a claim is
    # read at all), the transformer's alignment at the end, the ResNet's none (it would cost 40 min per logged step over the 20
    # runs) and its QAT in mini-batches of 64 (half the cost of ptq_methods' 128; still 150 steps). Statistics unchanged: 100 null
    # draws per logged step, BCa CIs, exact Wilcoxon, Holm over all rows, log-rank.
    False: {
        "digits_mlp": (_DIGITS, {"bits": [2, 3, 4], "ranges": ["minmax", "mse"], "alignment_fractions": [0.0, 1.0]}),
        "resnet20_digits32": ({"qat_batch": 64, "qat_record_every": 50}, {"bits": [2], "ranges": ["minmax"], "max_seeds": 5,
                                                                          "alignment_fractions": []}),
        "text_transformer": ({"qat_record_every": 10}, {"bits": [2], "ranges": ["minmax"], "max_seeds": 5, "alignment_fractions": [1.0]}),
        "mnist1d_cnn": ({"qat_record_every": 10}, {"bits": [2], "ranges": ["minmax"], "alignment_fractions": [1.0]}),
    },
}


def _models(quick: bool, keys) -> dict:
    catalogue = _CATALOGUE[quick]
    return {"models": {key: catalogue[key][0] for key in keys}, "grid": {key: catalogue[key][1] for key in keys}}


def settings(quick: bool) -> dict:
    """Every size of the experiment (stored as the sweep's config).

    Quick: the digits MLP at 2 and 3 bits, min-max and MSE, and the CNN at 2-bit min-max; 6 seeds; alignment at 0, 10 and 50 %
    of the run. Full (``quick=False``; the README's full run): 10 seeds, at most 5 for the transformer and the ResNet; the MLP at
    bits 2/3/4 x min-max/MSE, the ResNet-20 (BatchNorm re-estimated at every deployed point) and the transformer at 2-bit min-max,
    the CNN at 2-bit min-max (250 QAT steps, against 150 in quick mode); 320 runs. Why this grid and not the whole one (4 models x 3 bits x 2 ranges x 10 seeds x 4
    arms = 960 runs with 6 logged alignment steps each, about 57 h of CPU here, 54 h of it the ResNet's): see the comment on ``_CATALOGUE[False]``.
    """
    common = {"n_null": 100, "floor_steps": 30, "accuracy_drop": 0.01, "calibration_samples": qd.CALIBRATION_SAMPLES}
    if quick:
        return {**common, "seeds": 6, "alignment_fractions": [0.0, 0.1, 0.5], **_models(True, DEFAULT_MODELS[True])}
    return {**common, "seeds": 10, "alignment_fractions": [0.0, 0.05, 0.1, 0.25, 0.5, 1.0], **_models(False, DEFAULT_MODELS[False])}


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def arguments(parser) -> None:
    parser.add_argument("--models", type=_comma_list, default=None,
                        help=f"comma list of models (default {','.join(DEFAULT_MODELS[True])} with --quick, else "
                             f"{','.join(DEFAULT_MODELS[False])}); each runs its grid of the chosen mode")
    parser.add_argument("--tables-only", action="store_true",
                        help="run no cell: write the tables, figures and summary of the cells stored in OUT (e.g. of an interrupted run)")


def overrides(opts) -> dict:
    """``--models``: those models with their budgets and grids of the chosen mode."""
    if opts.models is None:
        return {}
    unknown = [key for key in opts.models if key not in _CATALOGUE[opts.quick]]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(_CATALOGUE[opts.quick])}")
    return _models(opts.quick, opts.models)


def specs(cfg: dict) -> dict[str, st.StudyModel]:
    return {key: ps.experiment_model(key, **overrides) for key, overrides in cfg["models"].items()}


def _seeds(cfg: dict, key: str) -> int:
    return min(cfg["seeds"], cfg["grid"][key].get("max_seeds", cfg["seeds"]))


def cells(cfg: dict, seed: int) -> list[dict]:
    """Seeds outside arms, so an interrupted sweep leaves complete pairs."""
    return [{"model": key, "bits": b, "range": r, "arm": arm, "seed": seed + i}
            for key in cfg["models"] for b in cfg["grid"][key]["bits"] for r in cfg["grid"][key]["ranges"]
            for i in range(_seeds(cfg, key)) for arm in qd.ARMS.values()]


def run_cell(cell: dict, cfg: dict, out_dir, progress: bool) -> dict:
    spec = specs(cfg)[cell["model"]]
    study = st.load_study(spec, cell["seed"], out_dir / "fp_models", progress=progress)  # seed = FP model, batches and draws
    grid = cfg["grid"][cell["model"]]
    return qd.dynamics_cell(study, cell["bits"], cell["range"], cell["arm"], seed=cell["seed"], record_every=spec.qat_record_every,
                            alignment_fractions=grid.get("alignment_fractions", cfg["alignment_fractions"]), n_null=cfg["n_null"],
                            floor_steps=cfg["floor_steps"], accuracy_drop=cfg["accuracy_drop"],
                            calibration_samples=cfg.get("calibration_samples", qd.CALIBRATION_SAMPLES), progress=progress)


def _mean_sd(series: list[list[float]]) -> tuple[np.ndarray, np.ndarray | None]:
    ys = np.asarray([[np.nan if v is None else v for v in s] for s in series], dtype=float)
    return np.nanmean(ys, 0), (np.nanstd(ys, 0, ddof=1) if len(series) > 1 else None)


def figures(results: list[dict], out_dir) -> None:
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in results:
        groups.setdefault(qd.group_key(r), {}).setdefault(f"{r['arm']} {r['estimator']}", []).append(r)
    for (model, bits, range_method), arms in groups.items():
        panels: dict[str, dict] = {"held-out L(Q(w_t))": {}, "held-out accuracy of Q(w_t)": {}, "alignment z vs matched null": {}}
        for label, runs in sorted(arms.items()):
            for panel, key in zip(panels, ("deployed_loss", "deployed_accuracy")):
                panels[panel][label] = (runs[0]["steps"], *_mean_sd([r[key] for r in runs]))
            steps = [row["step"] for row in runs[0]["alignment"]]
            if steps:  # a model's grid may log no alignment step
                panels["alignment z vs matched null"][label] = (steps, *_mean_sd([[row["z"] for row in r["alignment"]] for r in runs]))
        if not panels["alignment z vs matched null"]:
            del panels["alignment z vs matched null"]
        fig, mfig = series_figures(panels, f"{model}, {bits} bits, {range_method}: QAT arms (mean ± sd over {len(runs)} seeds)",
                                   log_y=(True, False, False)[:len(panels)])
        sw.write_figure(fig, out_dir / f"arms_{model}_{bits}bit_{range_method}", static=mfig)


def main(argv: list[str] | None = None) -> dict:
    opts, cfg, sweep = st.open_sweep(
        NAME, __doc__.splitlines()[0], settings, argv, models=specs, arguments=arguments, overrides=overrides,
        seeds_help="seeds per configuration (default: 6 quick, 10 full; a model's grid may cap them, max_seeds)",
    )
    if opts.tables_only:
        records = sweep.records
        print(f"--tables-only: {len(records)} of {len(cells(cfg, opts.seed))} cells stored in {opts.out}", flush=True)
    else:
        records = sweep.run(cells(cfg, opts.seed), lambda c: run_cell(c, cfg, opts.out, opts.progress))
    results = [r["result"] for r in records]
    comparisons = qd.paired_comparisons(results)
    drift = qd.drift_comparisons(results)
    sweep.summary = {"comparisons": comparisons, "drift": drift}
    columns = {"model": "model", "bits": "bits", "range": "range", "contrast": "contrast", "n": "n", "diff": "Δ final loss",
               "ci_low": "95% CI low", "ci_high": "high", "wilcoxon_p": "Wilcoxon p", "holm_p": "Holm p", "hits": "hits a/b",
               "logrank_p": "log-rank p", "z_A": "z_A", "z_ctrl": "z ctrl", "pz_A": "z_A (from p)", "pz_ctrl": "z ctrl (from p)"}
    means = qd.arm_means(results)
    stale = ["stale_bn_final_accuracy"] if any("stale_bn_final_accuracy" in row for row in means) else []  # BatchNorm models only
    md = [sw.print_table(qd.table_rows(comparisons), columns,
                         title="Paired by seed: final held-out deployed loss, STE (A) minus control; T_hit log-rank; Stouffer-pooled alignment z"),
          sw.print_table(means, ["model", "bits", "range", "arm", "seeds", "final_loss", "final_accuracy", "best_loss", "hit",
                                 "fp_accuracy", "ptq_accuracy", *stale, "s/run"], title="Per arm: means over seeds"),
          sw.print_table(qd.drift_rows(drift), {"model": "model", "bits": "bits", "range": "range", "arm": "arm", "n": "n",
                                                "fp_continuation": "|w_T − θ_fp| FP cont.", "deployed": "|Q(w_T) − θ_fp|",
                                                "latent": "|w_T − θ_fp|", "diff": "Δ deployed − FP cont.", "ci_low": "95% CI low",
                                                "ci_high": "high", "wilcoxon_p": "Wilcoxon p"},
                         title="Distance from θ_fp at the end, paired by seed against the FP continuation (arm D's latent endpoint)")]
    figures(results, opts.out)
    st.finish_sweep(sweep, opts.out, md)
    return {"comparisons": comparisons, "drift": drift, "records": records}


if __name__ == "__main__":
    main(sys.argv[1:])
