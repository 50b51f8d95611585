"""Curvature (eigenpairs, trace, diagonal, SLQ density, per layer) against dense float64 oracles."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import riverscape as rs
from riverscape.landscape.curvature import (
    block_slice,
    eigenpair_residuals,
    hessian_diagonal,
    hessian_eigs,
    hessian_trace,
    lanczos,
    layer_curvature,
    spectral_density,
)
from riverscape.quant import QuantMap, UniformQuantizer

from helpers import assert_close, tiny_cnn, tiny_mlp


class Quadratic(nn.Module):
    """``0.5 theta^T A theta`` for every sample: its Hessian is exactly ``A``."""

    def __init__(self, matrix: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(matrix.shape[0], generator=g, dtype=matrix.dtype))
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.theta @ (self.matrix @ self.theta)).expand(x.shape[0])


def psd_matrix(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = U diag(lam) U^T with a decaying spectrum lam_i = 10 / i (distinct, PSD)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = 10.0 / torch.arange(1, n + 1, dtype=torch.float64)
    return u @ torch.diag(lam) @ u.T, lam


def quadratic_objective(n: int = 200, seed: int = 0) -> tuple[rs.Objective, torch.Tensor, torch.Tensor]:
    matrix, lam = psd_matrix(n, seed)
    x = torch.zeros(4, 1, dtype=torch.float64)
    obj = rs.Objective(Quadratic(matrix, seed), lambda out, y: out.mean(), (x, x[:, 0]), metric=None)
    return obj, matrix, lam


def model_case(kind: str, classification_data, image_data):
    """Objective, user model and a generic point (off the init) for a tiny float64 model."""
    model = tiny_mlp(0) if kind == "mlp" else tiny_cnn(0)
    data = classification_data if kind == "mlp" else image_data
    obj = rs.Objective(model, "cross_entropy", data, batch_size=4)  # unequal batches: 23 = 4*5 + 3, 10 = 4*2 + 2
    theta = obj.theta0 + 0.2 * torch.randn(obj.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return obj, model, theta


def principal_sine(v: torch.Tensor, v_exact: torch.Tensor) -> float:
    """Sine of the largest principal angle between two orthonormal column spaces."""
    cosines = torch.linalg.svdvals(v.T.double() @ v_exact.double())
    return math.sqrt(max(0.0, 1.0 - float(cosines.min()) ** 2))


def exact_selection(evals: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices into ascending eigenvalues that eigsh's ``which`` returns."""
    n = evals.shape[0]
    if which == "LA":
        return torch.arange(n - k, n)
    if which == "SA":
        return torch.arange(k)
    if which == "BE":
        return torch.cat([torch.arange(k // 2), torch.arange(n - (k - k // 2), n)])
    return torch.argsort(evals.abs(), descending=True)[:k]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("which", ["LA", "SA", "BE", "LM"])
def test_eigs_match_dense_hessian(kind, which, classification_data, image_data):
    obj, _, theta = model_case(kind, classification_data, image_data)
    evals, evecs = torch.linalg.eigh(obj.dense_hessian(theta))
    k = 5
    idx = exact_selection(evals, k, which)
    chosen = set(idx.tolist())
    # premise of the subspace test: the chosen eigenvalues are separated from the rest
    gap = min(abs(float(evals[i] - evals[j])) for i in chosen for j in range(len(evals)) if j not in chosen)
    assert gap > 1e-4
    op = obj.hessian(theta)
    values, vectors = hessian_eigs(obj, theta, k, which=which, operator=op)
    expected = evals[idx].sort(descending=True).values
    # the issue asks for 1e-6 relative; observed ~1e-15 (tol=1e-8 stops ARPACK at residual 1e-8 |lambda|)
    assert_close(values, expected, rtol=1e-10, atol=1e-13, what=f"{which} eigenvalues")
    assert principal_sine(vectors, evecs[:, idx]) < 1e-6  # observed ~1e-9 (residual / gap)
    assert torch.allclose(vectors.T @ vectors, torch.eye(k, dtype=torch.float64), atol=1e-12)
    residuals = eigenpair_residuals(obj, theta, values, vectors, operator=op)
    assert residuals.shape == (k,) and float(residuals.max()) < 1e-8 * float(evals.abs().max())
    if which == "BE":
        assert (values[:3] > 0).all() and (values[3:] < 0).all()  # 3 from the top, 2 from the bottom


def test_block_eigs_equal_dense_block(image_data):
    obj, _, theta = model_case("cnn", None, image_data)
    h = obj.dense_hessian(theta)
    for name, k in [("4.weight", 4), ("0.weight", 3)]:  # 96 coordinates: ARPACK; 18 <= ncv: dense path
        s = block_slice(obj, name)
        exact = torch.linalg.eigvalsh(h[s, s]).flip(0)[:k]
        values, vectors = hessian_eigs(obj, theta, k, block=name)
        assert vectors.shape == (s.stop - s.start, k)
        assert_close(values, exact, rtol=1e-10, atol=1e-13, what=f"block {name}")
        by_slice, _ = hessian_eigs(obj, theta, k, block=slice(s.start, s.stop))
        assert_close(by_slice, exact, rtol=1e-10, atol=1e-13, what=f"slice {name}")
        assert float(eigenpair_residuals(obj, theta, values, vectors, block=name).max()) < 1e-9


def test_eigs_of_known_quadratic():
    obj, _, lam = quadratic_objective(120)
    values, vectors = hessian_eigs(obj, None, 6)
    assert_close(values, lam[:6], rtol=1e-12, what="H = A")  # analytic: H is exactly A
    sa, _ = hessian_eigs(obj, None, 2, which="SA")
    assert_close(sa, lam[-2:], rtol=1e-8, what="smallest")  # clustered end (10/119, 10/120): slower, still 1e-10


def test_residuals_detect_wrong_pairs(classification_data):
    obj, _, theta = model_case("mlp", classification_data, None)
    values, vectors = hessian_eigs(obj, theta, 2)
    bad = eigenpair_residuals(obj, theta, values * 1.01, vectors)
    assert_close(bad, 0.01 * values.abs(), rtol=1e-6, what="residual of a scaled eigenvalue")


def test_float32_eigs_close_to_float64(classification_data):
    model = tiny_mlp(0)
    obj64 = rs.Objective(model, "cross_entropy", classification_data)
    obj32 = rs.Objective(model, "cross_entropy", classification_data, dtype=torch.float32)
    exact = torch.linalg.eigvalsh(obj64.dense_hessian(obj64.theta0)).flip(0)[:3]
    values, vectors = hessian_eigs(obj32, None, 3)
    assert vectors.dtype == torch.float32
    assert_close(values, exact, rtol=1e-4, what="float32 smoke")  # float32 HVPs: ~1e-6 relative


def test_hutchpp_and_hutchinson_on_known_psd_matrix():
    obj, matrix, lam = quadratic_objective(200)
    exact = float(lam.sum())
    est = hessian_trace(obj, matvecs=100, method="hutch++", seed=0)
    assert est.method == "hutch++" and est.matvecs == 100
    assert abs(est.value - exact) < 0.05 * exact  # the 5% at 100 matvecs (observed ~1%)
    frob2, diag2 = float((matrix**2).sum()), float((torch.diagonal(matrix) ** 2).sum())
    predicted_sd = math.sqrt(2 * (frob2 - diag2) / 100)  # Rademacher Hutchinson variance (docs/theory.md §4.4)
    for seed in range(5):
        h = hessian_trace(obj, matvecs=100, method="hutchinson", seed=seed)
        # calibrated stderr: the truth lies within 4 stderr, and stderr matches the closed form
        assert abs(h.value - exact) < 4 * h.stderr
        assert 0.5 < h.stderr / predicted_sd < 1.6  # std of 100 samples: ~10% relative spread
        pp = hessian_trace(obj, matvecs=99, method="hutch++", seed=seed)
        assert abs(pp.value - exact) < 4 * pp.stderr
        assert pp.stderr < h.stderr  # deflating the top of the spectrum reduces the variance


def test_trace_rtol_stops_early_with_its_promised_accuracy():
    obj, _, lam = quadratic_objective(200)
    exact = float(lam.sum())
    rtol = 0.05
    for method in ("hutchinson", "hutch++"):
        for seed in range(4):
            est = hessian_trace(obj, matvecs=150, method=method, seed=seed, rtol=rtol)
            fixed = 2 * (150 // 3) if method == "hutch++" else 0  # the sketch is never cut short
            probes = est.matvecs - fixed
            # stopped at a block boundary once the rule held, well before the 150-matvec cap
            assert probes >= 8 and probes % 4 == 0 and est.matvecs < 150, (method, est.matvecs)
            assert 2 * est.stderr <= rtol * abs(est.value)
            # the rule promises ~95% confidence of |error| <= rtol; 2 * rtol is 4 stderr: never flaky
            assert abs(est.value - exact) <= 2 * rtol * exact, (method, seed, est.value, exact)
        # an unreachable tolerance spends exactly the whole budget
        assert hessian_trace(obj, matvecs=150, method=method, seed=0, rtol=1e-12).matvecs == 150
    with pytest.raises(ValueError, match="rtol"):
        hessian_trace(obj, matvecs=150, rtol=0.0)


def test_hutchpp_on_tiny_cnn_and_exact_for_small_blocks(image_data):
    obj, _, theta = model_case("cnn", None, image_data)
    h = obj.dense_hessian(theta)
    exact = float(h.trace())
    assert obj.dim > 100  # so the 100-matvec budget is a real Hutch++ run
    est = hessian_trace(obj, theta, matvecs=100, seed=0)
    assert est.method == "hutch++" and abs(est.value - exact) < 0.05 * abs(exact)
    s = block_slice(obj, "4.weight")
    block = hessian_trace(obj, theta, matvecs=100, block="4.weight")  # 96 <= 100 coordinates: exact
    assert block.method == "exact" and block.stderr == 0.0
    assert abs(block.value - float(h[s, s].trace())) < 1e-12 * max(1.0, abs(block.value))


def test_hessian_diagonal_against_dense(image_data):
    obj, _, theta = model_case("cnn", None, image_data)
    h = obj.dense_hessian(theta)
    diag = torch.diagonal(h)
    m = 100
    est = hessian_diagonal(obj, theta, matvecs=m, seed=0, batch_size=30)
    assert est.values.shape == (obj.dim,) and est.matvecs == m and est.method == "hutchinson"
    # E ||est - diag||^2 = sum_j sum_{l != j} H_jl^2 / m for Rademacher probes
    expected_sq = float((h**2).sum() - (diag**2).sum()) / m
    err_sq = float(((est.values - diag) ** 2).sum())
    assert err_sq < 3 * expected_sq
    sd = torch.sqrt(((h**2).sum(1) - diag**2) / m)
    ok = (est.stderr > 0) & (sd > 0)
    assert 0.7 < float((est.stderr[ok] / sd[ok]).median()) < 1.3  # stderr tracks the closed form
    exact = hessian_diagonal(obj, theta, matvecs=200)
    assert exact.method == "exact"
    assert_close(exact.values, diag, rtol=1e-12, atol=1e-14, what="exact diagonal")


def test_hessian_diagonal_of_quadratic_gives_rtn_damage_formula():
    obj, matrix, _ = quadratic_objective(150)
    scales = torch.linspace(0.1, 1.0, 150, dtype=torch.float64)
    exact = float((torch.diagonal(matrix) * scales**2).sum()) / 24  # docs/theory.md §6.6: (1/24) sum_j H_jj s_j^2
    est = hessian_diagonal(obj, matvecs=149, seed=1)
    value = float((est.values * scales**2).sum()) / 24
    sd = float(torch.sqrt(((est.stderr * scales**2) ** 2).sum())) / 24
    assert abs(value - exact) < 4 * sd


def test_lanczos_on_known_matrix():
    matrix, lam = psd_matrix(30, seed=3)
    v0 = torch.ones(30, dtype=torch.float64)
    alphas, betas, basis = lanczos(lambda v: matrix @ v, v0, 50)
    assert alphas.shape == (30,) and betas.shape == (29,) and basis.shape == (30, 30)  # capped at n
    assert torch.allclose(basis.T @ basis, torch.eye(30, dtype=torch.float64), atol=1e-12)
    t = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    assert torch.allclose(basis.T @ matrix @ basis, t, atol=1e-12)
    assert_close(torch.linalg.eigvalsh(t).flip(0), lam, rtol=1e-10, what="full Lanczos")
    # invariant start: an eigenvector stops the recursion after one step
    a, b, v = lanczos(lambda x: torch.diag(lam) @ x, torch.eye(30, dtype=torch.float64)[0], 10)
    assert a.shape == (1,) and b.shape == (0,) and abs(float(a[0]) - 10.0) < 1e-14


def test_spectral_density_integrates_to_one_and_covers_spectrum(classification_data):
    obj, _, theta = model_case("mlp", classification_data, None)
    evals = torch.linalg.eigvalsh(obj.dense_hessian(theta))
    op = obj.hessian(theta)
    d = spectral_density(obj, theta, lanczos_steps=80, probes=3, operator=op, seed=0)
    assert d.grid.shape == d.density.shape == (1000,)
    assert d.ritz_values.shape[0] == 3 and d.dim == obj.dim
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-6
    assert float(d.grid[0]) < float(evals[0]) and float(d.grid[-1]) > float(evals[-1])
    # 80 steps > D = 39: the Krylov space is the whole space, Ritz extremes are the exact extremes
    lo, hi = float(d.ritz_values.nan_to_num(float("inf")).min()), float(d.ritz_values.nan_to_num(-float("inf")).max())
    assert_close(torch.tensor([lo, hi], dtype=torch.float64), evals[[0, -1]], rtol=1e-8, atol=1e-12, what="Ritz extremes")
    assert_close(d.ritz_weights.sum(1), torch.ones(3), rtol=1e-12, what="quadrature weights")
    # quadrature reproduces z^T H z of each probe exactly (the probes come from the same generator)
    h = obj.dense_hessian(theta)
    gen = torch.Generator().manual_seed(0)
    for p in range(3):
        z = (torch.randint(0, 2, (obj.dim, 1), generator=gen) * 2 - 1).double()[:, 0]
        quad = obj.dim * float((d.ritz_weights[p] * d.ritz_values[p].nan_to_num(0.0)).sum())
        assert abs(quad - float(z @ h @ z)) < 1e-10 * float(z @ z) * float(evals.abs().max())
    assert d.matvecs == op.matvecs
    assert set(d.to_dict()) >= {"grid", "density", "ritz_values", "ritz_weights", "matvecs"}


def test_spectral_density_of_quadratic_finds_top_eigenvalues():
    obj, _, lam = quadratic_objective(200)
    d = spectral_density(obj, lanczos_steps=40, probes=2, grid_points=2000)
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-6
    top = d.ritz_values.nan_to_num(-1.0).max(1).values
    assert_close(top, lam[0].expand(2), rtol=1e-8, what="largest Ritz value")  # 10, isolated: converges fast
    mass_above = float(torch.trapezoid(d.density * (d.grid > 1.0), d.grid))
    assert abs(mass_above - 10 / 200) < 0.05  # 10 of 200 eigenvalues exceed 1 (two probes: rough)


def test_spectral_density_tol_stops_early_and_matches_the_full_run():
    obj, _, lam = quadratic_objective(400)
    full = spectral_density(obj, lanczos_steps=150, probes=2, grid_points=2000)
    early = spectral_density(obj, lanczos_steps=150, probes=2, grid_points=2000, sigma=full.sigma, tol=1e-3)
    steps = (~torch.isnan(early.ritz_values)).sum(1)
    assert (steps % 10 == 0).all() and early.matvecs == int(steps.sum()) < full.matvecs  # stopped at checks
    assert_close(early.ritz_values.nan_to_num(-1.0).max(1).values, lam[0].expand(2), rtol=1e-8, what="largest Ritz")
    low = early.ritz_values.nan_to_num(1e9).min(1).values  # the dense end (10/i accumulates at 0.025)
    assert ((low - lam[-1]).abs() <= 1e-3 * float(lam[0] - lam[-1]) * 10).all()
    # the stopped density, evaluated on the full run's grid, is the full run's density up to the L1 tol
    assert torch.equal(full.evaluate(full.grid), full.density)
    assert float(torch.trapezoid((early.evaluate(full.grid) - full.density).abs(), full.grid)) < 1e-3
    with pytest.raises(ValueError, match="tol"):
        spectral_density(obj, tol=-1.0)


def test_layer_curvature_matches_dense_blocks(image_data):
    obj, _, theta = model_case("cnn", None, image_data)
    h = obj.dense_hessian(theta)
    built = []
    original = obj.hessian
    obj.hessian = lambda *a, **kw: built.append(1) or original(*a, **kw)
    rows = layer_curvature(obj, theta, k=2, trace_matvecs=30, progress=False)
    assert len(built) == 1  # one shared operator for all blocks
    assert [r.name for r in rows] == obj.param_names
    stochastic = 0
    for row in rows:
        s = block_slice(obj, row.name)
        exact = torch.linalg.eigvalsh(h[s, s]).flip(0)
        assert row.numel == s.stop - s.start
        assert abs(row.top_eigenvalue - float(exact[0])) <= 1e-6 * abs(float(exact[0]))
        true_trace = float(h[s, s].trace())
        assert abs(row.trace - true_trace) <= 4 * row.trace_stderr + 1e-10 * max(1.0, abs(true_trace))
        assert row.mean_trace == row.trace / row.numel and row.to_dict()["mean_trace"] == row.mean_trace
        stochastic += row.trace_method == "hutch++"
    assert stochastic == 1  # only "4.weight" (96 > 30 coordinates) is estimated
    weights = layer_curvature(obj, theta, names=QuantMap(obj, UniformQuantizer(2)), progress=False)
    assert [r.name for r in weights] == ["0.weight", "4.weight"]


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
def test_pyhessian_agrees(classification_data):
    pyhessian = pytest.importorskip("pyhessian")
    x, y = classification_data
    model = tiny_mlp(3)
    obj = rs.Objective(model, "cross_entropy", (x, y))
    ours, _ = hessian_eigs(obj, None, 1)
    trace = hessian_trace(obj, matvecs=100)  # D = 39 <= 100: exact
    assert trace.method == "exact"
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float64)  # PyHessian draws its probes in the default dtype
        try:
            ph = pyhessian.hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            top, _ = ph.eigenvalues(maxIter=500, tol=1e-7)
            samples = torch.tensor(ph.trace(maxIter=200, tol=0.0), dtype=torch.float64)
        finally:
            torch.set_default_dtype(default_dtype)
    assert abs(top[0] - float(ours[0])) < 1e-3 * abs(float(ours[0]))  # power iteration, stopped at 1e-7 change
    ph_mean, ph_stderr = float(samples.mean()), float(samples.std() / math.sqrt(len(samples)))
    assert len(samples) == 200 and abs(ph_mean - trace.value) < 4 * ph_stderr


def test_user_model_untouched_even_on_errors(image_data):
    model = tiny_cnn(0)
    with torch.no_grad():  # non-trivial BatchNorm statistics, which train-mode forwards would overwrite
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    obj = rs.Objective(model, "cross_entropy", image_data)
    hessian_eigs(obj, None, 2, which="BE")
    hessian_trace(obj, matvecs=30, method="hutchinson")
    hessian_diagonal(obj, matvecs=10)
    spectral_density(obj, lanczos_steps=10, probes=1)
    layer_curvature(obj, progress=False)
    with pytest.raises(ValueError, match="unknown block"):
        hessian_eigs(obj, None, 2, block="nope")
    with pytest.raises(ValueError, match="unknown block"):
        layer_curvature(obj, names=["0.weight", "nope"], progress=False)
    calls = {"n": 0}

    def failing_loss(out, target):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("loss failed on the second HVP")
        return nn.functional.cross_entropy(out, target)

    failing = rs.Objective(model, failing_loss, image_data, hvp_mode="forward")
    with pytest.raises(RuntimeError, match="second HVP"):
        hessian_eigs(failing, None, 2)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="second HVP"):
        layer_curvature(failing, progress=False)
    assert model.training == training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_arguments_raise(classification_data):
    obj, _, theta = model_case("mlp", classification_data, None)
    with pytest.raises(ValueError, match="which must be one of"):
        hessian_eigs(obj, theta, 2, which="XX")
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_trace(obj, theta, method="bogus")
    with pytest.raises(ValueError, match="k must be between"):
        hessian_eigs(obj, theta, obj.dim + 1)
    with pytest.raises(ValueError, match="contiguous"):
        block_slice(obj, slice(5, 5))
    with pytest.raises(ValueError, match="another point"):
        hessian_eigs(obj, theta, 2, operator=obj.hessian(obj.theta0))
