"""Weights quantized elsewhere: dequantized values as the PTQ point, their grids recovered exactly."""
from __future__ import annotations

import copy

import pytest
import torch

import riverscape as rs
from riverscape.quant import UniformQuantizer, ptq_result
from riverscape.quant.ptq import External, dequantized_weights, infer_grid
from tests.helpers import tiny_cnn, tiny_mlp


def _wide_mlp(seed: int = 0) -> torch.nn.Module:
    """Rows of 64 weights: enough used levels per channel that their gaps have the step as greatest common divisor."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def _obj(model, inputs: int = 64):
    x = torch.randn(16, inputs, dtype=torch.float64)
    return rs.Objective(model, "cross_entropy", (x, torch.randint(0, 3, (16,))))


@pytest.mark.parametrize("quantizer", [UniformQuantizer(3), UniformQuantizer(2, range="mse"), UniformQuantizer(4, symmetric=False),
                                       UniformQuantizer(4, group_size=32), UniformQuantizer(8, per_channel=False)])
def test_round_to_nearest_weights_are_recovered_with_their_grid(quantizer):
    """An RTN point handed over as dequantized weights is the same point, with the same steps and the same codes up to the zero point."""
    obj = _obj(_wide_mlp(0))
    rtn = ptq_result(obj, quantizer)
    weights = obj.unflatten(rtn.theta_q)
    ext = ptq_result(obj, quantizer, method=External(weights, source="rtn", group_size=quantizer.group_size))
    assert torch.equal(ext.theta_q, rtn.theta_q)
    for name, qp in rtn.qparams.items():
        got = ext.qparams[name]
        # the inferred step is a float gcd of gaps of up to 2^b steps: a few ulps per Euclid step, far below 1e-9 relative
        torch.testing.assert_close(torch.broadcast_to(got.scale, weights[name].shape), torch.broadcast_to(qp.scale, weights[name].shape),
                                   rtol=1e-9, atol=0)
        codes = torch.round(weights[name] / got.scale)
        true_codes = torch.round(weights[name] / qp.scale) + qp.zero_point * 0  # values are s * (q - z)
        assert torch.equal(codes, true_codes) and got.qmin <= int(codes.min()) and int(codes.max()) <= got.qmax
    assert all(r <= 1e-9 for r in ext.calibration["grid_residual"].values())


def test_conv_channel_axis_and_hand_computed_grid():
    w = torch.tensor([[0.5, -1.0, 0.0, 1.5], [0.2, 0.4, -0.2, 0.0]])
    grid = infer_grid(w)
    assert grid.qparams.scale.shape == (2, 1) and grid.qparams.scale.flatten().tolist() == pytest.approx([0.5, 0.2])
    assert (grid.qparams.qmin, grid.qparams.qmax, grid.levels, grid.residual) == (-2, 3, 4, 0.0)
    conv = tiny_cnn(0)[0].weight.detach()  # (2, 1, 3, 3)
    q = UniformQuantizer(3)
    grid = infer_grid(q(conv), channel_axis=0)
    assert grid.qparams.scale.shape == (2, 1, 1, 1)
    torch.testing.assert_close(grid.qparams.scale, q.qparams(conv).scale, rtol=1e-12, atol=0)


def test_an_affine_grid_without_zero_is_recovered_with_its_offset():
    """optimum-quanto's int4 layout written by hand: ``w = s q - shift`` per group of 32, codes 0..15, a float shift."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4, 64), generator=gen)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group uses both ends of its range
    scale = 0.01 + 0.1 * torch.rand(4, 2, dtype=torch.float64, generator=gen)
    shift = 0.1 + 0.5 * torch.rand(4, 2, dtype=torch.float64, generator=gen)  # not a multiple of the step: zero is off the grid
    w = (scale.repeat_interleave(32, dim=1) * codes - shift.repeat_interleave(32, dim=1)).float()
    grid = infer_grid(w, group_size=32)
    assert grid.affine and grid.on_grid and grid.residual < 1e-4  # float32 values: ~1e-6 of a step
    assert (grid.qparams.qmin, grid.qparams.qmax, grid.levels) == (0, 15, 16)
    assert torch.equal(torch.round(w / grid.qparams.scale + grid.qparams.zero_point).long(), codes)
    # least-squares step and offset from 32 float32 values: ~1e-7 relative
    torch.testing.assert_close(grid.qparams.scale[:, ::32].double(), scale, rtol=1e-5, atol=0)
    torch.testing.assert_close((grid.qparams.zero_point * grid.qparams.scale)[:, ::32].double(), shift, rtol=1e-5, atol=0)
    forced = infer_grid(w, group_size=32, zero_on_grid=True)  # zero on the grid: no step up to 16 bits fits these values
    assert not forced.affine and not forced.on_grid
    # values on s * integers fit both descriptions with as many codes: zero stays on the grid
    assert not infer_grid(torch.tensor([[0.5, -1.0, 0.0, 1.5]])).affine
    assert infer_grid(torch.tensor([[0.5, -1.0, 0.0, 1.5]]), zero_on_grid=False).affine


