"""Operator algorithms of riverscape.linalg on known float64 matrices, and HessianOperator's isolation."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

import riverscape as rs
from riverscape.linalg import (
    HVP_MODES,
    BlockOperator,
    DenseOperator,
    HessianOperator,
    Operator,
    ScaledOperator,
    as_operator,
    eigenpair_residuals,
    eigenpairs,
    estimate_diagonal,
    estimate_trace,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    rademacher,
    random_signs,
    spectral_density,
)

from helpers import assert_close, tiny_mlp


def symmetric_matrix(n: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``U diag(eigenvalues) U^T`` with a random orthogonal ``U`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return u @ torch.diag(eigenvalues) @ u.T


@pytest.fixture(scope="module")
def indefinite() -> torch.Tensor:
    """n = 150, eigenvalues 10 / i for i = 1..120 and -0.5 * j / 30 for j = 1..30 (distinct)."""
    lam = torch.cat([10.0 / torch.arange(1, 121, dtype=torch.float64), -0.5 * torch.arange(1, 31, dtype=torch.float64) / 30])
    return symmetric_matrix(150, lam, seed=0)


@pytest.fixture(scope="module")
def decaying() -> torch.Tensor:
    """n = 400, PSD, eigenvalues 1 / i^2: Hutch++'s favourable case (a few directions dominate)."""
    return symmetric_matrix(400, 1.0 / torch.arange(1, 401, dtype=torch.float64) ** 2, seed=1)


