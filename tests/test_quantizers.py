"""Quantizers against hand-computed grids, and PTQ on a trained model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import riverscape as rs
from riverscape.quant import QuantMap, UniformQuantizer, integer_grid, ptq
from riverscape.training import flat_parameters


def test_hand_computed_symmetric_grid():
    w = torch.tensor([-1.0, -0.4, 0.2, 0.6, 1.0, 0.5], dtype=torch.float64)
    q = UniformQuantizer(2, per_channel=False)  # levels {-1, 0, 1} * (1 / 1)
    assert q(w).tolist() == [-1.0, -0.0, 0.0, 1.0, 1.0, 0.0]  # 0.5 rounds half to even -> 0
    q3 = UniformQuantizer(3, per_channel=False)  # s = 1/3, levels k/3, |k| <= 3
    assert torch.allclose(q3(w), torch.tensor([-1, -1 / 3, 1 / 3, 2 / 3, 1, 2 / 3], dtype=torch.float64), atol=1e-15)


def test_hand_computed_asymmetric_grid():
    w = torch.tensor([0.0, 0.1, 0.5, 0.9, 3.0], dtype=torch.float64)
    q = UniformQuantizer(2, symmetric=False, per_channel=False)  # alpha=0, beta=3: s = 1, z = 0, codes 0..3
    params = q.qparams(w)
    assert float(params.scale) == 1.0 and float(params.zero_point) == 0.0
    assert q(w).tolist() == [0.0, 0.0, 0.0, 1.0, 3.0]
    w2 = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)  # alpha=-1, beta=2: s = 1, z = 1
    assert UniformQuantizer(2, symmetric=False, per_channel=False)(w2).tolist() == [-1.0, 0.0, 2.0]


def test_one_bit_is_sign_times_mean_abs_per_channel():
    w = torch.tensor([[1.0, -3.0, 0.0], [0.5, 0.5, -2.0]], dtype=torch.float64)
    out = UniformQuantizer(1)(w)
    expected = torch.tensor([[4 / 3, -4 / 3, 4 / 3], [1.0, 1.0, -1.0]], dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-15)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("range_method", ["minmax", "mse", "percentile"])
def test_levels_error_and_idempotence(bits, symmetric, range_method):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 50, generator=g, dtype=torch.float64)
    quant = UniformQuantizer(bits, symmetric=symmetric, range=range_method)
    params = quant.qparams(w)
    out = quant(w)
    for c in range(6):
        assert torch.unique(out[c]).numel() <= quant.levels <= 2**bits
    # inside the clipping range the error is at most half a step (exact, plus float rounding)
    lo = params.scale * (params.qmin - params.zero_point)
    hi = params.scale * (params.qmax - params.zero_point)
    inside = (w >= lo) & (w <= hi)
    err = (out - w).abs()
    assert bool((err[inside] <= (params.scale / 2).expand_as(w)[inside] * (1 + 1e-12)).all())
    assert torch.equal(quant.quantize_with(out, params), out)  # grid points are fixed


def test_two_bit_has_at_most_four_levels_per_channel():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for symmetric in (True, False):
        out = UniformQuantizer(2, symmetric=symmetric)(w)
        assert max(torch.unique(row).numel() for row in out) <= 4


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_range_beats_minmax_on_gaussian_weights(bits):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    err_minmax = ((UniformQuantizer(bits)(w) - w) ** 2).sum()
    err_mse = ((UniformQuantizer(bits, range="mse")(w) - w) ** 2).sum()
    print(f"{bits}-bit squared error: minmax {err_minmax:.2f}, mse {err_mse:.2f}")
    assert err_mse < 0.9 * err_minmax


def test_per_tensor_vs_per_channel_scales():
    w = torch.tensor([[1.0, -1.0], [10.0, 5.0]])
    per_channel = UniformQuantizer(2).qparams(w).scale
    per_tensor = UniformQuantizer(2, per_channel=False).qparams(w).scale
    assert per_channel.shape == (2, 1) and per_channel.flatten().tolist() == [1.0, 10.0]
    assert per_tensor.numel() == 1 and float(per_tensor) == 10.0


def test_zero_channel_does_not_divide_by_zero():
    w = torch.zeros(3, 4)
    assert torch.equal(UniformQuantizer(4)(w), w)
    assert torch.isfinite(UniformQuantizer(4, symmetric=False, range="mse")(w)).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 0}, "bits"), ({"bits": 33}, "bits"), ({"bits": 2.5}, "bits"),
    ({"bits": 4, "range": "max"}, "unknown range"), ({"bits": 4, "percentile": 0}, "percentile"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UniformQuantizer(**kwargs)


def test_integer_grid_table():
    assert integer_grid(4, True) == (-7, 7)
    assert integer_grid(4, False) == (0, 15)
    assert integer_grid(1, True) == (-1, 1)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.conv = nn.Conv1d(3, 4, 2)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, idx):
        x = self.emb(idx).transpose(1, 2)
        x = self.conv(x).mean(-1)
        return self.fc(self.norm(x))


def test_quant_map_quantizes_weights_only_and_respects_options():
    net = _Net()
    data = (torch.randint(0, 5, (6, 4)), torch.randint(0, 2, (6,)))
    obj = rs.Objective(net, "cross_entropy", data)
    quant = UniformQuantizer(2)
    qmap = QuantMap(obj, quant)
    assert [t.name for t in qmap.targets] == ["emb.weight", "conv.weight", "fc.weight"]
    theta_q = qmap(obj.theta0)
    params = obj.unflatten(theta_q)
    originals = dict(net.named_parameters())
    for name in ("conv.bias", "norm.weight", "norm.bias", "fc.bias"):
        assert torch.equal(params[name], originals[name].detach())
    assert torch.equal(params["conv.weight"], quant(originals["conv.weight"].detach()))
    assert int(qmap.mask.sum()) == 15 + 24 + 8
    assert [t.name for t in QuantMap(obj, quant, keep_first_last=True).targets] == ["conv.weight"]
    assert [t.name for t in QuantMap(obj, quant, exclude=["fc"]).targets] == ["emb.weight", "conv.weight"]
    assert [t.name for t in QuantMap(obj, quant, include="conv.*").targets] == ["conv.weight", "conv.bias"]
    with pytest.raises(ValueError, match="no parameter"):
        QuantMap(obj, quant, include=["missing"])


def test_ptq_digits_mlp_accuracy_table(trained_digits_mlp, digits_data):
    obj = rs.Objective(trained_digits_mlp.model, "cross_entropy", digits_data.test)
    fp = obj.metric(obj.theta0)
    table = {}
    for bits in (8, 6, 4, 3, 2, 1):
        for method in ("minmax", "mse"):
            table[bits, method] = obj.metric(ptq(obj, UniformQuantizer(bits, range=method)))
    print(f"\nFP accuracy {fp:.4f}")
    for (bits, method), acc in table.items():
        print(f"{bits}-bit {method:6s}: {acc:.4f}")
    assert fp > 0.95
    assert abs(table[8, "minmax"] - fp) <= 0.01 and abs(table[8, "mse"] - fp) <= 0.01
    assert table[2, "minmax"] < fp - 0.1  # the PTQ cliff at 2 bits
    assert table[2, "minmax"] < table[4, "minmax"]
    assert obj.theta0.equal(flat_parameters(trained_digits_mlp.model))  # the model is untouched
