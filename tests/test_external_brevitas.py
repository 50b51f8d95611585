"""Models quantized by Brevitas (``QuantConv2d`` / ``QuantLinear`` with integer weights) analysed at their own point.

Skipped when Brevitas is absent; it is part of the ``external`` extra that CI installs. A Brevitas
layer keeps its float ``weight`` and quantizes it in every forward; ``quant_weight()`` returns the
``QuantTensor`` its forward uses (``value`` dequantized, ``int()`` the codes, ``scale``,
``bit_width``). Both quantizers used here are Brevitas's narrow symmetric ones with max-|w| scales
(``Int8WeightPerTensorFloat``, the default, and ``Int8WeightPerChannelFloat`` at 4 bits): the grid
of riverscape's symmetric ``UniformQuantizer`` with ``per_channel`` set to match.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("brevitas", reason="Brevitas is not installed (the `external` extra; CI installs it)")
from brevitas.nn import QuantConv2d, QuantLinear  # noqa: E402
from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat  # noqa: E402

import riverscape as rs  # noqa: E402
from riverscape.gradients import damage  # noqa: E402
from riverscape.quant import UniformQuantizer, greedy_flip_search, ptq_result  # noqa: E402
from riverscape.quant.ptq import External, dequantized_weights, infer_grid  # noqa: E402

SETTINGS = {  # id: (Brevitas weight quantizer and bit-width, riverscape's quantizer on the same grid)
    "int8-per-tensor": ({"weight_quant": Int8WeightPerTensorFloat}, UniformQuantizer(8, per_channel=False)),
    "int4-per-channel": ({"weight_quant": Int8WeightPerChannelFloat, "weight_bit_width": 4}, UniformQuantizer(4)),
}


def _models(setting: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """The FP network, its Brevitas twin holding the same float weights, inputs and labels."""
    options = SETTINGS[setting][0]
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))
    quant = nn.Sequential(QuantConv2d(2, 6, 3, **options), nn.ReLU(), nn.Flatten(), QuantLinear(6 * 4 * 4, 10, bias=True, **options))
    with torch.no_grad():
        for name, value in fp.state_dict().items():
            quant.get_parameter(name).copy_(value)
    quant.eval()
    return fp, quant, torch.randn(48, 2, 6, 6), torch.randint(0, 10, (48,))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dequantized_weights_are_the_weights_brevitas_forward_uses(setting):
    fp, quant, x, _ = _models(setting)
    stored = {k: v.detach().clone() for k, v in quant.named_parameters()}
    weights = dequantized_weights(quant)
    for name in ("0", "3"):
        qt = quant.get_submodule(name).quant_weight()
        assert torch.equal(weights[f"{name}.weight"], qt.value)
        # Brevitas's dequantization from its own codes: s (q - z), the same float32 values to one rounding
        torch.testing.assert_close(weights[f"{name}.weight"], (qt.int(float_datatype=True) - qt.zero_point) * qt.scale, rtol=1e-6, atol=0)
        assert not torch.equal(weights[f"{name}.weight"], fp.get_submodule(name).weight)  # quantized, not the float weight
        assert torch.equal(weights[f"{name}.bias"], fp.get_submodule(name).bias)
    assert all(torch.equal(v, stored[k]) for k, v in quant.named_parameters())  # the Brevitas model is untouched
    with torch.no_grad():  # the FP architecture at the dequantized point is Brevitas's network
        torch.testing.assert_close(torch.func.functional_call(fp, weights, (x,)), quant(x), rtol=1e-5, atol=1e-5)  # float32 rounding


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_inferred_grid_is_brevitas_scale_bits_and_codes(setting):
    _, quant, _, _ = _models(setting)
    weights = dequantized_weights(quant)
    for name in ("0", "3"):
        qt = quant.get_submodule(name).quant_weight()
        w = weights[f"{name}.weight"]
        grid = infer_grid(w)  # per output channel; a per-tensor scale is then the same step in every channel
        top = 2 ** (int(qt.bit_width) - 1) - 1  # narrow range: [-127, 127] at 8 bits, [-7, 7] at 4
        assert not grid.affine and grid.residual < 1e-4 and -top <= grid.qparams.qmin and grid.qparams.qmax <= top
        # a float gcd of float32 gaps of up to 2 * top steps: ~1e-6 relative
        torch.testing.assert_close(grid.qparams.scale.double(), torch.broadcast_to(qt.scale, grid.qparams.scale.shape).double(), rtol=1e-5, atol=0)
        assert torch.equal(torch.round(w / grid.qparams.scale), qt.int(float_datatype=True))  # Brevitas's codes exactly


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_brevitas_point_is_riverscapes_rtn_and_reaches_flips_and_damage(setting):
    fp, quant, x, y = _models(setting)
    quantizer = SETTINGS[setting][1]
    obj = rs.Objective(fp, "cross_entropy", (x, y))
    res = ptq_result(obj, quantizer, method=External(dequantized_weights(quant), source=f"brevitas {setting}"))
    with torch.no_grad():
        library_loss = nn.functional.cross_entropy(quant(x), y).item()
    assert obj.loss(res.theta_q) == pytest.approx(library_loss, rel=1e-5)  # float32: the same network evaluated twice
    own = ptq_result(obj, quantizer)
    torch.testing.assert_close(res.theta_q, own.theta_q, rtol=1e-6, atol=0)  # Brevitas rounds to nearest on riverscape's grid
    # greedy grid flips start at the Brevitas point (on the grid riverscape calibrates at theta_fp) and only ever lower the loss
    search = greedy_flip_search(obj, quantizer, theta_q=res.theta_q, rounds=3, candidates_per_round=4, diagonal_matvecs=8)
    assert search.trajectory[0] == pytest.approx(library_loss, rel=1e-5)
    assert all(b < a for a, b in zip(search.trajectory, search.trajectory[1:])) and search.flips <= len(search.trajectory) - 1
    result = damage(obj, None, quantizer, theta_q=res.theta_q, widths=False, floor=False, random_control=False, profile_points=4, progress=False)
    assert result.measured_loss_increase == pytest.approx(library_loss - obj.loss(obj.theta0), rel=1e-4, abs=1e-6)
    assert [row["name"] for row in result.per_layer] == ["0.weight", "3.weight"]