def test_values_off_a_uniform_grid_are_refused_unless_allowed():
    obj = _obj(_wide_mlp(0))
    noisy = {k: v + 1e-3 * torch.randn_like(v) for k, v in obj.unflatten(ptq_result(obj, UniformQuantizer(3)).theta_q).items()}
    with pytest.raises(ValueError, match=r"is not on a uniform grid \(residual"):
        ptq_result(obj, UniformQuantizer(3), method=External(noisy))
    loose = ptq_result(obj, UniformQuantizer(3), method=External(noisy, allow_off_grid=True))
    assert max(loose.calibration["grid_residual"].values()) > 1e-3


def test_missing_or_misshapen_weights_and_the_bare_name_are_clear_errors():
    obj = _obj(tiny_mlp(0), inputs=5)
    weights = obj.unflatten(ptq_result(obj, UniformQuantizer(3)).theta_q)
    with pytest.raises(ValueError, match="lack 1 quantized tensor"):
        ptq_result(obj, UniformQuantizer(3), method=External({k: v for k, v in weights.items() if k != "2.weight"}))
    with pytest.raises(ValueError, match="has shape"):
        ptq_result(obj, UniformQuantizer(3), method=External({**weights, "0.weight": weights["0.weight"].T}))
    with pytest.raises(ValueError, match="needs arguments"):
        ptq_result(obj, UniformQuantizer(3), method="external")
    with pytest.raises(ValueError, match="needs the dequantized weights"):
        ptq_result(obj, UniformQuantizer(3), method=External())


def test_torch_quantized_tensors_are_dequantized():
    model = _wide_mlp(0).float()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w = state["0.weight"]
    scales = w.abs().amax(dim=1) / 127
    state["0.weight"] = torch.quantize_per_channel(w, scales.double(), torch.zeros(16, dtype=torch.long), 0, torch.qint8)
    plain = dequantized_weights(state)
    torch.testing.assert_close(plain["0.weight"], state["0.weight"].dequantize(), rtol=0, atol=0)
    grid = infer_grid(plain["0.weight"])
    assert grid.on_grid and grid.qparams.qmax == 127 and grid.qparams.qmin >= -128
    torch.testing.assert_close(grid.qparams.scale.flatten(), scales, rtol=1e-5, atol=0)  # float32 values: ~1e-7 per gap


def test_a_torchao_int4_per_group_model_is_analysed_at_its_own_point():
    torchao = pytest.importorskip("torchao")  # the `external` extra; installed in CI
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    fp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    quantized = copy.deepcopy(fp)
    quantize_(quantized, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    weights = dequantized_weights(quantized)
    x, y = torch.randn(48, 64), torch.randint(0, 10, (48,))
    obj = rs.Objective(fp, "cross_entropy", (x, y))
    res = ptq_result(obj, UniformQuantizer(4, group_size=32), method=External(weights, source=f"torchao {torchao.__version__}", group_size=32))
    with torch.no_grad():
        own = torch.nn.functional.cross_entropy(quantized(x), y).item()
    assert obj.loss(res.theta_q) == pytest.approx(own, rel=1e-5)  # float32: the same network evaluated twice
    for name in ("0.weight", "2.weight"):
        qp = res.qparams[name]
        codes = torch.round(weights[name].double() / qp.scale.double())
        assert -8 <= qp.qmin and qp.qmax <= 7 and torch.equal(codes.clamp(-8, 7), codes)  # int4 codes
