"""The QAT-dynamics control arms: matched noise, stochastic rounding, latent (FP) gradient points."""
from __future__ import annotations

import math

import pytest
import torch

import riverscape as rs
from riverscape.quant import (
    ARM_SEED_OFFSET,
    GRADIENT_POINT_ARMS,
    QParams,
    QuantMap,
    UniformQuantizer,
    estimator_config,
    latent,
    matched_noise,
    random_signs,
    stochastic_codes,
    stochastic_rounding,
)
from riverscape.quant.qat import qat

from helpers import assert_close, tiny_mlp


@pytest.fixture
def obj(classification_data):
    return rs.Objective(tiny_mlp(), "cross_entropy", classification_data)


def _qp(scale=0.25, zero=0.0, qmin=-3, qmax=3):
    return QParams(torch.tensor(scale, dtype=torch.float64), torch.tensor(zero, dtype=torch.float64), qmin, qmax)


# ---------------------------------------------------------------------- the functions
def test_matched_noise_has_the_rounding_magnitudes_with_the_given_signs_and_identity_backward():
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(400, generator=g, dtype=torch.float64) - 0.5) * 2.4  # some beyond the range +-0.75
    qp = _qp()
    rounded = torch.clamp(torch.round(w / 0.25), -3, 3) * 0.25  # hand-computed grid
    signs = random_signs(w.shape, torch.Generator().manual_seed(1), dtype=torch.float64)
    w = w.requires_grad_(True)
    out = matched_noise(w, qp, signs=signs)
    magnitude = (rounded - w.detach()).abs()
    assert torch.equal(out.detach(), w.detach() + magnitude * signs)  # the documented forward, bit for bit
    step = out.detach() - w.detach()
    # |out - w| = |delta| up to the rounding of the sum and difference (|w|, |delta| <= 1.2: a few ulp)
    assert_close(step.abs(), magnitude, rtol=0, atol=1e-15, what="matched-noise magnitudes")
    nonzero = step != 0
    assert torch.equal(torch.sign(step[nonzero]), signs[nonzero])
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    # random signs: about half flip the rounding direction (binomial, n=400: 0.5 +- 5 sd = 0.5 +- 0.125)
    agree = (torch.sign(step) == torch.sign(rounded - w.detach()))[nonzero].double().mean()
    assert 0.375 < float(agree) < 0.625
    with pytest.raises(ValueError, match="shape"):
        matched_noise(w, qp, signs=signs[:3])


def test_stochastic_rounding_stays_on_the_grid_and_rounds_to_the_neighbours():
    g = torch.Generator().manual_seed(2)
    w = (torch.rand(500, generator=g, dtype=torch.float64) - 0.5) * 3.0
    qp = _qp()
    u = torch.rand(500, generator=g, dtype=torch.float64)
    codes = stochastic_codes(w, qp, u)
    assert torch.equal(codes, torch.round(codes)) and int(codes.min()) >= -3 and int(codes.max()) <= 3
    x = torch.clamp(w / 0.25, -3, 3)
    assert bool(((codes == torch.floor(x)) | (codes == torch.ceil(x))).all())  # a neighbour of w, never further
    value = stochastic_rounding(w, qp, uniforms=u)
    assert torch.equal(value, 0.25 * codes)
    outside = (w / 0.25).abs() > 3
    assert outside.any() and torch.equal(value[outside], 0.75 * torch.sign(w[outside]))  # saturates at the ends
    # asymmetric grid with a zero point: codes in [qmin, qmax], values s * (code - z)
    asym = QParams(torch.tensor(0.1, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), 0, 7)
    c = stochastic_codes(w, asym, u)
    assert int(c.min()) >= 0 and int(c.max()) <= 7
    assert torch.equal(stochastic_rounding(w, asym, uniforms=u), 0.1 * (c - 2.0))


