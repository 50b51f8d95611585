"""Models quantized by optimum-quanto (``quantize`` + ``freeze``) analysed at their own point.

Skipped when optimum-quanto is absent; it is part of the ``external`` extra that CI installs.
quanto's defaults: int8 weights per output channel with absmax scales (``WeightQBytesTensor``,
codes in [-127, 127], zero on the grid); int4 weights with min-max affine scales and a *float*
shift (``WeightQBitsTensor``: ``w = s q - shift``, codes 0..15, zero not on the grid), per group
of 128 input weights when a layer has more than 128 (else per channel).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch
from torch import nn

pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (the `external` extra; CI installs it)")
from optimum.quanto import freeze, qint4, qint8, quantize  # noqa: E402

import riverscape as rs  # noqa: E402
from riverscape import cli  # noqa: E402
from riverscape.gradients import damage  # noqa: E402
from riverscape.quant import UniformQuantizer, ptq_result  # noqa: E402
from riverscape.quant.ptq import External, dequantized_weights, infer_grid  # noqa: E402
from tests.helpers import digits_mlp_checkpoint  # noqa: E402

QUANTO_GROUP = 128  # quanto's int4 group size for layers with 128 < in_features, in_features % 128 == 0


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    """The first layer (256 inputs) is int4-quantized per group of 128, the second (32 inputs) per channel."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 32), nn.Tanh(), nn.Linear(32, 10)), torch.randn(40, 256)


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    """A convolution with 64 x 2 x 2 = 256 inputs per output channel: per group at int4, like a linear layer."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(64, 8, 2), nn.Tanh(), nn.Flatten(), nn.Linear(72, 10)), torch.randn(40, 64, 4, 4)


def _quantized(fp: nn.Module, qtype, frozen: bool = True) -> nn.Module:
    model = copy.deepcopy(fp)  # quanto quantizes in place
    quantize(model, weights=qtype)
    if frozen:
        freeze(model)
    return model


def _library_grid(weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """quanto's stored codes, scales and (int4) float shifts of a frozen weight, one row per channel or group."""
    data = weight._data.unpack() if hasattr(weight._data, "unpack") else weight._data
    rows = weight._scale.numel()
    shift = getattr(weight, "_shift", None)
    return data.reshape(rows, -1), weight._scale.reshape(rows, 1), None if shift is None else shift.reshape(rows, 1)


def _hand_dequantized(weight) -> torch.Tensor:
    """``s q`` (int8) or ``s q - shift`` (int4) from the stored codes, in the layer's shape."""
    codes, scale, shift = _library_grid(weight)
    value = scale * codes.to(scale.dtype)
    return (value if shift is None else value - shift).reshape(weight.shape)


