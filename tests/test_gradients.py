"""Alignment of gradients at quantized points, the matched null, the valley floor, QAT series.

Oracles: the quadratic model of ``gradients_helpers.py`` (grad = A (w - w*), H = A exactly),
closed forms in float64 and exhaustive enumeration of sign patterns.
"""
from __future__ import annotations

import doctest
import itertools
import math
import time

import pytest
import torch
from helpers import assert_close
from gradients_helpers import DIM, digits_setup, quadratic_objective, single_thread, top_eigenpairs  # noqa: F401 (fixtures)

from riverscape.gradients import HillBasis, alignment, alignment_along_qat, floor, matched_null, valley_floor
from riverscape.gradients._common import random_orthonormal
from riverscape.quant import QuantMap, UniformQuantizer


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _projector(V):
    return V @ V.T


@pytest.mark.parametrize("offset_scale", [0.0, 0.3])
def test_alignment_matches_closed_forms_on_a_quadratic(offset_scale):
    obj, A, w_star, theta_fp = quadratic_objective(seed=0, offset_scale=offset_scale)
    quantizer = UniformQuantizer(3)
    res = alignment(obj, theta_fp, quantizer, basis=HillBasis.compute(obj, theta_fp, k=4), n_null=3, progress=False)
    q = QuantMap(obj, quantizer)(theta_fp)
    g_q, g_fp = A @ (q - w_star), A @ (theta_fp - w_star)
    u_back = theta_fp - q
    _, V = top_eigenpairs(A, 4)
    P = _projector(V)
    u_hill, u_river = P @ u_back, u_back - P @ u_back
    # Closed forms; float64 round-off over d = 18 terms and ARPACK eigenvectors accurate to
    # ~1e-13 bound the differences by far less than 1e-10.
    assert res.cosine_to_fp == pytest.approx(_cos(-g_q, u_back), abs=1e-12)
    assert res.cosine_hill == pytest.approx(_cos(-g_q, u_hill), abs=1e-10)
    assert res.cosine_river == pytest.approx(_cos(-g_q, u_river), abs=1e-10)
    # the inward component normalised by |g_Q| is the cosine with u_hill; the raw one is loss per unit length
    assert res.inward == pytest.approx(float(-g_q @ u_hill / (u_hill.norm() * g_q.norm())), rel=1e-10)
    assert res.inward_raw == pytest.approx(float(-g_q @ u_hill / u_hill.norm()), rel=1e-10)
    assert res.chi_k == pytest.approx(float((P @ g_q).norm() ** 2 / g_q.norm() ** 2), rel=1e-10)
    assert res.chi_k_baseline == 4 / DIM and res.random_baseline == 1 / math.sqrt(DIM)
    assert res.z_iso == pytest.approx(res.cosine_to_fp * math.sqrt(DIM), rel=1e-14)
    assert res.grad_norm_q == pytest.approx(float(g_q.norm()), rel=1e-12)
    assert res.grad_norm_fp == pytest.approx(float(g_fp.norm()), rel=1e-12, abs=1e-14)
    # On a quadratic grad L(q) - grad L(w) = H delta exactly: the second-order relation is exact.
    assert res.second_order_cosine == pytest.approx(1.0, abs=1e-12)
    assert res.second_order_relerr < 1e-10
    assert_close(res.hill_restoring_ratio, torch.ones(4), rtol=1e-8, what="hill restoring ratio")
    assert_close(res.eigenvalues, top_eigenpairs(A, 4)[0], rtol=1e-10, what="eigenvalues")
    # Per layer: the cosine of the layer's slices and the gradient energy shares (sum to 1).
    rows = res.per_layer
    assert [r["name"] for r in rows] == ["layers.0.weight", "layers.1.weight"]
    sl = slice(0, 12)
    assert rows[0]["cosine_to_fp"] == pytest.approx(_cos(-g_q[sl], u_back[sl]), abs=1e-12)
    assert sum(r["grad_energy_share"] for r in rows) == pytest.approx(1.0, abs=1e-12)
    assert sum(r["delta_energy_share"] for r in rows) == pytest.approx(1.0, abs=1e-12)