@pytest.mark.parametrize("binary", [False, True])
def test_stochastic_rounding_is_unbiased_inside_the_range(binary):
    """E[SR(w)] = w inside the range: mean of N draws within 5 binomial sd of w.

    Per coordinate SR(w) - w takes two values one grid step apart (two steps at 1 bit), so
    sd(mean) <= s / (2 sqrt(N)) (s at 1 bit); 5 sd leaves a false-alarm chance < 1e-6 per
    coordinate (and the draws are seeded, so the test is deterministic).
    """
    n_draws, step = 20000, 0.25
    qp = QParams(torch.tensor(step, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64), -1 if binary else -3, 1 if binary else 3)
    lim = step if binary else 3 * step
    w = torch.linspace(-lim, lim, 41, dtype=torch.float64)[1:-1]
    u = torch.rand(n_draws, w.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mean = stochastic_rounding(w.expand(n_draws, -1), qp, uniforms=u, binary=binary).mean(0)
    gap = 2 * step if binary else step
    assert float((mean - w).abs().max()) < 5 * gap / (2 * math.sqrt(n_draws))
    # round to nearest is biased on the same points (the test can tell the two apart)
    nearest = torch.clamp(torch.round(w / step), -3, 3) * step
    if not binary:
        assert float((nearest - w).abs().max()) > 20 * gap / (2 * math.sqrt(n_draws))


def test_latent_is_the_identity():
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    out = latent(w, _qp())
    assert out is w


# ---------------------------------------------------------------------- inside qat
def test_arms_are_registered_configs():
    for name in GRADIENT_POINT_ARMS:
        config = estimator_config(name)
        assert config.name == name and config.to_dict() == {"name": name}


@pytest.mark.parametrize("arm", ["matched_noise", "stochastic_rounding"])
def test_one_step_takes_the_gradient_at_the_arms_point_with_the_documented_draws(obj, arm):
    """theta_1 = theta_0 - lr * grad L(p_0) with p_0 drawn from Generator(seed + ARM_SEED_OFFSET), targets in order."""
    q, seed, lr = UniformQuantizer(2), 5, 0.1
    res = qat(obj, q, estimator=arm, steps=1, lr=lr, optimizer="sgd", momentum=0.0, seed=seed, progress=False)
    qmap = QuantMap(obj, q)
    qparams = qmap.qparams(obj.theta0)
    gen = torch.Generator().manual_seed(seed + ARM_SEED_OFFSET)

    def point(target, w, i):
        if arm == "matched_noise":
            return matched_noise(w, qparams[i], signs=random_signs(w.shape, gen, dtype=w.dtype))
        return stochastic_rounding(w, qparams[i], uniforms=torch.rand(tuple(w.shape), generator=gen, dtype=w.dtype))

    p0 = qmap.map_targets(obj.theta0, point)
    assert not torch.equal(p0, qmap(obj.theta0))  # really a different point from Q(theta_0)
    assert_close(res.theta, obj.theta0 - lr * obj.grad(p0), rtol=1e-13, atol=1e-15, what=f"one {arm} step")


def test_arms_draw_fresh_randomness_every_step(obj):
    from riverscape.quant import QATContext, build_estimator

    qmap = QuantMap(obj, UniformQuantizer(2))
    cal = qmap.qparams(obj.theta0)
    for name in ("matched_noise", "stochastic_rounding"):
        handler = build_estimator(estimator_config(name), QATContext(obj, qmap, 3, 0, "frozen", cal, []))
        hard = qmap(obj.theta0)
        handler.before_update(0, hard, cal)
        first = [d.clone() for d in handler.draws]
        handler.before_update(1, hard, cal)
        assert [tuple(d.shape) for d in first] == [tuple(t.spec.shape) for t in qmap.targets]
        assert all(not torch.equal(a, b) for a, b in zip(first, handler.draws))


@pytest.mark.parametrize("arm", ["ste", *GRADIENT_POINT_ARMS])
def test_every_arm_deploys_and_records_q_of_the_latent_iterate(obj, arm):
    q = UniformQuantizer(2)
    res = qat(obj, q, estimator=arm, steps=6, lr=0.05, batch_size=8, record_every=2, seed=1, progress=False)
    qmap = QuantMap(obj, q)
    qparams = qmap.qparams(obj.theta0)  # frozen at the start point for every arm
    for w, deployed, loss in zip(res.latent_trajectory, res.quantized_trajectory, res.history["loss"]):
        assert torch.equal(deployed, qmap(w, qparams))
        assert loss == pytest.approx(obj.loss(deployed), rel=1e-13)
    assert torch.equal(res.theta_q, qmap(res.theta, qparams))


@pytest.mark.parametrize("arm", GRADIENT_POINT_ARMS)
def test_same_seed_same_run_other_seed_other_run(obj, arm):
    kwargs = dict(estimator=arm, steps=5, lr=0.05, batch_size=8, record_every=1, progress=False)
    a = qat(obj, 2, seed=3, **kwargs)
    b = qat(obj, 2, seed=3, **kwargs)
    c = qat(obj, 2, seed=4, **kwargs)
    assert torch.equal(a.latent_trajectory, b.latent_trajectory) and a.history == b.history
    assert not torch.equal(a.latent_trajectory, c.latent_trajectory)  # batches (and draws) change with the seed


def _adam_by_hand(theta, grads_at, steps, lr, betas=(0.9, 0.999), eps=1e-8):
    """PyTorch's Adam (no weight decay, no amsgrad) written out: the FP training oracle."""
    m, v, trajectory = torch.zeros_like(theta), torch.zeros_like(theta), [theta.clone()]
    for t in range(1, steps + 1):
        g = grads_at(t - 1, theta)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        denom = (v.sqrt() / math.sqrt(1 - betas[1] ** t)) + eps
        theta = theta - (lr / (1 - betas[0] ** t)) * m / denom
        trajectory.append(theta.clone())
    return torch.stack(trajectory)


def test_latent_arm_is_fp_training_full_batch_adam(obj):
    res = qat(obj, 2, estimator="latent", steps=8, lr=0.03, record_every=1, progress=False)
    expected = _adam_by_hand(obj.theta0.clone(), lambda t, th: obj.grad(th), 8, 0.03)
    # float64: the same operations in a different association order differ by a few ulp
    assert_close(res.latent_trajectory, expected, rtol=1e-12, atol=1e-14, what="latent arm vs hand-written Adam")


def test_latent_arm_is_fp_training_with_the_same_mini_batches(obj, classification_data):
    """SGD with momentum on hand-drawn batches: qat's stream is Generator(seed): randperm(n), one
    randperm(numel) per quantized target, then randperm(n) at every new epoch."""
    seed, bs, steps, lr, mom = 7, 8, 9, 0.05, 0.9
    res = qat(obj, 2, estimator="latent", steps=steps, lr=lr, optimizer="sgd", momentum=mom, batch_size=bs,
              record_every=1, seed=seed, progress=False)
    x, y = classification_data
    n = y.shape[0]
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(n, generator=gen), 0
    for t in QuantMap(obj, UniformQuantizer(2)).targets:
        torch.randperm(t.spec.numel, generator=gen)
    theta, buf, trajectory = obj.theta0.clone(), None, [obj.theta0.clone()]
    for _ in range(steps):
        if cursor + bs > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + bs]
        cursor += bs
        th = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(obj.batch_loss(th, x[idx], y[idx]), th)
        buf = g if buf is None else mom * buf + g
        theta = theta - lr * buf
        trajectory.append(theta.clone())
    assert_close(res.latent_trajectory, torch.stack(trajectory), rtol=1e-12, atol=1e-14, what="latent arm vs hand SGD")
