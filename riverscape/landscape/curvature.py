"""Hessian curvature at a point: eigenpairs, trace, diagonal, spectral density, per layer.

Everything here is a small algorithm over a curvature *operator* (THEORY.md sections 5 and
7.2): the Objective's exact Hessian ``LinearOperator`` (:meth:`Objective.hessian`),
optionally restricted to a block of coordinates (one layer: the diagonal block ``H_ll``).
Pass ``operator=`` to reuse one operator (its gradient graph and ``matvecs`` counter)
across calls; any object with ``shape``, ``matvecs`` and ``torch_matmat(V (n, K)) -> (n, K)``
works, so the algorithms can be tested on a known matrix.

Shapes: ``D`` parameters (``objective.dim``), ``n`` coordinates of a block (``n = D``
without one), ``k`` eigenpairs, ``m`` Lanczos steps, ``K`` probe vectors.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConvergenceError
from ..objective import HessianOperator, Objective
from ..quant.qmap import QuantMap

__all__ = [
    "Block",
    "BlockOperator",
    "block_slice",
    "hessian_eigs",
    "eigenpair_residuals",
    "hessian_trace",
    "TraceEstimate",
    "hessian_diagonal",
    "DiagonalEstimate",
    "lanczos",
    "spectral_density",
    "SpectralDensity",
    "layer_curvature",
    "LayerCurvature",
    "EIG_WHICH",
    "TRACE_METHODS",
]

Block = Union[None, str, slice]
EIG_WHICH = ("LA", "SA", "BE", "LM")
TRACE_METHODS = ("hutch++", "hutchinson", "exact")


# ---------------------------------------------------------------------------- operators
def block_slice(objective: Objective, block: Block) -> slice:
    """Coordinates of ``theta`` for a block: a parameter name, a slice, or ``None`` (all).

    Slices are normalised to ``slice(start, stop)`` with ``0 <= start < stop <= D`` and
    step 1; anything else raises ``ValueError``.
    """
    if block is None:
        return slice(0, objective.dim)
    if isinstance(block, slice):
        start, stop, step = block.indices(objective.dim)
        if step != 1 or stop <= start:
            raise ValueError(f"block slice must be contiguous and non-empty within [0, {objective.dim}), got {block}")
        return slice(start, stop)
    for spec in objective.layout:
        if spec.name == block:
            return spec.slice
    raise ValueError(f"unknown block {block!r}; choose a parameter name from {objective.param_names}")


class BlockOperator(LinearOperator):
    """The diagonal block ``H[s, s]`` of a Hessian operator (vectors embedded with zeros)."""

    def __init__(self, operator: HessianOperator, block: slice) -> None:
        n = block.stop - block.start
        super().__init__(dtype=np.float64, shape=(n, n))
        self.operator = operator
        self.block = block

    @property
    def matvecs(self) -> int:
        return self.operator.matvecs

    def torch_matmat(self, vectors: Tensor) -> Tensor:
        """``H[s, s] V`` for a block of vectors ``(n, K)``."""
        full = torch.zeros(self.operator.shape[0], vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
        full[self.block] = vectors
        return self.operator.torch_matmat(full)[self.block]

    def torch_matvec(self, v: Tensor) -> Tensor:
        return self.torch_matmat(v[:, None])[:, 0]

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        obj = self.operator.objective
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=obj.dtype, device=obj.device)
        return self.torch_matvec(v).detach().cpu().double().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _adjoint(self):
        return self


class _ScipyAdapter(LinearOperator):
    """Any ``torch_matmat`` operator as a float64 scipy ``LinearOperator`` (symmetric)."""

    def __init__(self, operator, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(dtype=np.float64, shape=tuple(operator.shape))
        self.operator = operator
        self.torch_dtype = dtype
        self.device = device

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x), dtype=self.torch_dtype, device=self.device)
        return self.operator.torch_matmat(v).detach().cpu().double().numpy()

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1))[:, 0]

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _adjoint(self):
        return self


def _resolve(objective: Objective, theta: Tensor | None, block: Block, operator) -> tuple[object, int]:
    """The (block) operator for a call and its dimension ``n``.

    A passed ``operator`` is used as is (restricted to ``block``); when it knows its point
    (``operator.theta``) and ``theta`` is given too, the two must agree.
    """
    s = block_slice(objective, block)
    if operator is None:
        theta = objective.theta0 if theta is None else objective.check_theta(theta)
        op = objective.hessian(theta)
    else:
        op = operator
        if tuple(op.shape) != (objective.dim, objective.dim):
            raise ValueError(f"operator has shape {tuple(op.shape)}, the objective needs ({objective.dim}, {objective.dim})")
        at = getattr(op, "theta", None)
        if theta is not None and at is not None and not torch.equal(at, objective.check_theta(theta)):
            raise ValueError("operator was built at another point than theta; pass one of them, or matching ones")
    if s.start == 0 and s.stop == objective.dim:
        return op, objective.dim
    return BlockOperator(op, s), s.stop - s.start


def _dense(op, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``(n, n)`` matrix of an operator from ``n`` unit-vector products (symmetrised)."""
    h = op.torch_matmat(torch.eye(n, dtype=dtype, device=device)).double()
    return 0.5 * (h + h.T)


