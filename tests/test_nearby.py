"""Nearby grid points: the searches stay on the grid, never go uphill, and find a known better point."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from riverscape import Objective
from riverscape.quant import QuantMap, UniformQuantizer
from riverscape.quant.grid import CoordinateGrid
from riverscape.quant.nearby import best_of_stochastic_rounding, greedy_flip_search
from tests.helpers import tiny_mlp


def _mlp_objective(seed: int = 0) -> tuple[nn.Module, Objective]:
    """A tiny MLP trained briefly (so that quantization damages it) and its Objective."""
    model = tiny_mlp(seed)
    gen = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, Objective(model, "cross_entropy", (x, y))


def _assert_on_grid(qmap: QuantMap, theta: torch.Tensor, point: torch.Tensor) -> None:
    """Quantized coordinates of ``point`` are grid values of the qparams chosen at ``theta``; the rest equal ``theta``."""
    qparams = qmap.qparams(theta)
    assert torch.equal(qmap(point, qparams), point)  # re-rounding a grid point is the identity
    grid = CoordinateGrid.build(qmap, theta)
    codes = grid.codes(point)
    assert codes.dtype == torch.int64 and bool((codes >= grid.qmin).all() and (codes <= grid.qmax).all())
    assert torch.equal(grid.point(point, codes), point)
    assert torch.equal(point[~qmap.mask], theta[~qmap.mask])


@pytest.mark.parametrize("quantizer", [UniformQuantizer(1), UniformQuantizer(2), UniformQuantizer(3, symmetric=False, per_channel=False)])
def test_greedy_search_stays_on_the_grid_and_goes_downhill(quantizer):
    model, obj = _mlp_objective()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    theta0 = obj.theta0.clone()
    qmap = QuantMap(obj, quantizer)
    qparams_before = qmap.qparams(obj.theta0)
    result = greedy_flip_search(obj, qmap, candidates_per_round=6, rounds=8)
    _assert_on_grid(qmap, obj.theta0, result.theta_best)
    for before, after in zip(qparams_before, qmap.qparams(obj.theta0)):
        assert torch.equal(before.scale, after.scale) and torch.equal(before.zero_point, after.zero_point)
    steps = result.trajectory
    assert steps[0] == result.loss_rtn and steps[-1] == result.loss_best
    assert all(b < a for a, b in zip(steps, steps[1:]))  # accepted losses strictly decrease
    assert result.loss_best <= result.loss_rtn
    assert len(steps) >= 2, "a 1- or 2-bit tiny MLP has some improving flip"
    assert 1 <= result.flips <= len(steps) - 1  # one code per accepted flip; a coordinate may move back
    # float64 loss of the same point by another code path (plain forward vs vmap): 1e-12 relative
    assert math.isclose(obj.loss(result.theta_best), result.loss_best, rel_tol=1e-12)
    assert result.curvature == "exact"  # D = 32 <= diagonal_matvecs = 100
    removed = result.damage_removed
    assert math.isclose(removed, (result.loss_rtn - result.loss_best) / (result.loss_rtn - result.loss_fp))
    assert result.to_dict()["damage_removed"] == removed
    for k, v in model.state_dict().items():  # the user's model and the Objective's point are untouched
        assert torch.equal(v, state[k]), k
    assert torch.equal(obj.theta0, theta0)


def _known_flip_problem(d: int = 6, k: int = 2) -> tuple[Objective, QuantMap, torch.Tensor]:
    """Least squares on correlated inputs, loss (1/n) ||X (w - t)||^2 with t = RTN(theta) + one step on
    coordinate ``k``: its unique grid minimiser (loss 0) is one flip away from RTN."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(30, d, generator=gen, dtype=torch.float64)
    x = base + 0.8 * base[:, :1]  # strongly correlated columns: a non-diagonal Hessian
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.2, 0.3, 1.1, -0.6, 2.4]]))  # per-tensor 3-bit: s = 1
    qmap_model = Objective(model, "mse", (x, torch.zeros(30, dtype=torch.float64)))
    qmap = QuantMap(qmap_model, UniformQuantizer(3, per_channel=False))
    t = qmap(qmap_model.theta0).clone()
    t[k] += 1.0  # code 0 -> 1
    obj = Objective(model, "mse", (x, (x @ t).reshape(-1)))
    return obj, QuantMap(obj, UniformQuantizer(3, per_channel=False)), t


