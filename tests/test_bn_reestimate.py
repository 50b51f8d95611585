"""BatchNorm re-estimation at a point: hand-computed batch statistics, the original Objective untouched."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from riverscape import Objective
from riverscape.quant import QuantMap, UniformQuantizer
from riverscape.quant.bn_reestimate import objective_with_reestimated_bn
from tests.helpers import assert_close, tiny_mlp


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
    ).double().eval()


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased and unbiased variance over batch and spatial positions."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.mean(1)
    centred = flat - mean[:, None]
    n = flat.shape[1]
    return mean, (centred**2).sum(1) / n, (centred**2).sum(1) / (n - 1)


def _reference_stats(params: dict, model: nn.Sequential, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Running (mean, var) of both BatchNorms after a cumulative average over ``batches``, by hand:
    conv -> normalise with the biased batch variance (train mode) -> relu, twice."""
    per_layer = [[], []]
    for x in batches:
        h = x
        for i, (conv, bn) in enumerate([(0, 1), (3, 4)]):
            h = F.conv2d(h, params[f"{conv}.weight"], params.get(f"{conv}.bias"), padding=1)
            mean, var_biased, var_unbiased = _stats(h)
            per_layer[i].append((mean, var_unbiased))
            shape = (1, -1, 1, 1)
            eps = model[bn].eps
            h = (h - mean.view(shape)) / torch.sqrt(var_biased.view(shape) + eps)
            h = torch.relu(h * params[f"{bn}.weight"].view(shape) + params[f"{bn}.bias"].view(shape))
    return [
        (torch.stack([m for m, _ in rows]).mean(0), torch.stack([v for _, v in rows]).mean(0)) for rows in per_layer
    ]


def test_reestimated_statistics_equal_hand_computed_batch_statistics():
    model = _bn_cnn()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    obj = Objective(model, "cross_entropy", (x, y))
    buffers = {k: v.clone() for k, v in obj.module.named_buffers()}
    loss_before = obj.loss(obj.theta0)
    theta_q = QuantMap(obj, UniformQuantizer(2))(obj.theta0)
    new = objective_with_reestimated_bn(obj, theta_q, (x, y), batch_size=6)  # batches of 6 and 4
    assert torch.equal(new.theta0, theta_q)
    params = {k: v.detach() for k, v in new.unflatten(theta_q).items()}
    reference = _reference_stats(params, model, [x[:6], x[6:]])
    # float64, a few hundred operations per statistic: 1e-12 leaves room only for rounding
    for bn, (mean, var) in zip((new.module[1], new.module[4]), reference):
        assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12, what="running mean")
        assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12, what="running var")
        assert bn.momentum == 0.1 and not bn.training
    for k, v in obj.module.named_buffers():  # the original Objective is untouched, bit for bit
        assert torch.equal(v, buffers[k]), k
    assert obj.loss(obj.theta0) == loss_before
    assert new.loss(theta_q) != obj.loss(theta_q)  # the statistics changed the loss at theta_q
    assert new.param_names == obj.param_names and new.layout == obj.layout
    assert new.metric(theta_q) is not None


def test_one_batch_gives_the_exact_statistics_of_the_data():
    model = _bn_cnn()
    x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    obj = Objective(model, "cross_entropy", (x, torch.zeros(8, dtype=torch.long)))
    new = objective_with_reestimated_bn(obj, obj.theta0, (x, torch.zeros(8)))
    captured = []
    handle = new.module[1].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    new.module(x)
    handle.remove()
    mean, _, var = _stats(captured[0])  # eval-mode input of the first BN = its train-mode input (layer 0 precedes it)
    assert_close(new.module[1].running_mean, mean, rtol=1e-12, atol=1e-12, what="mean")
    assert_close(new.module[1].running_var, var, rtol=1e-12, atol=1e-12, what="var")


def test_model_without_batchnorm_gives_an_equivalent_objective():
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(4))
    obj = Objective(tiny_mlp(), "cross_entropy", (x, y), params="*.weight")
    theta = obj.theta0 + 0.1
    new = objective_with_reestimated_bn(obj, theta, (x, y))
    assert new.loss(theta) == obj.loss(theta)
    assert torch.equal(new.grad(theta), obj.grad(theta))
    assert new.param_names == ["0.weight", "2.weight"]