def test_alignment_to_dict_is_flat_and_json_ready():
    import json

    obj, A, w_star, theta_fp = quadratic_objective(seed=1)
    theta_qat = theta_fp + 0.01
    res = alignment(obj, None, UniformQuantizer(2), basis=HillBasis.compute(obj, None, k=3), n_null=2, theta_qat=theta_qat, progress=False)
    out = res.to_dict()
    json.dumps(out, allow_nan=False)
    for key in ("cosine_to_fp", "random_baseline", "cosine_hill", "cosine_river", "cosine_floor", "cosine_qat",
                "inward", "chi_k", "chi_k_baseline", "z_iso", "null_mean", "null_sd", "null_z",
                "second_order_cosine", "second_order_relerr", "hill_restoring_ratio", "grad_norm_q",
                "grad_norm_fp", "k", "dim", "per_layer"):
        assert key in out, key
    assert out["cosine_qat"] == pytest.approx(_cos(-(A @ (QuantMap(obj, UniformQuantizer(2))(theta_fp) - w_star)),
                                                   theta_qat - QuantMap(obj, UniformQuantizer(2))(theta_fp)), abs=1e-12)
    no_qat = alignment(obj, None, UniformQuantizer(2), basis=HillBasis.compute(obj, None, k=3), n_null=0, floor=False, progress=False).to_dict()
    assert no_qat["cosine_qat"] is None and no_qat["cosine_floor"] is None and no_qat["null_mean"] is None


def test_matched_null_equals_enumeration_of_all_sign_patterns():
    shapes = ((2, 3),)  # d = 6: all 64 sign patterns
    obj, A, w_star, theta_fp = quadratic_objective(seed=2, offset_scale=0.2, shapes=shapes)
    q = QuantMap(obj, UniformQuantizer(2))(theta_fp)
    delta = q - theta_fp
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=6)), dtype=torch.float64)
    null = matched_null(obj, theta_fp, delta, signs)
    expected = []
    for eps in signs:
        d = delta * eps
        g = A @ (theta_fp + d - w_star)
        expected.append(_cos(-g, -d))
    assert_close(null.cosines, expected, rtol=0, atol=1e-13, what="null cosines")
    increases = [float(0.5 * (theta_fp + delta * e - w_star) @ A @ (theta_fp + delta * e - w_star)
                       - 0.5 * (theta_fp - w_star) @ A @ (theta_fp - w_star)) for e in signs]
    assert_close(null.loss_increases, increases, rtol=1e-12, atol=1e-14, what="null loss increases")

    # The sampled null of alignment() estimates the exact mean over patterns. With n i.i.d.
    # draws the sample mean has sd sigma/sqrt(n) (sigma: population sd over the 64 patterns);
    # 4 sd is a two-sided false-alarm rate of 6e-5 (and the seed is fixed).
    exact = torch.tensor(expected)
    n = 400
    res = alignment(obj, theta_fp, UniformQuantizer(2), basis=HillBasis.compute(obj, theta_fp, k=2), n_null=n, floor=False, per_layer=False, progress=False)
    sigma = float(exact.std(unbiased=False))
    assert abs(res.null_mean - float(exact.mean())) < 4 * sigma / math.sqrt(n)
    assert res.null_sd == pytest.approx(sigma, rel=0.25)  # sd of a sample sd ~ sigma/sqrt(2n) = 3.5 % of sigma
    assert res.null_z == pytest.approx((res.cosine_to_fp - res.null_mean) / res.null_sd, rel=1e-12)


