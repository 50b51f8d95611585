"""Seeds as an axis of the ptq_vs_qat and estimators sweeps: riverscape.stats.summary, riverscape.ptq_qat_claims, the scripts."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from helpers import experiment_script
from riverscape import ptq_qat_claims as claims
from riverscape.stats import holm
from riverscape.stats.summary import (
    by_seed,
    contrast_rows,
    format_interval,
    interval_series,
    seed_band,
    seed_interval,
    summary_rows,
)



def _record(method: str, seed: int, bits: int = 2, model: str = "m", **result) -> dict:
    return {"params": {"model": model, "bits": bits, "method": method, "seed": seed}, "result": result}


def _t_half(values) -> float:
    x = np.asarray(values, dtype=float)
    return float(scipy_stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


# ---------------------------------------------------------------------- aggregation over seeds
def test_summary_rows_give_the_t_interval_and_n_per_metric():
    acc = {"a": [0.5, 0.7, 0.6, 0.8], "b": [0.9, 0.95, 0.85, 0.9]}
    records = [_record(m, s, accuracy=acc[m][s], ratio=None if (m, s) == ("a", 3) else s + 1.0) for s in range(4) for m in acc]
    groups = by_seed(records, ("model", "bits", "method"))
    rows = {r["method"]: r for r in summary_rows(groups, ("model", "bits", "method"), {"accuracy": "accuracy", "r": "ratio",
                                                                                       "acc2": lambda res: 2 * res["accuracy"]})}
    a = rows["a"]
    assert (a["model"], a["bits"], a["n"]) == ("m", 2, 4)
    assert a["accuracy"]["estimate"] == pytest.approx(0.65, rel=1e-12)
    assert a["accuracy"]["low"] == pytest.approx(0.65 - _t_half(acc["a"]), rel=1e-12)
    assert a["accuracy"]["high"] == pytest.approx(0.65 + _t_half(acc["a"]), rel=1e-12)
    assert a["r"]["n"] == 3 and a["r"]["estimate"] == pytest.approx(2.0)  # the undefined ratio of seed 3 is dropped, not counted
    assert a["acc2"]["estimate"] == pytest.approx(1.3, rel=1e-12)  # a metric may be a function of the result
    assert rows["b"]["r"]["n"] == 4
    assert format_interval(a["accuracy"]) == f"0.650 [{0.65 - _t_half(acc['a']):.3f}, {0.65 + _t_half(acc['a']):.3f}] n=4"
    assert format_interval(a["accuracy"], "{:.2f}", show_n=False) == f"0.65 [{0.65 - _t_half(acc['a']):.2f}, {0.65 + _t_half(acc['a']):.2f}]"


def test_one_seed_has_no_interval_and_no_values_no_row_entry():
    single = seed_interval([0.5])
    assert single["n"] == 1 and math.isnan(single["low"]) and format_interval(single) == "0.500 n=1"
    assert seed_interval([None, None]) is None and format_interval(None) is None


def test_by_seed_refuses_records_without_a_seed_and_duplicate_seeds():
    with pytest.raises(ValueError, match="without a seed"):
        by_seed([{"params": {"model": "m"}, "result": {}}], ("model",))
    with pytest.raises(ValueError, match="have seed 0"):
        by_seed([_record("a", 0), _record("a", 0)], ("model", "method"))
    kept = by_seed([_record("a", 0), _record("fp", 0, bits=32)], ("model", "method"), where=lambda p: p["method"] != "fp")
    assert list(kept) == [("m", "a")]


def test_contrast_rows_pair_by_seed_and_holm_adjust_each_metric():
    # arm b is arm a plus a known shift per seed (6 distinct positive differences: exact Wilcoxon p = 2 / 2^6)
    shift = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    base = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2]  # seed-to-seed variation far larger than the shift: cancels in the pairs
    records = [_record("a", s, accuracy=base[s] + shift[s], loss=1.0) for s in range(6)]
    records += [_record("b", s, accuracy=base[s], loss=1.0 + (s % 2) * 0.1) for s in range(6)]
    records += [_record("c", s, accuracy=base[s] - 2 * shift[s], loss=1.0) for s in range(5)]  # one seed fewer
    group = ("model", "bits", "method")
    rows = {(r["a"], r["b"]): r for r in contrast_rows(by_seed(records, group), group, "method", [("a", "b"), ("c", "b"), ("a", "zz")],
                                                          {"accuracy": "accuracy", "loss": "loss"})}
    assert set(rows) == {("a", "b"), ("c", "b")}  # a missing arm is skipped
    ab, cb = rows[("a", "b")], rows[("c", "b")]
    assert ab["n"] == 6 and cb["n"] == 5 and "method" not in ab and ab["model"] == "m"
    assert ab["accuracy"]["estimate"] == pytest.approx(np.mean(shift), rel=1e-9)
    assert 0 < ab["accuracy"]["low"] <= ab["accuracy"]["high"] < 0.1
    assert ab["accuracy"]["wilcoxon_p"] == pytest.approx(2 / 2**6, rel=1e-12)
    assert cb["accuracy"]["wilcoxon_p"] == pytest.approx(2 / 2**5, rel=1e-12)
    expected = holm([ab["accuracy"]["wilcoxon_p"], cb["accuracy"]["wilcoxon_p"]])
    assert [ab["accuracy"]["holm_p"], cb["accuracy"]["holm_p"]] == pytest.approx(list(expected), rel=1e-12)
    assert ab["accuracy"]["holm_p"] == pytest.approx(2 * 2 / 2**6, rel=1e-12)
    assert math.isfinite(cb["loss"]["wilcoxon_p"]) and cb["loss"]["estimate"] == pytest.approx(-0.04)  # seeds 1, 3 differ by -0.1
    with pytest.raises(ValueError, match="arm"):
        contrast_rows({}, ("model",), "method", [], {})


def test_contrast_with_identical_arms_has_no_p_value():
    records = [_record(m, s, accuracy=0.5 + s / 10) for s in range(3) for m in ("a", "b")]
    group = ("model", "bits", "method")
    (row,) = contrast_rows(by_seed(records, group), group, "method", [("a", "b")], {"accuracy": "accuracy"})
    assert row["accuracy"]["estimate"] == 0.0 and math.isnan(row["accuracy"]["wilcoxon_p"]) and math.isnan(row["accuracy"]["holm_p"])


def test_seed_band_and_interval_series():
    series = [[1.0, 2.0, None], [3.0, 4.0, 5.0], [2.0, 3.0, None]]
    mean, half = seed_band(series)
    assert mean.tolist() == pytest.approx([2.0, 3.0, 5.0])
    assert half[0] == pytest.approx(_t_half([1, 3, 2])) and half[1] == pytest.approx(_t_half([2, 4, 3]))
    assert math.isnan(half[2])  # one defined value at that step: no band
    assert seed_band([[1.0, 2.0]])[1] is None
    rows = [{"bits": 4, "y": {"estimate": 1.0, "low": 0.5, "high": 1.5, "n": 3}}, {"bits": 2, "y": {"estimate": 2.0, "low": math.nan, "high": math.nan, "n": 1}},
            {"bits": 3, "y": None}]
    assert interval_series(rows, "bits", "y") == ([2, 4], [2.0, 1.0], [0.0, 0.5])


# ---------------------------------------------------------------------- the claims
def test_damage_ratio_rows_t_interval_and_test_of_r_equal_one():
    ratios = {6: [0.8, 0.85, 0.9], 8: [0.99, 1.0, 1.01]}
    records = [_record("ptq_minmax", s, bits=b, ratio=r[s]) for b, r in ratios.items() for s in range(3)]
    records += [_record("ptq_mse", s, bits=6, ratio=5.0) for s in range(3)] + [_record("ptq_minmax", 3, bits=6, ratio=None)]
    rows = {r["bits"]: r for r in claims.damage_ratio_rows(records)}
    six, eight = rows[6], rows[8]
    assert six["n"] == 3 and six["ratios"] == ratios[6]  # the undefined seed is dropped
    assert six["ratio"]["estimate"] == pytest.approx(0.85) and six["ratio"]["high"] == pytest.approx(0.85 + _t_half(ratios[6]))
    assert six["one_inside"] is False and eight["one_inside"] is True
    # t = (0.85 - 1) / (0.05 / sqrt 3) on 2 degrees of freedom
    assert six["t_p"] == pytest.approx(2 * scipy_stats.t.sf(0.15 / (0.05 / math.sqrt(3)), 2), rel=1e-9)
    assert eight["t_p"] == pytest.approx(1.0)
    assert [six["holm_p"], eight["holm_p"]] == pytest.approx(list(holm([six["t_p"], eight["t_p"]])))
    assert [r["bits"] for r in claims.damage_ratio_rows(records, bits=[6])] == [6]
    assert six["errors"] == [] and six["error"] is None and math.isnan(six["error_holm_p"])  # no damage terms recorded


def test_model_error_stays_meaningful_where_the_ratio_divides_by_nearly_zero():
    # first-order -0.0049 and second-order +0.0049 nearly cancel: predicted 1e-6, measured 7e-4 -> r = 700,
    # yet the model misses by 7e-4 out of terms of size 0.0098: 7 %
    cancel = {"measured_loss_increase": 7e-4, "predicted_loss_increase": 1e-6, "predicted_first_order": -0.0049, "ratio": 700.0}
    assert claims.model_error(cancel) == pytest.approx((7e-4 - 1e-6) / (0.0049 + 0.004901), rel=1e-12)
    assert claims.model_error({"measured_loss_increase": 1.0, "predicted_loss_increase": 0.0, "predicted_first_order": 0.0}) is None
    assert claims.model_error({"ratio": 1.0}) is None
    exact = {"measured_loss_increase": 0.02, "predicted_loss_increase": 0.02, "predicted_first_order": 0.005, "ratio": 1.0}
    off = [dict(exact, measured_loss_increase=0.02 * (1 + e)) for e in (0.1, 0.2, 0.3)]  # measured 10-30 % above, terms sum to 0.02
    records = [_record("ptq_minmax", s, bits=6, **r) for s, r in enumerate([exact, exact, cancel])]
    records += [_record("ptq_minmax", s, bits=2, **r) for s, r in enumerate(off)]
    rows = {r["bits"]: r for r in claims.damage_ratio_rows(records)}
    assert rows[2]["errors"] == pytest.approx([0.1, 0.2, 0.3], rel=1e-9)
    assert rows[2]["error"]["estimate"] == pytest.approx(0.2, rel=1e-9)
    assert rows[2]["error_t_p"] == pytest.approx(2 * scipy_stats.t.sf(0.2 / (0.1 / math.sqrt(3)), 2), rel=1e-9)
    assert rows[6]["ratio"]["estimate"] > 200 and abs(rows[6]["error"]["estimate"]) < 0.03  # r explodes, the error does not


def test_recovery_fraction_per_seed_and_the_paired_difference():
    assert claims.recovery_fraction(0.5, 2.5, 1.0) == pytest.approx(0.75)
    assert claims.recovery_fraction(0.5, 0.4, 0.3) is None  # PTQ did not raise the loss: nothing to recover
    fp, ptq = [0.5, 0.4, 0.6, 0.5], [2.5, 1.4, 2.6, 1.5]
    ste, lsq = [0.5, 0.5, 0.6, 0.75], [0.75, 0.6, 0.5, 0.7]  # per-seed fractions; QAT losses built from them
    records = [_record("fp", s, bits=32, loss=fp[s]) for s in range(4)] + [_record("ptq_minmax", s, loss=ptq[s]) for s in range(4)]
    records += [_record("qat_ste", s, loss=ptq[s] - ste[s] * (ptq[s] - fp[s])) for s in range(4)]
    records += [_record("qat_lsq", s, loss=ptq[s] - lsq[s] * (ptq[s] - fp[s])) for s in range(4)]
    (row,) = claims.recovery_rows(records, bits=2)
    assert row["fractions"]["qat_ste"]["values"] == pytest.approx(ste, rel=1e-9)
    assert row["fractions"]["qat_lsq"]["interval"]["estimate"] == pytest.approx(np.mean(lsq), rel=1e-9)
    assert row["fractions"]["qat_lsq"]["interval"]["low"] == pytest.approx(np.mean(lsq) - _t_half(lsq), rel=1e-9)
    assert row["difference_arms"] == ["qat_lsq", "qat_ste"]
    assert row["difference"]["estimate"] == pytest.approx(np.mean(np.subtract(lsq, ste)), rel=1e-9) and row["difference"]["n"] == 4
    # accuracy: higher is better, (A_QAT - A_PTQ) / (A_FP - A_PTQ)
    acc = [_record("fp", 0, bits=32, accuracy=0.9), _record("ptq_minmax", 0, accuracy=0.3), _record("qat_ste", 0, accuracy=0.6),
           _record("fp", 1, bits=32, accuracy=0.8), _record("ptq_minmax", 1, accuracy=0.4), _record("qat_ste", 1, accuracy=0.7)]
    (row,) = claims.recovery_rows(acc, metric="accuracy", qat=("qat_ste",))
    assert row["fractions"]["qat_ste"]["values"] == pytest.approx([0.5, 0.75]) and "difference" not in row


def test_alignment_z_is_pooled_with_stouffer_and_counted_by_sign():
    records = [_record("ptq_minmax", s, null_z=z, null_draws=50) for s, z in enumerate([1.0, 2.0, 3.0, -0.5])]
    records += [_record("ptq_minmax", s, model="n", null_z=-z, null_draws=50) for s, z in enumerate([1.0, 1.0, 1.0])]
    records += [_record("ptq_minmax", 0, bits=4, null_z=9.0)]
    rows = {r["model"]: r for r in claims.alignment_z_rows(records, bits=2)}
    m, n = rows["m"], rows["n"]
    assert m["n"] == 4 and m["positive"] == 3 and m["stouffer_z"] == pytest.approx(5.5 / 2.0)
    assert m["p_greater"] == pytest.approx(scipy_stats.norm.sf(2.75), rel=1e-9)
    assert m["p_two_sided"] == pytest.approx(2 * scipy_stats.norm.sf(2.75), rel=1e-9)
    assert n["positive"] == 0 and n["stouffer_z"] == pytest.approx(-math.sqrt(3))
    assert n["p_two_sided"] == pytest.approx(2 * scipy_stats.norm.cdf(-math.sqrt(3)), rel=1e-9)
    assert [m["holm_p"], n["holm_p"]] == pytest.approx(list(holm([m["p_two_sided"], n["p_two_sided"]])))
    assert m["null_draws"] == [50] * 4


# ---------------------------------------------------------------------- the scripts
@pytest.mark.parametrize("name", ["ptq_vs_qat", "estimators"])
def test_cells_carry_the_seed_and_put_seeds_outermost(name):
    script = experiment_script(name)
    cfg = {**script.settings(False), "seeds": 3, "quick": False, "seed": 7}
    cells = script.cells(cfg, 7)
    seeds = [c["seed"] for c in cells]
    assert set(seeds) == {7, 8, 9} and seeds == sorted(seeds)  # seeds outer: every cell of seed 7 before any of seed 8
    per_seed = [[{k: v for k, v in c.items() if k != "seed"} for c in cells if c["seed"] == s] for s in (7, 8, 9)]
    assert per_seed[0] == per_seed[1] == per_seed[2] and len(set(map(json.dumps, per_seed[0]))) == len(per_seed[0])


def test_ptq_vs_qat_bits_and_models_options_restrict_the_grid(tmp_path):
    script = experiment_script("ptq_vs_qat")
    opts = script.st.open_sweep("t", "t", script.settings, ["--bits", "2", "6", "--models", "mnist1d_cnn", "--seeds", "2", "--out", str(tmp_path)],
                                arguments=script.arguments, overrides=script.overrides, seeds_help="n")[1]
    assert opts["bits"] == [6, 2] and list(opts["models"]) == ["mnist1d_cnn"] and opts["seeds"] == 2


def _micro_ptq_vs_qat(quick: bool) -> dict:
    return {"models": {"digits_mlp": {"train_steps": 60, "qat_steps": 4, "qat_record_every": 2, "trace_matvecs": 4, "analysis_samples": 128,
                                      "qat_samples": 128, "floor": False}}, "bits": [2], "landscape_bits": [], "seeds": 1}


def _micro_estimators(quick: bool) -> dict:
    return {"models": {"digits_mlp": {"train_steps": 60, "qat_steps": 4, "qat_record_every": 2, "analysis_samples": 128, "qat_samples": 128}},
            "bits": [2], "seeds": 1, "qat_options": {"digits_mlp": {}}}


@pytest.mark.parametrize("name, micro", [("ptq_vs_qat", _micro_ptq_vs_qat), ("estimators", _micro_estimators)])
def test_scripts_run_with_two_seeds_and_store_the_summary(name, micro, tmp_path, capsys):
    script = experiment_script(name)
    script.settings = micro
    out = script.main(["--seeds", "2", "--out", str(tmp_path), "--no-progress"])
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["config"]["seeds"] == 2 and stored["cpu_seconds"] > 0
    assert {c["params"]["seed"] for c in stored["cells"]} == {0, 1}
    assert stored["summary"]["rows"] and all(r["n"] == 2 for r in stored["summary"]["rows"])
    accuracy = {r["method"]: r["accuracy"] for r in stored["summary"]["rows"]}
    for method, interval in accuracy.items():  # the stored interval is the t interval of the stored per-seed accuracies
        values = [c["result"]["accuracy"] for c in stored["cells"] if c["params"]["method"] == method]
        assert interval["n"] == 2 and interval["estimate"] == pytest.approx(np.mean(values), rel=1e-12)
    assert stored["summary"]["contrasts"] and all(c["n"] == 2 for c in stored["summary"]["contrasts"])
    printed = capsys.readouterr().out
    assert "95% t CI" in printed and "[95% BCa]" in printed
    if name == "ptq_vs_qat":
        assert {"damage_ratio", "recovery", "alignment_z"} <= set(stored["summary"])
        (z,) = stored["summary"]["alignment_z"]
        assert z["n"] == 2 and z["null_draws"] == [50, 50] and "Stouffer Z" in printed
    assert len(out["summary"]["rows"]) == len(stored["summary"]["rows"])


def test_more_seeds_on_a_finished_sweep_compute_only_the_new_seeds(tmp_path):
    from riverscape.sweep import ConfigMismatchError, Sweep

    calls = []

    def square(cell):
        calls.append(cell["seed"])
        return {"v": cell["seed"] ** 2}

    Sweep(tmp_path, "demo", {"seeds": 2, "x": 1}, progress=False, axes=("seeds",)).run([{"seed": s} for s in range(2)], square)
    more = Sweep(tmp_path, "demo", {"seeds": 3, "x": 1}, progress=False, axes=("seeds",))
    assert [r["result"]["v"] for r in more.run([{"seed": s} for s in range(3)], square)] == [0, 1, 4]
    assert calls == [0, 1, 2]  # seeds 0 and 1 were reused
    assert json.loads((tmp_path / "results.json").read_text())["config"]["seeds"] == 3
    with pytest.raises(ConfigMismatchError, match="x: stored 1 != requested 2"):  # any other key still has to match
        Sweep(tmp_path, "demo", {"seeds": 3, "x": 2}, progress=False, axes=("seeds",))
    with pytest.raises(ConfigMismatchError, match="seeds"):  # without the axis, the seed count is part of the config
        Sweep(tmp_path, "demo", {"seeds": 4, "x": 1}, progress=False)


def test_docstring_examples_hold():
    import doctest

    from riverscape.stats import summary

    for module in (claims, summary):
        assert doctest.testmod(module, raise_on_error=True).attempted >= 1


def test_holm_families_split_by_a_row_field():
    shift = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    records = [_record("ref1", s, accuracy=0.5) for s in range(6)] + [_record("ref2", s, accuracy=0.4) for s in range(6)]
    records += [_record("x", s, accuracy=0.5 + shift[s]) for s in range(6)] + [_record("y", s, accuracy=0.5 - shift[s]) for s in range(6)]
    group = ("model", "bits", "method")
    pairs = [("x", "ref1"), ("y", "ref1"), ("x", "ref2")]
    one = {(r["a"], r["b"]): r["accuracy"]["holm_p"] for r in contrast_rows(by_seed(records, group), group, "method", pairs, {"accuracy": "accuracy"})}
    split = {(r["a"], r["b"]): r["accuracy"]["holm_p"]
             for r in contrast_rows(by_seed(records, group), group, "method", pairs, {"accuracy": "accuracy"}, holm_by=("b",))}
    p = 2 / 2**6  # every contrast: 6 differences of one sign
    assert one == pytest.approx({k: 3 * p for k in pairs})  # one family of 3
    assert split == pytest.approx({("x", "ref1"): 2 * p, ("y", "ref1"): 2 * p, ("x", "ref2"): p})  # families of 2 and 1


def test_series_figures_mark_points_and_wrap_a_single_panels_legend():
    from riverscape.report.experiment_figures import series_figures

    panels = {"acc": {f"s{i}": ([2, 6], [0.1 * i, 0.2 * i], [0.01, 0.02]) for i in range(6)} | {"one point": ([2], [0.5])}}
    fig, mfig = series_figures(panels, "t", xlabel="bits", markers=True)
    lines = [t for t in fig.data if t.name is not None and t.fill is None]
    assert len(lines) == 7 and all("markers" in t.mode for t in lines)
    assert all(line.get_marker() == "o" for line in mfig.axes[0].get_lines())
    assert len(mfig.legends) == 1
    # one narrow panel: 7 labels in 3 columns (3 rows, room made below the axes), not 6 columns cut off at the figure's edge
    assert mfig.subplotpars.bottom == pytest.approx(0.19 + 0.06 * 3)
    plain, _ = series_figures(panels, "t")
    assert all(t.mode == "lines" for t in plain.data if t.fill is None)
