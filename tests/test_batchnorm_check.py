"""BatchNorm sanity: running statistics that do not match the weights are flagged and can be re-estimated."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import riverscape as rs
from riverscape.batchnorm import SHIFT_THRESHOLD, batchnorm_preflight, check_batchnorm, recalibrate_batchnorm
from riverscape.cli import main

# the model spec the CLI loads (the layout of the in-process network below)
FACTORY = '''
from torch import nn


def make_bn_net():
    """64 -> 32 -> BatchNorm1d -> tanh -> 10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))
'''
# Recalibration must bring FP accuracy back to the healthy model's within 2 points (the brief's bar).
ACCURACY_MARGIN = 0.02


def _factory(work: Path):
    path = work / "bn_nets.py"
    path.write_text(FACTORY)
    spec = importlib.util.spec_from_file_location("bn_nets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module.make_bn_net


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    """Minibatch Adam (BatchNorm in train mode), about a second on digits."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _corrupt(net: nn.Module) -> nn.Module:
    """Running statistics that belong to no network: mean moved by 3 sd, variance divided by 20."""
    bad = copy.deepcopy(net)
    bn = bad[2]
    with torch.no_grad():
        bn.running_mean.add_(3.0 * bn.running_var.sqrt())
        bn.running_var.mul_(0.05)
    return bad


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net.eval()(x).argmax(1) == y).double().mean())


@pytest.fixture(scope="module")
def digits_bn(tmp_path_factory):
    work = tmp_path_factory.mktemp("bn")
    factory_path, make = _factory(work)
    ds = rs.load_dataset("digits")
    (x, y), (x_test, y_test) = ds.train, ds.test
    torch.manual_seed(0)
    healthy = _train(make(), x, y)
    return {"work": work, "factory": factory_path, "healthy": healthy, "bad": _corrupt(healthy),
            "train": (x, y), "test": (x_test, y_test)}


def _state(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_corrupted_statistics_are_flagged_and_healthy_ones_are_not(digits_bn):
    healthy, bad, train = digits_bn["healthy"], digits_bn["bad"], digits_bn["train"]
    before = _state(bad)
    ok, wrong = check_batchnorm(healthy, train), check_batchnorm(bad, train)
    assert [layer.name for layer in ok.layers] == ["2"] and ok.layers[0].samples == train[0].shape[0]
    assert not ok.mismatched and ok.max_mean_shift < SHIFT_THRESHOLD / 2  # healthy: sampling noise and drift only
    assert wrong.mismatched and wrong.max_mean_shift > 5.0 and wrong.layers[0].variance_ratio > 4.0
    assert "layer 2: shift" in wrong.message()
    assert all(torch.equal(v, before[k]) for k, v in bad.state_dict().items())  # the check mutates nothing
    assert not bad.training
    # the warning the analysis shows, and no warning for the healthy model
    _, notes, warnings = batchnorm_preflight(bad, train)
    assert notes == [] and len(warnings) == 1 and "do not match the data" in warnings[0] and "--bn-recalibrate" in warnings[0]
    assert batchnorm_preflight(healthy, train) == (healthy, [], [])


def test_recalibration_restores_fp_accuracy(digits_bn):
    healthy, bad, train, test = digits_bn["healthy"], digits_bn["bad"], digits_bn["train"], digits_bn["test"]
    before = _state(bad)
    acc_healthy, acc_bad = _accuracy(healthy, *test), _accuracy(bad, *test)
    assert acc_healthy > 0.9 and acc_bad < 0.5  # the corruption is what it should be: near chance
    fixed = recalibrate_batchnorm(bad, train)
    assert fixed is not bad and all(torch.equal(v, before[k]) for k, v in bad.state_dict().items())
    assert abs(_accuracy(fixed, *test) - acc_healthy) <= ACCURACY_MARGIN
    assert not check_batchnorm(fixed, train).mismatched
    assert fixed[2].momentum == bad[2].momentum and not fixed.training
    for name, p in fixed.named_parameters():  # weights untouched
        assert torch.equal(p, dict(bad.named_parameters())[name])
    model, notes, warnings = batchnorm_preflight(bad, train, recalibrate=True)
    assert model is not bad and len(notes) == 1 and "re-estimated" in notes[0] and warnings == []


def test_cli_bn_recalibrate_restores_fp_accuracy(digits_bn, tmp_path, capsys):
    healthy, bad, test = digits_bn["healthy"], digits_bn["bad"], digits_bn["test"]
    checkpoint = tmp_path / "bad.pt"
    torch.save(bad.state_dict(), checkpoint)
    out = tmp_path / "report"
    args = [
        "analyze", str(checkpoint), "--model", f"{digits_bn['factory']}:make_bn_net", "--data", "digits",
        "--bits", "2", "--qat-steps", "5", "--grid-steps", "3", "--top-k", "2", "--max-samples", "0",
        "--out", str(out), "--bn-recalibrate",
    ]
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["fp"]["accuracy"] - _accuracy(healthy, *test)) <= ACCURACY_MARGIN
    assert any("re-estimated" in note for note in metrics["notes"]), metrics["notes"]
    assert metrics["run"]["options"]["bn_recalibrate"] is True


def test_cli_warns_about_stale_batchnorm_statistics(digits_bn, tmp_path, capsys):
    checkpoint = tmp_path / "bad.pt"
    torch.save(digits_bn["bad"].state_dict(), checkpoint)
    out = tmp_path / "report"
    args = [
        "analyze", str(checkpoint), "--model", f"{digits_bn['factory']}:make_bn_net", "--data", "digits",
        "--bits", "2", "--qat-steps", "0", "--grid-steps", "3", "--top-k", "2", "--max-samples", "256", "--out", str(out),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "riverscape: warning: BatchNorm running statistics do not match the data" in err and "--bn-recalibrate" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("do not match the data" in w for w in metrics["warnings"])
    assert "do not match the data" in (out / "report.html").read_text()