def test_bad_input():
    with pytest.raises(TypeError, match="Objective"):
        objective_with_reestimated_bn(tiny_mlp(), torch.zeros(3), None)
    obj = Objective(tiny_mlp(), "cross_entropy", (torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="shape"):
        objective_with_reestimated_bn(obj, torch.zeros(3), None)


# ---------------------------------------------------------------------- per point: landscapes and PTQ measurements
def _bn_data(n: int = 12, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _loss_by_hand(model: nn.Module, theta: torch.Tensor, obj: Objective, calib_x, x, y) -> float:
    """Load ``theta``, re-estimate the statistics with one plain pass in train mode (momentum None), evaluate in eval mode."""
    net = copy.deepcopy(model)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in obj.unflatten(theta).items():
            params[name].copy_(value)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        net.train()
        net(calib_x)
        net.eval()
        return float(F.cross_entropy(net(x), y))


def test_slices_and_paths_reestimate_at_every_point():
    from riverscape.landscape import LinearPath, path_losses, slice_1d, slice_2d

    model = _bn_cnn()
    x, y = _bn_data()
    calib_x, calib_y = _bn_data(10, seed=8)
    obj = Objective(model, "cross_entropy", (x, y))
    qmap = QuantMap(obj, UniformQuantizer(3))
    direction = 0.3 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    plain = slice_1d(obj, obj.theta0, direction, steps=5, progress=False)
    fresh = slice_1d(obj, obj.theta0, direction, steps=5, progress=False, reestimate_bn=(calib_x, calib_y))
    quantized = slice_1d(obj, obj.theta0, direction, steps=5, quantizer=qmap, progress=False, reestimate_bn=(calib_x, calib_y))
    for i, alpha in enumerate(fresh.alphas.tolist()):
        point = obj.theta0 + alpha * direction
        # float64, a few hundred operations: only rounding separates the two evaluations
        assert fresh.loss[i] == pytest.approx(_loss_by_hand(model, point, obj, calib_x, x, y), rel=1e-12)
        assert quantized.loss[i] == pytest.approx(_loss_by_hand(model, qmap(point), obj, calib_x, x, y), rel=1e-12)
    assert float((fresh.loss - plain.loss).abs().max()) > 1e-3  # the statistics matter on this path
    assert fresh.metric is not None and fresh.metric.shape == (5,)
    plane = slice_2d(obj, obj.theta0, direction, direction.flip(0), steps=2, span=0.5, progress=False, reestimate_bn=(calib_x, calib_y))
    corner = obj.theta0 - 0.5 * direction - 0.5 * direction.flip(0)
    assert plane.loss[0, 0] == pytest.approx(_loss_by_hand(model, corner, obj, calib_x, x, y), rel=1e-12)
    end = obj.theta0 + direction
    profile = path_losses(obj, LinearPath(obj.theta0, end), n=3, quantizer=qmap, progress=False, reestimate_bn=(calib_x, calib_y))
    assert profile.loss[2] == pytest.approx(_loss_by_hand(model, end, obj, calib_x, x, y), rel=1e-12)
    assert profile.quantized_loss[1] == pytest.approx(
        _loss_by_hand(model, qmap(obj.theta0 + 0.5 * direction), obj, calib_x, x, y), rel=1e-12)
    assert [len(m._forward_pre_hooks) for m in obj.module.modules()] == [0] * len(list(obj.module.modules()))


def test_measure_ptq_with_reestimated_statistics_equals_a_hand_reestimation():
    from riverscape.pipeline import build_reference, measure_ptq, measurement_notes

    model = _bn_cnn()
    x, y = _bn_data(16)
    x_test, y_test = _bn_data(9, seed=11)
    ref, _ = build_reference(model, "cross_entropy", (x, y), (x_test, y_test), quantizer=UniformQuantizer(2))
    qmap = ref.quant_map(UniformQuantizer(2))
    stale = measure_ptq(ref, qmap)
    fresh = measure_ptq(ref, qmap, bn_reestimate=True)
    assert torch.equal(stale.point, fresh.point)
    assert fresh.metrics["bn_reestimation"] == {"samples": 16, "batches": 1} and "bn_reestimation" not in stale.metrics
    assert fresh.metrics["stale_bn"]["loss"] == stale.metrics["loss"]
    assert fresh.metrics["loss"] == pytest.approx(_loss_by_hand(model, fresh.point, ref.analysis, x, x_test, y_test), rel=1e-12)
    assert abs(fresh.metrics["loss"] - stale.metrics["loss"]) > 1e-3
    # curvature at Q(theta) is measured on the re-estimated objective
    obj_q = fresh.curvature_objective(ref)
    assert obj_q is not ref.analysis and obj_q.loss(fresh.point) == pytest.approx(fresh.metrics["train_loss"], rel=1e-14)
    assert stale.curvature_objective(ref) is ref.analysis
    assert any("on 16 analysis samples" in note for note in measurement_notes(fresh.metrics))
    # without BatchNorm nothing changes and nothing is recorded
    mlp_ref, _ = build_reference(tiny_mlp(), "cross_entropy", (torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))),
                                 (torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))), quantizer=UniformQuantizer(2))
    plain = measure_ptq(mlp_ref, mlp_ref.quant_map(UniformQuantizer(2)), bn_reestimate=True)
    assert "bn_reestimation" not in plain.metrics and plain.objectives is None