# ---------------------------------------------------------------------------- operators
def test_dense_operator_products_and_counter(indefinite):
    op = DenseOperator(indefinite)
    v = torch.randn(150, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert isinstance(op, Operator) and op.shape == (150, 150) and op.torch_dtype == torch.float64
    assert torch.equal(op.matmat(v), indefinite @ v) and torch.equal(op @ v, indefinite @ v)
    assert torch.equal(op.matvec(v[:, 0]), indefinite @ v[:, 0])
    assert op.matvecs == 3 + 3 + 1
    with pytest.raises(ValueError, match="symmetric"):
        DenseOperator(torch.arange(4.0).reshape(2, 2))
    with pytest.raises(ValueError, match="shape"):
        op.torch_matmat(v[:10])


def test_to_scipy_matches_torch(indefinite):
    op = DenseOperator(indefinite)
    scipy_op = op.to_scipy()
    assert isinstance(scipy_op, LinearOperator) and scipy_op.dtype == np.float64 and scipy_op.shape == (150, 150)
    x = np.random.default_rng(0).standard_normal((150, 2))
    expected = op.matmat(torch.from_numpy(x)).numpy()
    column = op.matvec(torch.from_numpy(x[:, 0])).numpy()  # same arithmetic as the scipy matvec
    np.testing.assert_array_equal(scipy_op.matvec(x[:, 0]), column)
    np.testing.assert_array_equal(scipy_op.rmatvec(x[:, 0]), column)  # symmetric
    np.testing.assert_array_equal(scipy_op.H.matvec(x[:, 0]), column)
    np.testing.assert_array_equal(scipy_op.matmat(x), expected)
    top = eigsh(scipy_op, k=2, which="LA", return_eigenvectors=False)  # usable by scipy as is
    np.testing.assert_allclose(np.sort(top), [5.0, 10.0], rtol=1e-10)
    float32 = DenseOperator(indefinite.float()).to_scipy()
    assert float32.matvec(x[:, 0]).dtype == np.float64


def test_block_operator_is_the_dense_submatrix(indefinite):
    full = DenseOperator(indefinite)
    block = BlockOperator(full, slice(10, 57))
    assert block.shape == (47, 47)
    assert torch.equal(block.to_dense(), 0.5 * (indefinite[10:57, 10:57] + indefinite[10:57, 10:57].T))
    v = torch.randn(47, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close(block.matvec(v), indefinite[10:57, 10:57] @ v, rtol=1e-14, atol=1e-14, what="block matvec")
    assert torch.equal(BlockOperator(full, slice(None)).to_dense(), full.to_dense())
    for bad in (slice(5, 5), slice(-3, 10), slice(0, 151), slice(0, 10, 2)):
        with pytest.raises(ValueError, match="contiguous"):
            BlockOperator(full, bad)


def test_scaled_operator_and_as_operator(indefinite):
    s = torch.linspace(0.5, 2.0, 150, dtype=torch.float64)
    scaled = ScaledOperator(DenseOperator(indefinite), s)
    assert_close(scaled.to_dense(), s[:, None] * indefinite * s[None, :], rtol=1e-13, atol=1e-14, what="S A S")

    class Duck:  # any object with shape and torch_matmat
        shape = (150, 150)

        def torch_matmat(self, vectors):
            return indefinite @ vectors

    wrapped = as_operator(Duck(), torch.float64, "cpu")
    assert torch.equal(wrapped.to_dense(), DenseOperator(indefinite).to_dense())
    assert as_operator(scaled) is scaled and isinstance(as_operator(indefinite), DenseOperator)
    with pytest.raises(ValueError, match="dtype"):
        as_operator(Duck())


# ---------------------------------------------------------------------------- eigenpairs
@pytest.mark.parametrize("which", ["LA", "SA", "BE", "LM"])
def test_eigenpairs_match_eigvalsh(indefinite, which):
    exact = torch.linalg.eigvalsh(indefinite)  # ascending
    k = 5
    expected = {
        "LA": exact[-k:],
        "SA": exact[:k],
        "BE": torch.cat([exact[: k // 2], exact[-(k - k // 2):]]),
        "LM": exact[torch.argsort(exact.abs(), descending=True)[:k]],
    }[which]
    op = DenseOperator(indefinite)
    values, vectors = eigenpairs(op, k, which=which, seed=3)
    assert vectors.shape == (150, k) and vectors.dtype == torch.float64
    assert_close(values, expected.sort(descending=True).values, rtol=1e-8, what=f"eigsh {which}")
    assert float(eigenpair_residuals(op, values, vectors).max()) < 1e-6
    again, _ = eigenpairs(DenseOperator(indefinite), k, which=which, seed=3)
    assert torch.equal(values, again)  # a seed gives the same numbers


def test_eigenpairs_dense_path_and_errors(indefinite):
    small = BlockOperator(DenseOperator(indefinite), slice(0, 12))  # n = 12 <= ncv: dense eigh
    exact = torch.linalg.eigvalsh(indefinite[:12, :12])
    values, vectors = eigenpairs(small, 12)
    assert_close(values, exact.flip(0), rtol=1e-12, atol=1e-13, what="dense path")
    assert small.matvecs == 12
    assert_close(vectors.T @ vectors, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12, what="orthonormal")
    with pytest.raises(ValueError, match="k must be between"):
        eigenpairs(DenseOperator(indefinite), 151)
    with pytest.raises(ValueError, match="which must be one of"):
        eigenpairs(small, 2, which="XX")
    with pytest.raises(rs.errors.ConvergenceError, match="ARPACK converged"):
        eigenpairs(DenseOperator(indefinite), 40, which="SA", tol=1e-14, maxiter=1, ncv=41)


# ---------------------------------------------------------------------------- trace, diagonal
def test_hutchpp_and_hutchinson_trace_within_budget(decaying):
    op = DenseOperator(decaying)
    exact = float(decaying.trace())  # sum 1/i^2 for i <= 400, about 1.6424
    budget = 90  # seed 0; Hutch++ deflates the dominant directions, Hutchinson cannot
    pp = estimate_trace(op, matvecs=budget, method="hutch++", seed=0)
    hutch = estimate_trace(op, matvecs=budget, method="hutchinson", seed=0)
    assert pp.method == "hutch++" and pp.matvecs == budget and hutch.matvecs == budget
    assert abs(pp.value - exact) <= 0.01 * exact and abs(pp.value - exact) <= 4 * pp.stderr
    assert abs(hutch.value - exact) <= 0.15 * exact and abs(hutch.value - exact) <= 4 * hutch.stderr
    assert pp.stderr < hutch.stderr / 5
    assert hutchpp_trace(op, budget, seed=0) == pp and hutchinson_trace(op, budget, seed=0) == hutch
    assert op.matvecs == 4 * budget


def test_trace_early_stopping_and_exact(decaying, indefinite):
    op = DenseOperator(decaying)
    early = estimate_trace(op, matvecs=300, method="hutchinson", seed=1, rtol=0.2)
    assert early.matvecs % 4 == 0 and 8 <= early.matvecs < 300
    assert 2 * early.stderr <= 0.2 * abs(early.value)
    block = BlockOperator(DenseOperator(indefinite), slice(0, 50))
    exact = estimate_trace(block, matvecs=50, method="hutch++")  # n <= matvecs: exact
    assert exact.method == "exact" and exact.stderr == 0.0 and exact.matvecs == 50
    assert abs(exact.value - float(indefinite[:50, :50].trace())) < 1e-12
    with pytest.raises(ValueError, match="at least 3"):
        estimate_trace(op, matvecs=2)
    with pytest.raises(ValueError, match="rtol"):
        estimate_trace(op, rtol=0.0)


def test_diagonal_estimate(indefinite):
    op = DenseOperator(indefinite)
    exact = estimate_diagonal(op, matvecs=200)
    assert exact.method == "exact" and torch.equal(exact.values, torch.diagonal(op.to_dense()))
    est = estimate_diagonal(op, matvecs=100, seed=2, batch_size=32)
    assert est.method == "hutchinson" and est.matvecs == 100 and est.values.shape == (150,)
    z = (est.values - torch.diagonal(indefinite)) / est.stderr
    assert float((z.abs() <= 4).double().mean()) >= 0.99


# ---------------------------------------------------------------------------- Lanczos, SLQ
def test_lanczos_on_operator_equals_callable(indefinite):
    op = DenseOperator(indefinite)
    v0 = torch.randn(150, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a1, b1, basis = lanczos(op, v0, 30)
    a2, b2, _ = lanczos(lambda v: indefinite @ v, v0, 30)
    assert_close(a1, a2, rtol=1e-12, atol=1e-14, what="alphas")
    assert_close(b1, b2, rtol=1e-12, atol=1e-14, what="betas")
    t = torch.diag(a1) + torch.diag(b1, 1) + torch.diag(b1, -1)
    assert_close(basis.T @ indefinite @ basis, t, rtol=0, atol=1e-12, what="V^T A V = T")


def test_random_signs_are_the_int64_draws_in_the_probe_dtype():
    """The int8 draws equal the former int64 recipe entry for entry and leave the generator where it left it,
    so every probe (trace, SLQ, alignment nulls) and every pinned number built on them is unchanged."""
    for dtype, shape in ((torch.float64, (1001, 7)), (torch.float32, (3, 5, 11))):
        new, old = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        signs = random_signs(shape, new, dtype, torch.device("cpu"))
        expected = (torch.randint(0, 2, shape, generator=old) * 2 - 1).to(dtype)
        assert signs.dtype == dtype and torch.equal(signs, expected)
        assert torch.equal(torch.rand(4, generator=new), torch.rand(4, generator=old))  # the same state afterwards
    assert torch.equal(rademacher(9, 2, torch.Generator().manual_seed(1), torch.float64, torch.device("cpu")),
                       random_signs((9, 2), torch.Generator().manual_seed(1), torch.float64, torch.device("cpu")))


def test_slq_moments_are_exact_gauss_quadrature(indefinite):
    """``n sum_i w_pi r_pi^j = z_p^T A^j z_p`` for ``j < 2m`` (Gauss quadrature with m nodes)."""
    n, m, probes = 150, 12, 3
    op = DenseOperator(indefinite)
    d = spectral_density(op, lanczos_steps=m, probes=probes, seed=4)
    assert d.ritz_values.shape == (probes, m) and d.matvecs == probes * m and d.dim == n
    gen = torch.Generator().manual_seed(4)  # the probes spectral_density drew
    scale = float(torch.linalg.matrix_norm(indefinite, ord=2))
    for p in range(probes):
        z = rademacher(n, 1, gen, torch.float64, torch.device("cpu"))[:, 0]
        power = z.clone()
        for j in range(2 * m):
            exact = float(z @ power) / scale**j
            quadrature = n * float((d.ritz_weights[p] * (d.ritz_values[p] / scale) ** j).sum())
            assert abs(quadrature - exact) <= 1e-9 * n, (p, j)
            power = indefinite @ power
    # averaged over probes, the first moments estimate tr(A^j) / n (Hutchinson): within 4 stderr
    for j in (1, 2):
        samples = n * (d.ritz_weights * d.ritz_values**j).sum(1)
        exact = float(torch.trace(torch.linalg.matrix_power(indefinite, j)))
        assert abs(float(samples.mean()) - exact) <= 4 * float(samples.std()) / math.sqrt(probes) + 1e-12
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-10
    assert_close(d.evaluate(d.grid), d.density, rtol=0, atol=0, what="evaluate on own grid")


def test_full_lanczos_recovers_the_spectrum():
    lam = torch.linspace(-1.0, 3.0, 40, dtype=torch.float64)
    d = spectral_density(DenseOperator(symmetric_matrix(40, lam, seed=2)), lanczos_steps=40, probes=1, seed=0)
    assert_close(d.ritz_values[0], lam, rtol=0, atol=1e-10, what="Ritz values = eigenvalues")


# ---------------------------------------------------------------------------- HessianOperator
def _state(obj: rs.Objective) -> dict:
    """Every attribute of the Objective (by identity) plus the values that could change in place."""
    return {
        "attrs": dict(vars(obj)),
        "params": {k: v.clone() for k, v in obj.module.state_dict().items()},
        "theta0": obj.theta0.clone(),
    }


def _assert_same_state(obj: rs.Objective, before: dict) -> None:
    after = vars(obj)
    assert after.keys() == before["attrs"].keys()
    changed = [k for k, v in before["attrs"].items() if after[k] is not v]
    assert changed == [], f"HessianOperator changed Objective attributes {changed}"
    assert obj._reverse_hvp is False and obj.hvp_mode == "auto"
    state = obj.module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before["params"].items())
    assert torch.equal(obj.theta0, before["theta0"])


def test_hessian_operator_never_mutates_its_objective(classification_data):
    obj = rs.Objective(tiny_mlp(0), "cross_entropy", classification_data, batch_size=8)
    theta = obj.theta0 + 0.1
    g = torch.Generator().manual_seed(0)
    v = torch.randn(obj.dim, generator=g, dtype=torch.float64)
    block = torch.randn(obj.dim, 3, generator=g, dtype=torch.float64)
    hvp_before, hvps_before = obj.hvp(theta, v), obj.hvps(theta, block)
    before = _state(obj)
    dense = obj.dense_hessian(theta)
    for mode in ("reverse",) + HVP_MODES:  # "reverse" first: it used to switch the Objective to reverse mode
        for op in (HessianOperator(obj, theta, mode), obj.hessian(theta, mode=mode)):
            assert op.mode != "auto" and op.objective is obj
            tol = 1e-6 if mode == "finite_difference" else 1e-10
            assert_close(op.matvec(v), dense @ v, rtol=tol, atol=tol, what=f"{mode} matvec")
            assert_close(op.matmat(block), dense @ block, rtol=tol, atol=tol, what=f"{mode} matmat")
            assert_close(torch.from_numpy(op.to_scipy().matvec(v.numpy())), dense @ v, rtol=tol, atol=tol, what=f"{mode} scipy")
            assert op.matvecs == 5
            op.release()
            _assert_same_state(obj, before)
            assert torch.equal(obj.hvp(theta, v), hvp_before) and torch.equal(obj.hvps(theta, block), hvps_before)
    assert obj.hessian(theta).mode == "reuse" and HessianOperator(obj, theta, "auto").mode == "reuse"
    obj.reuse_max_batches = 1
    assert obj.hessian(theta).mode == "forward"
    with pytest.raises(ValueError, match="mode must be one of"):
        HessianOperator(obj, theta, "bogus")


def test_hessian_operator_algorithms_agree_with_dense(classification_data):
    obj = rs.Objective(tiny_mlp(1), "cross_entropy", classification_data)
    op = obj.hessian(obj.theta0)
    dense = obj.dense_hessian(obj.theta0)
    assert_close(op.to_dense(), dense, rtol=1e-10, atol=1e-12, what="to_dense")
    values, _ = eigenpairs(op, 3, ncv=20)  # D = 39 > ncv: ARPACK on the Hessian operator
    assert_close(values, torch.linalg.eigvalsh(dense).flip(0)[:3], rtol=1e-8, what="top-3")
    assert abs(estimate_trace(op, matvecs=39).value - float(dense.trace())) < 1e-10


def test_compiled_hvps_equal_the_eager_ones_and_share_one_kernel(classification_data):
    """hvp_mode="compiled": torch.compile of the same forward-over-reverse kernel, so the same exact product.

    float64, two equal batches (one compile); 1e-12 relative is rounding (the compiled graph may fuse
    and reorder the same float64 operations), far below a wrong batch weight or a missing term (1e-2).
    """
    x, y = classification_data
    eager = rs.Objective(tiny_mlp(2), "cross_entropy", (x[:32], y[:32]), batch_size=16)
    compiled = rs.Objective(tiny_mlp(2), "cross_entropy", (x[:32], y[:32]), batch_size=16, hvp_mode="compiled")
    theta = eager.theta0 + 0.05
    g = torch.Generator().manual_seed(3)
    v, block = torch.randn(eager.dim, generator=g, dtype=torch.float64), torch.randn(eager.dim, 3, generator=g, dtype=torch.float64)
    assert_close(compiled.hvp(theta, v), eager.hvp(theta, v), rtol=1e-12, atol=1e-14, what="compiled hvp")
    assert_close(compiled.hvps(theta, block), eager.hvps(theta, block), rtol=1e-12, atol=1e-14, what="compiled hvps")
    op = compiled.hessian(theta)
    assert op.mode == "compiled" and op._compiled is compiled._compiled_hvp  # no second compile
    dense = eager.dense_hessian(theta)
    values, _ = eigenpairs(op, 3, ncv=20)
    assert_close(values, torch.linalg.eigvalsh(dense).flip(0)[:3], rtol=1e-8, what="compiled top-3")


def test_a_failed_compile_warns_once_and_gives_the_eager_product(classification_data, monkeypatch):
    import riverscape.linalg.operators as operators

    def broken(fn):
        def call(*args):
            raise RuntimeError("the compiler does not support this op\nlong traceback")
        return call

    monkeypatch.setattr(operators.torch, "compile", broken)
    obj = rs.Objective(tiny_mlp(2), "cross_entropy", classification_data, batch_size=16, hvp_mode="compiled")
    eager = rs.Objective(tiny_mlp(2), "cross_entropy", classification_data, batch_size=16, hvp_mode="forward")
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="torch.compile of the HVP failed .*RuntimeError: the compiler does not support this op\\)"):
        first = obj.hvp(obj.theta0, v)
    assert obj._compiled_hvp.failed and torch.equal(first, eager.hvp(obj.theta0, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(obj.hvp(obj.theta0, v), first)
