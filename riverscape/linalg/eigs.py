"""Extreme eigenpairs of a symmetric operator: ARPACK Lanczos (``eigsh``), thick-restart Lanczos in
torch (:mod:`riverscape.linalg.restart`), or dense for small ``n``.

Shapes: ``n`` the operator's dimension, ``k`` eigenpairs.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import Tensor

from ..errors import ConvergenceError
from .operators import Operator
from .restart import thick_restart_lanczos

__all__ = ["EIG_WHICH", "EIG_SOLVERS", "default_ncv", "default_solver", "eigenpairs", "eigenpair_residuals"]

EIG_WHICH = ("LA", "SA", "BE", "LM")
EIG_SOLVERS = ("auto", "arpack", "lanczos")


def _select(k: int, n: int, which: str, ascending_values: Tensor) -> Tensor:
    """Indices (into ascending eigenvalues) that eigsh's ``which`` would return."""
    if which == "LA":
        return torch.arange(n - k, n)
    if which == "SA":
        return torch.arange(0, k)
    if which == "BE":  # eigsh: k // 2 from the low end, the rest (one more if k is odd) from the high end
        low = k // 2
        return torch.cat([torch.arange(0, low), torch.arange(n - (k - low), n)])
    order = torch.argsort(ascending_values.abs(), descending=True, stable=True)
    return order[:k]


def default_ncv(k: int, n: int) -> int:
    """Lanczos basis size used by :func:`eigenpairs`: ``min(n, max(2k + 1, 20))``."""
    return min(n, max(2 * k + 1, 20))


def default_solver(dtype: torch.dtype) -> str:
    """The solver of ``solver="auto"``: ``"arpack"`` for a float64 operator, ``"lanczos"`` otherwise.

    ARPACK (scipy) keeps its basis in float64 numpy arrays on the CPU, and at the end a second
    ``n x ncv`` array for the Ritz vectors; the thick-restart Lanczos keeps one basis in the
    operator's dtype on its device (half the memory in float32, none of it copied per product).
    """
    return "arpack" if dtype == torch.float64 else "lanczos"