@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("qtype", [qint4, qint8], ids=["int4", "int8"])
def test_dequantized_weights_are_quantos_codes_times_scales_and_give_its_outputs(build, qtype):
    fp, x = build()
    model = _quantized(fp, qtype)
    weights = dequantized_weights(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for name, module in layers:
        kind = "WeightQBitsTensor" if qtype is qint4 else "WeightQBytesTensor"
        assert type(module.weight).__name__ == kind
        assert torch.equal(weights[f"{name}.weight"], _hand_dequantized(module.weight))  # bit for bit: the same s * q (- shift)
        assert torch.equal(weights[f"{name}.bias"], fp.get_submodule(name).bias)  # biases stay float
    # the dynamic (unfrozen) quantization gives the same point
    unfrozen = dequantized_weights(_quantized(fp, qtype, frozen=False))
    assert all(torch.equal(unfrozen[k], v) for k, v in weights.items())
    # the FP architecture at the dequantized point is quanto's network: same outputs to float32 rounding
    with torch.no_grad():
        ours = torch.func.functional_call(fp, weights, (x,))
        torch.testing.assert_close(ours, model(x), rtol=1e-5, atol=1e-5)  # float32 matmuls in another order: ~1e-6
    assert all(torch.equal(p, q) for p, q in zip(fp.parameters(), build()[0].parameters()))  # the FP model is untouched


@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_int4_affine_grid_is_recovered_with_quantos_scales_shifts_and_codes(build):
    fp, _ = build()
    model = _quantized(fp, qint4)
    weights = dequantized_weights(model)
    first = model[0].weight
    assert first._scale.shape[0] == (8 if build is _cnn else 32) * 2  # really per group: two groups of 128 per channel
    for name, module in [("0", model[0]), (str(len(model) - 1), model[-1])]:
        w = weights[f"{name}.weight"]
        grid = infer_grid(w, group_size=QUANTO_GROUP)
        codes, scale, shift = _library_grid(module.weight)
        assert grid.affine and grid.on_grid and grid.residual < 1e-4  # float32 s q - shift: ~1e-6 of a step
        ours_scale = grid.qparams.scale.reshape(w.shape[0], -1)
        per_row = ours_scale[:, ::QUANTO_GROUP].reshape(-1, 1) if w[0].numel() > QUANTO_GROUP else ours_scale[:, :1]
        # the step is a float gcd of float32 gaps of up to 15 steps: ~1e-6 relative
        torch.testing.assert_close(per_row.double(), scale.double(), rtol=2e-5, atol=0)
        ours_codes = torch.round(w / grid.qparams.scale + grid.qparams.zero_point)  # riverscape's codes on this grid
        assert torch.equal(ours_codes.reshape(codes.shape).to(torch.uint8), codes)  # quanto's codes exactly
        assert 0 <= grid.qparams.qmin and grid.qparams.qmax <= 15
        offset = -(grid.qparams.zero_point * grid.qparams.scale).reshape(w.shape[0], -1)
        offset = offset[:, ::QUANTO_GROUP].reshape(-1, 1) if w[0].numel() > QUANTO_GROUP else offset[:, :1]
        torch.testing.assert_close(offset, -shift, rtol=1e-5, atol=1e-7)  # the offset is quanto's -shift = the group's minimum


def test_int8_grid_is_quantos_absmax_grid_and_riverscapes_own_rtn():
    fp, x = _mlp()
    weights = dequantized_weights(_quantized(fp, qint8))
    obj = rs.Objective(fp, "cross_entropy", (x, torch.randint(0, 10, (40,))))
    own = ptq_result(obj, UniformQuantizer(8))  # symmetric restricted grid, max |w| / 127 per channel: quanto's absmax
    res = ptq_result(obj, UniformQuantizer(8), method=External(weights, source="optimum-quanto qint8"))
    for name in ("0.weight", "2.weight"):
        grid = infer_grid(weights[name])
        assert not grid.affine and grid.residual < 1e-4 and -127 <= grid.qparams.qmin and grid.qparams.qmax <= 127
        torch.testing.assert_close(res.qparams[name].scale, own.qparams[name].scale, rtol=1e-5, atol=0)
    # quanto rounds to nearest on the same grid: no code differs from riverscape's RTN
    torch.testing.assert_close(res.theta_q, own.theta_q, rtol=1e-6, atol=0)


def test_the_quanto_point_reaches_the_damage_analysis():
    fp, x = _mlp()
    y = torch.randint(0, 10, (40,))
    model = _quantized(fp, qint4)
    obj = rs.Objective(fp, "cross_entropy", (x, y))
    res = ptq_result(obj, UniformQuantizer(4, group_size=QUANTO_GROUP),
                     method=External(dequantized_weights(model), source="optimum-quanto qint4", group_size=QUANTO_GROUP))
    with torch.no_grad():
        library_loss = nn.functional.cross_entropy(model(x), y).item()
    assert obj.loss(res.theta_q) == pytest.approx(library_loss, rel=1e-5)  # float32: the same network evaluated twice
    result = damage(obj, None, UniformQuantizer(4, group_size=QUANTO_GROUP), theta_q=res.theta_q, widths=False, floor=False,
                    random_control=False, profile_points=4, progress=False)
    assert result.measured_loss_increase == pytest.approx(library_loss - obj.loss(obj.theta0), rel=1e-4, abs=1e-6)
    assert [row["name"] for row in result.per_layer] == ["0.weight", "2.weight"]
    assert abs(result.predicted_loss_increase) < float("inf")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits MLP checkpoint, its int4 quanto model and both ways of saving that model."""
    folder = tmp_path_factory.mktemp("quanto_cli")
    net = digits_mlp_checkpoint(folder / "ckpt.pt", steps=60).model
    model = _quantized(net, qint4)
    torch.save(dequantized_weights(model), folder / "dequantized.pt")
    torch.save(model.state_dict(), folder / "quanto_state.pt")  # quanto's own serialization: '<name>.weight._data._data', ...
    return folder, model


def _analyze(folder, weights: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in ("analyze", folder / "ckpt.pt", "--quantized-weights", folder / weights, "--bits", "4", "--range", "minmax",
                                         "--budget", "quick", "--skip", "slices,density,paths,alignment,damage,layers", "--qat-steps", "0",
                                         "--max-samples", "0", "--top-k", "2", "--out", folder / f"report_{weights}")])
    return code, err.getvalue()


def test_the_cli_analyses_a_saved_quanto_point(digits):
    """``torch.save(dequantized_weights(model))`` then ``riverscape analyze --quantized-weights``: the analysed PTQ point is quanto's."""
    folder, model = digits
    code, err = _analyze(folder, "dequantized.pt")
    assert code == 0, err
    m = json.loads((folder / "report_dequantized.pt" / "metrics.json").read_text())
    x, y = rs.load_dataset("digits").test
    with torch.no_grad():
        own = nn.functional.cross_entropy(model(x), y).item()
    assert m["ptq"]["ptq_method"] == "external" and m["ptq"]["loss"] == pytest.approx(own, rel=1e-5)
    assert m["ptq"]["grid_residual_max"] < 1e-3  # quanto's per-channel affine int4 grid (64 and fewer inputs: no groups)


def test_quantos_own_state_dict_is_refused_with_the_way_to_save_it(digits):
    folder, _ = digits
    code, err = _analyze(folder, "quanto_state.pt")
    errors = [line for line in err.strip().splitlines() if line.startswith("riverscape: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "lacks 2 of the quantized tensors" in errors[0] and "'1.weight._data._data'" in errors[0] and "dequantized_weights(model)" in errors[0]
