"""PTQ damage: second-order predictions, breakdown scale, hill/river split, basin widths.

On the quadratic model (``gradients_helpers.py``) every second-order prediction is exact, the
profile never breaks and the basin width along an eigenvector is sqrt(2 tau / lambda).
"""
from __future__ import annotations

import doctest
import importlib
import json
import math
import time

import pytest
import torch
from helpers import assert_close
from gradients_helpers import DIM, digits_setup, quadratic_objective, single_thread, top_eigenpairs  # noqa: F401 (fixtures)

from riverscape.gradients import HillBasis, basin_widths, breakdown_scale, damage
from riverscape.gradients._common import per_coordinate_scale, random_orthonormal
from riverscape.quant import QuantMap, UniformQuantizer

damage_module = importlib.import_module("riverscape.gradients.damage")  # the package attribute is the function


def _quad(A, w_star, x):
    d = x - w_star
    return float(0.5 * d @ A @ d)


def test_damage_is_exactly_quadratic_on_a_quadratic():
    obj, A, w_star, theta_fp = quadratic_objective(seed=0, offset_scale=0.3)  # g != 0 at theta_fp
    quantizer = UniformQuantizer(2)
    k = 4
    res = damage(obj, theta_fp, quantizer, basis=HillBasis.compute(obj, theta_fp, k=k), tau=0.05, rtn_matvecs=60, progress=False)
    q = QuantMap(obj, quantizer)(theta_fp)
    delta = q - theta_fp
    g = A @ (theta_fp - w_star)
    values, V = top_eigenpairs(A, k)
    c = V.T @ delta
    base = _quad(A, w_star, theta_fp)
    measured = _quad(A, w_star, q) - base
    # Exact identities up to float64 round-off (|terms| ~ 10, d = 18): rtol 1e-10.
    assert res.measured_loss_increase == pytest.approx(measured, rel=1e-12)
    assert res.predicted_first_order == pytest.approx(float(g @ delta), rel=1e-10)
    assert res.predicted_loss_increase == pytest.approx(measured, rel=1e-10)
    assert not hasattr(res, "predicted_quadratic") and not hasattr(res, "hill_energy_share")  # one name per quantity
    assert res.ratio == pytest.approx(1.0, abs=1e-10)
    assert math.isinf(res.breakdown_scale) and res.inside_basin
    assert_close(res.profile_loss, res.profile_quadratic, rtol=1e-10, atol=1e-12, what="profile")
    assert len(res.profile_t) == 16 and res.profile_t[-1] == pytest.approx(1.5)
    # Block-diagonal prediction: one block per quantized tensor.
    blocks = float(g @ delta) + sum(0.5 * float(delta[s] @ A[s, s] @ delta[s]) for s in (slice(0, 12), slice(12, 18)))
    assert res.predicted_block_diagonal == pytest.approx(blocks, rel=1e-10)
    for row, s in zip(res.per_layer, (slice(0, 12), slice(12, 18))):
        part = torch.zeros_like(delta)
        part[s] = delta[s]
        assert row["measured"] == pytest.approx(_quad(A, w_star, theta_fp + part) - base, rel=1e-10)
        assert row["predicted"] == pytest.approx(row["measured"], rel=1e-10)
    # Hill/river split with the dense eigenvectors.
    d_hill = V @ c
    assert res.hill_fraction == pytest.approx(float(c @ c / (delta @ delta)), rel=1e-10)
    assert res.hill_energy_baseline == k / DIM
    assert res.curvature_share == pytest.approx(float((values * c**2).sum() / (delta @ A @ delta)), rel=1e-10)
    assert res.predicted_hill_only == pytest.approx(0.5 * float((values * c**2).sum()), rel=1e-10)
    assert res.dL_hill == pytest.approx(_quad(A, w_star, theta_fp + d_hill) - base, rel=1e-10)
    assert res.dL_river == pytest.approx(_quad(A, w_star, q - d_hill) - base, rel=1e-10)
    assert res.ratio_hill == pytest.approx(1.0, abs=1e-9) and res.ratio_river == pytest.approx(1.0, abs=1e-9)
    # RTN-noise expectation (1/24) sum_j A_jj s_j^2: Hutch++ with a sketch of 20 >= d columns is exact.
    s = per_coordinate_scale(QuantMap(obj, quantizer), theta_fp)
    assert res.expected_rtn_damage == pytest.approx(float((torch.diagonal(A) * s**2).sum() / 24), rel=1e-8)
    sd = torch.sqrt(((V**2) * (s**2 / 12)[:, None]).sum(0))
    assert_close(res.rho_expected, sd / torch.sqrt(2 * 0.05 / values), rtol=1e-10, what="rho_expected")
    out = res.to_dict()
    json.dumps(out, allow_nan=False)
    assert out["breakdown_scale"] is None and out["inside_basin"] is True


