"""Matched nulls of ``cosine_floor``, ``cosine_qat``, the normalised inward component and the series along QAT.

Oracles: the exact quadratic of ``gradients_helpers.py`` (grad = A (w - w*), H = A), where a
quantized point displaced along the top eigenvector has a known way back (every cosine is 1),
and an Objective whose gradient is replaced by a fresh isotropic Gaussian vector: then the
observed statistic and each null draw are i.i.d. (the cosine of an isotropic vector with any
direction built independently of it has one distribution), so the empirical p-value is uniform
on {1/(n+1), ..., 1}.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gradients_helpers import DIM, QuadraticModel, output_as_loss, quadratic_objective, single_thread, spd_matrix, top_eigenpairs  # noqa: F401

import riverscape as rs
from riverscape.gradients import HillBasis, alignment, alignment_along_qat, matched_null
from riverscape.gradients._common import NullComparison, per_coordinate_scale, rademacher
from riverscape.quant import QuantMap, UniformQuantizer


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


class RandomGradientObjective(rs.Objective):
    """The true loss values with a fresh standard Gaussian vector as the gradient at every call."""

    def __init__(self, *args, generator: torch.Generator, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generator = generator

    def value_and_grad(self, theta):
        return self.loss(theta), torch.randn(self.dim, generator=self.generator, dtype=torch.float64)


def _quadratic(A, minimum, start, *, generator=None):
    model = QuadraticModel(A, minimum, start).double()
    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    if generator is None:
        return rs.Objective(model, output_as_loss, data, dtype=torch.float64)
    return RandomGradientObjective(model, output_as_loss, data, dtype=torch.float64, generator=generator)


def test_floor_and_qat_nulls_are_the_hand_computed_draws():
    # theta_fp = w* (a minimum) and exact eigenvectors: the floor below any q' is q' - P (q' - w*)
    # (the quadratic warm start is exact), so every null draw has a closed form.
    obj, A, w_star, theta_fp = quadratic_objective(seed=2)
    values, V = top_eigenpairs(A, 4)
    P = V @ V.T
    quantizer = UniformQuantizer(2)
    theta_qat = theta_fp + 0.05 * torch.randn(DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    n = 12
    res = alignment(obj, theta_fp, quantizer, basis=HillBasis.from_vectors(obj, theta_fp, V, values=values), theta_qat=theta_qat,
                    n_null=n, floor_steps=5, per_layer=False, seed=7, progress=False)
    q = QuantMap(obj, quantizer)(theta_fp)
    delta = q - theta_fp
    signs = rademacher((n, DIM), torch.Generator().manual_seed(7), delta)  # alignment's draws: generator seeded by `seed`
    floor_draws, qat_draws, inward_draws = [], [], []
    for eps in signs:
        point = theta_fp + delta * eps
        g = A @ (point - w_star)
        floor_draws.append(_cos(-g, -P @ (point - w_star)))
        qat_draws.append(_cos(-g, theta_qat - point))
        inward_draws.append(_cos(-g, P @ (theta_fp - point)))
    g_q = A @ (q - w_star)
    # float64 closed forms; the L-BFGS floor solve starts at the exact minimiser (|V^T grad| ~ 1e-15)
    assert res.cosine_floor == pytest.approx(_cos(-g_q, -P @ (q - w_star)), abs=1e-10)
    for prefix, observed, draws in (("null_floor", res.cosine_floor, floor_draws), ("null_qat", res.cosine_qat, qat_draws),
                                    ("null_inward", res.inward, inward_draws)):
        mean, sd = float(np.mean(draws)), float(np.std(draws, ddof=1))
        assert getattr(res, f"{prefix}_mean") == pytest.approx(mean, abs=1e-10), prefix
        assert getattr(res, f"{prefix}_sd") == pytest.approx(sd, rel=1e-8), prefix
        assert getattr(res, f"{prefix}_z") == pytest.approx((observed - mean) / sd, rel=1e-8), prefix
        assert getattr(res, f"{prefix}_p") == pytest.approx((1 + sum(d >= observed for d in draws)) / (n + 1), abs=1e-12), prefix
    assert res.z_iso_floor == pytest.approx(res.cosine_floor * math.sqrt(DIM), rel=1e-14)
    assert res.z_iso_qat == pytest.approx(res.cosine_qat * math.sqrt(DIM), rel=1e-14)
    assert res.inward == pytest.approx(res.cosine_hill, abs=1e-15)  # I / |g| is the cosine with u_hill
    # Without the floor null no floor solve per draw: the fields stay empty
    cheap = alignment(obj, theta_fp, quantizer, basis=HillBasis.from_vectors(obj, theta_fp, V, values=values), n_null=4, floor_null=False,
                      per_layer=False, progress=False)
    assert cheap.cosine_floor is not None and cheap.null_floor_z is None and cheap.null_qat_z is None


def test_a_known_way_back_is_significant_against_every_static_null():
    # q = w* + s v_1: the gradient A (q - w*) = lambda_1 s v_1 points exactly back (to fp, to the floor,
    # inward, to a QAT solution at w*), every cosine is 1. A random-sign draw w* + s v_1 * eps mixes
    # the eigendirections, so its cosines are < 1: the observed value beats all n draws.
    obj, A, w_star, theta_fp = quadratic_objective(seed=4)
    values, V = top_eigenpairs(A, 4)
    q = theta_fp + 0.4 * V[:, 0]
    n = 30
    res = alignment(obj, theta_fp, UniformQuantizer(2), theta_q=q, theta_qat=w_star, basis=HillBasis.from_vectors(obj, theta_fp, V, values=values),
                    n_null=n, floor_steps=20, per_layer=False, progress=False)
    for name in ("cosine_to_fp", "cosine_floor", "cosine_qat", "inward"):
        assert getattr(res, name) == pytest.approx(1.0, abs=1e-9), name
    for prefix in ("null", "null_floor", "null_qat", "null_inward"):
        # significant: above every draw, p = 1/31 < 0.05 (the smallest attainable); the floor's null sits close to 1
        # (A x is mostly in the hill subspace for any x), so its z is only ~1.5: the p-value is the test
        assert getattr(res, f"{prefix}_p") == pytest.approx(1 / (n + 1)), prefix
        assert getattr(res, f"{prefix}_z") > 1, prefix


def test_random_gradients_give_uniform_p_values():
    # A fresh Gaussian gradient everywhere: observed and draws i.i.d., so P(p <= j/(n+1)) = j/(n+1).
    # 30 repeats x 4 statistics, n = 9 draws; the floor solve of each draw keeps the exact quadratic
    # warm start (random gradients cannot pass the Armijo test at the floor's minimum).
    A, _, _ = spd_matrix(DIM, 5)
    minimum = torch.randn(DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values, V = top_eigenpairs(A, 4)
    obj = _quadratic(A, minimum, minimum, generator=torch.Generator().manual_seed(0))
    basis = HillBasis.from_vectors(obj, minimum, V, values=values)
    n, repeats = 9, 30
    ps = {name: [] for name in ("null_p", "null_inward_p", "null_floor_p", "null_qat_p")}
    for r in range(repeats):
        res = alignment(obj, minimum, UniformQuantizer(2), basis=basis, theta_qat=minimum + 0.1, n_null=n, floor_steps=1,
                        per_layer=False, seed=r, progress=False)
        for name in ps:
            ps[name].append(getattr(res, name))
    pooled = np.array([p for values_ in ps.values() for p in values_])
    assert pooled.size == 4 * repeats  # no statistic was undefined
    # Each p is uniform on {0.1, ..., 1.0}: mean 0.55, sd 0.287; the 120 values are 4 correlated
    # families of 30 independent ones, so the sd of the pooled mean is at most 0.287 / sqrt(30) = 0.052:
    # 4 sd is 0.21. The share of p <= 0.2 is 0.2 in expectation (sd <= 0.073 per family): 4 sd is 0.29.
    assert abs(pooled.mean() - 0.55) < 0.21
    assert abs(np.mean(pooled <= 0.2 + 1e-12) - 0.2) < 0.29
    for name, values_ in ps.items():  # and no family is stuck at one end (the significant case gives 0.1 always)
        assert 0.2 < np.mean(values_) < 0.9, name


def _on_grid_setup(generator=None):
    """Diagonal A (eigenvectors = coordinate axes, the largest on coordinate 0), theta_fp = w* on the frozen grid,
    and a latent point one grid step from it along coordinate 0 plus noise below a quarter step elsewhere:
    Q(w) - w* is a multiple of e_0, an eigenvector, so the gradient at Q(w) points exactly back."""
    lam = torch.logspace(1.3, -1.3, DIM, dtype=torch.float64)
    A = torch.diag(lam)
    start = torch.randn(DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    probe = _quadratic(A, start, start)
    qmap = QuantMap(probe, UniformQuantizer(3))
    frozen = qmap.qparams(start)
    theta_fp = qmap(start, frozen)  # a grid point: Q(theta_fp) = theta_fp
    obj = _quadratic(A, theta_fp, theta_fp, generator=generator)
    qmap = QuantMap(obj, UniformQuantizer(3))
    step = per_coordinate_scale(qmap, start)
    noise = 0.2 * step * (2 * torch.rand(DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 1)
    direction = -1.0 if float(theta_fp[0]) > 0 else 1.0  # stay inside the channel's range
    w = theta_fp + noise
    w[0] = theta_fp[0] + direction * step[0] + noise[0]
    return obj, qmap, frozen, A, lam, theta_fp, w


def test_along_qat_null_flags_a_known_way_back():
    obj, qmap, frozen, A, lam, theta_fp, w = _on_grid_setup()
    basis = HillBasis.from_vectors(obj, theta_fp, torch.eye(DIM, dtype=torch.float64)[:, :4], values=lam[:4])  # top-4 of diagonal A
    n = 30
    series = alignment_along_qat(obj, theta_fp, qmap, w[None], basis=basis, qparams=frozen, n_null=n, seed=3, progress=False)
    q = qmap(w, frozen)
    assert torch.count_nonzero(q - theta_fp) == 1  # only coordinate 0 moved, by one grid step
    assert series.cosine_to_fp[0] == pytest.approx(1.0, abs=1e-12) and series.inward[0] == pytest.approx(1.0, abs=1e-12)
    assert series.null_p[0] == pytest.approx(1 / (n + 1)) and series.null_inward_p[0] == pytest.approx(1 / (n + 1))
    assert series.null_z[0] > 1 and series.null_inward_z[0] > 1  # the p-value is the test; z as in the static case
    # the latent cosine's draws by hand: q' = w + (q - w) * eps, statistic cos(-grad L(q'), w - q')
    draws = []
    for eps in rademacher((n, DIM), torch.Generator().manual_seed(3), w):
        point = w + (q - w) * eps
        draws.append(_cos(-(A @ (point - theta_fp)), w - point))
    latent = NullComparison.of(_cos(-(A @ (q - theta_fp)), w - q), draws)
    assert series.null_latent_mean[0] == pytest.approx(latent.null_mean, abs=1e-12)
    assert series.null_latent_z[0] == pytest.approx(latent.z, rel=1e-9)
    assert series.null_latent_p[0] == pytest.approx(latent.p_value)
    assert series.n_null == n and series.to_dict()["null_p"] == series.null_p


def test_along_qat_from_theta_fp_is_the_static_null():
    # Row 0 of a run from theta_fp rounds theta_fp itself: the same draws (the seed's first block) and target give
    # the static alignment's null of cosine_to_fp and of the inward component, bit for bit up to summation order.
    obj, A, w_star, theta_fp = quadratic_objective(seed=6, offset_scale=0.2)
    values, V = top_eigenpairs(A, 4)
    basis = HillBasis.from_vectors(obj, theta_fp, V, values=values)
    quantizer = UniformQuantizer(2)
    series = alignment_along_qat(obj, theta_fp, quantizer, theta_fp[None], basis=basis, n_null=10, seed=4, progress=False)
    static = alignment(obj, theta_fp, quantizer, basis=basis, n_null=10, floor=False, per_layer=False, seed=4, progress=False)
    for name in ("null_mean", "null_z", "null_p", "null_inward_mean", "null_inward_z", "null_inward_p"):
        assert getattr(series, name)[0] == pytest.approx(getattr(static, name), rel=1e-12, abs=1e-15), name
    empty = alignment_along_qat(obj, theta_fp, quantizer, theta_fp[None], basis=basis, n_null=0, progress=False)
    assert empty.n_null == 0 and empty.null_z == []
    with pytest.raises(ValueError, match="n_null"):
        alignment_along_qat(obj, theta_fp, quantizer, theta_fp[None], basis=basis, n_null=-1, progress=False)


def test_along_qat_random_gradients_give_uniform_p_values():
    gen = torch.Generator().manual_seed(11)
    obj, qmap, frozen, A, lam, theta_fp, w = _on_grid_setup(generator=gen)
    basis = HillBasis.from_vectors(obj, theta_fp, torch.eye(DIM, dtype=torch.float64)[:, :4], values=lam[:4])
    rows = 60
    # latent points within 0.2 step of w: every row rounds to theta_fp + step e_0, so u_hill is never zero
    noise = 2 * torch.rand(rows, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 1
    trajectory = w + 0.2 * noise * per_coordinate_scale(qmap, theta_fp)
    n = 9
    series = alignment_along_qat(obj, theta_fp, qmap, trajectory, basis=basis, qparams=frozen, n_null=n, progress=False)
    for name in ("null_p", "null_inward_p", "null_latent_p"):
        ps = np.array(getattr(series, name), dtype=float)
        # 60 independent rows, p uniform on {0.1, ..., 1}: sd of the mean 0.287 / sqrt(60) = 0.037, 4 sd = 0.15
        assert abs(ps.mean() - 0.55) < 0.15, name
        assert np.mean(ps <= 0.1 + 1e-12) < 0.1 + 4 * math.sqrt(0.09 / rows), name