def _rademacher(n: int, m: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    return (torch.randint(0, 2, (n, m), generator=generator) * 2 - 1).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------- eigenpairs
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
    """Lanczos basis size used by :func:`hessian_eigs`: ``min(n, max(2k + 1, 20))``."""
    return min(n, max(2 * k + 1, 20))


def hessian_eigs(
    objective: Objective,
    theta: Tensor | None = None,
    k: int = 5,
    *,
    which: str = "LA",
    tol: float | None = None,
    block: Block = None,
    operator: HessianOperator | None = None,
    seed: int = 0,
    ncv: int | None = None,
    maxiter: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Extreme eigenpairs of the Hessian by ARPACK Lanczos (``scipy.sparse.linalg.eigsh``).

    Parameters
    ----------
    objective : Objective
    theta : Tensor, shape (D,), optional
        Point of evaluation (default: ``objective.theta0``, or the ``operator``'s point).
    k : int
        Number of eigenpairs (``1 <= k <= n``; ``k = n`` only on the dense path).
    which : {"LA", "SA", "BE", "LM"}
        Largest algebraic (default), smallest algebraic (negative curvature at quantized
        points), both ends (eigsh semantics: ``k // 2`` from the low end and ``k - k // 2``
        from the high end), or largest magnitude.
    tol : float, optional
        ARPACK's relative stopping tolerance (Ritz residual ``<= tol * |lambda|``; the
        eigenvalue error is about ``residual^2 / gap``). Default: ``1e-8`` in float64
        (eigenvalues to machine precision; on digits MLP/CNN Hessians top-5 converges in
        21 HVPs vs 33 for ``tol=0``), ``1e-5`` in lower precision, where the HVPs
        themselves are only accurate to about 1e-7 relative.
    block : str or slice, optional
        Restrict to one parameter tensor (by name) or a coordinate slice: eigenpairs of ``H_ll``.
    operator : HessianOperator, optional
        Reuse an existing operator (its gradient graph and matvec counter).
    seed : int
        Seeds ARPACK's start vector.
    ncv : int, optional
        Lanczos basis size (default :func:`default_ncv`). Blocks with ``n <= ncv`` are
        solved densely from ``n`` HVPs (``torch.linalg.eigh``).
    maxiter : int, optional
        ARPACK restart limit (default: scipy's).

    Returns
    -------
    values : Tensor, shape (k,), float64, sorted descending
    vectors : Tensor, shape (n, k), orthonormal columns in the Objective's dtype and device

    Raises
    ------
    RuntimeError
        When ARPACK does not converge (with the number of converged pairs); raise ``tol``.
    """
    if which not in EIG_WHICH:
        raise ValueError(f"which must be one of {EIG_WHICH}, got {which!r}")
    op, n = _resolve(objective, theta, block, operator)
    ncv = default_ncv(k, n) if ncv is None else int(ncv)
    dense = n <= ncv
    if not (1 <= k <= n if dense else 1 <= k < n):
        raise ValueError(f"k must be between 1 and {n if dense else n - 1} for a block of dimension {n}, got {k}")
    if dense:
        evals, evecs = torch.linalg.eigh(_dense(op, n, objective.dtype, objective.device))
        idx = _select(k, n, which, evals)
        values, vectors = evals[idx].cpu().numpy(), evecs[:, idx].cpu().numpy()
    else:
        if tol is None:
            tol = 1e-8 if objective.dtype == torch.float64 else 1e-5
        scipy_op = op if isinstance(op, LinearOperator) else _ScipyAdapter(op, objective.dtype, objective.device)
        v0 = np.random.default_rng(seed).standard_normal(n)
        try:
            values, vectors = eigsh(scipy_op, k=k, which=which, tol=tol, v0=v0, ncv=ncv, maxiter=maxiter)
        except ArpackNoConvergence as err:
            raise ConvergenceError(
                f"ARPACK converged {len(err.eigenvalues)} of {k} eigenpairs (tol={tol}); raise tol or maxiter"
            ) from None
    order = np.argsort(values)[::-1]
    vals = torch.as_tensor(np.ascontiguousarray(values[order]), dtype=torch.float64)
    vecs = torch.as_tensor(np.ascontiguousarray(vectors[:, order]), dtype=objective.dtype, device=objective.device)
    return vals, vecs


def eigenpair_residuals(
    objective: Objective,
    theta: Tensor | None,
    values: Tensor,
    vectors: Tensor,
    *,
    block: Block = None,
    operator: HessianOperator | None = None,
) -> Tensor:
    """Residual norms ``||H v_i - lambda_i v_i||`` of approximate eigenpairs (k HVPs).

    For a unit ``v_i`` the residual bounds the eigenvalue error: some eigenvalue of ``H``
    lies within it of ``lambda_i`` (and within ``r_i^2 / gap`` once ``lambda_i`` is isolated).

    Parameters
    ----------
    values : Tensor, shape (k,)
    vectors : Tensor, shape (n, k)
        As returned by :func:`hessian_eigs` (same ``block``).

    Returns
    -------
    Tensor, shape (k,), float64
    """
    op, n = _resolve(objective, theta, block, operator)
    if vectors.ndim != 2 or vectors.shape != (n, values.shape[0]):
        raise ValueError(f"vectors must have shape ({n}, {values.shape[0]}), got {tuple(vectors.shape)}")
    v = vectors.to(device=objective.device, dtype=objective.dtype)
    hv = op.torch_matmat(v).double()
    return torch.linalg.vector_norm(hv - v.double() * values.to(hv)[None, :], dim=0).cpu()


# ---------------------------------------------------------------------------- trace, diagonal
@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate with its standard error and cost.

    ``method`` is the estimator that was run: ``"hutch++"``, ``"hutchinson"`` or
    ``"exact"`` (from unit vectors when the block is no larger than the budget; stderr 0).
    """

    value: float
    stderr: float
    matvecs: int
    method: str

    def to_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "matvecs": self.matvecs, "method": self.method}


def hessian_trace(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    matvecs: int = 100,
    method: str = "hutch++",
    block: Block = None,
    operator: HessianOperator | None = None,
    seed: int = 0,
    rtol: float | None = None,
) -> TraceEstimate:
    """Stochastic estimate of ``tr H`` (Hutchinson, or Hutch++ by Meyer et al. 2021, arXiv 2010.09649).

    Probes are Rademacher vectors applied in blocks (``operator.torch_matmat``).

    Parameters
    ----------
    matvecs : int
        Budget of Hessian-vector products (at least 3).
    method : {"hutch++", "hutchinson", "exact"}
        ``"hutchinson"``: mean of ``z^T H z`` over ``matvecs`` probes; its stderr is
        ``std(z^T H z) / sqrt(matvecs)``. ``"hutch++"``: ``matvecs // 3`` products sketch
        ``Q = orth(H S)``, ``matvecs // 3`` trace ``Q^T H Q`` exactly, and the rest
        estimate the deflated remainder ``tr((I - QQ^T) H (I - QQ^T))`` by Hutchinson on
        projected probes; the reported stderr is that of the remainder (the sketch part has
        no sampling error given ``Q``). ``"exact"``: ``n`` unit vectors. Whenever the
        block has at most ``matvecs`` coordinates the exact trace is cheaper and is used.
    block : str or slice, optional
        Trace of one diagonal block ``H_ll`` (one layer).
    operator : HessianOperator, optional
        Reuse an operator (any object with ``shape`` and ``torch_matmat``).
    seed : int
        Seeds the probes (a private ``torch.Generator``).
    rtol : float, optional
        Stop early: Hutchinson probes (the remainder probes of Hutch++) are drawn in blocks
        of ``PROBE_BLOCK`` and sampling stops once ``2 * stderr <= rtol * |estimate|``
        (about 95% confidence of a relative error below ``rtol``), after at least
        ``MIN_PROBES`` probes. ``matvecs`` is then a cap, and ``TraceEstimate.matvecs``
        says how many were used. Default: spend the whole budget.

    Returns
    -------
    TraceEstimate
        ``value``, ``stderr``, ``matvecs`` used and the ``method`` run.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    if matvecs < 3:
        raise ValueError(f"matvecs must be at least 3, got {matvecs}")
    if rtol is not None and not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    op, n = _resolve(objective, theta, block, operator)
    dtype, device = objective.dtype, objective.device
    if method == "exact" or n <= matvecs:
        value = float(torch.diagonal(_dense(op, n, dtype, device)).sum())
        return TraceEstimate(value, 0.0, n, "exact")
    gen = torch.Generator().manual_seed(seed)
    if method == "hutchinson":
        samples = _quadratic_form_samples(op, n, matvecs, gen, dtype, device, rtol=rtol)
        return TraceEstimate(float(samples.mean()), _stderr(samples), samples.numel(), method)
    sketch_size = matvecs // 3
    q, _ = torch.linalg.qr(op.torch_matmat(_rademacher(n, sketch_size, gen, dtype, device)))
    sketched = float((q * op.torch_matmat(q)).sum())
    samples = _quadratic_form_samples(op, n, matvecs - 2 * sketch_size, gen, dtype, device, rtol=rtol, deflate=q, offset=sketched)
    return TraceEstimate(sketched + float(samples.mean()), _stderr(samples), 2 * sketch_size + samples.numel(), method)


PROBE_BLOCK = 4  # probes per block when stopping early (one HVP each)
MIN_PROBES = 8  # before trusting a sample standard deviation for the stopping rule


def _stderr(samples: Tensor) -> float:
    return float(samples.std() / math.sqrt(samples.numel())) if samples.numel() > 1 else float("inf")


def _quadratic_form_samples(
    op,
    n: int,
    count: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    *,
    rtol: float | None = None,
    deflate: Tensor | None = None,
    offset: float = 0.0,
) -> Tensor:
    """Hutchinson samples ``g^T H g`` (``g`` Rademacher, projected off ``deflate``), float64 ``(m,)``.

    Without ``rtol`` all ``count`` probes run as one block. With ``rtol`` they run in blocks
    of ``PROBE_BLOCK`` until ``2 * stderr <= rtol * |offset + mean|`` (at least ``MIN_PROBES``).
    """
    samples: list[Tensor] = []
    drawn = 0
    block = count if rtol is None else PROBE_BLOCK
    while drawn < count:
        width = min(block, count - drawn)
        g = _rademacher(n, width, gen, dtype, device)
        if deflate is not None:
            g = g - deflate @ (deflate.T @ g)
        samples.append((g * op.torch_matmat(g)).sum(0).double())
        drawn += width
        if rtol is not None and drawn >= min(MIN_PROBES, count):
            done = torch.cat(samples)
            if 2.0 * _stderr(done) <= rtol * abs(offset + float(done.mean())):
                break
    return torch.cat(samples)


@dataclass(frozen=True)
class DiagonalEstimate:
    """Estimate of ``diag(H)`` with per-coordinate standard errors (shapes ``(n,)``)."""

    values: Tensor
    stderr: Tensor
    matvecs: int
    method: str

    def to_dict(self) -> dict:
        return {
            "values": self.values.tolist(),
            "stderr": self.stderr.tolist(),
            "matvecs": self.matvecs,
            "method": self.method,
        }


def hessian_diagonal(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    matvecs: int = 100,
    block: Block = None,
    operator: HessianOperator | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> DiagonalEstimate:
    """Hutchinson diagonal estimator ``diag(H) ~ mean_i z_i * (H z_i)``, Rademacher ``z_i``.

    Bekas, Kokiopoulou, Saad (2007). Coordinate ``j`` of one sample is
    ``H_jj + sum_{l != j} H_jl z_j z_l``, so its variance is ``sum_{l != j} H_jl^2``; the
    reported stderr is the sample standard deviation over ``sqrt(matvecs)``. Blocks with at
    most ``matvecs`` coordinates are computed exactly (``method="exact"``, stderr 0).
    Used for the expected RTN damage ``(1/24) sum_j H_jj s_j^2`` (THEORY.md 7.3).

    Parameters
    ----------
    matvecs : int
        Number of probes (at least 2).
    batch_size : int
        Probes per ``torch_matmat`` call (bounds memory at ``n * batch_size`` numbers).

    Returns
    -------
    DiagonalEstimate
        ``values`` and ``stderr`` of shape ``(n,)`` (float64, on the CPU).
    """
    if matvecs < 2:
        raise ValueError(f"matvecs must be at least 2, got {matvecs}")
    op, n = _resolve(objective, theta, block, operator)
    dtype, device = objective.dtype, objective.device
    if n <= matvecs:
        d = torch.diagonal(_dense(op, n, dtype, device)).cpu()
        return DiagonalEstimate(d, torch.zeros_like(d), n, "exact")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(n, dtype=torch.float64)
    total_sq = torch.zeros(n, dtype=torch.float64)
    for start in range(0, matvecs, batch_size):
        z = _rademacher(n, min(batch_size, matvecs - start), gen, dtype, device)
        samples = (z * op.torch_matmat(z)).double().cpu()
        total += samples.sum(1)
        total_sq += (samples**2).sum(1)
    mean = total / matvecs
    var = (total_sq - matvecs * mean**2).clamp_min(0.0) / (matvecs - 1)
    return DiagonalEstimate(mean, torch.sqrt(var / matvecs), matvecs, "hutchinson")


# ---------------------------------------------------------------------------- Lanczos, SLQ
def lanczos(
    matmul: Callable[[Tensor], Tensor],
    v0: Tensor,
    steps: int,
    *,
    converged: Callable[[Tensor, Tensor], bool] | None = None,
    check_every: int = 10,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos tridiagonalisation with full re-orthogonalisation.

    ``V^T A V = T`` with ``T = tridiag(betas, alphas, betas)`` for a symmetric ``A``; every
    new vector is orthogonalised against the whole basis twice (classical Gram-Schmidt,
    "twice is enough"), as SLQ in float32 needs (Ghorbani et al. 2019; PyHessian).
    Stops early when the Krylov space becomes invariant (``beta <= eps^(2/3) * ||T||``).

    Parameters
    ----------
    matmul : callable
        ``v (n,) -> A v (n,)``.
    v0 : Tensor, shape (n,)
        Start vector (normalised here).
    steps : int
        Maximum number of steps ``m`` (capped at ``n``).
    converged : callable, optional
        ``converged(alphas, betas) -> bool`` on the float64 coefficients so far, asked every
        ``check_every`` steps; ``True`` stops the iteration there.
    check_every : int
        Steps between two ``converged`` checks.

    Returns
    -------
    alphas : Tensor, shape (m,), float64
    betas : Tensor, shape (m - 1,), float64
    basis : Tensor, shape (n, m), orthonormal columns in ``v0``'s dtype
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    n = v0.shape[0]
    steps = min(steps, n)
    eps = torch.finfo(v0.dtype).eps
    # rows are the Lanczos vectors: each is contiguous, and re-orthogonalising against the first
    # j + 1 touches only those rows (a column-major (n, steps) basis streams all of it every step)
    basis = torch.zeros(steps, n, dtype=v0.dtype, device=v0.device)
    basis[0] = v0 / torch.linalg.vector_norm(v0)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for j in range(steps):
        w = matmul(basis[j])
        alpha = float(torch.dot(w, basis[j]))
        alphas.append(alpha)
        scale = max(scale, abs(alpha), betas[-1] if betas else 0.0)
        if j == steps - 1:
            break
        if converged is not None and (j + 1) % check_every == 0:
            if converged(torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)):
                break
        done = basis[: j + 1]
        for _ in range(2):
            w = w - done.T @ (done @ w)
        beta = float(torch.linalg.vector_norm(w))
        if beta <= eps ** (2 / 3) * max(scale, beta):
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    m = len(alphas)
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64), basis[:m].T


def _tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    return torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)


@dataclass(frozen=True)
class SpectralDensity:
    """Eigenvalue density of the Hessian by stochastic Lanczos quadrature.

    Attributes
    ----------
    grid : Tensor, shape (n,)
        Eigenvalue axis, covering the extreme Ritz values with a margin of 8 ``sigma``.
    density : Tensor, shape (n,)
        Gaussian-broadened density ``(1/P) sum_p sum_i w_pi g_sigma(t - r_pi)``; integrates
        to 1 over ``grid`` (trapezoid rule).
    ritz_values, ritz_weights : Tensor, shape (P, m)
        Quadrature nodes (Ritz values) and weights (squared first components of the
        eigenvectors of ``T``) of each probe; probes that stopped early are padded with
        NaN nodes and zero weights.
    sigma : float
        Gaussian broadening (standard deviation).
    matvecs : int
        HVPs used.
    dim : int
        Dimension ``n`` of the (block) operator; ``dim * sum_i w_pi r_pi`` is probe ``p``'s
        Hutchinson sample of the trace.
    """

    grid: Tensor
    density: Tensor
    ritz_values: Tensor
    ritz_weights: Tensor
    sigma: float
    matvecs: int
    dim: int

    def evaluate(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """The broadened density on another ``grid`` (shape ``(g,)``), with width ``sigma``
        (default: this result's), e.g. to compare two runs on one axis."""
        return _broadened(self.ritz_values, self.ritz_weights, grid.to(torch.float64), self.sigma if sigma is None else sigma)

    def to_dict(self) -> dict:
        return {
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "ritz_values": [[None if math.isnan(x) else x for x in row] for row in self.ritz_values.tolist()],
            "ritz_weights": self.ritz_weights.tolist(),
            "sigma": self.sigma,
            "matvecs": self.matvecs,
            "dim": self.dim,
        }


def spectral_density(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    lanczos_steps: int = 80,
    probes: int = 3,
    grid_points: int = 1000,
    sigma: float | None = None,
    block: Block = None,
    operator: HessianOperator | None = None,
    seed: int = 0,
    tol: float | None = None,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

    Ghorbani, Krishnan, Xiao 2019 (arXiv 1901.10159), as in PyHessian's ``density``:
    for each normalised Rademacher probe, ``m`` Lanczos steps with full
    re-orthogonalisation give ``T_m = Y diag(r) Y^T``; nodes ``r_i`` with weights
    ``Y_0i^2`` are smoothed with a Gaussian of width ``sigma`` and averaged over probes.

    Parameters
    ----------
    lanczos_steps : int
        Lanczos steps ``m`` per probe (capped at the dimension).
    probes : int
        Number of probe vectors ``P``.
    grid_points : int
        Points of the eigenvalue grid.
    sigma : float, optional
        Gaussian broadening. Default: 3 grid spacings, the finest width the grid resolves
        (``sigma = 3 * spread / (grid_points - 49)`` with ``spread`` the range of the
        Ritz values), so the trapezoid integral of the density is 1 to ~1e-12.
    block, operator, seed
        As in :func:`hessian_trace`.
    tol : float, optional
        Stop a probe's Lanczos run early, checked every ``DENSITY_CHECK_EVERY`` steps, once
        over the last check (a) each extreme Ritz value moved by at most ``tol`` relative to
        itself (floor ``tol**2`` times the Ritz spread, for extremes near 0) and (b) the
        probe's broadened density moved by at most ``tol`` in L1
        (total mass 1; width ``sigma``, or 1/300 of the spread when ``sigma`` is None, the
        default's width on 1000 grid points). The extremes converge first; interior nodes
        keep refining below that width, which is what stopping trades away.
        ``lanczos_steps`` is then a cap. Default: run all steps.

    Returns
    -------
    SpectralDensity
    """
    if probes < 1 or lanczos_steps < 1:
        raise ValueError(f"probes and lanczos_steps must be at least 1, got {probes} and {lanczos_steps}")
    if grid_points < 100:
        raise ValueError(f"grid_points must be at least 100, got {grid_points}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    op, n = _resolve(objective, theta, block, operator)
    start = op.matvecs
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    matmul = lambda v: op.torch_matmat(v[:, None])[:, 0]  # noqa: E731
    converged = None if tol is None else _density_converged(tol, sigma)
    for _ in range(probes):
        z = _rademacher(n, 1, gen, objective.dtype, objective.device)[:, 0]
        alphas, betas, _ = lanczos(matmul, z, lanczos_steps, converged=converged, check_every=DENSITY_CHECK_EVERY)
        ritz, weight = _quadrature(alphas, betas)
        nodes.append(ritz)
        weights.append(weight)
    m = max(len(r) for r in nodes)
    ritz_values = torch.full((probes, m), float("nan"), dtype=torch.float64)
    ritz_weights = torch.zeros(probes, m, dtype=torch.float64)
    for p, (r, w) in enumerate(zip(nodes, weights)):
        ritz_values[p, : len(r)] = r
        ritz_weights[p, : len(w)] = w
    low, high = float(min(r.min() for r in nodes)), float(max(r.max() for r in nodes))
    spread = max(high - low, 1e-12 * max(abs(low), abs(high), 1.0))
    margin_sigmas = 8.0  # Gaussian tail beyond 8 sigma: < 1e-15
    if sigma is None:
        sigma = 3.0 * spread / (grid_points - 1 - 3.0 * 2 * margin_sigmas)
    grid = torch.linspace(low - margin_sigmas * sigma, high + margin_sigmas * sigma, grid_points, dtype=torch.float64)
    if sigma < 2.0 * float(grid[1] - grid[0]):
        warnings.warn(
            f"sigma={sigma:.3g} is below two grid spacings ({float(grid[1] - grid[0]):.3g}): "
            "the density is under-resolved; raise grid_points or sigma",
            stacklevel=2,
        )
    density = _broadened(ritz_values, ritz_weights, grid, sigma)
    return SpectralDensity(grid, density, ritz_values, ritz_weights, float(sigma), op.matvecs - start, n)


def _broadened(ritz_values: Tensor, ritz_weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """``(1/P) sum_p sum_i w_pi N(t; r_pi, sigma^2)`` on ``grid``; NaN nodes (padding) carry weight 0."""
    values, weights = torch.atleast_2d(ritz_values), torch.atleast_2d(ritz_weights)
    centers = torch.where(torch.isnan(values), torch.zeros_like(values), values)
    kernel = torch.exp(-0.5 * ((grid[:, None, None] - centers[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (kernel * weights[None]).sum(dim=(1, 2)) / values.shape[0]


DENSITY_CHECK_EVERY = 10  # Lanczos steps between two convergence checks of spectral_density(tol=...)


def _quadrature(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss quadrature of the Lanczos tridiagonal: Ritz values and weights (float64)."""
    ritz, vecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
    return ritz, vecs[0] ** 2


def _density_converged(tol: float, sigma: float | None) -> Callable[[Tensor, Tensor], bool]:
    """The early-stopping rule of :func:`spectral_density` (see its ``tol``)."""
    last: dict[str, tuple[Tensor, Tensor]] = {}  # the quadrature at this probe's previous check

    def converged(alphas: Tensor, betas: Tensor) -> bool:
        now = _quadrature(alphas, betas[: len(alphas) - 1])
        before = last.get("quadrature") if len(alphas) > DENSITY_CHECK_EVERY else None  # first check of a probe
        last["quadrature"] = now
        if before is None:
            return False
        (r0, w0), (r1, w1) = before, now
        spread = max(float(r1.max() - r1.min()), 1e-30)
        width = sigma if sigma is not None else spread / 300.0
        for end in (torch.max, torch.min):  # each extreme to tol relative (floor: tol^2 * spread)
            now_end, before_end = float(end(r1)), float(end(r0))
            if abs(now_end - before_end) > tol * max(abs(now_end), tol * spread):
                return False
        grid = torch.linspace(float(r1.min()) - 8 * width, float(r1.max()) + 8 * width, 2000, dtype=torch.float64)
        change = _broadened(r1, w1, grid, width) - _broadened(r0, w0, grid, width)
        return float(torch.trapezoid(change.abs(), grid)) <= tol

    return converged


# ---------------------------------------------------------------------------- per layer
@dataclass(frozen=True)
class LayerCurvature:
    """Curvature of one diagonal Hessian block ``H_ll`` (one parameter tensor).

    ``mean_trace = trace / numel`` is HAWQ-V2's sensitivity (Dong et al. 2020, arXiv 1911.03852).
    """

    name: str
    numel: int
    top_eigenvalue: float
    eigenvalues: tuple[float, ...]
    trace: float
    trace_stderr: float
    trace_method: str

    @property
    def mean_trace(self) -> float:
        return self.trace / self.numel

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "numel": self.numel,
            "top_eigenvalue": self.top_eigenvalue,
            "eigenvalues": list(self.eigenvalues),
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "trace_method": self.trace_method,
            "mean_trace": self.mean_trace,
        }


def layer_curvature(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    names: Sequence[str] | QuantMap | None = None,
    k: int = 1,
    trace_matvecs: int = 60,
    seed: int = 0,
    progress: bool = True,
    operator: HessianOperator | None = None,
) -> list[LayerCurvature]:
    """Top eigenvalues and Hutch++ trace of every layer's diagonal Hessian block.

    One Hessian operator (one gradient graph in ``"reuse"`` mode) serves all blocks.

    Parameters
    ----------
    names : list of str or QuantMap, optional
        Parameter tensors to analyse (default: all of ``objective.layout``; a QuantMap
        gives its quantized targets).
    k : int
        Eigenvalues per block (``k`` largest; fewer for blocks smaller than ``k``).
    trace_matvecs : int
        Hutch++ budget per block (blocks no larger than this are traced exactly).
    seed : int
        Seeds eigsh start vectors and trace probes (``seed + i`` for block ``i``).
    progress : bool
        Show a progress bar over blocks.

    Returns
    -------
    list of LayerCurvature
        In the order of ``names``.
    """
    if isinstance(names, QuantMap):
        names = [t.name for t in names.targets]
    names = list(objective.param_names if names is None else names)
    for name in names:
        block_slice(objective, name)  # validate every name before any HVP
    own = operator is None
    if own:
        theta = objective.theta0 if theta is None else objective.check_theta(theta)
        operator = objective.hessian(theta)
    results = []
    try:
        for i, name in enumerate(tqdm(names, desc="layer curvature", leave=False, disable=not progress)):
            block = block_slice(objective, name)
            numel = block.stop - block.start
            values, _ = hessian_eigs(objective, theta, min(k, numel), block=name, operator=operator, seed=seed + i)
            trace = hessian_trace(objective, theta, matvecs=trace_matvecs, block=name, operator=operator, seed=seed + i)
            results.append(
                LayerCurvature(
                    name, numel, float(values[0]), tuple(values.tolist()), trace.value, trace.stderr, trace.method
                )
            )
    finally:
        if own:
            operator.release()
    return results