@pytest.mark.parametrize("method, gtol", [("lbfgs", 1e-10), ("gd", 1e-7)])
def test_valley_floor_is_the_exact_minimiser_along_the_subspace(method, gtol):
    obj, A, w_star, theta_fp = quadratic_objective(seed=3)
    g = torch.Generator().manual_seed(5)
    V = random_orthonormal(DIM, 3, g, theta_fp)  # not eigenvectors: the k-dim problem is coupled
    u = theta_fp + torch.randn(DIM, generator=g, dtype=torch.float64)
    # Plain gradient descent stalls near |V^T grad| ~ 1e-8, where the Armijo decrease is below
    # the round-off of L ~ 1: ask it for 1e-7 only.
    res = valley_floor(obj, u, V, method=method, steps=5000, gtol=gtol)
    # argmin_c 1/2 (u + V c - w*)^T A (u + V c - w*)  <=>  (V^T A V) c = -V^T A (u - w*)
    c_star = torch.linalg.solve(V.T @ A @ V, -(V.T @ A @ (u - w_star)))
    # The solvers stop at |V^T grad| <= gtol; the subspace Hessian's smallest eigenvalue is
    # > 0.05 (A's smallest), so |c - c*| <= gtol / 0.05 = 20 gtol (inf-norm vs 2-norm: x sqrt(3)).
    tol = 40 * gtol
    assert_close(res.coefficients, c_star, rtol=0, atol=tol, what=f"floor coefficients ({method})")
    assert_close(res.point, u + V @ c_star, rtol=0, atol=tol, what="floor point")
    assert res.converged and res.subspace_grad_norm < 2 * gtol
    assert res.loss_floor <= res.loss_start