def eigenpairs(
    operator: Operator,
    k: int = 5,
    *,
    which: str = "LA",
    tol: float | None = None,
    seed: int = 0,
    ncv: int | None = None,
    maxiter: int | None = None,
    solver: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Extreme eigenpairs of a symmetric operator by restarted Lanczos.

    Parameters
    ----------
    operator : Operator, shape (n, n)
    k : int
        Number of eigenpairs (``1 <= k <= n``; ``k = n`` only on the dense path).
    which : {"LA", "SA", "BE", "LM"}
        Largest algebraic (default), smallest algebraic, both ends (eigsh semantics:
        ``k // 2`` from the low end and ``k - k // 2`` from the high end), or largest magnitude.
    tol : float, optional
        ARPACK's relative stopping tolerance (Ritz residual ``<= tol * |lambda|``; the
        eigenvalue error is about ``residual^2 / gap``). Default: ``1e-8`` for a float64
        operator, ``1e-5`` in lower precision, where the products themselves are only
        accurate to about 1e-7 relative.
    seed : int
        Seeds the start vector: ARPACK's ``v0`` is ``numpy.random.default_rng(seed).standard_normal(n)``,
        the torch solver's ``torch.randn`` from a generator seeded with ``seed``.
    ncv : int, optional
        Lanczos basis size (default :func:`default_ncv`). Operators with ``n <= ncv`` are
        solved densely from ``n`` products (``torch.linalg.eigh`` of :meth:`Operator.to_dense`).
    maxiter : int, optional
        Restart limit (default: scipy's ``10 n``, for both solvers).
    solver : {"auto", "arpack", "lanczos"}
        ``"arpack"``: ``scipy.sparse.linalg.eigsh`` on the float64 scipy view of the operator
        (memory: about ``(2 ncv + k + 4) x n`` float64 numbers at the end, when scipy extracts
        the Ritz vectors). ``"lanczos"``: :func:`~riverscape.linalg.restart.thick_restart_lanczos`,
        the basis in the operator's dtype on its device (at most ``(ncv + k) x n`` numbers).
        ``"auto"`` (default): :func:`default_solver`, ARPACK in float64 and the torch solver in
        lower precision. Both stop on the same relative Ritz residual ``tol``.

    Returns
    -------
    values : Tensor, shape (k,), float64, sorted descending
    vectors : Tensor, shape (n, k), orthonormal columns in the operator's ``torch_dtype`` and device

    Raises
    ------
    ConvergenceError
        When the solver does not converge (with the number of converged pairs); raise ``tol`` or ``maxiter``.
    """
    if which not in EIG_WHICH:
        raise ValueError(f"which must be one of {EIG_WHICH}, got {which!r}")
    if solver not in EIG_SOLVERS:
        raise ValueError(f"solver must be one of {EIG_SOLVERS}, got {solver!r}")
    n = operator.shape[0]
    ncv = default_ncv(k, n) if ncv is None else int(ncv)
    dense = n <= ncv
    if not (1 <= k <= n if dense else 1 <= k < n):
        raise ValueError(f"k must be between 1 and {n if dense else n - 1} for an operator of dimension {n}, got {k}")
    if dense:
        evals, evecs = torch.linalg.eigh(operator.to_dense())
        idx = _select(k, n, which, evals)
        values, vectors = evals[idx].cpu().numpy(), evecs[:, idx].cpu().numpy()
    else:
        if tol is None:
            tol = 1e-8 if operator.torch_dtype == torch.float64 else 1e-5
        if (default_solver(operator.torch_dtype) if solver == "auto" else solver) == "lanczos":
            maxiter = 10 * n if maxiter is None else int(maxiter)
            return thick_restart_lanczos(operator, k, which=which, tol=tol, ncv=ncv, maxiter=maxiter, seed=seed)
        v0 = np.random.default_rng(seed).standard_normal(n)
        try:
            values, vectors = eigsh(operator.to_scipy(), k=k, which=which, tol=tol, v0=v0, ncv=ncv, maxiter=maxiter)
        except ArpackNoConvergence as err:
            raise ConvergenceError(
                f"ARPACK converged {len(err.eigenvalues)} of {k} eigenpairs (tol={tol}); raise tol or maxiter"
            ) from None
    order = np.argsort(values)[::-1]
    vals = torch.as_tensor(np.ascontiguousarray(values[order]), dtype=torch.float64)
    vecs = torch.as_tensor(np.ascontiguousarray(vectors[:, order]), dtype=operator.torch_dtype, device=operator.device)
    return vals, vecs


def eigenpair_residuals(operator: Operator, values: Tensor, vectors: Tensor) -> Tensor:
    """Residual norms ``||A v_i - lambda_i v_i||`` of approximate eigenpairs (``k`` products).

    For a unit ``v_i`` the residual bounds the eigenvalue error: some eigenvalue of ``A``
    lies within it of ``lambda_i`` (and within ``r_i^2 / gap`` once ``lambda_i`` is isolated).

    Parameters
    ----------
    operator : Operator, shape (n, n)
    values : Tensor, shape (k,)
    vectors : Tensor, shape (n, k)

    Returns
    -------
    Tensor, shape (k,), float64, on the CPU
    """
    n = operator.shape[0]
    if vectors.ndim != 2 or vectors.shape != (n, values.shape[0]):
        raise ValueError(f"vectors must have shape ({n}, {values.shape[0]}), got {tuple(vectors.shape)}")
    v = vectors.to(device=operator.device, dtype=operator.torch_dtype)
    hv = operator.torch_matmat(v).cpu().double()  # to the CPU first: MPS has no float64
    return torch.linalg.vector_norm(hv - v.cpu().double() * values.to(hv)[None, :], dim=0)