def test_basin_widths_match_the_quadratic_width():
    obj, A, w_star, theta_fp = quadratic_objective(seed=1)  # theta_fp = w*: L(w* + t v) - L(w*) = lambda t^2 / 2
    values, V = top_eigenpairs(A, 5)
    tau = 0.05
    plus, minus = basin_widths(obj, theta_fp, values, V, tau)
    expected = torch.sqrt(2 * tau / values)
    # Bisection stops at a relative bracket of 1e-10; round-off in L near tau is ~1e-16/tau.
    assert_close(plus, expected, rtol=1e-8, what="width +v")
    assert_close(minus, expected, rtol=1e-8, what="width -v")
    # The scan stops at 1024 times the guess sqrt(2 tau / lambda): a wildly wrong lambda (1e12 vs 20)
    # leaves the loss below tau on the whole scan, which is reported as inf (not found).
    flat_plus, flat_minus = basin_widths(obj, theta_fp, torch.tensor([1e12]), V[:, :1], tau)
    assert math.isinf(flat_plus[0]) and math.isinf(flat_minus[0])
    with pytest.raises(ValueError, match="tau"):
        basin_widths(obj, theta_fp, values, V, 0.0)


def test_rho_is_the_hill_coordinate_over_the_measured_width():
    obj, A, w_star, theta_fp = quadratic_objective(seed=2)
    res = damage(obj, theta_fp, UniformQuantizer(2), basis=HillBasis.compute(obj, theta_fp, k=3), tau=0.02, floor=False, random_control=False, rtn_matvecs=0, progress=False)
    values, V = top_eigenpairs(A, 3)
    c = V.T @ (QuantMap(obj, UniformQuantizer(2))(theta_fp) - theta_fp)
    assert_close(res.rho, c.abs() / torch.sqrt(2 * 0.02 / values), rtol=1e-8, what="rho")
    assert res.rho_max == pytest.approx(max(res.rho))
    assert res.floor_recovery is None and res.random_subspace_recovery is None and res.expected_rtn_damage is None


def test_hill_fraction_is_one_inside_the_subspace_and_k_over_d_for_random_perturbations():
    obj, A, w_star, theta_fp = quadratic_objective(seed=3)
    k = 3
    values, V = top_eigenpairs(A, k)
    kwargs = dict(basis=HillBasis.from_vectors(obj, theta_fp, V, values=values), widths=False, floor=False, random_control=False, rtn_matvecs=0, progress=False)
    inside = damage(obj, theta_fp, UniformQuantizer(4), theta_q=theta_fp + V @ torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), **kwargs)
    assert inside.hill_fraction == pytest.approx(1.0, abs=1e-12)
    assert inside.curvature_share == pytest.approx(1.0, abs=1e-12)
    assert inside.dL_river == pytest.approx(0.0, abs=1e-14)
    # For isotropic delta, E_H ~ Beta(k/2, (d-k)/2): mean k/d = 1/6, variance
    # (k/d)(1 - k/d) 2/(d + 2) = 0.0139. The mean of n = 200 draws has sd 0.0083; allow 4 sd.
    g = torch.Generator().manual_seed(0)
    shares = [
        damage(obj, theta_fp, UniformQuantizer(4), theta_q=theta_fp + torch.randn(DIM, generator=g, dtype=torch.float64), **kwargs).hill_fraction
        for _ in range(200)
    ]
    assert abs(sum(shares) / len(shares) - k / DIM) < 4 * 0.0083


