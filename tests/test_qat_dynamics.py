"""The QAT-dynamics experiment: a micro run of the script, its records, and comparisons paired by seed."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import riverscape as rs
from riverscape import qat_dynamics as qd
from riverscape.gradients import floor_alignment, gradient_point
from riverscape.pipeline import hitting
from riverscape.quant import QuantMap, UniformQuantizer
from riverscape.sweep import to_jsonable

from helpers import experiment_script, tiny_mlp

RESULT_FIELDS = {"model", "bits", "range", "arm", "estimator", "seed", "steps", "deployed_loss", "deployed_accuracy", "train_loss",
                 "final_loss", "final_accuracy", "best_loss", "best_step", "best_accuracy", "tolerance", "hit", "hit_time",
                 "threshold", "alignment", "alignment_z", "alignment_point_z", "deployed_distance_to_fp", "latent_distance_to_fp"}


def _micro(quick: bool) -> dict:
    return {"n_null": 4, "floor_steps": 5, "accuracy_drop": 0.01, "seeds": 2, "alignment_fractions": [0.0, 0.5],
            "models": {"digits_mlp": {"train_steps": 300, "train_weight_decay": 1e-4, "qat_batch": 64, "qat_steps": 20,
                                      "qat_record_every": 5}},
            "grid": {"digits_mlp": {"bits": [2], "ranges": ["minmax"]}}}


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    script = experiment_script("qat_dynamics")
    script.settings = _micro
    out = tmp_path_factory.mktemp("qat_dynamics")
    summary = script.main(["--out", str(out), "--no-progress", "--quick", "--seeds", "3"])
    torch.set_num_threads(1)
    return out, summary


def test_micro_run_writes_records_with_raw_series(micro_run):
    out, summary = micro_run
    stored = json.loads((out / "results.json").read_text())
    assert stored["config"]["seeds"] == 3  # --seeds overrides the settings
    records = stored["cells"]
    assert len(records) == 3 * 4
    assert {(r["params"]["arm"], r["params"]["seed"]) for r in records} == {(a, s) for a in qd.ARMS.values() for s in range(3)}
    for rec in records:
        p, r = rec["params"], rec["result"]
        assert set(p) == {"model", "bits", "range", "arm", "seed"}
        assert RESULT_FIELDS <= set(r)
        assert (r["model"], r["bits"], r["range"], r["estimator"], r["seed"]) == (p["model"], p["bits"], p["range"], p["arm"], p["seed"])
        assert r["arm"] == qd.ARM_LABELS[p["arm"]]
        assert r["bn_reestimation"] is None and "stale_bn_deployed_loss" not in r  # no BatchNorm: the reference's own objectives
        n = len(r["steps"])
        assert r["steps"] == list(range(0, 21, 5)) and len(r["deployed_loss"]) == len(r["deployed_accuracy"]) == len(r["train_loss"]) == n
        assert r["final_loss"] == r["deployed_loss"][-1] and r["best_loss"] == min(r["deployed_loss"])
        # hitting: censored runs are kept with the last step; a hit is the first step under the threshold
        below = [s for s, v in zip(r["steps"], r["deployed_loss"]) if v <= r["threshold"]]
        assert r["hit"] == bool(below) and r["hit_time"] == (below[0] if below else r["steps"][-1])
        assert [row["step"] for row in r["alignment"]] == [0, 10]
        for row in r["alignment"]:
            assert row["p_value"] is None or 1 / 5 <= row["p_value"] <= 1  # empirical p with 4 draws: (1 + k) / 5
    # every arm of one seed starts from the same FP model (same tolerance and PTQ point); seeds differ
    tol = {(r["params"]["seed"], r["params"]["arm"]): json.dumps(r["result"]["tolerance"], sort_keys=True) for r in records}
    for s in range(3):
        assert len({tol[(s, a)] for a in qd.ARMS.values()}) == 1
    assert len({tol[(s, "ste")] for s in range(3)}) == 3
    # at step 0 every arm sits at theta_fp: the matched null (seeded by seed and step) is the same for all arms
    for s in range(3):
        nulls = {r["result"]["alignment"][0]["null_mean"] for r in records if r["params"]["seed"] == s}
        assert len(nulls) == 1
    assert stored["summary"]["comparisons"] == to_jsonable(summary["comparisons"])  # NaN (no hits: log-rank p) stored as null
    assert (out / "arms_digits_mlp_2bit_minmax.html").exists() and (out / "tables.md").exists()


def test_comparisons_are_paired_by_seed(micro_run):
    _, summary = micro_run
    results = [r["result"] for r in summary["records"]]
    rows = summary["comparisons"]
    assert [(r["a"], r["b"]) for r in rows] == list(qd.COMPARISONS)
    means = {row["arm"]: row for row in qd.arm_means(results)}  # FP accuracy: the mean over the seeds' FP models
    fp = [r["tolerance"]["fp_accuracy"] for r in results if r["estimator"] == "ste"]
    assert means["A"]["fp_accuracy"] == pytest.approx(float(np.mean(fp)), rel=1e-12) and len(set(fp)) > 1
    by = {(r["estimator"], r["seed"]): r for r in results}
    for row in rows:
        assert row["seeds"] == [0, 1, 2]
        diffs = [by[(row["a"], s)]["final_loss"] - by[(row["b"], s)]["final_loss"] for s in row["seeds"]]
        assert row["final_loss"]["difference"]["estimate"] == pytest.approx(float(np.mean(diffs)), rel=1e-12, abs=1e-15)
        assert row["final_loss"]["n"] == 3
    # order does not matter, a seed missing from one arm drops out of that contrast only
    shuffled = [r for r in results if not (r["estimator"] == "matched_noise" and r["seed"] == 1)]
    random.Random(0).shuffle(shuffled)
    again = {(r["a"], r["b"]): r for r in qd.paired_comparisons(shuffled)}
    assert again[("ste", "matched_noise")]["seeds"] == [0, 2]
    assert again[("ste", "latent")]["final_loss"] == rows[2]["final_loss"]
    diffs = [by[("ste", s)]["final_loss"] - by[("matched_noise", s)]["final_loss"] for s in (0, 2)]
    assert again[("ste", "matched_noise")]["final_loss"]["difference"]["estimate"] == pytest.approx(float(np.mean(diffs)), rel=1e-12)


def test_drift_is_paired_against_the_fp_continuation(micro_run):
    out, summary = micro_run
    results = [r["result"] for r in summary["records"]]
    by = {(r["estimator"], r["seed"]): r for r in results}
    rows = qd.drift_comparisons(results)
    assert [r["estimator"] for r in rows] == list(qd.ARMS.values())
    for row in rows:
        fp = [by[(qd.FP_CONTINUATION, s)]["latent_distance_to_fp"] for s in row["seeds"]]
        for kind in ("deployed", "latent"):
            diffs = [by[(row["estimator"], s)][f"{kind}_distance_to_fp"] - f for s, f in zip(row["seeds"], fp)]
            assert row[kind]["difference"]["estimate"] == pytest.approx(float(np.mean(diffs)), rel=1e-12, abs=1e-15)
            assert row[kind]["n"] == 3
    for r in results:  # every run moved (20 Adam steps), and Q(w_T) is off the latent point by the rounding
        assert r["latent_distance_to_fp"] > 0 and r["deployed_distance_to_fp"] > 0
    # arm D's latent row is the control against itself: every paired difference is exactly 0
    control = next(r for r in rows if r["estimator"] == qd.FP_CONTINUATION)
    assert control["latent"]["difference"]["estimate"] == 0.0
    assert json.loads((out / "results.json").read_text())["summary"]["drift"] == to_jsonable(summary["drift"])
    assert len(qd.drift_comparisons([r for r in results if r["estimator"] != qd.FP_CONTINUATION])) == 0  # no control, no rows


def test_tables_only_summarises_a_partial_run_without_running_cells(micro_run, tmp_path):
    """An interrupted sweep: its stored cells give the tables; nothing is computed (seed 2 stays missing)."""
    out, summary = micro_run
    stored = json.loads((out / "results.json").read_text())
    stored["cells"] = [c for c in stored["cells"] if c["params"]["seed"] < 2]
    (tmp_path / "results.json").write_text(json.dumps(stored))
    script = experiment_script("qat_dynamics")
    script.settings = _micro
    partial = script.main(["--out", str(tmp_path), "--no-progress", "--quick", "--seeds", "3", "--tables-only"])
    torch.set_num_threads(1)
    assert len(partial["records"]) == 8 and len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 8
    assert [row["seeds"] for row in partial["comparisons"]] == [[0, 1]] * 3
    full = {(r["a"], r["b"]): r for r in summary["comparisons"]}
    by = {(r["result"]["estimator"], r["result"]["seed"]): r["result"] for r in summary["records"]}
    for row in partial["comparisons"]:
        diffs = [by[(row["a"], s)]["final_loss"] - by[(row["b"], s)]["final_loss"] for s in (0, 1)]
        assert row["final_loss"]["difference"]["estimate"] == pytest.approx(float(np.mean(diffs)), rel=1e-12)
        assert full[(row["a"], row["b"])]["final_loss"]["n"] == 3
    assert "| digits_mlp |" in (tmp_path / "tables.md").read_text()


# ---------------------------------------------------------------------- the measurements
def test_gradient_points_and_hitting(classification_data):
    obj = rs.Objective(tiny_mlp(), "cross_entropy", classification_data)
    qmap = QuantMap(obj, UniformQuantizer(2))
    w = obj.theta0 + 0.01
    qp = qmap.qparams(obj.theta0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(gradient_point(qmap, w, qp, "ste", gen), qmap(w, qp))
    assert torch.equal(gradient_point(qmap, w, qp, "latent", gen), w)
    noisy = gradient_point(qmap, w, qp, "matched_noise", gen)
    torch.testing.assert_close((noisy - w).abs(), (qmap(w, qp) - w).abs(), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="unknown arm"):
        gradient_point(qmap, w, qp, "lsq", gen)
    assert hitting([0, 5, 10], [3.0, 1.0, 0.5], 1.0).to_dict() == {"hit": True, "time": 5, "threshold": 1.0}
    assert hitting([0, 5, 10], [3.0, 2.0, 1.5], 1.0).to_dict() == {"hit": False, "time": 10, "threshold": 1.0}


def test_floor_alignment_observed_and_null_by_hand(classification_data):
    """The fixed direction is F - Q(w); the null draws matched-noise points from the generator, then the arm draws its point."""
    obj = rs.Objective(tiny_mlp(), "cross_entropy", classification_data)
    qmap = QuantMap(obj, UniformQuantizer(2))
    qp = qmap.qparams(obj.theta0)
    vectors = torch.linalg.qr(torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    res = floor_alignment(obj, qmap, obj.theta0, qp, vectors, arm="stochastic_rounding", n_null=6, floor_steps=20,
                          generator=torch.Generator().manual_seed(9))
    from riverscape.gradients import valley_floor

    deployed = qmap(obj.theta0, qp)
    floor = valley_floor(obj, deployed, vectors, steps=20).point
    gen = torch.Generator().manual_seed(9)
    nulls = []
    for _ in range(6):  # the null is drawn first
        p = gradient_point(qmap, obj.theta0, qp, "matched_noise", gen)
        gn = obj.grad(p)
        nulls.append(float(-gn @ (floor - deployed) / (gn.norm() * (floor - deployed).norm())))
    point = gradient_point(qmap, obj.theta0, qp, "stochastic_rounding", gen)
    g = obj.grad(point)
    expected = float(-g @ (floor - deployed) / (g.norm() * (floor - deployed).norm()))
    assert res.fixed.observed == pytest.approx(expected, rel=1e-10)
    assert res.fixed.draws == pytest.approx(nulls, rel=1e-10)
    assert res.fixed.p_value == (1 + sum(n >= expected for n in nulls)) / 7
    assert res.fixed.z == pytest.approx((expected - np.mean(nulls)) / np.std(nulls, ddof=1), rel=1e-9)


def test_accuracy_tolerance_is_the_loss_increase_at_the_first_one_point_drop(classification_data):
    """Checked point by point with loss_and_metric (the function evaluates the line in one batched pass)."""
    from riverscape.pipeline import LINE_POINTS, accuracy_tolerance, build_reference
    from riverscape.quant import ptq

    x, y = classification_data
    ref, _ = build_reference(tiny_mlp(), "cross_entropy", (x, y), (x, y), quantizer=UniformQuantizer(2))
    qmap = ref.quant_map(UniformQuantizer(2))
    tol = accuracy_tolerance(ref, qmap, drop=0.05)  # 23 samples: one sample is 4.3 points
    fp, direction = ref.theta_fp, ptq(ref.analysis, qmap) - ref.theta_fp
    points = [ref.evaluation.loss_and_metric(fp + t * direction) for t in LINE_POINTS]
    first = next(i for i, (_, acc) in enumerate(points) if acc <= points[0][1] - 0.05)
    assert tol.t_star == LINE_POINTS[first]
    # float64 model: batched (vmap) and single evaluations agree to rounding
    assert tol.tau == pytest.approx(points[first][0] - points[0][0], rel=1e-9, abs=1e-12)
    assert (tol.ptq_loss, tol.ptq_accuracy) == pytest.approx(points[LINE_POINTS.index(1.0)], rel=1e-9)
    with pytest.raises(ValueError, match="drop"):
        accuracy_tolerance(ref, qmap, drop=0.0)


def test_module_doctests():
    import doctest
    import importlib

    for name in ("riverscape.qat_dynamics", "riverscape.pipeline.dynamics"):
        result = doctest.testmod(importlib.import_module(name), raise_on_error=True)
        assert result.attempted >= 1, name
