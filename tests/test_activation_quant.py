"""Activation fake-quantization (W4A8): hand-computed grids, a fine-grid bound, hooks that never stay, STE derivatives."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from riverscape import Objective
from riverscape.pipeline import build_reference, measure_ptq
from riverscape.quant import QuantMap, UniformQuantizer
from riverscape.quant.ptq import (
    ActivationQuantization,
    activation_hooks,
    calibrate_activations,
    ptq_result,
    setting_name,
    with_activation_quantization,
)
from tests.helpers import assert_close


def _identity_objective(x: torch.Tensor) -> Objective:
    """``y = 1 * x``: the model's output is exactly its (quantized) input."""
    layer = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    return Objective(layer, "mse", (x, torch.zeros_like(x)))


def _mlp_objective(seed: int = 0, n: int = 48):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, Objective(model, "cross_entropy", (x, y)), (x, y)


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_minmax_grid_by_hand():
    x = torch.tensor([[-1.0], [0.0], [0.5], [2.0]], dtype=torch.float64)
    obj = _identity_objective(x)
    qmap = QuantMap(obj, UniformQuantizer(8))
    calib = calibrate_activations(obj, qmap, obj.theta0, ActivationQuantization(3))
    # range [-1, 2], 3 bits: codes 0..7, s = 3/7, z = round(1 / s) = round(2.33) = 2
    qp = calib.qparams["" if "" in calib.qparams else next(iter(calib.qparams))]
    assert calib.ranges[next(iter(calib.ranges))] == (-1.0, 2.0) and calib.n_samples == 4
    assert_close(qp.scale, torch.tensor(3 / 7, dtype=torch.float64), rtol=1e-15, atol=0, what="scale")
    assert float(qp.zero_point) == 2.0 and (qp.qmin, qp.qmax) == (0, 7)
    quantized = with_activation_quantization(obj, calib)
    out = quantized.forward(obj.theta0, x).reshape(-1)
    # codes: clamp(round(x / s) + 2, 0, 7) = [round(-2.33) + 2, 2, round(1.17) + 2, round(4.67) + 2] = [0, 2, 3, 7]
    expected = torch.tensor([0 - 2, 2 - 2, 3 - 2, 7 - 2], dtype=torch.float64) * 3 / 7
    assert_close(out, expected, rtol=1e-15, atol=1e-15, what="Q_a(x)")
    # the loss is the mse of those outputs (exact in float64 up to the sum)
    assert quantized.loss(obj.theta0) == pytest.approx(float((expected**2).mean()), rel=1e-14)
    assert obj.forward(obj.theta0, x).reshape(-1).tolist() == x.reshape(-1).tolist()  # the original is unchanged


def test_percentile_range_ignores_an_outlier_and_mse_is_the_weight_rule():
    x = torch.cat([torch.linspace(-1, 1, 199), torch.tensor([50.0])]).double()[:, None]
    obj = _identity_objective(x)
    qmap = QuantMap(obj, UniformQuantizer(8))
    scale = {r: float(next(iter(calibrate_activations(obj, qmap, obj.theta0, ActivationQuantization(4, range=r, percentile=99.0, calibration_samples=None))
                                .qparams.values())).scale) for r in ("minmax", "percentile", "mse")}
    assert scale["minmax"] == pytest.approx(51 / 15, rel=1e-12)  # min-max covers the outlier: [-1, 50] on 15 steps
    # the 99th percentile of x lies near 1: a step far below min-max's
    assert scale["percentile"] < 0.2 * scale["minmax"]
    # fewer inputs than max_values: the MSE rule sees every input, so its scale is UniformQuantizer's on them
    rule = UniformQuantizer(4, grid="asymmetric", per_channel=False, range="mse").row_qparams(x.T)
    assert scale["mse"] == float(rule.scale) <= scale["minmax"]


def test_a16_changes_the_loss_by_less_than_the_first_order_bound():
    model, obj, (x, y) = _mlp_objective()
    qmap = QuantMap(obj, UniformQuantizer(8))
    calib = calibrate_activations(obj, qmap, obj.theta0, ActivationQuantization(16, calibration_samples=None))
    change = abs(with_activation_quantization(obj, calib).loss(obj.theta0) - obj.loss(obj.theta0))
    # first order: |dL| <= sum_l sum_entries |dL/dx_l| * s_l / 2 (every input lies inside its calibrated range: the
    # rounding error is at most half a step); the second-order remainder is O(s^2) ~ 1e-10 relative, hence the factor 2
    x0 = x.clone().requires_grad_(True)
    x2 = torch.tanh(model[0](x0))  # the input of layer "2"
    grads = torch.autograd.grad(F.cross_entropy(model[2](x2), y), [x0, x2])
    bound = sum(float(g.abs().sum()) * float(calib.qparams[name].scale) / 2 for g, name in zip(grads, ("0", "2")))
    assert 0 < bound < 1e-4
    assert change <= 2 * bound
    a4 = with_activation_quantization(obj, calibrate_activations(obj, qmap, obj.theta0, ActivationQuantization(4)))
    assert abs(a4.loss(obj.theta0) - obj.loss(obj.theta0)) > 10 * change  # a coarse grid does change it


