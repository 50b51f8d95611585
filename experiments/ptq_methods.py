"""E12 (docs/experiments.md §8): is the PTQ of "PTQ fails at 2 bits, QAT recovers" strong enough?

The digits MLP and the MNIST-1D CNN (one FP model per seed), bits 4/3/2, per-channel and per-group
(16 input columns: ``W{b}g16``) symmetric grids. Held-out (test split) accuracy and loss of RTN with
min-max and with MSE scales, GPTQ and AdaRound (on the MSE grid), the best nearby grid point (greedy
code flips from RTN-mse searched on a calibration split of the TRAINING data, evaluated on test),
and QAT from theta_fp with STE and LSQ (LSQ per channel only; the study's QAT budget). Every
data-aware method calibrates on the same ``calibration_samples`` training rows drawn with the seed.
Per (model, bits, granularity, method): mean over seeds with a 95 % Student t interval and n;
paired by seed: best PTQ (per seed the PTQ method with the lowest loss on a validation split of the
training data, disjoint from the calibration rows) minus QAT,
QAT-ste minus RTN-minmax, and GPTQ / AdaRound / flips minus RTN-mse (BCa interval, Wilcoxon p).
``--models resnet20_digits32`` (or a comma list with the default ``digits_mlp,mnist1d_cnn``) adds the
CIFAR ResNet-20 (width 8, BatchNorm; ``riverscape.ptq_study.RESNET_STUDY``) on the CIFAR-shaped
digits (``riverscape.data.digits32``); it is not in the default set: on a shared 2-core machine
(load ~18) one seed's FP training took 15-30 min; on the idle machine a cell takes 7-12 s (RTN, GPTQ),
15-30 s (AdaRound), 50-90 s (QAT) and 6-14 min for the flip search at 2 bits, which at 4 bits runs all
its rounds (over 30 min per cell). Every deployed point (PTQ and QAT) is evaluated with BatchNorm running
statistics re-estimated at that point on the calibration split (no effect on the models without
BatchNorm); the cells of a BatchNorm model also record the test numbers with the stale FP
statistics (``stale_bn_accuracy``, ``stale_bn_loss``). ``--methods``, ``--bits`` and ``--group-sizes`` restrict
the grid (e.g. ``--methods rtn_minmax,rtn_mse,gptq,adaround,qat_ste --group-sizes none``).

    python experiments/ptq_methods.py --quick --out /tmp/ptq_methods   # 3 seeds, 240 cells: ~5 min (281 s CPU, one thread)
    python experiments/ptq_methods.py --out runs/ptq_methods            # 10 seeds, longer searches
    python experiments/ptq_methods.py --quick --models resnet20_digits32 --out /tmp/ptq_resnet

results.json: cells ``params = {"model", "bits", "group_size" (None: per channel), "method", "seed"}``,
method ``fp`` (bits 32) or one of ``riverscape.ptq_study.METHODS``; ``result``: the record of
``riverscape.ptq_study.ptq_method_cell`` (``fp``: ``fp_point_cell``); ``summary``: ``rows``
(``ptq_study.summary_rows``) and ``contrasts`` (``ptq_study.paired_contrasts``).
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

from riverscape import ptq_study as ps
from riverscape import studies as st
from riverscape import sweep as sw
from riverscape.report.experiment_figures import series_figures

NAME = "ptq_methods"
LABELS = {"rtn_minmax": "RTN min-max", "rtn_mse": "RTN MSE", "gptq": "GPTQ", "adaround": "AdaRound", "nearby": "greedy flips",
          "best_ptq": "best PTQ (val.)", "qat_ste": "QAT STE", "qat_lsq": "QAT LSQ"}


DEFAULT_MODELS = ("digits_mlp", "mnist1d_cnn")


def settings(quick: bool) -> dict:
    """Every size of the experiment (stored as the sweep's config)."""
    common = {"models": {key: {} for key in DEFAULT_MODELS}, "bits": [4, 3, 2], "group_sizes": [None, 16], "calibration_samples": 256,
              "validation_samples": 1024, "methods": list(ps.METHODS), "bn_reestimate": True}
    if quick:
        return {**common, "seeds": 3, "adaround_iterations": 500, "flip_rounds": 50, "flip_candidates": 16, "flip_matvecs": 50}
    return {**common, "seeds": 10, "adaround_iterations": 2000, "flip_rounds": 300, "flip_candidates": 32, "flip_matvecs": 100}


def specs(cfg: dict) -> dict[str, st.StudyModel]:
    return {key: ps.experiment_model(key, **overrides) for key, overrides in cfg["models"].items()}


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def arguments(parser) -> None:
    parser.add_argument("--models", type=_comma_list, default=None,
                        help=f"comma list of models (default {','.join(DEFAULT_MODELS)}; also {ps.RESNET_STUDY.key})")
    parser.add_argument("--methods", type=_comma_list, default=None, help=f"comma list of methods (default all: {','.join(ps.METHODS)})")
    parser.add_argument("--group-sizes", type=_comma_list, default=None, help="comma list of group sizes, 'none' = per channel (default none,16)")
    parser.add_argument("--bits", type=_comma_list, default=None, help="comma list of bit-widths (default 4,3,2)")


def overrides(opts) -> dict:
    """The settings the options replace (the models' budgets stay those of ``settings``)."""
    out = {}
    if opts.models is not None:
        for key in opts.models:
            ps.experiment_model(key)  # unknown names fail here, before any cell runs
        out["models"] = {key: {} for key in opts.models}
    if opts.methods is not None:
        unknown = [m for m in opts.methods if m not in ps.METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {list(ps.METHODS)}")
        out["methods"] = list(opts.methods)
    if opts.bits is not None:
        out["bits"] = [int(b) for b in opts.bits]
    if opts.group_sizes is not None:
        out["group_sizes"] = [None if g.lower() == "none" else int(g) for g in opts.group_sizes]
    return out


def cells(cfg: dict, seed: int) -> list[dict]:
    """Seeds outer, so an interrupted sweep leaves complete seeds (every method of one FP model)."""
    out = []
    for key in cfg["models"]:
        for i in range(cfg["seeds"]):
            out.append({"model": key, "bits": 32, "group_size": None, "method": "fp", "seed": seed + i})
            out += [{"model": key, "bits": b, "group_size": g, "method": m, "seed": seed + i}
                    for b in cfg["bits"] for g in cfg["group_sizes"] for m in cfg.get("methods", ps.METHODS)
                    if not (m == "qat_lsq" and g is not None)]
    return out


def run_cell(cell: dict, cfg: dict, out_dir, progress: bool) -> dict:
    study = st.load_study(specs(cfg)[cell["model"]], cell["seed"], out_dir / "fp_models", progress=progress)
    if cell["method"] == "fp":
        return ps.fp_point_cell(study)
    return ps.ptq_method_cell(study, cell["bits"], cell["group_size"], cell["method"], seed=cell["seed"],
                              calibration_samples=cfg["calibration_samples"], validation_samples=cfg["validation_samples"],
                              adaround_iterations=cfg["adaround_iterations"],
                              flip_rounds=cfg["flip_rounds"], flip_candidates=cfg["flip_candidates"], flip_matvecs=cfg["flip_matvecs"],
                              bn_reestimate=cfg.get("bn_reestimate", False), progress=progress)


def _fp_rows(records: list[dict]) -> dict[str, dict]:
    fp: dict[str, list[dict]] = {}
    for r in records:
        if r["params"]["method"] == "fp":
            fp.setdefault(r["params"]["model"], []).append(r["result"])
    return {model: {k: ps.seed_interval([res[k] for res in results], 0.95) for k in ("accuracy", "loss")} for model, results in fp.items()}


def tables(rows: list[dict], contrasts: list[dict], fp: dict[str, dict]) -> list[str]:
    md = []
    methods = list(LABELS)
    for metric in ("accuracy", "loss"):
        wide: dict[tuple, dict] = {}
        for r in rows:
            entry = wide.setdefault((r["model"], r["granularity"], r["bits"]), {"model": r["model"], "grid": None, "bits": r["bits"]})
            entry[r["method"]] = ps.format_interval(r[metric])
            if r["short_name"] and r["method"] == "rtn_mse":
                entry["grid"] = r["short_name"]
        ordered = sorted(wide.values(), key=lambda e: (e["model"], e["grid"] or "", -e["bits"]))
        fp_text = "; ".join(f"{m} {ps.format_interval(v[metric])}" for m, v in fp.items())
        md.append(sw.print_table(ordered, {"model": "model", "grid": "grid", "bits": "bits", **{m: LABELS[m] for m in methods}},
                                 title=f"Test {metric}: mean [95% t CI] n=seeds (FP: {fp_text})"))
    crow = [{"model": c["model"], "grid": c["granularity"], "bits": c["bits"], "contrast": f"{c['a']} - {c['b']}", "n": c["n"],
             "acc": ps.format_interval(c["accuracy"]), "acc_p": c["accuracy"]["wilcoxon_p"],
             "loss": ps.format_interval(c["loss"]), "loss_p": c["loss"]["wilcoxon_p"]} for c in contrasts]
    md.append(sw.print_table(crow, {"model": "model", "grid": "granularity", "bits": "bits", "contrast": "a - b", "n": "n",
                                    "acc": "Δ test acc [95% BCa]", "acc_p": "Wilcoxon p", "loss": "Δ test loss [95% BCa]", "loss_p": "Wilcoxon p"},
                             title="Paired by seed (same FP model): a minus b"))
    stale = [{"model": r["model"], "grid": r["granularity"], "bits": r["bits"], "method": LABELS.get(r["method"], r["method"]),
              "acc": ps.format_interval(r["accuracy"]), "stale_acc": ps.format_interval(r["stale_bn_accuracy"]),
              "loss": ps.format_interval(r["loss"]), "stale_loss": ps.format_interval(r["stale_bn_loss"])}
             for r in rows if "stale_bn_accuracy" in r]
    if stale:
        md.append(sw.print_table(stale, {"model": "model", "grid": "granularity", "bits": "bits", "method": "method",
                                         "acc": "test acc (BN re-estimated)", "stale_acc": "test acc (FP statistics)",
                                         "loss": "test loss (BN re-estimated)", "stale_loss": "test loss (FP statistics)"},
                                 title="BatchNorm models: the same points with statistics re-estimated on the calibration split vs the stale FP ones"))
    picks = [{"model": r["model"], "grid": r["granularity"], "bits": r["bits"], "selected": ", ".join(f"{m}×{k}" for m, k in r["selected"].items())}
             for r in rows if r["method"] == "best_ptq"]
    md.append(sw.print_table(picks, ["model", "grid", "bits", "selected"], title="best PTQ: method picked per seed by the loss on the validation split of the training data"))
    return md


def figures(rows: list[dict], out_dir) -> None:
    for model in sorted({r["model"] for r in rows}):
        for metric in ("accuracy", "loss"):
            panels: dict[str, dict] = {}
            for gran in sorted({r["granularity"] for r in rows if r["model"] == model}):
                series = {}
                for method, label in LABELS.items():
                    mine = sorted((r for r in rows if r["model"] == model and r["granularity"] == gran and r["method"] == method), key=lambda r: r["bits"])
                    if mine:
                        ivs = [r[metric] for r in mine]
                        series[label] = ([r["bits"] for r in mine], [iv["estimate"] for iv in ivs],
                                         [0.0 if iv["n"] < 2 else (iv["high"] - iv["low"]) / 2 for iv in ivs])
                panels[f"{gran}: test {metric}"] = series
            fig, mfig = series_figures(panels, f"{model}: PTQ methods vs QAT (mean ± 95% t half-width over seeds)", xlabel="bits",
                                       log_y=[metric == "loss"] * len(panels))
            sw.write_figure(fig, out_dir / f"{metric}_{model}", static=mfig)


def main(argv: list[str] | None = None) -> dict:
    opts, cfg, sweep = st.open_sweep(
        NAME, __doc__.splitlines()[0], settings, argv, models=specs, arguments=arguments, overrides=overrides,
        seeds_help="seeds (FP models) per configuration (default: 3 quick, 10 full)",
    )
    records = sweep.run(cells(cfg, opts.seed), lambda c: run_cell(c, cfg, opts.out, opts.progress))
    rows, contrasts = ps.summary_rows(records), ps.paired_contrasts(records)
    sweep.summary = {"rows": rows, "contrasts": contrasts}
    md = tables(rows, contrasts, _fp_rows(records))
    figures(rows, opts.out)
    st.finish_sweep(sweep, opts.out, md)
    return {"rows": rows, "contrasts": contrasts, "records": records}


if __name__ == "__main__":
    main(sys.argv[1:])
