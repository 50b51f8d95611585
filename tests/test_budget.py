"""Budgets, the cost model, the preset choice and the per-stage log."""
from __future__ import annotations

import dataclasses

import pytest

from riverscape.analysis_options import AnalyzeOptions
from riverscape.budget import BUDGETS, SKIPPABLE_STAGES, RunShape, Timing, choose_budget, estimate, parse_budget, stage_costs
from riverscape.errors import InputError
from riverscape.stage_log import StageLog, format_seconds

SHAPE = RunShape(n_bits=3, n_layers=20, n_ptq_methods=1, hill_k=10)
TIMING = Timing(gradient=0.02, forward=0.005)


def test_standard_is_exactly_the_defaults_of_earlier_versions():
    """The pinned metrics of the demo model were produced with these numbers; changing them changes every result."""
    resolved = AnalyzeOptions().resolve(BUDGETS["standard"])
    assert (resolved.top_k, resolved.grid_steps, resolved.max_samples, resolved.qat_steps) == (5, 25, 1024, 300)
    standard = BUDGETS["standard"]
    assert (standard.trace_matvecs, standard.density_steps, standard.density_probes, standard.layer_matvecs) == (99, 60, 2, 30)
    assert (standard.max_layers, standard.floor_steps, standard.rtn_matvecs) == (None, 100, 60)


def test_explicit_values_win_and_zero_samples_means_all():
    options = AnalyzeOptions(top_k=7, max_samples=0, budget="quick").resolve(BUDGETS["quick"])
    assert (options.top_k, options.max_samples, options.sample_cap) == (7, 0, None)
    assert options.grid_steps == BUDGETS["quick"].grid_steps and options.budget == "quick"
    assert AnalyzeOptions(skip="qat", qat_steps=50).resolve(BUDGETS["standard"]).qat_steps == 0  # skipping QAT wins


@pytest.mark.parametrize("value, expected", [("quick", "quick"), ("thorough", "thorough"), ("12", 12.0), (7.5, 7.5)])
def test_parse_budget(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("bad", ["fast", "0", "-3", "nan", "inf", True, None])
def test_bad_budgets_are_one_clear_error(bad):
    with pytest.raises(InputError, match="budget must be one of quick, standard, thorough or a positive number of minutes"):
        AnalyzeOptions(budget=bad)


def test_unknown_stage_to_skip_names_the_allowed_ones():
    with pytest.raises(InputError, match="cannot skip 'curvature'; stages that can be skipped: density, layers"):
        AnalyzeOptions(skip=("slices", "curvature"))
    assert AnalyzeOptions(skip=["slices,paths", "slices"]).skip == ("slices", "paths")


def test_presets_are_ordered_by_cost_for_every_stage():
    """quick <= standard <= thorough stage by stage: a bigger preset never does less work."""
    costs = [stage_costs(b, SHAPE) for b in BUDGETS.values()]
    for stage in costs[0]:
        work = [c[stage][0] + c[stage][1] for c in costs]
        assert work == sorted(work), (stage, work)
    totals = [estimate(b, SHAPE, TIMING)["total"] for b in BUDGETS.values()]
    assert totals[0] < totals[1] < totals[2]


def test_estimate_is_linear_in_the_timing_and_skipping_removes_cost():
    base = estimate(BUDGETS["standard"], SHAPE, TIMING)
    doubled = estimate(BUDGETS["standard"], SHAPE, Timing(2 * TIMING.gradient, 2 * TIMING.forward))
    assert doubled["total"] == pytest.approx(2 * base["total"], rel=1e-12)
    skipped = estimate(BUDGETS["standard"], SHAPE, TIMING, skip=("qat", "slices"))
    assert skipped["qat"] == skipped["slices"] == 0.0 and skipped["total"] < base["total"]
    assert set(SKIPPABLE_STAGES) - {"density", "layers"} <= set(base)


def test_per_bit_stages_scale_with_the_number_of_bit_widths():
    one = stage_costs(BUDGETS["standard"], dataclasses.replace(SHAPE, n_bits=1))
    three = stage_costs(BUDGETS["standard"], SHAPE)
    for stage in ("ptq", "curvature_quantized", "damage", "qat", "alignment", "slices", "paths"):
        assert three[stage] == pytest.approx(tuple(3 * x for x in one[stage]))
    assert three["curvature_fp"] == one["curvature_fp"] and three["basin_widths"] == one["basin_widths"]


def test_layer_stage_is_capped_by_the_budget():
    many = dataclasses.replace(SHAPE, n_layers=200)
    quick, standard = stage_costs(BUDGETS["quick"], many), stage_costs(BUDGETS["standard"], many)
    per_layer_quick = quick["layer_curvature"][0] / BUDGETS["quick"].max_layers
    assert quick["layer_curvature"][0] == pytest.approx(per_layer_quick * 8)
    assert standard["layer_curvature"][0] > 10 * quick["layer_curvature"][0]


def test_choose_budget_takes_the_largest_preset_that_fits():
    totals = {name: estimate(b, SHAPE, TIMING)["total"] for name, b in BUDGETS.items()}
    between = (totals["standard"] + totals["thorough"]) / 2 / 60
    chosen, seconds, fits = choose_budget(between, SHAPE, TIMING)
    assert (chosen.name, seconds, fits) == ("standard", totals["standard"], True)
    chosen, seconds, fits = choose_budget(totals["quick"] / 2 / 60, SHAPE, TIMING)
    assert (chosen.name, fits) == ("quick", False)
    assert choose_budget(10 * totals["thorough"] / 60, SHAPE, TIMING)[0].name == "thorough"


def test_stage_log_counts_stages_and_scales_the_time_left_by_the_observed_ratio():
    lines: list[str] = []
    log = StageLog(lines.append, {"a": 10.0, "b": 20.0, "total": 30.0}, {"b": 2})
    log.done("a", 20.0)  # twice as slow as estimated: the 20 s left become about 40 s
    assert lines[-1] == "[1/3] a: 20.0 s (estimated 10.0 s); about 40.0 s left"
    log.done("b", 10.0, "b, 4 bits")  # now on estimate overall (30 s actual for 20 s estimated): 10 s left x 1.5
    assert lines[-1] == "[2/3] b, 4 bits: 10.0 s (estimated 10.0 s); about 15.0 s left"
    log.done("b", 0.0, "b, 2 bits", skipped=True)
    assert lines[-1] == "[3/3] b, 2 bits: skipped; done"
    assert log.timings == {"a": 20.0, "b": 10.0}


def test_a_silent_stage_log_still_keeps_the_timings():
    log = StageLog(None)
    log.done("x", 1.5)
    log.say("nothing printed")
    assert log.timings == {"x": 1.5} and log.seconds_left() is None


@pytest.mark.parametrize("seconds, text", [(0.00034, "0.34 ms"), (0.5, "500 ms"), (12.44, "12.4 s"), (600, "10.0 min"), (7200, "2.0 h")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text