def test_floor_recovery_beats_the_random_subspace_on_a_quadratic():
    obj, A, w_star, theta_fp = quadratic_objective(seed=4)
    res = damage(obj, theta_fp, UniformQuantizer(2), basis=HillBasis.compute(obj, theta_fp, k=6), widths=False, rtn_matvecs=0, progress=False)
    values, V = top_eigenpairs(A, 6)
    q = QuantMap(obj, UniformQuantizer(2))(theta_fp)
    # Exact floor: remove the hill coordinates of q - w*; the rest is the river damage.
    P = V @ V.T
    floor_point = q - P @ (q - w_star)
    assert res.floor_recovery == pytest.approx(_quad(A, w_star, floor_point), rel=1e-8)
    assert res.floor_recovery == pytest.approx(res.dL_river, rel=1e-8)
    # Random orthonormal frame of the same size (same seed -> same frame): exact minimiser too.
    frame = random_orthonormal(DIM, 6, torch.Generator().manual_seed(0), theta_fp)
    u = q - w_star
    c = torch.linalg.solve(frame.T @ A @ frame, -(frame.T @ A @ u))
    assert res.random_subspace_recovery >= res.floor_recovery
    assert res.random_subspace_recovery == pytest.approx(_quad(A, w_star, q + frame @ c), rel=1e-6)


def test_breakdown_scale_detects_a_cubic_departure():
    t = torch.linspace(0, 1.5, 16).tolist()
    quadratic = [x * x for x in t]
    cubic = [x * x + 2 * x**3 for x in t]  # |p - p2| = 2 t^3 > t^2 / 2  <=>  t > 1/4
    t_b = breakdown_scale(t, cubic, quadratic, atol=0.0)
    assert 0.2 <= t_b <= 0.3
    assert math.isinf(breakdown_scale(t, quadratic, quadratic))
    assert doctest.testmod(damage_module, raise_on_error=True).attempted >= 2


def test_damage_validates_arguments():
    obj, _, _, theta_fp = quadratic_objective(seed=5)
    with pytest.raises(ValueError, match="tau"):
        damage(obj, theta_fp, UniformQuantizer(2), tau=-1.0, progress=False)
    with pytest.raises(ValueError, match="profile_points"):
        damage(obj, theta_fp, UniformQuantizer(2), profile_points=1, progress=False)


@pytest.mark.slow
def test_digits_damage_end_to_end(digits_setup):
    model, state, obj, op, values, vectors = digits_setup
    widths = basin_widths(obj, obj.theta0, values, vectors, 0.05)  # depend on w_ref only: reuse across bits
    results = {}
    for bits in (4, 2):
        start = time.perf_counter()
        res = damage(obj, None, UniformQuantizer(bits), basis=HillBasis(values, vectors, op), widths=widths, progress=False)
        results[bits] = res
        print(f"\n{bits}-bit: dL {res.measured_loss_increase:.4g} pred {res.predicted_loss_increase:.4g} r {res.ratio:.3g} "
              f"t_b {res.breakdown_scale:.3g} E_H {res.hill_fraction:.4f} (k/d {res.hill_energy_baseline:.4f}) "
              f"C_H {res.curvature_share:.3f} rho_max {res.rho_max:.3f} floor {res.floor_recovery:.4g} "
              f"random {res.random_subspace_recovery:.4g} ({time.perf_counter() - start:.2f} s)")
    four, two = results[4], results[2]
    # 4 bits: inside the quadratic regime (measured within a factor 2 of the prediction).
    assert 0.5 <= four.ratio <= 2.0
    # 2 bits: the quadratic model underestimates grossly and breaks before t = 1.
    assert two.ratio > 10 and not two.inside_basin
    for res in (four, two):
        # delta's energy in the hill subspace is random-like, its curvature share is not.
        assert res.curvature_share > 20 * res.hill_fraction
        assert res.floor_recovery < res.measured_loss_increase
    # The user's model is unchanged.
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_basin_widths_evaluate_in_bounded_chunks_with_the_same_result(monkeypatch):
    """The scan never builds all 2k x 29 points at once (26 GB for an 11M-parameter model); chunking changes no width."""
    damage_module = importlib.import_module("riverscape.gradients.damage")  # the package exports a function of that name
    obj, A, _, theta_fp = quadratic_objective(seed=1)
    values, V = top_eigenpairs(A, 5)
    whole = basin_widths(obj, theta_fp, values, V, 0.05)
    seen = []
    original = obj.losses

    def spy(points, **kwargs):
        seen.append(points.shape[0])
        return original(points, **kwargs)

    monkeypatch.setattr(obj, "losses", spy)
    monkeypatch.setattr(damage_module, "POINTS_BYTES", 3 * theta_fp.numel() * theta_fp.element_size())  # 3 points per call
    chunked = basin_widths(obj, theta_fp, values, V, 0.05)
    assert seen and max(seen) == 3
    assert chunked == whole  # the same points, evaluated in other groups: bit-identical in float64
