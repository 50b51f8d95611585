"""Directions: filter normalisation (Li et al.), eigenvector directions, planes through three points."""
from __future__ import annotations

import pytest
import torch

import riverscape as rs
from helpers import assert_close, tiny_cnn, tiny_mlp
from riverscape.landscape.directions import (
    eigenvector_directions,
    orthonormalize,
    plane_coordinates,
    plane_through,
    quantization_direction,
    random_direction,
)
from riverscape.quant import QuantMap, UniformQuantizer, ptq


@pytest.fixture
def cnn_objective(image_data):
    return rs.Objective(tiny_cnn(), "cross_entropy", image_data)


def _filter_norms(objective, vector):
    """Per-filter norms of every tensor with >= 2 dims (first axis = output filter / row)."""
    return {
        s.name: vector[s.slice].view(s.shape[0], -1).norm(dim=1)
        for s in objective.layout
        if len(s.shape) >= 2
    }


def test_filter_normalised_norms_match_theta_per_filter(cnn_objective):
    obj = cnn_objective
    d = random_direction(obj, seed=0)
    expected = _filter_norms(obj, obj.theta0)
    actual = _filter_norms(obj, d)
    assert set(actual) == {"0.weight", "4.weight"}  # one Conv2d (2 filters), one Linear (3 rows)
    for name in expected:
        # ||theta_f|| * ||d_f|| / (||d_f|| + 1e-10): relative deviation <= 1e-10 / ||d_f|| (~1e-10)
        assert_close(actual[name], expected[name], rtol=1e-9, what=name)


@pytest.mark.parametrize("mode", ["zero", "keep"])
def test_one_dimensional_parameters_zeroed_or_kept(cnn_objective, mode):
    obj = cnn_objective
    d = random_direction(obj, seed=1, bias_bn=mode)
    one_dim = [s for s in obj.layout if len(s.shape) == 1]
    assert {s.name for s in one_dim} == {"0.bias", "1.weight", "1.bias", "4.bias"}  # conv/fc bias and BN affine
    for s in one_dim:
        expected = torch.zeros(s.numel, dtype=torch.float64) if mode == "zero" else obj.theta0[s.slice]
        assert torch.equal(d[s.slice], expected), s.name


