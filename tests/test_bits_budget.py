"""``riverscape analyze --bits-budget B``: a mixed-precision plan in the analysis, metrics.json and the report."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math

import pytest
import torch

from helpers import digits_mlp_checkpoint

from riverscape import cli
from riverscape.analysis_options import MIXED_PRECISION_BITS, AnalyzeOptions
from riverscape.errors import InputError


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One small in-process ``riverscape analyze --bits-budget 3`` of a digits MLP checkpoint: exit code, stderr, metrics, report."""
    folder = tmp_path_factory.mktemp("bits_budget")
    ckpt = folder / "ckpt.pt"
    digits_mlp_checkpoint(ckpt, steps=60)
    out = folder / "report"
    args = ["analyze", str(ckpt), "--bits", "2", "--budget", "quick", "--skip", "slices,density,paths,alignment,damage", "--qat-steps", "0",
            "--max-samples", "128", "--top-k", "2", "--bits-budget", "3", "--out", str(out)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(args)
    torch.set_num_threads(1)
    return code, err.getvalue(), json.loads((out / "metrics.json").read_text()), (out / "report.html").read_text()


def test_plan_meets_the_budget_and_is_the_best_allocation_of_its_own_scores(finished):
    code, _, metrics, _ = finished
    assert code == 0
    mp = metrics["mixed_precision"]
    assert mp["budget_bits"] == 3.0 and mp["candidate_bits"] == list(MIXED_PRECISION_BITS)
    plan, sizes = mp["plan"], mp["plan"]["sizes"]
    assert set(plan["bits"]) == set(metrics["quantized_layers"]) == {"1.weight", "3.weight"}
    total = sum(sizes.values())
    assert sizes == {"1.weight": 64 * 32, "3.weight": 32 * 10}
    average = sum(sizes[n] * b for n, b in plan["bits"].items()) / total
    assert average == pytest.approx(plan["average_bits"], abs=1e-12) and average <= 3.0
    # brute force over all 4^2 allocations: the plan minimises the summed second-order damage within the budget
    table = {row["name"]: dict(zip(row["bits"], row["second_order"])) for row in mp["sensitivities"]["layers"]}
    feasible = [dict(zip(table, combo)) for combo in itertools.product(MIXED_PRECISION_BITS, repeat=len(table))
                if sum(sizes[n] * b for n, b in zip(table, combo)) <= 3.0 * total]
    best = min(sum(table[n][b] for n, b in alloc.items()) for alloc in feasible)
    assert plan["predicted_damage"] == pytest.approx(best, rel=1e-12)
    check = mp["verification"]
    assert len(check["random_losses"]) == 8 and all(a <= 3.0 for a in check["random_average_bits"])
    assert check["hawq_plan"]["average_bits"] <= 3.0
    assert all(math.isfinite(v) for v in (check["loss_fp"], check["loss_plan"], check["loss_hawq"]))
    # the FP loss is the analysis-set loss at the checkpoint (128 samples)
    assert check["loss_fp"] == pytest.approx(metrics["fp"]["train_loss"], rel=1e-6)


def test_cli_prints_one_plan_line_and_the_report_carries_the_tables(finished):
    _, err, metrics, html = finished
    lines = [line for line in err.splitlines() if "mixed precision" in line]
    assert len(lines) == 1
    plan = metrics["mixed_precision"]["plan"]
    assert all(f"{n}={b}" in lines[0] for n, b in plan["bits"].items())
    assert "Mixed precision under 3 bits" in html and "HAWQ-V2 plan" in html and "random allocations" in html
    assert metrics["run"]["options"]["bits_budget"] == 3.0


@pytest.mark.parametrize("value", [1.5, 9, float("nan"), True, "3"])
def test_bad_bits_budget_is_an_input_error(value):
    with pytest.raises(InputError, match="bits_budget"):
        AnalyzeOptions(bits_budget=value)


def test_bits_budget_is_stored_as_float_and_defaults_to_none():
    assert AnalyzeOptions().bits_budget is None
    assert AnalyzeOptions(bits_budget=3).bits_budget == 3.0 and isinstance(AnalyzeOptions(bits_budget=3).bits_budget, float)


def test_cli_rejects_a_budget_below_the_smallest_candidate(tmp_path, capsys):
    code = cli.main(["analyze", str(tmp_path / "missing.pt"), "--bits-budget", "1", "--out", str(tmp_path / "out")])
    assert code == 2 and "bits_budget must be a number from 2 to 8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
