"""The E6/E7 experiment scripts in --quick mode: they run, write their files and show their claims."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from riverscape import sweep as sw
from riverscape.theory import binary_perceptron as bp
from riverscape.theory import uncertainty as uq

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("ste_dynamics", "binary_ste")


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Both scripts run concurrently (one core each) with --quick; returns {name: out_dir}."""
    base = tmp_path_factory.mktemp("experiments")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    procs = {}
    for name in SCRIPTS:
        out = base / name
        procs[name] = (out, subprocess.Popen([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--out", str(out), "--no-progress"],
                                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = {}
    for name, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} failed:\n{log}"
        outs[name] = out
    return outs


def load(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "results.json").read_text()), json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_ste_dynamics_quick(quick_runs):
    out = quick_runs["ste_dynamics"]
    results, summary = load(out)
    assert results["config"]["quick"] is True and set(results["versions"]) >= {"riverscape", "torch", "python"}
    for name in ("curves", "plateau", "concentration"):
        assert (out / f"{name}.html").stat().st_size > 1_000_000 and (out / f"{name}.png").exists()
    tables = (out / "tables.md").read_text()
    assert "Plateau length" in tables and "95% CI" in tables and "n=2" in tables
    assert results["summary"]["plateau_fits"] == summary["plateau_fits"]  # the statistics are stored with the raw cells
    cells = [c for c in results["cells"] if c["params"]["kind"] == "curve"]
    configs = {r["params"]["range"]: r for r in summary["configs"] if r["params"]["bits"] == 2}
    # the per-seed numbers and their intervals are recomputable from the raw per-seed curves in results.json
    for cell in cells:
        row = next(r for r in summary["configs"] if r["params"] == cell["params"])
        res = cell["result"]
        # JSON stores floats exactly (repr) and NaN as None: compare the recomputation after the same conversion
        assert row["final"] == sw.to_jsonable(uq.replica_summary(uq.replica_final_errors(res["taus"], res["eps"])))
        assert row["plateau"] == sw.to_jsonable(uq.replica_summary(uq.replica_plateaus(res["taus"], res["eps"])))
        assert row["final"]["n"] == results["config"]["replicas"] == len(res["eps"])
        assert row["final"]["estimate"] == pytest.approx(res["final_sim"], abs=1e-12)  # mean of per-seed finals = final of the mean curve
    # claim 1: the STE plateau is longer for a larger quantization range (per-seed mean and PDE)
    for key in (lambda r: r["plateau"]["estimate"], lambda r: r["plateau_pde"]):
        assert key(configs[0.5]) < key(configs[1.0]) < key(configs[1.5])
    fit = next(f for f in summary["plateau_fits"] if f["bits"] == 2)
    slope = fit["slope_seeds"]
    assert slope["n"] == 2 and slope["low"] <= slope["estimate"] <= slope["high"] and slope["estimate"] > 0
    # claim 2: the final error is the dithering fixed point (0.25 at R = 1.5), not rounding (0.125)
    assert configs[1.5]["final"]["estimate"] == pytest.approx(configs[1.5]["dithering"], abs=0.04)
    assert configs[1.5]["final_pde"] == pytest.approx(0.25, abs=0.01)
    assert configs[1.0]["final"]["low"] == configs[1.0]["final"]["high"] == 0.0  # every seed sits exactly on w*: zero width
    assert all(abs(r["pde_mass_error"]) < 1e-9 for r in configs.values())
    # claim 3: trajectories concentrate: spread over seeds shrinks with d (~ d^-1/2), with an interval
    spread = [row["spread_rms"]["estimate"] for row in summary["concentration"]]
    assert spread[-1] < spread[0] and summary["spread_exponent"] < -0.25
    ci = summary["spread_exponent_ci"]
    assert ci["low"] <= ci["high"] and ci["n"] == sum(results["config"]["concentration"]["replicas"]) and ci["valid"] > 0.9 * ci["n_boot"]


@pytest.mark.slow
def test_binary_ste_quick(quick_runs):
    out = quick_runs["binary_ste"]
    results, summary = load(out)
    cfg = results["config"]
    for name in ("error_vs_alpha", "samples_vs_dim", "recurrence"):
        assert (out / f"{name}.html").exists() and (out / f"{name}.png").exists()
    assert "95% CI" in (out / "tables.md").read_text()
    rows = summary["table"]
    for d, r in zip(cfg["dims"], cfg["replicas"]):
        err = np.array([row["err_bin"]["estimate"] for row in rows if row["dim"] == d])
        err_fp = np.array([row["err_fp"]["estimate"] for row in rows if row["dim"] == d])
        assert all(row["err_bin"]["n"] == row["p_exact"]["n"] == r for row in rows if row["dim"] == d)
        # claim: binary-STE error falls with alpha (allow one non-monotone step from seed noise)
        assert err[-1] < err[0] and (np.diff(err) <= 0.02).all()
        assert err_fp[-1] < err_fp[0]
    # the 1-bit prior pays off at large alpha: exact recovery at the largest alpha for the smallest d
    assert next(r for r in reversed(rows) if r["dim"] == cfg["dims"][0])["p_exact"]["estimate"] >= 0.5
    fits = {f["target"]: f for f in summary["fits"]}
    assert len(fits) == 4 and any(t.startswith("binary - FP") for t in fits)
    for target, f in fits.items():
        if not target.startswith("binary - FP") and f["exponent"]["estimate"] is not None:
            assert f["exponent"]["estimate"] > 0.5  # more samples for larger d
    # the intervals are recomputable from the per-replica values stored in results.json
    records = [c for c in results["cells"] if c["params"]["kind"] == "alpha"]
    replicas = [[np.column_stack([next(c["result"][k] for c in records if c["params"]["dim"] == d and c["params"]["alpha"] == a
                                       and c["params"]["student"] == s) for s, k in (("binary", "error"), ("full_precision", "error"), ("binary", "exact"))])
                 .astype(float) for a in cfg["alphas"]] for d in cfg["dims"]]
    again = bp.sample_complexity(cfg["dims"], cfg["alphas"], replicas, target_error=cfg["target_error"], seed=cfg["seed"])
    assert [sw.to_jsonable(e["exponent"].to_dict()) for e in again["exponents"]] == [f["exponent"] for f in summary["fits"]]
    noise = {r["label_noise"]: r for r in summary["recurrence"]}
    assert noise[0.0]["time_at_zero_summary"]["estimate"] == 1.0 and 0.0 < noise[0.05]["time_at_zero_summary"]["estimate"] < 1.0  # returns and escapes
    assert len(noise[0.05]["returns"]) == noise[0.05]["returns_summary"]["n"] == cfg["noise"]["replicas"]
