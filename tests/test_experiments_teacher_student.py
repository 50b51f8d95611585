"""The E6/E7 experiment scripts in --quick mode: they run, write their files and show their claims."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
    assert "Plateau length" in (out / "tables.md").read_text()
    curves = {c["params"]["range"]: c["result"] for c in results["cells"] if c["params"]["kind"] == "curve" and c["params"]["bits"] == 2}
    # claim 1: the STE plateau is longer for a larger quantization range (sim and PDE)
    for key in ("plateau_sim", "plateau_pde"):
        assert curves[0.5][key] < curves[1.0][key] < curves[1.5][key]
    # claim 2: the final error is the dithering fixed point (0.25 at R = 1.5), not rounding (0.125)
    assert curves[1.5]["final_sim"] == pytest.approx(curves[1.5]["dithering"], abs=0.04)
    assert curves[1.5]["final_pde"] == pytest.approx(0.25, abs=0.01)
    assert all(abs(c["pde_mass_error"]) < 1e-9 for c in curves.values())
    # claim 3: trajectories concentrate: spread over seeds shrinks with d (~ d^-1/2)
    spread = [row["spread_rms"] for row in summary["concentration"]]
    assert spread[-1] < spread[0] and summary["spread_exponent"] < -0.25


@pytest.mark.slow
def test_binary_ste_quick(quick_runs):
    out = quick_runs["binary_ste"]
    results, summary = load(out)
    for name in ("error_vs_alpha", "samples_vs_dim", "recurrence"):
        assert (out / f"{name}.html").exists() and (out / f"{name}.png").exists()
    rows = summary["table"]
    for d in results["config"]["dims"]:
        err = np.array([r["err_bin"] for r in rows if r["dim"] == d])
        err_fp = np.array([r["err_fp"] for r in rows if r["dim"] == d])
        # claim: binary-STE error falls with alpha (allow one non-monotone step from seed noise)
        assert err[-1] < err[0] and (np.diff(err) <= 0.02).all()
        assert err_fp[-1] < err_fp[0]
    # the 1-bit prior pays off at large alpha: exact recovery at the largest alpha for the smallest d
    assert next(r for r in reversed(rows) if r["dim"] == results["config"]["dims"][0])["p_exact"] >= 0.5
    fits = {f["target"]: f for f in summary["fits"]}
    assert all(f["exponent"] is None or f["exponent"] > 0.5 for f in fits.values())  # more samples for larger d
    noise = {r["label_noise"]: r for r in summary["recurrence"]}
    assert noise[0.0]["time_at_zero"] == 1.0 and 0.0 < noise[0.05]["time_at_zero"] < 1.0  # returns and escapes
