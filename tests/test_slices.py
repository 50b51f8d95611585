"""1D/2D slices: exact centre, agreement with looped losses, closed forms, quantized slices, safety."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import riverscape as rs
from helpers import assert_close, tiny_cnn, tiny_mlp
from riverscape.landscape.directions import eigenvector_directions, random_direction
from riverscape.landscape.slices import WHICH_FP, WHICH_Q, grid_axis, slice_1d, slice_2d
from riverscape.quant import QuantMap, UniformQuantizer

# vmapped (batched matmul) and single evaluations round differently: ~1e-16 relative, 1e-12 is ample
VMAP_RTOL = 1e-12


class Quadratic(nn.Module):
    """``L(theta) = 0.5 theta^T A theta`` with ``theta`` the only parameter, so ``H = A``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(matrix.shape[0], dtype=torch.float64))
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.theta @ self.matrix @ self.theta).expand(x.shape[0])


def quadratic_objective(dim: int = 6, seed: int = 0) -> tuple[rs.Objective, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    matrix = m @ m.T + torch.diag(torch.arange(dim, dtype=torch.float64))
    data = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    return rs.Objective(Quadratic(matrix), lambda out, y: out.mean(), data), matrix


@pytest.fixture
def cnn_objective(image_data):
    return rs.Objective(tiny_cnn(), "cross_entropy", image_data)


def test_grid_axis_contains_zero_and_endpoints_exactly():
    for steps in (3, 25, 51, 101):
        axis = grid_axis((-0.7, 0.7), steps)
        assert axis[steps // 2].item() == 0.0
        assert (axis[0].item(), axis[-1].item()) == (-0.7, 0.7)
        assert torch.equal(axis, -axis.flip(0))
    assert_close(grid_axis((0.0, 2.0), 5), torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="lo < hi"):
        grid_axis((1.0, -1.0), 5)
    with pytest.raises(ValueError, match="at least 2"):
        grid_axis((-1.0, 1.0), 1)


def test_slice_2d_centre_and_grid_points_equal_looped_losses(cnn_objective):
    obj = cnn_objective  # BatchNorm in eval mode: running statistics
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    s = slice_2d(obj, obj.theta0, d1, d2, span=((-1.0, 1.0), (-0.5, 0.5)), steps=(7, 5), chunk_size=4, progress=False)
    assert s.loss.shape == (7, 5) and s.metric.shape == (7, 5)
    assert (s.alphas[3].item(), s.betas[2].item()) == (0.0, 0.0)
    assert_close(s.loss[3, 2], obj.loss(obj.theta0), rtol=VMAP_RTOL, what="centre")
    for i, j in [(0, 0), (6, 4), (2, 1), (5, 3)]:
        theta = obj.theta0 + s.alphas[i] * d1 + s.betas[j] * d2
        assert_close(s.loss[i, j], obj.loss(theta), rtol=VMAP_RTOL, what=f"loss[{i}, {j}]")
        assert s.metric[i, j].item() == obj.metric(theta)
    assert s.which == WHICH_FP and s.quantizer is None
    whole = slice_2d(obj, obj.theta0, d1, d2, span=((-1.0, 1.0), (-0.5, 0.5)), steps=(7, 5), chunk_size=35, progress=False)
    assert_close(whole.loss, s.loss, rtol=VMAP_RTOL, what="chunking does not matter")
    json.dumps(s.to_dict())


def test_slice_coordinates_locate_points(cnn_objective):
    obj = cnn_objective
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    s = slice_2d(obj, obj.theta0, d1, d2, span=1.0, steps=3, progress=False)
    alpha, beta, residual = s.coordinates(obj.theta0 + 0.3 * d1 - 0.8 * d2)
    assert_close(torch.tensor([alpha, beta]), torch.tensor([0.3, -0.8]), rtol=1e-12, what="coordinates")
    assert residual < 1e-12
    q, _ = torch.linalg.qr(torch.stack([d1, d2], dim=1))
    off = random_direction(obj, seed=2)
    off = off - q @ (q.T @ off)  # orthogonal to the plane
    alpha, beta, residual = s.coordinates(obj.theta0 + 0.3 * d1 + off)
    assert_close(torch.tensor([alpha, beta, residual]), torch.tensor([0.3, 0.0, float(off.norm())]), rtol=1e-12, atol=1e-12)


def test_slice_1d_along_eigenvector_of_quadratic_is_half_lambda_t_squared():
    obj, matrix = quadratic_objective()
    centre = torch.zeros(obj.dim, dtype=torch.float64)
    values, vectors = eigenvector_directions(obj, centre, 2)
    assert_close(values, torch.linalg.eigvalsh(matrix).flip(0)[:2], rtol=1e-12, what="H = A")  # analytic, STYLE.md
    for i in range(2):
        s = slice_1d(obj, centre, vectors[:, i], span=2.0, steps=21, progress=False)
        # v^T A v = lambda up to the eigsh residual (machine precision): rtol 1e-12
        assert_close(s.loss, 0.5 * values[i] * s.alphas**2, rtol=1e-12, atol=1e-300, what=f"eigenvector {i}")
        assert s.loss[10].item() == 0.0  # the centre is on the grid exactly
    assert s.metric is None


def _in_cell_direction(obj: rs.Objective, qmap: QuantMap) -> torch.Tensor:
    """A direction that keeps every quantized weight inside its rounding cell for |alpha| <= 1.

    Per-channel min-max scales stay fixed because the largest |w| of each row does not move and
    no other entry may grow past it; biases are not quantized, so the direction is 0 on them.
    """
    theta = obj.theta0
    direction = torch.zeros(obj.dim, dtype=torch.float64)
    signs = torch.where(torch.randn(obj.dim, generator=torch.Generator().manual_seed(0)) > 0, 1.0, -1.0)
    for target, params in zip(qmap.targets, qmap.qparams(theta)):
        w = theta[target.spec.slice].view(target.spec.shape)
        ratio = w / params.scale
        to_edge = (0.5 - (ratio - torch.round(ratio)).abs()) * params.scale
        to_max = params.scale * params.qmax - w.abs()
        step = 0.9 * torch.minimum(to_edge, to_max)
        direction[target.spec.slice] = (step * signs[target.spec.slice].view(w.shape)).reshape(-1)
    return direction


def test_quantized_slice_is_constant_inside_a_cell_and_changes_across(classification_data):
    obj = rs.Objective(tiny_mlp(), "cross_entropy", classification_data)
    q = UniformQuantizer(4)
    direction = _in_cell_direction(obj, QuantMap(obj, q))
    assert int((direction != 0).sum()) == 32 - 7  # every weight moves but the row maxima (4 + 3 rows)
    inside = slice_1d(obj, obj.theta0, direction, span=1.0, steps=21, quantizer=q, progress=False)
    assert inside.which == WHICH_Q and "4-bit" in inside.quantizer
    assert torch.unique(inside.loss).numel() == 1  # L(Q(.)) bit-identical inside one cell
    plain = slice_1d(obj, obj.theta0, direction, span=1.0, steps=21, progress=False)
    assert torch.unique(plain.loss).numel() == 21  # while L(.) itself varies along the same line
    across = slice_1d(obj, obj.theta0, direction, span=4.0, steps=41, quantizer=QuantMap(obj, q), progress=False)
    assert torch.unique(across.loss).numel() > 1
    assert bool((across.loss[15:26] == inside.loss[0]).all())  # alpha in [-1, 1]: still the same cell


def test_quantized_slice_2d_equals_looped_quantized_losses(classification_data):
    obj = rs.Objective(tiny_mlp(), "cross_entropy", classification_data)
    qmap = QuantMap(obj, UniformQuantizer(2, range="mse"))
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    s = slice_2d(obj, obj.theta0, d1, d2, span=0.5, steps=5, quantizer=qmap, progress=False)
    for i, j in [(0, 0), (2, 2), (4, 1)]:
        theta = obj.theta0 + s.alphas[i] * d1 + s.betas[j] * d2
        assert_close(s.loss[i, j], obj.loss(qmap(theta)), rtol=VMAP_RTOL, what=f"L(Q) at [{i}, {j}]")


def test_bad_arguments(cnn_objective):
    obj, d = cnn_objective, random_direction(cnn_objective, seed=0)
    with pytest.raises(ValueError, match="span"):
        slice_2d(obj, obj.theta0, d, d, span=(1, 2, 3), progress=False)
    with pytest.raises(ValueError, match="steps"):
        slice_2d(obj, obj.theta0, d, d, steps=(3, 3, 3), progress=False)
    with pytest.raises(ValueError, match="shape"):
        slice_1d(obj, obj.theta0, d[:-1], progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        slice_1d(obj, obj.theta0, d * float("nan"), progress=False)
    with pytest.raises(TypeError, match="quantizer"):
        slice_1d(obj, obj.theta0, d, quantizer="int4", progress=False)


def test_interrupted_slice_leaves_model_bit_identical(image_data):
    model = tiny_cnn()
    model.train()  # the caller's mode must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}

    def failing_loss(outputs, targets):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("loss failed mid-grid")
        return F.cross_entropy(outputs, targets)

    obj = rs.Objective(model, failing_loss, image_data)
    inner_before = {k: v.clone() for k, v in obj.module.state_dict().items()}
    d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=1)
    with pytest.raises(RuntimeError, match="mid-grid"):
        slice_2d(obj, obj.theta0, d1, d2, steps=5, chunk_size=4, progress=False)
    assert calls["n"] >= 4  # three chunks of seven succeeded before the failure
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, value in obj.module.state_dict().items():
        assert torch.equal(value, inner_before[name]), name