def test_seeded_reproducible_and_seeds_differ(cnn_objective):
    obj = cnn_objective
    assert torch.equal(random_direction(obj, seed=3), random_direction(obj, seed=3))
    assert torch.equal(
        random_direction(obj, generator=torch.Generator().manual_seed(3)), random_direction(obj, seed=3)
    )
    assert not torch.equal(random_direction(obj, seed=3), random_direction(obj, seed=4))
    state = torch.random.get_rng_state()
    random_direction(obj, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_unnormalised_direction_and_mask(classification_data):
    obj = rs.Objective(tiny_mlp(), "cross_entropy", classification_data)
    raw = random_direction(obj, seed=0, filter_normalize=False)
    gaussian = torch.randn(obj.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.zeros(obj.dim, dtype=torch.bool)
    for s in obj.layout:
        weights[s.slice] = s.kind == "weight"
    assert torch.equal(raw[weights], gaussian[weights])
    assert torch.equal(raw[~weights], torch.zeros(int((~weights).sum()), dtype=torch.float64))
    qmap = QuantMap(obj, UniformQuantizer(4), include="2.weight")
    masked = random_direction(obj, seed=0, mask=qmap)
    assert torch.equal(masked[~qmap.mask], torch.zeros(int((~qmap.mask).sum()), dtype=torch.float64))
    assert bool((masked[qmap.mask] != 0).all())


def test_bad_arguments(cnn_objective):
    with pytest.raises(ValueError, match="bias_bn must be one of"):
        random_direction(cnn_objective, bias_bn="drop")
    with pytest.raises(ValueError, match="either generator or seed"):
        random_direction(cnn_objective, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="mask must be"):
        random_direction(cnn_objective, seed=0, mask=torch.ones(3, dtype=torch.bool))


def test_eigenvector_directions_match_dense_hessian(classification_data):
    obj = rs.Objective(tiny_mlp(), "cross_entropy", classification_data)
    values, vectors = eigenvector_directions(obj, obj.theta0, 3)
    dense = torch.linalg.eigvalsh(obj.dense_hessian(obj.theta0)).flip(0)[:3]
    assert_close(values, dense, rtol=1e-8, what="eigenvalues")  # STYLE.md: top-k vs eigvalsh, rtol 1e-8
    assert vectors.shape == (obj.dim, 3)
    residual = obj.hvps(obj.theta0, vectors) - vectors * values
    assert float(residual.norm()) < 1e-8 * float(values.abs().max())

    block_values, block_vectors = eigenvector_directions(obj, obj.theta0, 2, block="2.weight")
    spec = next(s for s in obj.layout if s.name == "2.weight")
    outside = torch.ones(obj.dim, dtype=torch.bool)
    outside[spec.slice] = False
    assert block_vectors.shape == (obj.dim, 2)
    assert torch.equal(block_vectors[outside], torch.zeros(int(outside.sum()), 2, dtype=torch.float64))
    h_block = obj.dense_hessian(obj.theta0)[spec.slice, spec.slice]
    assert_close(block_values, torch.linalg.eigvalsh(h_block).flip(0)[:2], rtol=1e-8, what="block eigenvalues")


def test_quantization_direction_reaches_the_quantized_point(classification_data):
    obj = rs.Objective(tiny_mlp(), "cross_entropy", classification_data)
    theta_q = ptq(obj, UniformQuantizer(2))
    delta = quantization_direction(obj.theta0, theta_q)
    assert_close(obj.theta0 + delta, theta_q, rtol=0, atol=1e-15, what="theta + delta")  # one rounding
    with pytest.raises(ValueError):
        quantization_direction(obj.theta0, theta_q[:-1])


def test_plane_through_three_points_recovers_them():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3))
    plane = plane_through(a, b, c)
    basis = torch.stack([plane.d1, plane.d2])
    assert_close(basis @ basis.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-14, what="orthonormal")
    assert plane.coordinates(a) == (0.0, 0.0)
    x_b, y_b = plane.coordinates(b)
    assert_close(torch.tensor([x_b, y_b]), torch.tensor([float((b - a).norm()), 0.0]), rtol=1e-12, atol=1e-12)
    for point in (a, b, c):
        recovered = plane.point(*plane.coordinates(point))
        # coordinates and reconstruction are O(10) flops per entry: rounding ~1e-15 relative
        assert_close(recovered, point, rtol=1e-12, atol=1e-12, what="point(coordinates(p))")
        assert plane.distance(point) < 1e-12
    r = torch.randn(50, generator=g, dtype=torch.float64)
    normal = r - (plane.d1 @ r) * plane.d1 - (plane.d2 @ r) * plane.d2
    off = c + 2.5 * normal / normal.norm()
    assert abs(plane.distance(off) - 2.5) < 1e-12


def test_plane_coordinates_non_orthogonal_basis():
    g = torch.Generator().manual_seed(1)
    origin, d1, d2, normal = (torch.randn(20, generator=g, dtype=torch.float64) for _ in range(4))
    q, _ = torch.linalg.qr(torch.stack([d1, d2, normal], 1))
    normal = q[:, 2]  # orthogonal to span(d1, d2)
    point = origin + 0.7 * d1 - 1.3 * d2 + 0.25 * normal
    x, y, residual = plane_coordinates(point, origin, d1, d2)
    assert_close(torch.tensor([x, y, residual]), torch.tensor([0.7, -1.3, 0.25]), rtol=1e-12, what="lstsq")


def test_orthonormalize_rejects_parallel_and_zero():
    d = torch.randn(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="parallel"):
        orthonormalize(d, 3 * d)
    with pytest.raises(ValueError, match="zero"):
        orthonormalize(torch.zeros(5, dtype=torch.float64), d)
    with pytest.raises(ValueError, match="parallel"):
        plane_through(d, 2 * d, 3 * d)
