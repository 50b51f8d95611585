"""Thick-restart Lanczos (riverscape.linalg.restart) on known matrices, against dense eigvalsh and ARPACK."""
from __future__ import annotations

import pytest
import torch

import riverscape as rs
from riverscape.linalg import DenseOperator, Operator, default_solver, eigenpair_residuals, eigenpairs
from riverscape.linalg.restart import ritz_order, thick_restart_lanczos

from helpers import assert_close


def _symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``U diag(eigenvalues) U^T`` with a random orthogonal ``U`` (float64)."""
    n = eigenvalues.shape[0]
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return u @ torch.diag(eigenvalues) @ u.T


@pytest.fixture(scope="module")
def indefinite() -> torch.Tensor:
    """n = 150, eigenvalues 10 / i (i = 1..120) and -0.5 j / 30 (j = 1..30): distinct, clustered toward 0."""
    lam = torch.cat([10.0 / torch.arange(1, 121, dtype=torch.float64), -0.5 * torch.arange(1, 31, dtype=torch.float64) / 30])
    return _symmetric(lam)


def _expected(matrix: torch.Tensor, k: int, which: str) -> torch.Tensor:
    exact = torch.linalg.eigvalsh(matrix)  # ascending
    picked = {
        "LA": exact[-k:],
        "SA": exact[:k],
        "BE": torch.cat([exact[: k // 2], exact[-(k - k // 2):]]),
        "LM": exact[torch.argsort(exact.abs(), descending=True)[:k]],
    }[which]
    return picked.sort(descending=True).values


@pytest.mark.parametrize("which", ["LA", "SA", "BE", "LM"])
def test_thick_restart_matches_eigvalsh_in_float64(indefinite, which):
    # ncv = 12 for k = 5 on n = 150: the smallest-algebraic end is a cluster (gaps 0.017), so every
    # `which` needs several restarts; tol 1e-10 bounds each residual by 1e-10 |lambda|, and the
    # eigenvalue error by that residual (Weyl), so 1e-9 relative is a bound with margin
    op = DenseOperator(indefinite)
    values, vectors = eigenpairs(op, 5, which=which, ncv=12, tol=1e-10, solver="lanczos", seed=1)
    assert op.matvecs > 12, "no restart happened: the test would not exercise the restart"
    assert vectors.shape == (150, 5) and vectors.dtype == torch.float64
    assert_close(values, _expected(indefinite, 5, which), rtol=1e-9, atol=1e-12, what=f"thick restart {which}")
    assert_close(vectors.T @ vectors, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12, what="orthonormal")
    assert float(eigenpair_residuals(op, values, vectors).max()) <= 1e-10 * 10.0  # tol * |lambda|max
    again, _ = eigenpairs(DenseOperator(indefinite), 5, which=which, ncv=12, tol=1e-10, solver="lanczos", seed=1)
    assert torch.equal(values, again)  # a seed gives the same numbers


def test_float32_operator_uses_the_torch_solver_in_float32(indefinite):
    op32 = DenseOperator(indefinite.float())
    assert default_solver(torch.float32) == "lanczos" and default_solver(torch.float64) == "arpack"
    values, vectors = eigenpairs(op32, 5, seed=0)  # tol 1e-5 by default in float32
    assert vectors.dtype == torch.float32
    # residual <= 1e-5 |lambda| bounds the eigenvalue error by 1e-5 relative; the float32 matrix itself
    # differs from the float64 one by 6e-8 relative (its eigenvalues move by ~6e-7 at |A| = 10)
    assert_close(values, _expected(indefinite, 5, "LA"), rtol=1e-5, atol=1e-6, what="float32 top-5")
    assert float((vectors.T @ vectors - torch.eye(5)).abs().max()) < 1e-5  # float32 orthonormality


def test_invariant_subspace_and_an_operator_that_returns_its_input():
    # rank 3 (eigenvalues 3, 2, 1, then 0 x 57): the Krylov space is invariant after 4 steps and
    # the solver must go on from fresh random directions to find the two zeros
    low_rank = _symmetric(torch.cat([torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), torch.zeros(57, dtype=torch.float64)]))
    values, vectors = eigenpairs(DenseOperator(low_rank), 5, ncv=10, solver="lanczos", tol=1e-10)
    assert_close(values, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-10, what="rank 3")
    assert_close(vectors.T @ vectors, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10, what="orthonormal")

    class Identity(Operator):  # returns its input: the solver must not orthogonalise its own basis in place
        def _apply(self, vectors):
            return vectors

    with pytest.raises(rs.errors.ConvergenceError, match="exactly zero"):  # as ARPACK (a zero Hessian: degenerate weights)
        eigenpairs(DenseOperator(torch.zeros(30, 30, dtype=torch.float64)), 2, ncv=8, solver="lanczos")
    values, vectors = eigenpairs(Identity(50, torch.float64, "cpu"), 3, ncv=8, solver="lanczos")
    assert_close(values, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-14, what="identity eigenvalues")
    assert_close(vectors.T @ vectors, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12, what="identity eigenvectors")


def test_ritz_order_follows_eigsh_which_and_errors(indefinite):
    values = torch.tensor([0.5, -3.0, 2.0, -0.1, 1.0], dtype=torch.float64)
    assert ritz_order(values, "LA").tolist() == [2, 4, 0, 3, 1]
    assert ritz_order(values, "SA").tolist() == [1, 3, 0, 4, 2]
    assert ritz_order(values, "LM").tolist() == [1, 2, 4, 0, 3]
    assert ritz_order(values, "BE").tolist() == [2, 1, 4, 3, 0]  # top, bottom, next top, next bottom, ...
    op = DenseOperator(indefinite)
    with pytest.raises(rs.errors.ConvergenceError, match="converged .* of 5 eigenpairs in 1 restarts"):
        thick_restart_lanczos(op, 5, which="SA", tol=1e-14, ncv=8, maxiter=1)
    with pytest.raises(ValueError, match="k < ncv < n"):
        thick_restart_lanczos(op, 5, tol=1e-8, ncv=5, maxiter=3)
    with pytest.raises(ValueError, match="solver must be one of"):
        eigenpairs(op, 2, solver="lobpcg")
