"""Lanczos tridiagonalisation and stochastic Lanczos quadrature (SLQ) of a symmetric operator.

Shapes: ``n`` the operator's dimension, ``m`` Lanczos steps, ``P`` probes, ``g`` grid points.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from .operators import Operator
from .trace import rademacher

__all__ = ["lanczos", "orthogonalise_", "owned_product", "spectral_density", "SpectralDensity", "DENSITY_CHECK_EVERY"]

DENSITY_CHECK_EVERY = 10  # Lanczos steps between two convergence checks of spectral_density(tol=...)


def orthogonalise_(w: Tensor, basis: Tensor, total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Remove the span of ``basis``'s rows (orthonormal) from ``w`` in place, twice.

    Classical Gram-Schmidt applied twice ("twice is enough"), with no temporary of ``w``'s
    size. Returns the float64 coefficients of both passes added, ``basis @ w`` of the original
    ``w`` to rounding (on the CPU). When ``w`` and ``basis`` hold only some coordinates of the
    vectors (a :class:`~riverscape.linalg.operators.CoordinateSplit`), ``total`` completes the
    partial dot products over the processes (one small sum per pass).
    """
    complete = (lambda x: x) if total is None else total
    first = complete(basis @ w)
    w.addmv_(basis.T, first, alpha=-1.0)
    second = complete(basis @ w)
    w.addmv_(basis.T, second, alpha=-1.0)
    return first.double().cpu() + second.double().cpu()


def owned_product(w: Tensor, basis: Tensor) -> Tensor:
    """``w``, or a copy when it shares memory with ``basis`` (a product that returned its input), before in-place work."""
    return w.clone() if w.untyped_storage().data_ptr() == basis.untyped_storage().data_ptr() else w


def lanczos(
    matmul: Union[Operator, Callable[[Tensor], Tensor]],
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
    Memory: the ``(m, n)`` basis in ``v0``'s dtype and device and one more vector, plus what
    one product needs.

    Parameters
    ----------
    matmul : Operator or callable
        The operator ``A``, applied as a block of one column (``torch_matmat``), or any
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
    if isinstance(matmul, Operator):
        operator = matmul
        matmul = lambda v: operator.torch_matmat(v[:, None])[:, 0]  # noqa: E731
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
        w = owned_product(matmul(basis[j]), basis)
        alpha = float(torch.dot(w, basis[j]))
        alphas.append(alpha)
        scale = max(scale, abs(alpha), betas[-1] if betas else 0.0)
        if j == steps - 1:
            break
        if converged is not None and (j + 1) % check_every == 0:
            if converged(torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)):
                break
        orthogonalise_(w, basis[: j + 1])
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
    """Eigenvalue density of an operator by stochastic Lanczos quadrature.

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
        Products used.
    dim : int
        Dimension ``n`` of the operator; ``dim * sum_i w_pi r_pi`` is probe ``p``'s
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
    operator: Operator,
    *,
    lanczos_steps: int = 80,
    probes: int = 3,
    grid_points: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
    tol: float | None = None,
) -> SpectralDensity:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

    Ghorbani, Krishnan, Xiao 2019 (arXiv 1901.10159), as in PyHessian's ``density``:
    for each normalised Rademacher probe, ``m`` Lanczos steps with full
    re-orthogonalisation give ``T_m = Y diag(r) Y^T``; nodes ``r_i`` with weights
    ``Y_0i^2`` are smoothed with a Gaussian of width ``sigma`` and averaged over probes.

    Parameters
    ----------
    operator : Operator, shape (n, n)
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
    seed : int
        Seeds the Rademacher probes (a private ``torch.Generator``).
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
    n = operator.shape[0]
    start = operator.matvecs
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    converged = None if tol is None else _density_converged(tol, sigma)
    for _ in range(probes):
        z = rademacher(n, 1, gen, operator.torch_dtype, operator.device)[:, 0]
        alphas, betas, _ = lanczos(operator, z, lanczos_steps, converged=converged, check_every=DENSITY_CHECK_EVERY)
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
    return SpectralDensity(grid, density, ritz_values, ritz_weights, float(sigma), operator.matvecs - start, n)


def _broadened(ritz_values: Tensor, ritz_weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """``(1/P) sum_p sum_i w_pi N(t; r_pi, sigma^2)`` on ``grid``; NaN nodes (padding) carry weight 0."""
    values, weights = torch.atleast_2d(ritz_values), torch.atleast_2d(ritz_weights)
    centers = torch.where(torch.isnan(values), torch.zeros_like(values), values)
    kernel = torch.exp(-0.5 * ((grid[:, None, None] - centers[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (kernel * weights[None]).sum(dim=(1, 2)) / values.shape[0]


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