def test_greedy_search_finds_the_optimum_one_known_flip_away():
    obj, qmap, target = _known_flip_problem()
    grid = CoordinateGrid.build(qmap, obj.theta0)
    assert torch.equal(grid.scale, torch.ones(6, dtype=torch.float64))
    levels = torch.arange(-3, 4, dtype=torch.float64)
    points = torch.tensor(list(itertools.product(levels.tolist(), repeat=6)), dtype=torch.float64)
    brute = obj.losses(points, chunk_size=4096)
    assert torch.equal(points[int(brute.argmin())], target)  # brute force: the optimum is RTN + one flip
    # one candidate per round: found only if the second-order score ranks the right flip first
    # (for a quadratic the score is the exact loss change)
    result = greedy_flip_search(obj, qmap, candidates_per_round=1, rounds=5)
    assert torch.equal(result.theta_best, target)
    assert result.flips == 1 and result.evaluations == 2
    assert result.loss_best < 1e-25 and result.stop_reason == "no measured move lowers the loss"
    assert result.loss_rtn > 0.1


def test_max_flips_and_start_point():
    obj, qmap, target = _known_flip_problem()
    none = greedy_flip_search(obj, qmap, max_flips=0)
    assert none.stop_reason == "no allowed move" and none.flips == 0 and none.loss_best == none.loss_rtn
    started = greedy_flip_search(obj, qmap, theta_q=target, rounds=3)
    assert torch.equal(started.theta_best, target) and started.flips == 1 and len(started.trajectory) == 1
    with pytest.raises(ValueError, match="not on the grid"):
        greedy_flip_search(obj, qmap, theta_q=target + 0.25)
    with pytest.raises(ValueError, match="candidates_per_round"):
        greedy_flip_search(obj, qmap, candidates_per_round=0)


def test_stochastic_rounding_rounds_up_with_the_fractional_part():
    _, obj = _mlp_objective()
    qmap = QuantMap(obj, UniformQuantizer(4, per_channel=False))
    theta = obj.theta0
    grid = CoordinateGrid.build(qmap, theta)
    n = 20000
    codes = grid.stochastic_codes(theta, n, torch.Generator().manual_seed(0))
    # by hand: per-tensor symmetric 4-bit, s = max|w| / 7 per tensor, u = w / s
    u = torch.cat([theta[t.spec.slice] / (theta[t.spec.slice].abs().max() / 7) for t in qmap.targets])
    floor = torch.floor(u)
    frac = u - floor
    assert bool(((codes == floor.long()) | (codes == floor.long() + 1)).all())
    rate = (codes == floor.long() + 1).double().mean(0)
    # binomial standard error sqrt(p (1 - p) / n); 5 sigma on each of 32 coordinates fails by chance
    # with probability ~32 * 6e-7; +1e-9 absorbs the coordinates with p = 0 or 1 (the range ends)
    bound = 5 * torch.sqrt(frac * (1 - frac) / n) + 1e-9
    assert bool(((rate - frac).abs() <= bound).all()), float(((rate - frac).abs() / bound).max())


def test_one_bit_stochastic_rounding_probability():
    _, obj = _mlp_objective(1)
    qmap = QuantMap(obj, UniformQuantizer(1))
    grid = CoordinateGrid.build(qmap, obj.theta0)
    n = 20000
    codes = grid.stochastic_codes(obj.theta0, n, torch.Generator().manual_seed(1))
    p = torch.clamp((obj.theta0[grid.index] / grid.scale + 1) / 2, 0, 1)  # grid {-s, s}, spacing 2s
    rate = (codes == 1).double().mean(0)
    assert bool((codes.abs() == 1).all())
    assert bool(((rate - p).abs() <= 5 * torch.sqrt(p * (1 - p) / n) + 1e-9).all())


def test_best_of_stochastic_rounding():
    model, obj = _mlp_objective(2)
    qmap = QuantMap(obj, UniformQuantizer(2))
    result = best_of_stochastic_rounding(obj, qmap, n=24, seed=3)
    _assert_on_grid(qmap, obj.theta0, result.theta_best)
    assert len(result.sample_losses) == 24 and result.loss_best == min(result.sample_losses)
    assert math.isclose(obj.loss(result.theta_best), result.loss_best, rel_tol=1e-12)
    rtn_codes = CoordinateGrid.build(qmap, obj.theta0).codes(obj.theta0)
    assert result.flips == int((qmap.codes(result.theta_best, qmap.qparams(obj.theta0)) != rtn_codes).sum())
    again = best_of_stochastic_rounding(obj, qmap, n=24, seed=3)
    assert torch.equal(again.theta_best, result.theta_best)  # seeded
    summary = result.to_dict()
    assert summary["fraction_below_rtn"] == sum(v < result.loss_rtn for v in result.sample_losses) / 24
    with pytest.raises(ValueError, match="n must be"):
        best_of_stochastic_rounding(obj, qmap, n=0)
