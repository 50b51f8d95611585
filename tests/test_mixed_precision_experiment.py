"""experiments/mixed_precision.py on a micro config, and the cell and summaries of riverscape.mixed_precision_study."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import experiment_script
from riverscape import mixed_precision_study as mp
from riverscape import ptq_study as ps
from riverscape import studies as st


def _micro(quick: bool) -> dict:
    return {"models": {"digits_mlp": {"train_steps": 120, "qat_steps": 6, "qat_record_every": 3}}, "budgets": [2.5, 3.0],
            "calibration_samples": 64, "n_random": 5, "trace_matvecs": 8, "seeds": 2}


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    script = experiment_script("mixed_precision")
    script.settings = _micro
    out = tmp_path_factory.mktemp("mixed_precision")
    summary = script.main(["--out", str(out), "--no-progress", "--quick"])
    torch.set_num_threads(1)
    return out, summary


def test_micro_run_writes_every_cell_its_tables_and_figure(micro_run):
    out, summary = micro_run
    records = json.loads((out / "results.json").read_text())["cells"]
    assert sorted((r["params"]["seed"], r["params"]["budget"]) for r in records) == [(0, 2.5), (0, 3.0), (1, 2.5), (1, 3.0)]
    for rec in records:
        r = rec["result"]
        assert r["plan_average_bits"] <= rec["params"]["budget"] + 1e-12 and r["hawq_average_bits"] <= rec["params"]["budget"] + 1e-12
        assert all(a <= rec["params"]["budget"] + 1e-12 for a in r["random_average_bits"]) and len(r["random_losses"]) == 5
        # the best random allocation is picked on the calibration rows, its test loss reported
        best = int(np.argmin(r["random_calibration_losses"]))
        assert r["random_best_index"] == best and r["random_best"] == r["random_losses"][best]
        assert r["random_mean"] == pytest.approx(np.mean(r["random_losses"]), rel=1e-12)
        assert r["uniform_bits"] == math.floor(rec["params"]["budget"]) and r["calibration_samples"] == 64
    assert len(summary["rows"]) == 2 and all(row["n"] == 2 for row in summary["rows"])
    assert len(summary["contrasts"]) == 2 * len(mp.MIXED_CONTRASTS)
    tables = (out / "tables.md").read_text()
    assert "second-order plan - HAWQ-V2 plan" in tables and "Wilcoxon p" in tables
    assert (out / "mixed_precision.html").stat().st_size > 1000 and (out / "mixed_precision.png").exists()


def test_the_cell_measures_each_allocation_on_the_test_split(micro_run):
    """The plan's and the uniform arm's losses recomputed by hand: each layer RTN-MSE at its bits, test loss."""
    out, _ = micro_run
    records = json.loads((out / "results.json").read_text())["cells"]
    rec = next(r for r in records if r["params"] == {"model": "digits_mlp", "budget": 3.0, "seed": 1})
    study = st.load_study(st.study_model("digits_mlp", **_micro(True)["models"]["digits_mlp"]), 1, out / "fp_models")
    theta = study.theta_fp
    point = theta.clone()
    for name, bits in rec["result"]["plan_bits"].items():
        qmap = study.reference.quant_map(ps.method_quantizer("rtn_mse", bits, None))
        block = dict(qmap.per_layer())[name]
        point[block] = qmap(theta)[block]
    # 1e-12: the same float64 losses, evaluated once in a batch of points and once alone
    assert rec["result"]["loss_plan"] == pytest.approx(study.evaluation.loss(point), rel=1e-12)
    uniform = study.reference.quant_map(ps.method_quantizer("rtn_mse", 3, None))(theta)
    assert rec["result"]["loss_uniform"] == pytest.approx(study.evaluation.loss(uniform), rel=1e-12)
    assert rec["result"]["loss_fp"] == pytest.approx(study.evaluation.loss(theta), rel=1e-12)
    with pytest.raises(ValueError, match="floor"):
        mp.mixed_precision_cell(study, 5.0, seed=0)  # floor(5) = 5 is not a candidate of (2, 3, 4, 8)


def test_contrasts_pair_the_arms_by_seed():
    losses = {0: (0.30, 0.35, 0.50, 0.31, 0.40), 1: (0.20, 0.19, 0.45, 0.25, 0.30), 2: (0.50, 0.60, 0.70, 0.40, 0.55)}
    records = [{"params": {"model": "m", "budget": 3.0, "seed": s}, "result": dict(zip(mp.PLAN_ARMS, v), loss_fp=0.1)} for s, v in losses.items()]
    rows = {(c["a"], c["b"]): c for c in mp.mixed_contrasts(records)}
    plan_hawq = rows[("loss_plan", "loss_hawq")]
    assert plan_hawq["n"] == 3 and plan_hawq["wins"] == 2  # seed 1: the plan loses to HAWQ
    assert plan_hawq["difference"]["estimate"] == pytest.approx(np.mean([-0.05, 0.01, -0.10]), rel=1e-12)
    assert rows[("loss_plan", "random_best")]["wins"] == 2
    summary = mp.mixed_summary_rows(records)
    assert summary[0]["loss_plan"]["estimate"] == pytest.approx(1.0 / 3, rel=1e-12) and summary[0]["n"] == 3
    assert mp.mixed_contrasts(records[:1]) == []  # one seed: no paired verdict
