"""QAT gradient estimators: exact forward values, hand-computed backward formulas, torch.func."""
from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch.func import grad, vmap

import riverscape.quant.estimators as estimators_module
from riverscape.quant import QParams, UniformQuantizer
from riverscape.quant.estimators import (
    ESTIMATORS,
    clip_mask,
    clipped_ste,
    ewgs,
    get_estimator,
    lsq,
    lsq_grad_scale,
    lsq_initial_scale,
    make_estimator,
    pege,
    pege_mask,
    pege_rho,
    ste,
)

from helpers import assert_close

DT = torch.float64
ZERO = torch.tensor(0.0, dtype=DT)


def _qp(scale, qmin: int, qmax: int, zero: float = 0.0) -> QParams:
    scale = torch.as_tensor(scale, dtype=DT)
    return QParams(scale, torch.full_like(scale, zero), qmin, qmax)


def _backward(fn, w: torch.Tensor, upstream: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward value and dL/dw for L = sum(upstream * fn(w))."""
    w = w.clone().requires_grad_(True)
    out = fn(w, **kw)
    (g,) = torch.autograd.grad((upstream * out).sum(), w)
    return out.detach(), g


# Step 0.5, 2 bits (ternary, codes -1..1): w / s = [-1.75, -1.0, -0.5, 0.25, 0.75, 1.0, 1.25, 1.5].
# All values are dyadic, so w / s is exact and the clip decisions are unambiguous.
W2 = torch.tensor([-0.875, -0.5, -0.25, 0.125, 0.375, 0.5, 0.625, 0.75], dtype=DT)
QP2 = _qp(0.5, -1, 1)
INSIDE2 = torch.tensor([0, 1, 1, 1, 1, 1, 0, 0], dtype=DT)  # -1 <= w/s <= 1 (inclusive)
UPSTREAM2 = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5, 2.5, 4.0, -0.75], dtype=DT)


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_forward_is_the_quantizer_exactly(name, bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 9, generator=g, dtype=DT)
    quantizer = UniformQuantizer(bits, range="mse")
    qp = quantizer.qparams(w)
    options = {"grad_scale": 0.1} if name == "lsq" else {"delta": 0.3} if name == "ewgs" else {}
    out = make_estimator(name, binary=bits == 1, **options)(w, qp)
    assert torch.equal(out, quantizer.quantize_with(w, qp))


def test_ste_gradient_is_identity():
    out, g = _backward(ste, W2, UPSTREAM2, qparams=QP2)
    assert torch.equal(out, torch.tensor([-0.5, -0.5, -0.0, 0.0, 0.5, 0.5, 0.5, 0.5], dtype=DT))
    assert torch.equal(g, UPSTREAM2)


def test_clipped_ste_zeroes_gradient_outside_the_range():
    assert torch.equal(clip_mask(W2, QP2).to(DT), INSIDE2)
    _, g = _backward(clipped_ste, W2, UPSTREAM2, qparams=QP2)
    assert torch.equal(g, UPSTREAM2 * INSIDE2)


def test_clipped_ste_at_one_bit_is_hardtanh_derivative():
    w = torch.tensor([-1.5, -0.5, 0.0, 0.25, 1.0, 1.25], dtype=DT)
    out, g = _backward(clipped_ste, w, torch.ones_like(w), qparams=_qp(1.0, -1, 1), binary=True)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, 1.0], dtype=DT))  # sgn(0) = +1
    assert torch.equal(g, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=DT))


def test_lsq_weight_gradient_is_clipped_ste_and_step_gradient_matches_formula():
    # 3 bits: codes -3..3, step 0.5, one scale per element so the step gradient is per element.
    w = torch.tensor([-2.5, -1.3, -0.2, 0.3, 0.9, 1.7, 2.2], dtype=DT)
    scale = torch.full_like(w, 0.5).requires_grad_(True)
    qp = QParams(scale, torch.zeros_like(w), -3, 3)
    gscale = lsq_grad_scale(7, 3)
    w_leaf = w.clone().requires_grad_(True)
    out = lsq(w_leaf, qp, grad_scale=gscale)
    assert torch.equal(out.detach(), UniformQuantizer(3).quantize_with(w, QParams(scale.detach(), qp.zero_point, -3, 3)))
    gw, gs = torch.autograd.grad(out.sum(), (w_leaf, scale))
    # w/s = [-5, -2.6, -0.4, 0.6, 1.8, 3.4, 4.4]: inside -> round(w/s) - w/s, below -> -Q_N, above -> Q_P
    step_grad = torch.tensor([-3.0, -0.4, 0.4, 0.4, 0.2, 3.0, 3.0], dtype=DT)
    assert gscale == pytest.approx(1 / math.sqrt(21), rel=1e-15)
    # rtol 1e-12: w/s is not exactly representable (e.g. -1.3/0.5), errors are a few ulp
    assert_close(gs, gscale * step_grad, rtol=1e-12, atol=1e-15, what="LSQ step gradient")
    assert_close(gw, torch.tensor([0.0, 1, 1, 1, 1, 0, 0], dtype=DT), rtol=0, atol=1e-15, what="LSQ weight gradient")


def test_lsq_per_channel_step_gradient_sums_over_the_channel_and_one_bit_rule():
    w = torch.tensor([[0.1, -0.7, 0.2], [0.3, 0.05, -0.4]], dtype=DT)
    scale = torch.tensor([[0.25], [0.5]], dtype=DT, requires_grad=True)
    qp = QParams(scale, torch.zeros(2, 1, dtype=DT), -1, 1)
    (gs,) = torch.autograd.grad(lsq(w, qp, grad_scale=1.0).sum(), scale)
    x = w / scale.detach()
    inside = x.abs() <= 1
    expected = torch.where(inside, torch.round(x) - x, torch.sign(x)).sum(1, keepdim=True)
    assert_close(gs, expected, rtol=1e-12, what="per-channel LSQ step gradient")
    # 1 bit: dw_hat/ds = sgn(w) - w/s inside |w/s| <= 1, sgn(w) outside
    (gs1,) = torch.autograd.grad(lsq(w, qp, grad_scale=1.0, binary=True).sum(), scale)
    expected1 = torch.where(inside, torch.sign(x) - x, torch.sign(x)).sum(1, keepdim=True)
    assert_close(gs1, expected1, rtol=1e-12, what="1-bit LSQ step gradient")


def test_lsq_grad_scale_and_initial_step():
    assert lsq_grad_scale(100, 3) == 1 / math.sqrt(300)
    assert lsq_grad_scale(10, 1) == 1 / math.sqrt(10)
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]], dtype=DT)
    qp = UniformQuantizer(3).qparams(w)  # per channel, Q_P = 3
    s0 = lsq_initial_scale(w, qp)
    assert s0.shape == qp.scale.shape
    assert_close(s0.reshape(-1), torch.tensor([2 * 2.0 / math.sqrt(3), 2 * 0.5 / math.sqrt(3)], dtype=DT), rtol=1e-15)
    per_tensor = UniformQuantizer(3, per_channel=False).qparams(w)
    assert_close(lsq_initial_scale(w, per_tensor), torch.tensor(2 * 1.25 / math.sqrt(3), dtype=DT), rtol=1e-15)
    with pytest.raises(ValueError):
        lsq_grad_scale(0, 3)


def test_ewgs_scaling_is_exactly_the_formula():
    w = torch.tensor([0.2, -0.15, 0.3, 0.7], dtype=DT)  # w/s = [0.4, -0.3, 0.6, 1.4] with s = 0.5
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    out, g = _backward(ewgs, w, upstream, qparams=QP2, delta=0.4)
    assert torch.equal(out, torch.tensor([0.0, -0.0, 0.5, 0.5], dtype=DT))
    # x_n - x_q = [0.4, -0.3, -0.4, 0 (clamped: outside, no gradient)]
    # factors 1 + 0.4 sign(g)(x_n - x_q) = [1.16, 1.12, 0.84, -]
    expected = torch.tensor([1.16, -2.24, 0.42, 0.0], dtype=DT)
    assert_close(g, expected, rtol=1e-12, atol=1e-15, what="EWGS gradient")  # a few ulp from w/s


def test_ewgs_with_zero_delta_is_clipped_ste_and_takes_per_channel_delta():
    _, g0 = _backward(ewgs, W2, UPSTREAM2, qparams=QP2, delta=0.0)
    _, gc = _backward(clipped_ste, W2, UPSTREAM2, qparams=QP2)
    assert torch.equal(g0, gc)
    w = torch.tensor([[0.2, 0.3], [0.2, 0.3]], dtype=DT)
    qp = QParams(torch.tensor([[0.5], [0.5]], dtype=DT), torch.zeros(2, 1, dtype=DT), -1, 1)
    delta = torch.tensor([[0.0], [1.0]], dtype=DT)
    _, g = _backward(ewgs, w, torch.ones_like(w), qparams=qp, delta=delta)
    assert_close(g, torch.tensor([[1.0, 1.0], [1.4, 0.6]], dtype=DT), rtol=1e-12, what="per-channel EWGS")


def test_pege_mask_fraction_forward_and_gradient():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=g, dtype=DT)
    ranks = torch.randperm(40, generator=g).reshape(5, 8)
    qp = UniformQuantizer(2).qparams(w)
    previous = torch.zeros_like(ranks, dtype=torch.bool)
    for rho, k in [(0.0, 0), (0.1, 4), (0.33, 13), (0.5, 20), (1.0, 40)]:  # k = floor(40 rho + 1/2)
        mask = pege_mask(ranks, rho)
        assert int(mask.sum()) == k
        assert bool((mask | ~previous).all())  # nested: once replaced, always replaced
        previous = mask
        out, grad_w = _backward(pege, w, torch.ones_like(w), qparams=qp, mask=mask)
        quantized = UniformQuantizer(2).quantize_with(w, qp)
        assert torch.equal(out, torch.where(mask, quantized, w))
        assert torch.equal(grad_w, torch.ones_like(w))


def test_pege_rho_hand_computed():
    assert pege_rho(0, 10, 10.0) == 0.0
    assert pege_rho(10, 10, 10.0) == 1.0
    assert pege_rho(3, 10, 10.0) == pytest.approx(math.log10(3.7), rel=1e-14)  # log(1 + 9 * 0.3) / log(10)
    assert pege_rho(1, 4, 5.0) == pytest.approx(math.log(2.0) / math.log(5.0), rel=1e-14)  # 1 + 4/4 = 2
    with pytest.raises(ValueError, match="beta"):
        pege_rho(1, 10, 1.0)


def _options(name: str) -> dict:
    return {"lsq": {"grad_scale": 0.2}, "ewgs": {"delta": 0.5}, "pege": {"mask": torch.tensor([True, False, True, True, False])}}.get(name, {})


@pytest.mark.parametrize("name", ESTIMATORS)
def test_runs_under_torch_func_grad_and_vmap(name):
    gen = torch.Generator().manual_seed(3)
    batch = torch.randn(4, 5, generator=gen, dtype=DT)
    qp = _qp(0.6, -1, 1)
    fn = make_estimator(name, **_options(name))

    def loss(w):
        return (torch.arange(1.0, 6.0, dtype=DT) * fn(w, qp) - 0.3).pow(2).sum()

    per_sample = vmap(grad(loss))(batch)
    values = vmap(lambda w: fn(w, qp))(batch)
    for i in range(batch.shape[0]):
        w = batch[i].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(loss(w), w)
        assert torch.equal(per_sample[i], expected)
        assert torch.equal(values[i], fn(batch[i], qp))
        assert torch.equal(grad(loss)(batch[i]), expected)


def test_lsq_learnable_scale_under_torch_func_grad():
    w = torch.tensor([0.1, -0.7, 0.2, 0.45], dtype=DT)

    def loss(s):
        return lsq(w, QParams(s, ZERO, -1, 1), grad_scale=0.5).pow(2).sum()

    s = torch.tensor(0.5, dtype=DT)
    leaf = s.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss(leaf), leaf)
    assert torch.equal(grad(loss)(s), expected)
    # per-sample scales through vmap
    scales = torch.tensor([0.25, 0.5, 1.0], dtype=DT)
    batched = vmap(grad(loss))(scales)
    for i, si in enumerate(scales):
        leaf = si.clone().requires_grad_(True)
        assert torch.equal(batched[i], torch.autograd.grad(loss(leaf), leaf)[0])


def test_registry_and_errors():
    assert ESTIMATORS == ("ste", "clipped_ste", "lsq", "ewgs", "pege")
    for name in ESTIMATORS:
        assert callable(get_estimator(name))
    with pytest.raises(ValueError, match="clipped_ste"):
        get_estimator("dsq")
    with pytest.raises(ValueError, match="unknown"):
        make_estimator("lsq", delta=0.1)


def test_module_doctests():
    result = doctest.testmod(estimators_module)
    assert result.attempted >= 4 and result.failed == 0
