"""``riverscape analyze``: BatchNorm re-estimated at every PTQ point by default, ``--act-bits`` for W{b}A{a}."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import riverscape as rs
from riverscape.analysis import run_analysis
from riverscape.analysis_options import AnalyzeOptions
from riverscape.budget import SKIPPABLE_STAGES
from riverscape.cli import _analyze_options, build_parser
from riverscape.errors import InputError
from riverscape.quant import QuantMap, UniformQuantizer


@pytest.fixture(scope="module")
def bn_mlp():
    ds = rs.load_dataset("digits")
    (x, y), test = ds.train, ds.test
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net.eval(), (x[:200], y[:200]), test


def _run(net, train, test, *, qat_steps: int = 0, **options):
    skip = [stage for stage in SKIPPABLE_STAGES if stage != "qat" or not qat_steps]
    opts = AnalyzeOptions(bits=(2,), top_k=2, grid_steps=3, qat_steps=qat_steps, max_samples=0, budget="quick", skip=skip, **options)
    return run_analysis(net, "cross_entropy", train, test, opts, progress=False).metrics()


def test_flags_parse_into_options():
    base = ["analyze", "ckpt.pt"]
    default = _analyze_options(build_parser().parse_args(base))
    assert default.bn_reestimate is True and default.act_bits is None
    chosen = _analyze_options(build_parser().parse_args([*base, "--no-bn-reestimate", "--act-bits", "8"]))
    assert chosen.bn_reestimate is False and chosen.act_bits == 8
    assert chosen.ptq_measure_options()["activations"].suffix == "A8"
    for bad in (1, 17, 8.0, True):
        with pytest.raises(InputError, match="act_bits"):
            AnalyzeOptions(act_bits=bad)


def test_analysis_reestimates_batchnorm_at_the_ptq_point_and_says_so(bn_mlp):
    net, train, test = bn_mlp
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fresh = _run(net, train, test, qat_steps=2)
    stale = _run(net, train, test, bn_reestimate=False)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # the user's model is untouched
    assert fresh["ptq"]["bn_reestimation"] == {"samples": 200, "batches": 1}
    assert "bn_reestimation" not in stale["ptq"] and stale["options"]["bn_reestimate"] is False
    assert any("re-estimated at Q(theta) (and at the QAT point) on 200 analysis samples" in note for note in fresh["notes"])
    assert fresh["qat"]["bn_reestimation"] == {"samples": 200, "batches": 1}
    assert fresh["ptq"]["stale_bn"]["loss"] == pytest.approx(stale["ptq"]["loss"], rel=1e-12)
    assert abs(fresh["ptq"]["loss"] - stale["ptq"]["loss"]) > 1e-4
    # by hand: Q(theta) loaded into a copy, one train-mode pass over the analysis samples, evaluated on the test split
    hand = copy.deepcopy(net)
    obj = rs.Objective(net, "cross_entropy", train, params=fresh["quantized_layers"])
    point = QuantMap(obj, UniformQuantizer(2, range="mse"))(obj.theta0)
    with torch.no_grad():
        for name, value in obj.unflatten(point).items():
            dict(hand.named_parameters())[name].copy_(value)
        hand[2].reset_running_stats()
        hand[2].momentum = None
        hand.train()(train[0])
        loss = float(F.cross_entropy(hand.eval()(test[0]), test[1]))
    assert fresh["ptq"]["loss"] == pytest.approx(loss, rel=1e-5)  # float32 model: summation order only
    # the curvature at Q(theta) is measured with the re-estimated statistics
    assert fresh["hessian"]["quantized"]["top_eigenvalues"] != stale["hessian"]["quantized"]["top_eigenvalues"]


def test_analysis_with_activation_bits_reports_the_setting_and_the_weights_only_loss(bn_mlp):
    net, train, test = bn_mlp
    both = _run(net, train, test, act_bits=4)
    ptq = both["ptq"]
    assert ptq["setting"] == "W2A4" and ptq["loss_measured"] == "weights+activations"
    assert ptq["weights_only"]["loss"] != ptq["loss"] and set(ptq["activations"]["layers"]) == {"1", "4"}
    assert any("W2A4" in note and "weights-only loss" in note for note in both["notes"])