def test_hooks_exist_only_during_forwards_and_are_removed_on_exceptions():
    model, obj, (x, y) = _mlp_objective()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibrate_activations(obj, QuantMap(obj, UniformQuantizer(4)), obj.theta0, ActivationQuantization(8))
    quantized = with_activation_quantization(obj, calib)
    theta = obj.theta0
    quantized.loss(theta), quantized.losses(torch.stack([theta, theta + 0.01])), quantized.grad(theta)
    quantized.hvp(theta, torch.ones_like(theta))
    assert _hooks(quantized.module) == _hooks(obj.module) == _hooks(model) == 0
    seen = []
    with activation_hooks(quantized.module, calib):
        seen.append(_hooks(quantized.module))
    assert seen == [2] and _hooks(quantized.module) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with activation_hooks(quantized.module, calib):
            raise RuntimeError("boom")
    assert _hooks(quantized.module) == 0
    # an exception inside the model's forward (a wrong input width) also leaves no hook behind
    with pytest.raises(RuntimeError):
        quantized.forward(theta, torch.zeros(2, 4, dtype=torch.float64))
    assert _hooks(quantized.module) == 0 and _hooks(model) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no layer"):
        with activation_hooks(nn.Linear(2, 2), calib):
            pass


def test_gradients_and_hessian_are_those_of_the_clipped_ste_surrogate():
    model, obj, (x, y) = _mlp_objective(seed=3, n=24)
    calib = calibrate_activations(obj, QuantMap(obj, UniformQuantizer(4)), obj.theta0, ActivationQuantization(4))
    quantized = with_activation_quantization(obj, calib)
    theta = obj.theta0 + 0.05 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def q(v: torch.Tensor, name: str) -> torch.Tensor:  # by hand: value Q_a(v), derivative 1 inside [lo, hi], 0 outside
        qp = calib.qparams[name]
        s, z = float(qp.scale), float(qp.zero_point)
        hard = s * (torch.clamp(torch.round(v / s) + z, qp.qmin, qp.qmax) - z)
        clipped = torch.clamp(v, s * (qp.qmin - z), s * (qp.qmax - z))
        return clipped + (hard - clipped).detach()

    def surrogate(t: torch.Tensor) -> torch.Tensor:
        p = obj.unflatten(t)
        h = torch.tanh(F.linear(q(x, "0"), p["0.weight"], p["0.bias"]))
        return F.cross_entropy(F.linear(q(h, "2"), p["2.weight"], p["2.bias"]), y)

    # the same float64 operations in the same order: agreement to rounding (1e-12)
    assert quantized.loss(theta) == pytest.approx(float(surrogate(theta)), rel=1e-13)
    assert_close(quantized.grad(theta), torch.func.grad(surrogate)(theta), rtol=1e-12, atol=1e-13, what="STE gradient")
    dense = torch.autograd.functional.hessian(surrogate, theta)
    assert_close(quantized.dense_hessian(theta), 0.5 * (dense + dense.T), rtol=1e-10, atol=1e-12, what="STE Hessian")
    # the surrogate's curvature differs from the weights-only Hessian (the activations are really quantized)
    assert float((quantized.dense_hessian(theta) - obj.dense_hessian(theta)).abs().max()) > 1e-6


def test_ptq_result_measure_ptq_and_names():
    model, obj, data = _mlp_objective()
    result = ptq_result(obj, 4, activations=ActivationQuantization(8))
    assert result.activations is not None and result.activations.layers == ["0", "2"]
    assert ptq_result(obj, 4).activations is None
    assert setting_name(UniformQuantizer(4), ActivationQuantization(8)) == "W4A8"
    assert setting_name(UniformQuantizer(4, group_size=128), ActivationQuantization(8)) == "W4g128A8"
    assert setting_name(UniformQuantizer(4), None) == "W4"
    ref, _ = build_reference(model, "cross_entropy", data, data, quantizer=UniformQuantizer(4))
    qmap = ref.quant_map(UniformQuantizer(4))
    weights = measure_ptq(ref, qmap)
    both = measure_ptq(ref, qmap, activations=ActivationQuantization(6))
    assert weights.metrics["loss_measured"] == "weights-only" and weights.metrics["setting"] == "W4"
    assert both.metrics["loss_measured"] == "weights+activations" and both.metrics["setting"] == "W4A6"
    assert both.metrics["weights_only"]["loss"] == weights.metrics["loss"] != both.metrics["loss"]
    assert torch.equal(both.point, weights.point)
    by_hand = with_activation_quantization(ref.evaluation, calibrate_activations(ref.analysis, qmap, both.point, ActivationQuantization(6)))
    assert both.metrics["loss"] == by_hand.loss(both.point)
    assert set(both.metrics["activations"]["layers"]) == {"0", "2"}


def test_bad_options():
    for kwargs, match in (({"bits": 1}, "bits"), ({"bits": 17}, "bits"), ({"range": "max"}, "range"),
                          ({"calibration_samples": 0}, "calibration_samples"), ({"percentile": 0.0}, "percentile")):
        with pytest.raises(ValueError, match=match):
            ActivationQuantization(**kwargs)
    _, obj, _ = _mlp_objective()
    with pytest.raises(TypeError, match="ActivationQuantization"):
        calibrate_activations(obj, QuantMap(obj, UniformQuantizer(4)), obj.theta0, 8)
    with pytest.raises(TypeError, match="ActivationCalibration"):
        with_activation_quantization(obj, None)
