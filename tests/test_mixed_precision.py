"""Mixed precision: sensitivities against a dense Hessian, the knapsack against brute force, the verification."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from riverscape import Objective
from riverscape.quant import QuantMap, UniformQuantizer
from riverscape.quant.mixed_precision import layer_sensitivities, plan_bits, verify_plan
from tests.helpers import assert_close, tiny_mlp


def _objective() -> Objective:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    return Objective(tiny_mlp(3), "cross_entropy", (x, y))


def test_sensitivities_equal_a_dense_hessian_computation():
    obj = _objective()
    theta = obj.theta0
    sens = layer_sensitivities(obj, UniformQuantizer(4), bits=(2, 3, 8))
    hessian = obj.dense_hessian(theta)
    layers = {t.name: t.spec.slice for t in QuantMap(obj, UniformQuantizer(2)).targets}
    assert [s.name for s in sens.layers] == ["0.weight", "2.weight"] and sens.bits == (2, 3, 8)
    for row in sens.layers:
        sl = layers[row.name]
        w = theta[sl].view(obj.unflatten(theta)[row.name].shape)
        block = hessian[sl, sl]
        for j, b in enumerate(row.bits):
            u = (UniformQuantizer(b)(w) - w).reshape(-1)  # per-channel symmetric RTN of this layer alone
            # float64: HVP vs dense Hessian differ by rounding of ~D-term sums -> 1e-10 relative
            assert_close(row.second_order[j], 0.5 * u @ block @ u, rtol=1e-10, atol=1e-14, what=f"{row.name} {b} bits")
            assert_close(row.quant_error[j], u @ u, rtol=1e-12, what="||u||^2")
            assert_close(row.hawq[j], torch.trace(block) / u.numel() * (u @ u), rtol=1e-10, atol=1e-14, what="hawq")
        assert row.trace_method == "exact" and row.trace_stderr == 0.0  # 20 and 12 weights <= 100 probes
    assert json.dumps(sens.to_dict())


def _brute_force(table, sizes, budget):
    names = list(table)
    best = None
    for combo in itertools.product(*[sorted(table[n]) for n in names]):
        if sum(sizes[n] * b for n, b in zip(names, combo)) <= budget * sum(sizes.values()) + 1e-9:
            damage = sum(table[n][b] for n, b in zip(names, combo))
            if best is None or damage < best:
                best = damage
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    sizes = {f"l{i}": int(rng.integers(1, 200)) for i in range(4)}
    bit_choices = (2, 4, 8)
    # random damages (not monotone in bits, to exercise the search, not just a greedy rule)
    table = {n: {b: float(rng.exponential()) for b in bit_choices} for n in sizes}
    for budget in (2.0, 2.7, 3.3, 4.0, 5.5, 8.0):
        plan = plan_bits(table, sizes, budget)
        assert plan.method == "dp-exact"
        assert plan.average_bits <= budget + 1e-12
        assert sum(sizes[n] * b for n, b in plan.bits.items()) <= budget * sum(sizes.values())
        assert plan.predicted_damage == pytest.approx(_brute_force(table, sizes, budget), rel=1e-12)
        assert plan.predicted_damage == pytest.approx(sum(table[n][b] for n, b in plan.bits.items()), rel=1e-12)


def test_rounded_plan_still_meets_the_budget():
    rng = np.random.default_rng(11)
    sizes = {f"l{i}": int(rng.integers(1000, 5000)) * 7 + 1 for i in range(5)}  # gcd 1: many states
    table = {n: {2: 10.0 / (i + 1), 3: 3.0 / (i + 1), 4: 1.0 / (i + 1), 8: 0.01} for i, n in enumerate(sizes)}
    for budget in (2.5, 3.1, 4.7):
        exact = plan_bits(table, sizes, budget)
        rounded = plan_bits(table, sizes, budget, max_states=50)
        assert exact.method == "dp-exact" and rounded.method == "dp-rounded"
        assert rounded.average_bits <= budget and exact.average_bits <= budget
        assert exact.predicted_damage <= rounded.predicted_damage + 1e-12


def test_budget_met_exactly_and_bad_input():
    sizes = {"a": 10, "b": 30}
    table = {"a": {2: 5.0, 4: 1.0}, "b": {2: 0.5, 4: 0.1}}
    plan = plan_bits(table, sizes, 2.5)
    assert plan.bits == {"a": 4, "b": 2} and plan.average_bits == 2.5  # the budget is used exactly
    assert plan_bits(table, sizes, 4.0).bits == {"a": 4, "b": 4}
    # 2.3 * 10 = 22.999999999999996 in floats: the budget of 23 bits must still be usable
    decimal = plan_bits({"a": {2: 1.0, 3: 0.0}, "b": {2: 1.0, 3: 0.0}}, {"a": 3, "b": 7}, 2.3)
    assert decimal.bits == {"a": 3, "b": 2} and decimal.average_bits == 2.3
    with pytest.raises(ValueError, match="below the smallest achievable"):
        plan_bits(table, sizes, 1.9)
    with pytest.raises(ValueError, match="sizes are required"):
        plan_bits(table, None, 3.0)
    with pytest.raises(ValueError, match="no size"):
        plan_bits(table, {"a": 10}, 3.0)
    with pytest.raises(ValueError, match="finite"):
        plan_bits({"a": {2: float("nan")}}, {"a": 1}, 3.0)


def test_verify_plan_measures_the_mixed_points():
    obj = _objective()
    sens = layer_sensitivities(obj, 4, bits=(2, 3, 4))
    plan = plan_bits(sens, budget_bits=3.0)
    assert plan.kind == "second_order" and plan.average_bits <= 3.0
    check = verify_plan(obj, plan, sens, 4, n_random=5, seed=1)
    # the plan's point built by hand: each layer RTN at its own bit-width
    theta = obj.theta0
    by_hand = theta.clone()
    for t in QuantMap(obj, UniformQuantizer(2)).targets:
        by_hand[t.spec.slice] = QuantMap(obj, UniformQuantizer(plan.bits[t.name]))(theta)[t.spec.slice]
    assert check.loss_plan == pytest.approx(obj.loss(by_hand), rel=1e-12)
    assert check.loss_fp == pytest.approx(obj.loss(theta), rel=1e-12)
    assert check.hawq_plan.kind == "hawq" and check.hawq_plan.average_bits <= 3.0
    assert len(check.random_losses) == 5 and all(a <= 3.0 for a in check.random_average_bits)
    summary = json.loads(json.dumps(check.to_dict()))
    assert summary["random_mean"] == pytest.approx(float(np.mean(check.random_losses)))
    with pytest.raises(ValueError, match="not the quantized tensors"):
        verify_plan(obj, plan_bits({"x": {2: 1.0}}, {"x": 3}, 2.0), sens, 4)


def test_stochastic_traces_feed_the_hawq_score():
    obj = _objective()
    sens = layer_sensitivities(obj, 4, bits=(2, 4), trace_method="hutchinson", trace_matvecs=9)
    exact = layer_sensitivities(obj, 4, bits=(2, 4))
    for row, ref in zip(sens.layers, exact.layers):
        assert row.trace_method == "hutchinson" and row.trace_stderr > 0  # 20 and 12 weights > 9 probes
        assert row.hawq == tuple(row.trace / row.size * e for e in row.quant_error)
        assert row.second_order == ref.second_order  # the quadratic forms are exact either way
        # Hutchinson with 9 probes: unbiased; 6 standard errors bound it (seeded, so deterministic)
        assert abs(row.trace - ref.trace) <= 6 * row.trace_stderr
