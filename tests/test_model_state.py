"""The model-state study: training states, one cell's record, its statistics, and a smoke run of the script."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import experiment_script
from riverscape import model_state as mst
from riverscape.stats import mean_ci

# the digits MLP on 256 training rows with a 2-vector hill frame: every state trains and is analysed in about a second
TINY = mst.state_model("digits_mlp", train_samples=256, k=2, trace_matvecs=6)
AXES = ("model", "weight_decay", "lr", "steps", "bits", "range", "seed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model_state_runs")


def test_lengths_are_prefixes_of_one_run(cache):
    """The iterate after 20 steps of a run to 60 is, bit for bit, the end of a run of 20 steps (same init, full batch)."""
    long = mst.load_state(TINY, 0.0, 0.5, 20, [20, 60], 0, cache)
    theta_long = long.reference.theta_fp.clone()
    short = mst.load_state(TINY, 0.0, 0.5, 20, [20], 0, cache)
    assert torch.equal(theta_long, short.reference.theta_fp)
    with pytest.raises(ValueError, match="recorded lengths"):
        mst.load_state(TINY, 0.0, 0.5, 30, [20, 60], 0, cache)


def test_weight_decay_lowers_the_weight_norm(cache):
    """GD with L2 weight decay shrinks the weights relative to the same run without it, seed by seed."""
    for seed in range(3):
        plain = float(mst.load_state(TINY, 0.0, 0.5, 60, [60], seed, cache).reference.theta_fp.norm())
        decayed = float(mst.load_state(TINY, 0.05, 0.5, 60, [60], seed, cache).reference.theta_fp.norm())
        assert decayed < plain


def test_large_learning_rate_keeps_sharpness_near_two_over_lr(cache):
    """Full-batch GD at lr 2 cannot settle where lambda_max (all parameters) is far above 2/lr (edge of stability).

    Tolerance 1.5: at the edge of stability lambda_max oscillates around 2/lr and overshoots it by
    tens of percent (Cohen et al. 2021; 1.17 for seed 0 here), while a wrong scale (a Hessian off by
    a factor 2, the curvature of another point) exceeds it. The small learning rate's states are
    far below their own 2/lr = 10, and the large-lr states are flatter than the small-lr ones.
    """
    for seed in range(3):
        sharp = mst.load_state(TINY, 0.0, 2.0, 200, [200], seed, cache).sharpness()
        assert sharp["eos"] == 1.0
        assert sharp["top_eigenvalue_all"] <= 1.5 * sharp["eos"]
        assert sharp["lr_times_top"] == pytest.approx(2.0 * sharp["top_eigenvalue_all"] / 2.0)
        # the quantized weights' Hessian is a principal submatrix of the full one: lambda_max cannot exceed it (interlacing)
        assert sharp["top_eigenvalue"] <= sharp["top_eigenvalue_all"] * (1 + 1e-6)
        gentle = mst.load_state(TINY, 0.0, 0.2, 200, [200], seed, cache).sharpness()
        assert gentle["top_eigenvalue_all"] < 0.5 * gentle["eos"]


def test_cell_record_carries_the_axes_and_consistent_measurements(cache):
    state = mst.load_state(TINY, 1e-3, 0.5, 60, [20, 60], 1, cache)
    rec = mst.state_cell(state, 2, "mse", n_null=5, floor_steps=3)
    assert {k: rec[k] for k in AXES} == {"model": "digits_mlp", "weight_decay": 1e-3, "lr": 0.5, "steps": 60, "bits": 2, "range": "mse", "seed": 1}
    assert rec["damage_ratio"] == pytest.approx(rec["measured_loss_increase"] / rec["train_loss_fp"], rel=1e-12)
    assert rec["measured_over_predicted"] == pytest.approx(rec["measured_loss_increase"] / rec["predicted_loss_increase"], rel=1e-12)
    assert rec["ptq_train_loss"] == pytest.approx(rec["train_loss_fp"] + rec["measured_loss_increase"], rel=1e-9)
    for name in ("align", "floor"):  # empirical p with 5 draws: (1 + k) / 6
        assert rec[f"{name}_p"] * 6 == pytest.approx(round(rec[f"{name}_p"] * 6)) and 1 / 6 <= rec[f"{name}_p"] <= 1
    assert rec["align_z"] == pytest.approx((rec["align_cosine"] - rec["align_null_mean"]) / rec["align_null_sd"])
    assert rec["weight_norm"] == pytest.approx(float(state.reference.theta_fp.norm()))
    with pytest.raises(ValueError, match="n_null"):
        mst.state_cell(state, 2, "mse", n_null=1)
    json.dumps(rec)  # JSON-friendly


# ---------------------------------------------------------------------- statistics on constructed records
def _records(effect, *, seeds=range(4), noise=0.0) -> list[dict]:
    """Records of a 2 x 2 x 2 state grid: sharpness 1 + wd_index + 2 lr_index + 4 steps_index (+ a seed shift), effect(sharpness)."""
    rng = np.random.default_rng(0)
    out = []
    for s in seeds:
        for i, wd in enumerate((0.0, 1e-3)):
            for j, lr in enumerate((0.1, 1.0)):
                for m, steps in enumerate((10, 100)):
                    sharp = 1.0 + i + 2 * j + 4 * m + 0.1 * s
                    out.append({"model": "m", "bits": 2, "range": "minmax", "weight_decay": wd, "lr": lr, "steps": steps, "seed": s,
                                "top_eigenvalue": sharp, "trace": 10 * sharp, "weight_norm": 5.0 - i + 0.01 * s,
                                **{k: effect(sharp) + noise * rng.standard_normal() for k in mst.EFFECTS}})
    return out


def test_summary_rows_are_t_intervals_over_seeds():
    recs = _records(lambda x: x**2, noise=0.3)
    rows = mst.summary_rows(recs)
    assert len(rows) == 8 and all(r["n"] == 4 for r in rows)
    row = next(r for r in rows if (r["weight_decay"], r["lr"], r["steps"]) == (1e-3, 1.0, 10))
    values = [r["damage_ratio"] for r in recs if (r["weight_decay"], r["lr"], r["steps"]) == (1e-3, 1.0, 10)]
    expected = mean_ci(values, method="t")
    assert (row["damage_ratio"]["estimate"], row["damage_ratio"]["low"], row["damage_ratio"]["high"]) == pytest.approx(
        (expected.estimate, expected.low, expected.high))
    assert row["eos"] == 2.0


def test_spearman_follows_a_monotone_relation():
    up = mst.sharpness_correlations(_records(lambda x: math.log(x)), n_boot=200)
    down = mst.sharpness_correlations(_records(lambda x: -x**3), n_boot=200)
    assert {r["effect"] for r in up} == set(mst.EFFECTS)
    for r in up:
        assert r["rho"] == pytest.approx(1.0) and r["low"] == pytest.approx(1.0) and r["n_states"] == 8 and r["n_seeds"] == 4
        assert r["per_seed"]["estimate"] == pytest.approx(1.0)
    for r in down:
        assert r["rho"] == pytest.approx(-1.0) and r["high"] == pytest.approx(-1.0)
    # pure noise unrelated to sharpness: the bootstrap interval is wide and covers 0
    noise = mst.sharpness_correlations(_records(lambda x: 0.0, noise=1.0, seeds=range(6)), n_boot=500)
    assert all(r["low"] < 0 < r["high"] for r in noise)


def test_vectorised_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, size=(50, 7)).astype(float), rng.standard_normal((50, 7))  # ties in x
    rho = mst._spearman(x, y)
    for i in range(50):
        expected = spearmanr(x[i], y[i]).statistic
        assert (math.isnan(rho[i]) and math.isnan(expected)) or rho[i] == pytest.approx(expected, abs=1e-12)
    assert math.isnan(mst._spearman(np.array([1.0, 2.0, np.nan, 4.0]), np.arange(4.0))[0])


def test_contrasts_average_the_other_axes_and_pair_by_seed():
    rows = mst.state_contrasts(_records(lambda x: 3.0 * x), n_boot=500)
    by = {(r["axis"], r["metric"]): r for r in rows}
    # sharpness = 1 + wd_index + 2 lr_index + 4 steps_index: high minus low is 1, 2, 4 exactly, for every seed
    for axis, step in (("weight_decay", 1.0), ("lr", 2.0), ("steps", 4.0)):
        r = by[(axis, "top_eigenvalue")]
        assert r["difference"]["estimate"] == pytest.approx(step) and r["n"] == 4 and r["n_states"] == 4
        assert by[(axis, "damage_ratio")]["difference"]["estimate"] == pytest.approx(3.0 * step)
    assert by[("weight_decay", "weight_norm")]["difference"]["estimate"] == pytest.approx(-1.0)
    assert by[("lr", "weight_norm")]["difference"]["estimate"] == pytest.approx(0.0, abs=1e-12)
    finite = [r for r in rows if r["holm_p"] is not None]
    assert finite and all(r["holm_p"] >= r["wilcoxon_p"] for r in finite)
    # 4 seeds all of one sign: the smallest two-sided exact Wilcoxon p, 2 / 2^4
    assert by[("steps", "top_eigenvalue")]["wilcoxon_p"] == pytest.approx(0.125)


# ---------------------------------------------------------------------- the script
def _micro(quick: bool) -> dict:
    return {"seeds": 2, "bits": [2], "ranges": ["minmax"], "n_null": 3, "floor_steps": 2,
            "models": {"digits_mlp": {"weight_decays": [0.0, 1e-2], "lrs": [1.0], "lengths": [10, 30],
                                      "overrides": {"train_samples": 128, "k": 2, "trace_matvecs": 6}}}}


def test_script_smoke_run(tmp_path):
    script = experiment_script("model_state")
    script.settings = _micro
    summary = script.main(["--out", str(tmp_path), "--no-progress", "--quick", "--seeds", "2"])
    torch.set_num_threads(1)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["config"]["seeds"] == 2 and stored["config"]["study_models"]["digits_mlp"]["train_samples"] == 128
    assert len(stored["cells"]) == 2 * 2 * 2
    for cell in stored["cells"]:
        assert set(cell["params"]) == set(AXES)
        assert {k: cell["result"][k] for k in AXES} == cell["params"]
    assert {r["axis"] for r in summary["contrasts"]} == {"weight_decay", "steps"}  # one lr: no lr contrast
    assert len(summary["rows"]) == 4 and all(r["n"] == 2 for r in summary["rows"])
    assert (tmp_path / "sharpness_digits_mlp.html").exists() and (tmp_path / "tables.md").exists()
