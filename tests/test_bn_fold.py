"""BatchNorm folding: the folded network computes the same function, the user's model is untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from riverscape.quant.bn_fold import fold_batchnorm
from tests.helpers import assert_close


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, then eval()."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            if m.weight is not None:
                m.weight.data.copy_(1 + 0.5 * torch.randn(n, generator=gen))
                m.bias.data.copy_(torch.randn(n, generator=gen))
    return model.eval()


class ResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class Net(nn.Module):
    """Conv->BN->ReLU blocks (with and without conv bias), a residual block, Linear->BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        )
        self.block = ResidualBlock(4)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.bn_fc = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.block(self.features(x))
        return self.head(torch.relu(self.bn_fc(self.fc(x.flatten(1)))))


class Unfoldable(nn.Module):
    """bn_shared: its conv output is also added to the result; bn_after_relu: follows a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn_shared = nn.BatchNorm2d(3)
        self.bn_after_relu = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn_ok = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn_shared(y) + y
        z = self.bn_after_relu(torch.relu(z))
        return self.bn_ok(self.conv2(z))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, the Sequential fallback applies."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.BatchNorm1d(3))

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.body(-x)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_folding_keeps_the_function(dtype, tol):
    torch.manual_seed(0)
    model = _randomise_bn(Net(), 1).to(dtype)
    before = _state(model)
    x = torch.randn(7, 2, 5, 5, dtype=dtype)
    folded, report = fold_batchnorm(model)
    # float64: folding only reorders roundings (s*(W*a) vs (s*W)*a), ~1e-16 relative per
    # operation over a handful of layers with O(1) outputs -> 1e-12 is generous.
    # float32: the same reordering costs a few ulps (6e-8) per product and accumulation;
    # a 3x3x4 = 36-term conv sum through 5 layers with O(1) outputs stays within ~1e-6, so
    # 1e-5 (abs, relative to outputs of order 1) bounds it with margin.
    assert_close(folded(x), model(x), rtol=tol, atol=tol, what=f"folded output ({dtype})")
    assert report.tracer == "fx"
    assert {(p.layer, p.batchnorm) for p in report.pairs} == {
        ("features.0", "features.1"), ("features.3", "features.4"), ("block.conv1", "block.bn1"),
        ("block.conv2", "block.bn2"), ("fc", "bn_fc"),
    }
    assert {p.layer for p in report.pairs if p.bias_created} == {"features.3", "block.conv1", "block.conv2"}
    assert report.unfolded == ()
    assert all(not isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert isinstance(folded.block.bn1, nn.Identity) and folded.block.conv1.bias is not None
    for key, value in model.state_dict().items():  # the user's model is untouched, bit for bit
        assert torch.equal(value, before[key]), key
    assert model.block.conv1.bias is None and isinstance(model.block.bn1, nn.BatchNorm2d)


def test_folded_weights_by_hand():
    conv = nn.Conv2d(1, 2, 1, bias=False).double()
    bn = nn.BatchNorm2d(2).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).reshape(2, 1, 1, 1))
        bn.running_mean.copy_(torch.tensor([1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0 - bn.eps, 0.25 - bn.eps]))
        bn.weight.copy_(torch.tensor([3.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, -1.0]))
    folded, _ = fold_batchnorm(nn.Sequential(conv, bn).eval())
    # s = gamma / sqrt(var + eps) = (3/2, 1/0.5) = (1.5, 2); W' = s W; b' = s (0 - mu) + beta
    assert torch.allclose(folded[0].weight.reshape(-1), torch.tensor([3.0, -2.0], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(folded[0].bias, torch.tensor([-1.5, -2.0], dtype=torch.float64), atol=1e-15)


def test_unfoldable_batchnorms_are_left_in_place_and_reported():
    torch.manual_seed(0)
    model = _randomise_bn(Unfoldable(), 2).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    folded, report = fold_batchnorm(model)
    assert [(p.layer, p.batchnorm) for p in report.pairs] == [("conv2", "bn_ok")]
    reasons = {u.batchnorm: u.reason for u in report.unfolded}
    assert set(reasons) == {"bn_shared", "bn_after_relu"}
    assert "also used elsewhere" in reasons["bn_shared"]
    assert "not the output of a Conv/Linear" in reasons["bn_after_relu"]
    assert isinstance(folded.bn_shared, nn.BatchNorm2d) and isinstance(folded.bn_after_relu, nn.BatchNorm2d)
    assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12, what="partially folded output")


def test_train_mode_batchnorm_is_not_folded():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()  # train mode
    folded, report = fold_batchnorm(model)
    assert report.pairs == () and "train mode" in report.unfolded[0].reason
    assert isinstance(folded[1], nn.BatchNorm1d)


def test_sequential_fallback_when_fx_fails():
    torch.manual_seed(0)
    model = _randomise_bn(Untraceable(), 3).double()
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    folded, report = fold_batchnorm(model)
    assert report.tracer == "sequential"
    assert [(p.layer, p.batchnorm) for p in report.pairs] == [("body.0", "body.1")]
    assert [u.batchnorm for u in report.unfolded] == ["body.3"]
    assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12, what="fallback-folded output")
    assert report.to_dict()["pairs"][0] == {"layer": "body.0", "batchnorm": "body.1", "bias_created": False}


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        fold_batchnorm(copy.deepcopy)
