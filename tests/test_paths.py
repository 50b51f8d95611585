"""Paths: exact geometry, loss profiles and barriers against closed forms, river R1, low-loss curves."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import riverscape as rs
from helpers import assert_close, tiny_mlp
from riverscape.landscape.paths import (
    BezierPath,
    LinearPath,
    PolylinePath,
    fit_bezier,
    loss_barrier,
    nudged_elastic_band,
    path_losses,
    project_onto_path,
    refine_path,
    river,
)
from riverscape.quant import QuantMap, UniformQuantizer
from test_slices import quadratic_objective


class Energy(nn.Module):
    """A module whose loss is a closed-form function of its parameter vector ``w``."""

    def __init__(self, w0: torch.Tensor, energy) -> None:
        super().__init__()
        self.w = nn.Parameter(w0.clone().double())
        self.energy = energy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(self.w).expand(x.shape[0])


def energy_objective(w0: torch.Tensor, energy) -> rs.Objective:
    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    return rs.Objective(Energy(w0, energy), lambda out, y: out.mean(), data)


def ring_problem() -> tuple[rs.Objective, torch.Tensor, torch.Tensor]:
    """``L(w) = (|w|^2 - 1)^2``: zero on the unit circle, a hill of height 1 at the origin.

    ``a`` and ``b`` sit on the circle at 10 degrees above the horizontal: the chord between them
    passes the hill (max 0.94), an arc over the top stays at zero loss.
    """
    angle = math.radians(10)
    a = torch.tensor([-math.cos(angle), math.sin(angle)], dtype=torch.float64)
    b = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    return energy_objective(a, lambda w: ((w**2).sum() - 1) ** 2), a, b


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- geometry
def test_linear_path_endpoints_and_extrapolation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    path = LinearPath(a, b)
    ends = path(torch.tensor([0.0, 1.0]))
    assert torch.equal(ends[0], a) and torch.equal(ends[1], b)
    assert_close(path(torch.tensor([0.25, -0.5, 1.5])), torch.stack([0.75 * a + 0.25 * b, 1.5 * a - 0.5 * b, 1.5 * b - 0.5 * a]), rtol=1e-12, atol=1e-14)
    assert_close(path.length, (b - a).norm(), rtol=1e-15)


def test_polyline_passes_through_vertices_at_their_arc_length():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0], [3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    path = PolylinePath(points)  # lengths 3, 4, 0 (repeated vertex), 5
    assert path.length == 12.0
    assert_close(path.vertex_t, torch.tensor([0.0, 3.0, 7.0, 7.0, 12.0], dtype=torch.float64) / 12.0, rtol=1e-15)
    assert torch.equal(path(path.vertex_t), points)
    inside = path([1.5 / 12, 5.0 / 12, 9.5 / 12])  # arc lengths 1.5, 5, 9.5
    assert_close(inside, torch.tensor([[1.5, 0.0], [3.0, 2.0], [1.5, 2.0]]), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        path(torch.tensor([1.01]))
    with pytest.raises(ValueError, match="zero length"):
        PolylinePath(torch.zeros(3, 2))


def test_bezier_endpoints_quadratic_formula_and_de_casteljau():
    g = torch.Generator().manual_seed(1)
    a, theta, b = (torch.randn(9, generator=g, dtype=torch.float64) for _ in range(3))
    quad = BezierPath(torch.stack([a, theta, b]))
    t = torch.linspace(0, 1, 17, dtype=torch.float64)[:, None]
    ends = quad(torch.tensor([0.0, 1.0]))
    assert torch.equal(ends[0], a) and torch.equal(ends[1], b)
    garipov = (1 - t) ** 2 * a + 2 * t * (1 - t) * theta + t**2 * b
    assert_close(quad(t[:, 0]), garipov, rtol=1e-12, atol=1e-14, what="quadratic Bezier")

    control = torch.randn(5, 9, generator=g, dtype=torch.float64)  # quartic
    level = control[None].expand(t.shape[0], -1, -1)
    while level.shape[1] > 1:  # de Casteljau recursion as the oracle
        level = (1 - t[:, :, None]) * level[:, :-1] + t[:, :, None] * level[:, 1:]
    assert_close(BezierPath(control)(t[:, 0]), level[:, 0], rtol=1e-12, atol=1e-13, what="quartic Bezier")

    straight = BezierPath(torch.stack([a, 0.5 * (a + b), b]))  # uniform speed along the chord
    assert_close(straight.length, (b - a).norm(), rtol=1e-12)


def test_project_onto_polyline_is_exact():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    path = PolylinePath(points)
    distance, t, closest = project_onto_path(torch.tensor([4.0, 2.0], dtype=torch.float64), path)
    assert distance == 1.0 and torch.equal(closest, torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert_close(t, 5.0 / 7.0, rtol=1e-15)  # 3/7 + 0.5 * 4/7 in two roundings
    distance, t, closest = project_onto_path(torch.tensor([5.0, -1.0], dtype=torch.float64), path)
    assert_close(distance, math.sqrt(5.0), rtol=1e-15)
    assert t == 3.0 / 7.0 and torch.equal(closest, points[1])

    g = torch.Generator().manual_seed(2)  # random polyline in 30-D against brute force over segment samples
    poly = PolylinePath(torch.randn(6, 30, generator=g, dtype=torch.float64))
    query = torch.randn(30, generator=g, dtype=torch.float64)
    result = project_onto_path(query, poly)
    samples = poly(torch.linspace(0, 1, 200001, dtype=torch.float64))
    brute = (samples - query).norm(dim=1).min()
    assert result.distance <= float(brute) + 1e-12
    assert float(brute) - result.distance < 1e-6  # samples are 1e-4 of the length apart (quadratic error)
    assert_close(poly([result.t])[0], result.point, rtol=1e-12, atol=1e-12, what="t of the projection")


def test_project_onto_bezier_by_dense_sampling():
    g = torch.Generator().manual_seed(3)
    curve = BezierPath(torch.randn(3, 4, generator=g, dtype=torch.float64))
    on_curve = curve(torch.tensor([0.3]))[0]
    distance, t, _ = project_onto_path(on_curve, curve, dense=400)
    assert distance < 1e-4 and abs(t - 0.3) < 1e-4  # chord error of 400 chords


# ---------------------------------------------------------------------------- losses
def test_barrier_of_convex_quadratic_along_a_line():
    obj, matrix = quadratic_objective()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(obj.dim, generator=g, dtype=torch.float64), torch.randn(obj.dim, generator=g, dtype=torch.float64)
    barrier = loss_barrier(obj, a, b, n=21, progress=False)
    t = barrier.profile.t
    delta = b - a
    expected = -0.5 * t * (1 - t) * (delta @ matrix @ delta)  # L(lerp) - lerp(L) for a quadratic
    scale = float(delta @ matrix @ delta)
    assert_close(barrier.excess, expected, rtol=0, atol=1e-12 * scale, what="excess")
    assert barrier.height <= 1e-12 * scale and barrier.t in (0.0, 1.0)
    assert_close(barrier.loss_a, 0.5 * a @ matrix @ a, rtol=1e-12)


def test_barrier_of_a_double_well_is_hand_computed():
    obj = energy_objective(torch.tensor([-1.0]), lambda w: ((w**2 - 1) ** 2).sum())
    a, b = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    barrier = loss_barrier(obj, a, b, n=41, progress=False)
    assert (barrier.height, barrier.t, barrier.loss_a, barrier.loss_b) == (1.0, 0.5, 0.0, 0.0)
    t = barrier.profile.t
    assert_close(barrier.excess, 16 * t**2 * (1 - t) ** 2, rtol=1e-12, atol=1e-15, what="(w^2-1)^2 at w=2t-1")
    json.dumps(barrier.to_dict())
    with pytest.raises(ValueError, match="start at a"):
        loss_barrier(obj, a, b, path=LinearPath(a, 2 * b), progress=False)


def test_path_losses_with_quantizer_match_looped_losses(classification_data):
    obj = rs.Objective(tiny_mlp(), "cross_entropy", classification_data)
    g = torch.Generator().manual_seed(5)
    end = obj.theta0 + 0.3 * torch.randn(obj.dim, generator=g, dtype=torch.float64)
    path = BezierPath(torch.stack([obj.theta0, 0.5 * (obj.theta0 + end) + 0.1, end]))
    qmap = QuantMap(obj, UniformQuantizer(3))
    profile = path_losses(obj, path, n=9, quantizer=qmap, chunk_size=4, progress=False)
    points = path(profile.t)
    for i in range(9):
        # vmapped vs single evaluation: ~1e-16 relative rounding differences
        assert_close(profile.loss[i], obj.loss(points[i]), rtol=1e-12, what=f"L at {i}")
        assert_close(profile.quantized_loss[i], obj.loss(qmap(points[i])), rtol=1e-12, what=f"L(Q) at {i}")
        assert profile.quantized_metric[i].item() == obj.metric(qmap(points[i]))
    assert "3-bit" in profile.quantizer
    json.dumps(profile.to_dict())
    plain = path_losses(obj, path, n=9, progress=False)
    assert plain.quantized_loss is None and plain.quantizer is None


# ---------------------------------------------------------------------------- river R1
def test_river_ema_matches_formula_keeps_endpoints_and_shortens_a_zigzag():
    steps = torch.arange(12, dtype=torch.float64)
    zigzag = torch.stack([steps, (-1.0) ** steps], dim=1)  # forward along x, oscillating in y
    smooth = river(zigzag, smoothing="ema", ema=0.5)
    assert torch.equal(smooth.vertices[0], zigzag[0]) and torch.equal(smooth.vertices[-1], zigzag[-1])
    expected = [zigzag[0]]
    for theta in zigzag[1:]:
        expected.append(0.5 * expected[-1] + 0.5 * theta)
    expected[-1] = zigzag[-1]
    assert_close(smooth.vertices, torch.stack(expected), rtol=1e-15, what="EMA")
    raw = river(zigzag, smoothing=None)
    assert torch.equal(raw.vertices, zigzag)
    assert smooth.length < 0.6 * raw.length  # the y-oscillation of the EMA shrinks to 1/3 of the raw one
    window = river(zigzag, smoothing="window", window=2)
    assert_close(window.vertices[1:-1, 1], torch.zeros(10, dtype=torch.float64), rtol=0, atol=0, what="pairs cancel")
    assert window.length < raw.length


def test_river_from_train_result_and_bad_arguments(classification_data):
    result = rs.train(tiny_mlp(), classification_data, steps=10, record_every=2, lr=1e-2)
    path = river(result)
    assert torch.equal(path.vertices[0], result.trajectory[0]) and torch.equal(path.vertices[-1], result.theta)
    with pytest.raises(ValueError, match="smoothing must be one of"):
        river(result, smoothing="gauss")
    with pytest.raises(ValueError, match="ema"):
        river(result, ema=0.0)
    with pytest.raises(ValueError, match="trajectory"):
        river(result.trajectory[0])


# ---------------------------------------------------------------------------- low-loss curves
def test_fit_bezier_goes_around_the_hill():
    obj, a, b = ring_problem()
    line = loss_barrier(obj, a, b, progress=False)
    assert line.height > 0.9  # the chord crosses the hill
    curve = fit_bezier(obj, a, b, steps=150, lr=0.05, progress=False)
    assert torch.equal(curve.control_points[0], a) and torch.equal(curve.control_points[-1], b)
    bent = loss_barrier(obj, a, b, path=curve, progress=False)
    assert bent.profile.loss.max() < 0.05  # a quadratic curve cannot follow the circle exactly
    assert bent.height < 0.05 * line.height
    cubic = fit_bezier(obj, a, b, bends=2, steps=150, lr=0.05, samples_per_step=2, progress=False)
    assert cubic.degree == 3 and loss_barrier(obj, a, b, path=cubic, progress=False).height < 0.05


def test_nudged_elastic_band_finds_the_arc():
    obj, a, b = ring_problem()
    band = nudged_elastic_band(obj, a, b, pivots=6, steps=100, lr=0.05, progress=False)
    assert band.vertices.shape == (8, 2)
    assert torch.equal(band.vertices[0], a) and torch.equal(band.vertices[-1], b)
    radii = band.vertices.norm(dim=1)
    assert float((radii - 1).abs().max()) < 1e-2  # pivots on the valley floor (the unit circle)
    spacing = band.segment_lengths
    # pivots sit at equal arc length along the previous chain; the new chords cut its corners,
    # so the chord lengths agree only up to the (small) curvature of the chain
    assert float(spacing.max() - spacing.min()) < 1e-3 * float(spacing.mean())
    assert loss_barrier(obj, a, b, path=band, n=81, progress=False).height < 0.05  # chords cut the circle a bit


def test_refine_path_dispatch_and_models_untouched(classification_data):
    model = tiny_mlp()
    before = snapshot(model)
    obj = rs.Objective(model, "cross_entropy", classification_data)
    end = obj.theta0 + 0.1
    curve = refine_path(obj, obj.theta0, end, method="bezier", steps=3, progress=False)
    band = refine_path(obj, obj.theta0, end, method="neb", pivots=2, steps=3, progress=False)
    assert isinstance(curve, BezierPath) and isinstance(band, PolylinePath)
    path_losses(obj, band, n=5, quantizer=UniformQuantizer(2), progress=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="method must be one of"):
        refine_path(obj, obj.theta0, end, method="autoneb")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fit_bezier(obj, obj.theta0, end, optimizer="lbfgs", progress=False)
