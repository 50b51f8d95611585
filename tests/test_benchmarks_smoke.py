"""Smoke test of the benchmark harness (benchmarks/): riverscape only, exact references, < 20 s."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import markdown_table  # noqa: E402
from benchmarks.tasks import TaskConfig, task_eigs, task_slice, task_trace  # noqa: E402
from benchmarks.timing import Row, check_agreement  # noqa: E402
from benchmarks.workloads import mlp_of_size  # noqa: E402


@pytest.fixture(scope="module")
def tiny_workload():
    workload = mlp_of_size(300, samples=32)  # ~300 parameters: the dense float64 Hessian is cheap
    workload.exact = True
    return workload


def test_top5_agrees_with_dense_eigh(tiny_workload):
    cfg = TaskConfig(repeats=1, use_cache=False, with_peers=False)
    rows = task_eigs(tiny_workload, cfg, 5)
    assert [r.tool for r in rows] == ["riverscape hessian_eigs"]
    row = rows[0]
    assert check_agreement(rows) == [] and cfg.failures == []
    # float32 HVPs vs the float64 dense eigh: rounding-limited, observed ~1e-6
    assert row.error is not None and row.error < 1e-4
    assert row.hvps is not None and row.hvps >= 5 and row.seconds > 0
    assert "riverscape hessian_eigs" in markdown_table(rows)


def test_slice_matches_forward_loop_and_contains_centre(tiny_workload):
    cfg = TaskConfig(repeats=1, use_cache=False, with_peers=False, slice_steps=5)
    rows = {r.tool: r for r in task_slice(tiny_workload, cfg)}
    assert cfg.failures == [] and check_agreement(list(rows.values())) == []
    assert rows["riverscape slice_2d"].error <= 1e-5  # float32, same points, different reduction order
    assert rows["forward limit (25 x one forward)"].seconds > 0


def test_trace_rows_fixed_budget_and_early_stopping(tiny_workload):
    cfg = TaskConfig(repeats=1, use_cache=False, with_peers=False)
    rows = {r.tool: r for r in task_trace(tiny_workload, cfg)}
    assert cfg.failures == [] and check_agreement(list(rows.values())) == []
    fixed, adaptive = rows["riverscape hessian_trace"], rows["riverscape hessian_trace (rtol=0.01)"]
    assert fixed.hvps == 100 and adaptive.hvps <= 100  # the budget is a cap for the early-stopping row
    for row in (fixed, adaptive):  # vs the exact dense trace; checked = miss / (2% + 3 stderr) <= 1
        assert row.error is not None and row.checked is not None and row.checked <= 1.0


def test_agreement_check_rejects_a_fast_wrong_answer():
    wrong = Row("w", "top5", "riverscape hessian_eigs", 0.001, error=1e-2, tolerance=1e-6)
    nan = Row("w", "trace", "riverscape hessian_trace", 0.001, error=float("nan"), tolerance=0.02)
    peer = Row("w", "top5", "PyHessian eigenvalues", 1.0, error=1.0)  # peers are reported, not enforced
    assert len(check_agreement([wrong, nan, peer])) == 2
    checked = Row("w", "top5", "riverscape hessian_eigs", 0.001, error=1e-5, tolerance=1e-6, checked=1e-7)
    assert check_agreement([checked]) == []
