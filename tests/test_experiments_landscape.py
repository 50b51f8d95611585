"""The PTQ-vs-QAT, river and estimator scripts in --quick mode: they run, write their files and show their claims."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("ptq_vs_qat", "river", "estimators")
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}


def run(name: str, out: Path) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--out", str(out), "--no-progress"]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """The three scripts run concurrently (one thread each) with --quick; returns {name: out_dir}."""
    base = tmp_path_factory.mktemp("landscape_experiments")
    procs = {name: (base / name, run(name, base / name)) for name in SCRIPTS}
    outs = {}
    for name, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} failed:\n{log}"
        outs[name] = out
    return outs


def cells(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["cells"]


def find(records: list[dict], **params) -> dict:
    (match,) = [r["result"] for r in records if all(r["params"].get(k) == v for k, v in params.items())]
    return match


@pytest.mark.slow
def test_ptq_vs_qat_quick(quick_runs):
    out = quick_runs["ptq_vs_qat"]
    records = cells(out)
    for r in records:  # the documented schema the notebook reads
        assert set(r["params"]) == {"model", "bits", "method", "seed"}
        assert {"accuracy", "loss", "top_eigenvalue", "trace"} <= set(r["result"])
    ptq2, qat2 = find(records, bits=2, method="ptq_minmax"), find(records, bits=2, method="qat_ste")
    assert ptq2["accuracy"] < qat2["accuracy"]  # the PTQ cliff vs QAT recovery
    ptq8 = find(records, bits=8, method="ptq_minmax")
    assert ptq2["ratio"] > ptq8["ratio"]  # the quadratic model breaks down at 2 bits, not at 8
    assert abs(ptq8["ratio"] - 1) < 0.1  # inside the basin at 8 bits: measured ~ predicted
    for key in ("hill_fraction", "cosine_to_fp", "random_baseline", "null_mean", "null_sd", "null_z",
                "predicted_loss_increase", "measured_loss_increase"):
        assert ptq2[key] is not None, key
    assert ptq2["cosine_to_fp"] > ptq2["random_baseline"]  # beats the isotropic 1/sqrt(d) baseline
    land = qat2["landscape"]
    assert len(land["fp_loss"]) == len(land["alphas"]) and len(land["fp_loss"][0]) == len(land["betas"])
    for stem in ("accuracy_vs_bits_digits_mlp", "geometry_digits_mlp", "landscape_digits_mlp_2bit"):
        assert (out / f"{stem}.html").stat().st_size > 10_000 and (out / f"{stem}.png").exists()


@pytest.mark.slow
def test_river_quick(quick_runs):
    out = quick_runs["river"]
    records = cells(out)
    assert sorted(r["params"]["seed"] for r in records) == list(range(6))  # the quick run's seeds, paired below
    res = find(records, bits=2, seed=0)
    assert res["qat_loss"] < res["ptq_loss"]  # QAT finds a quantized point far below the PTQ point
    assert res["river_distance_fp"] == pytest.approx(0.0, abs=1e-9)  # theta_fp ends the river
    assert res["river_distance_ptq"] > 0.1 * res["distance_ptq_to_fp"]  # the PTQ point is off the river
    prof = res["river_profile"]
    assert prof["loss"][-1] < prof["loss"][0]  # training goes downhill along the river
    assert prof["quantized_loss"][-1] == pytest.approx(res["ptq_loss"], rel=1e-9)  # Q(gamma(1)) is the PTQ point
    assert (out / "landscape_2bit.png").exists() and (out / "river_profile_2bit.html").exists()
    # QAT's held-out outcomes: T_hit is the first recorded step at or below the threshold, else censored at the end
    hist, outcomes = res["qat_history"], res["qat_outcomes"]
    below = [s for s, v in zip(outcomes["steps"], outcomes["deployed_loss"]) if v <= res["threshold"]]
    assert res["hit"] == bool(below) and res["hit_time"] == (below[0] if below else hist["step"][-1])
    assert res["best_loss"] == min(outcomes["deployed_loss"]) and res["final_loss"] == outcomes["deployed_loss"][-1]
    # every distance has its FP-continuation control, and the summary pairs them by seed over all six seeds
    assert res["distance_fpc_to_fp"] > 0 and res["fpc_loss"] < res["ptq_loss"]
    rows = {r["contrast"]: r for r in json.loads((out / "results.json").read_text())["summary"]["distances"]}
    fpc = rows["QAT deployed − FP continuation"]
    diffs = [r["result"]["distance_qat_to_fp"] - r["result"]["distance_fpc_to_fp"] for r in records]
    assert fpc["n"] == 6 and fpc["diff"] == pytest.approx(sum(diffs) / 6, rel=1e-12)
    assert fpc["ci_low"] <= fpc["diff"] <= fpc["ci_high"]


@pytest.mark.slow
def test_estimators_quick(quick_runs):
    records = cells(quick_runs["estimators"])
    ptq = find(records, model="digits_mlp", bits=2, method="ptq")
    for method in ("ste", "clipped_ste", "lsq", "ewgs", "pege"):
        res = find(records, model="digits_mlp", bits=2, method=method)
        assert res["loss"] < ptq["loss"], method  # every estimator beats PTQ at 2 bits
        assert res["train_loss"] < ptq["train_loss"], method
        assert len(res["alignment"]["cosine_to_fp"]) == len(res["history"]["step"])
    assert (quick_runs["estimators"] / "curves_digits_mlp_2bit.png").exists()


@pytest.mark.slow
def test_resume_recomputes_nothing(quick_runs):
    """A second run on a finished directory reuses every cell and the cached FP model."""
    out = quick_runs["river"]
    before = json.loads((out / "results.json").read_text())
    models = sorted((out / "fp_models").glob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in models]
    proc = run("river", out)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    after = json.loads((out / "results.json").read_text())
    assert [c["seconds"] for c in after["cells"]] == [c["seconds"] for c in before["cells"]]
    assert [c["result"] for c in after["cells"]] == [c["result"] for c in before["cells"]]
    assert [p.stat().st_mtime_ns for p in models] == stamps and models