def test_valley_floor_quadratic_warm_start_is_exact_with_eigenvectors():
    obj, A, w_star, theta_fp = quadratic_objective(seed=4)  # theta_fp = w* (a minimum)
    _, V = top_eigenpairs(A, 5)
    u = theta_fp + 0.3 * torch.randn(DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = valley_floor(obj, u, V, reference=theta_fp)
    assert res.start == "quadratic"
    # The quadratic-model start -V^T (u - w*) is already the minimiser: V^T grad = Lambda V^T (u + V c - w*) = 0.
    assert_close(res.coefficients, -(V.T @ (u - w_star)), rtol=0, atol=1e-12, what="warm start")
    with pytest.raises(ValueError, match="lbfgs"):
        valley_floor(obj, u, V, method="newton")


def test_alignment_along_qat_agrees_with_alignment_at_each_row():
    obj, A, w_star, theta_fp = quadratic_objective(seed=5, offset_scale=0.1)
    quantizer = UniformQuantizer(3)
    g = torch.Generator().manual_seed(1)
    trajectory = torch.stack([theta_fp + 0.05 * i * torch.randn(DIM, generator=g, dtype=torch.float64) for i in range(3)])
    values, vectors = top_eigenpairs(A, 4)
    series = alignment_along_qat(obj, theta_fp, quantizer, trajectory, steps=[0, 10, 20], basis=HillBasis.from_vectors(obj, theta_fp, vectors, values=values), progress=False)
    assert series.steps == [0, 10, 20]
    qmap = QuantMap(obj, quantizer)
    P = _projector(vectors)
    for i, w in enumerate(trajectory):
        q = qmap(w)
        single = alignment(obj, theta_fp, quantizer, theta_q=q, basis=HillBasis.from_vectors(obj, theta_fp, vectors, values=values), n_null=0, floor=False, progress=False)
        assert series.cosine_to_fp[i] == pytest.approx(single.cosine_to_fp, abs=1e-14)
        assert series.cosine_hill[i] == pytest.approx(single.cosine_hill, abs=1e-14)
        assert series.inward[i] == pytest.approx(single.inward, rel=1e-12)
        assert series.chi_k[i] == pytest.approx(single.chi_k, rel=1e-12)
        delta = q - w
        assert series.delta_norm[i] == pytest.approx(float(delta.norm()), rel=1e-14)
        assert series.hill_fraction[i] == pytest.approx(float((P @ delta).norm() ** 2 / delta.norm() ** 2), rel=1e-10)
        cH = float((values * (vectors.T @ delta) ** 2).sum() / (delta @ A @ delta))
        assert series.curvature_share[i] == pytest.approx(cH, rel=1e-10)
        assert series.loss_q[i] == pytest.approx(float(0.5 * (q - w_star) @ A @ (q - w_star)), rel=1e-12)
        assert series.cosine_latent[i] == pytest.approx(_cos(-(A @ (q - w_star)), w - q), abs=1e-12)
    # Frozen quantization parameters give Q(w_t) on the grid calibrated at theta_fp.
    frozen = qmap.qparams(theta_fp)
    fixed = alignment_along_qat(obj, theta_fp, quantizer, trajectory, basis=HillBasis.from_vectors(obj, theta_fp, vectors, values=values), qparams=frozen, progress=False)
    q_last = qmap(trajectory[-1], frozen)
    assert fixed.loss_q[-1] == pytest.approx(float(0.5 * (q_last - w_star) @ A @ (q_last - w_star)), rel=1e-12)
    with pytest.raises(ValueError, match="step labels"):
        alignment_along_qat(obj, theta_fp, quantizer, trajectory, steps=[0, 1], basis=HillBasis.from_vectors(obj, theta_fp, vectors, values=values), progress=False)


def test_bad_arguments_raise_clear_errors():
    obj, A, _, theta_fp = quadratic_objective(seed=6)
    with pytest.raises(TypeError, match="UniformQuantizer or a QuantMap"):
        alignment(obj, theta_fp, "int2", progress=False)
    with pytest.raises(ValueError, match="n_null"):
        alignment(obj, theta_fp, UniformQuantizer(2), n_null=-1, progress=False)
    with pytest.raises(ValueError, match="only apply to a UniformQuantizer"):
        alignment(obj, theta_fp, QuantMap(obj, UniformQuantizer(2)), keep_first_last=True, progress=False)
    with pytest.raises(ValueError, match="3 values for 2 vectors"):
        HillBasis.from_vectors(obj, theta_fp, torch.eye(obj.dim, dtype=torch.float64)[:, :2], values=torch.ones(3))
    with pytest.raises(ValueError, match="vectors must have shape"):
        HillBasis.from_vectors(obj, theta_fp, torch.ones(3, 2, dtype=torch.float64))
    other, *_ = quadratic_objective(seed=7, shapes=((3, 2),))  # a basis of another model is refused before any work
    with pytest.raises(ValueError, match="hill basis has vectors of dimension 6"):
        alignment(obj, theta_fp, UniformQuantizer(2), basis=HillBasis.compute(other, k=2), progress=False)


def test_docstring_examples():
    assert doctest.testmod(floor, raise_on_error=True).attempted >= 1


@pytest.mark.slow
def test_digits_alignment_end_to_end(digits_setup):
    model, state, obj, op, values, vectors = digits_setup
    training_flag = model.training
    results = {}
    for bits in (4, 2):
        start = time.perf_counter()
        res = alignment(obj, None, UniformQuantizer(bits), basis=HillBasis(values, vectors, op), progress=False)
        results[bits] = res
        print(f"\n{bits}-bit: A(u_back) {res.cosine_to_fp:.4f} (1/sqrt(d) {res.random_baseline:.4f}, null "
              f"{res.null_mean:.4f}+-{res.null_sd:.4f}, z {res.null_z:+.2f}) A(u_hill) {res.cosine_hill:.3f} "
              f"A(u_river) {res.cosine_river:.3f} chi_k {res.chi_k:.3f} I {res.inward:.3g} "
              f"cos2 {res.second_order_cosine:.3f} relerr {res.second_order_relerr:.3f} ({time.perf_counter() - start:.2f} s)")
        # Robust facts: any perturbation of a minimum beats the isotropic baseline (H >= 0 near w*),
        # the gradient at q lives mostly in the top-10 subspace, and its hill part aligns better than its river part.
        assert res.cosine_to_fp > 2 * res.random_baseline
        assert res.chi_k > 50 * res.chi_k_baseline
        assert res.cosine_hill > res.cosine_river
        assert res.inward > 0
        assert len(res.per_layer) == 2
    # The second-order relation holds at 4 bits and breaks at 2 bits (leaving the quadratic basin).
    assert results[4].second_order_cosine > 0.9 > results[2].second_order_cosine
    # The user's model is unchanged (parameters bit-identical, same training flag).
    assert model.training == training_flag
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
