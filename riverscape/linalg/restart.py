"""Extreme eigenpairs by thick-restart Lanczos on torch tensors (Wu & Simon 2000).

The Lanczos basis lives on the operator's device in the operator's dtype (float32 for a
float32 model): ``ncv`` vectors of ``n`` numbers plus one residual vector. A restart keeps the
``p`` most wanted Ritz vectors, rotated into the first ``p`` rows of the basis in place (one
column block at a time), and continues from the residual, so memory never grows past
``(ncv + 1) x n`` numbers during the iteration and ``(ncv + k) x n`` while the ``k`` returned
vectors are copied out, plus what one product needs. Nothing is ``n x n``, and nothing
leaves the device but the ``ncv x ncv`` projected matrix (float64, on the CPU).

Every new vector is orthogonalised against the whole basis twice (classical Gram-Schmidt,
"twice is enough"). The projected matrix ``T = V^T A V`` is tridiagonal (``alpha_j`` measured,
``beta_j`` the norms) after an arrowhead block: the kept Ritz values on the diagonal and their
couplings ``beta y_i[-1]`` to the residual, set algebraically at the restart (the measured
projections add only rounding, or a low-precision operator's noise, which the
re-orthogonalisation removes). Ritz pair ``(theta_i, V y_i)`` has residual
``||A V y_i - theta_i V y_i|| = ||r|| |y_i[-1]|`` with ``r`` the residual of the last step.

When every process of a group computes the same products (``operator.coordinate_split``, a
data-parallel Hessian), each process keeps only its block of coordinates of the basis: the
re-orthogonalisation, norms and restart rotations are split ``W`` ways, and each step adds one
all-gather of the new basis vector (the next product's input) and small sums of ``ncv`` dot
products. The numbers are those of one process up to the summation order of the dot products.

Shapes: ``n`` the operator's dimension, ``k`` eigenpairs, ``ncv`` basis vectors, ``p`` kept
Ritz vectors at a restart, ``c`` this process's coordinates (``n`` in one process).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConvergenceError
from .lanczos import orthogonalise_, owned_product
from .operators import CoordinateSplit, Operator

__all__ = ["thick_restart_lanczos", "ritz_order", "ROTATE_BLOCK", "RESIDUAL_FLOOR"]

ROTATE_BLOCK = 4096
"""Least coordinates rotated at once when Ritz vectors replace the basis; blocks of ``n / ncv``
coordinates when larger, so the temporary ``p x block`` holds at most about ``n`` numbers."""
RESIDUAL_FLOOR = 16.0
"""Residuals below ``RESIDUAL_FLOOR * eps * ||T||`` count as converged (rounding of the products)."""


def ritz_order(values: Tensor, which: str) -> Tensor:
    """Indices of ``values`` (Ritz values), the most wanted first, for eigsh's ``which``.

    ``"LA"`` descending, ``"SA"`` ascending, ``"LM"`` descending magnitude, ``"BE"`` alternating
    ends starting at the top, so the first ``k`` hold ``k - k // 2`` from the top and ``k // 2``
    from the bottom (eigsh's semantics).
    """
    if which == "LA":
        return torch.argsort(values, descending=True, stable=True)
    if which == "SA":
        return torch.argsort(values, stable=True)
    if which == "LM":
        return torch.argsort(values.abs(), descending=True, stable=True)
    if which != "BE":
        raise ValueError(f"which must be one of ('LA', 'SA', 'BE', 'LM'), got {which!r}")
    ascending = torch.argsort(values, stable=True).tolist()
    order, low, high = [], 0, len(ascending) - 1
    while low <= high:
        if len(order) % 2 == 0:
            order.append(ascending[high])
            high -= 1
        else:
            order.append(ascending[low])
            low += 1
    return torch.tensor(order, dtype=torch.long)


class _Coordinates:
    """The coordinates of the basis this process holds: all ``n``, or its block of a :class:`CoordinateSplit`."""

    def __init__(self, n: int, split: CoordinateSplit | None) -> None:
        self.n, self.split = n, split
        self.mine = slice(0, n) if split is None else split.coordinates(n)
        self.size = self.mine.stop - self.mine.start

    def total(self, partial: Tensor) -> Tensor:
        """Dot products over this block completed over the processes (unchanged in one process)."""
        return partial if self.split is None else self.split.sum(partial)

    def norm(self, w: Tensor) -> float:
        if self.split is None:
            return float(torch.linalg.vector_norm(w))
        return float(self.total(torch.dot(w, w).double().reshape(1))[0]) ** 0.5

    def whole(self, row: Tensor) -> Tensor:
        """The whole ``n``-vector of a basis row (an all-gather when split)."""
        return row if self.split is None else self.split.gather_coordinates(row, self.n)

    def block(self, vector: Tensor) -> Tensor:
        """This process's block of a whole ``n``-vector (a copy when split, so the vector can be freed)."""
        return vector if self.split is None else vector[self.mine].clone()

    def random_block(self, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
        """This block of a random ``n``-vector (the same draw in every process), not yet normalised."""
        return self.block(torch.randn(self.n, generator=generator, dtype=torch.float64)).to(dtype=dtype, device=device)


def _fresh(basis: Tensor, generator: torch.Generator, coords: _Coordinates) -> Tensor:
    """A random unit vector orthogonal to ``basis`` (rows), to continue past an invariant subspace."""
    w = coords.random_block(generator, basis.dtype, basis.device)
    for _ in range(2):  # a second pass in case the first left a large component in the span
        orthogonalise_(w, basis, coords.total)
    return w / coords.norm(w)


def _rotate(basis: Tensor, coefficients: Tensor) -> None:
    """``basis[:p] = coefficients^T basis[:m]`` in place for ``coefficients (m, p)``, one column block at a time."""
    m, p = coefficients.shape
    c = coefficients.T.to(dtype=basis.dtype, device=basis.device)
    width = max(ROTATE_BLOCK, -(-basis.shape[1] // basis.shape[0]))
    for start in range(0, basis.shape[1], width):
        block = slice(start, start + width)
        basis[:p, block] = c @ basis[:m, block]


def thick_restart_lanczos(
    operator: Operator,
    k: int,
    *,
    which: str = "LA",
    tol: float,
    ncv: int,
    maxiter: int,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos in its own dtype and device.

    Parameters
    ----------
    operator : Operator, shape (n, n)
    k : int
        Number of eigenpairs, ``1 <= k < ncv``.
    which : {"LA", "SA", "BE", "LM"}
        As in :func:`riverscape.linalg.eigenpairs`.
    tol : float
        Stop once every wanted Ritz pair has residual ``<= max(tol |theta_i|, 16 eps max |theta|)``:
        ARPACK's relative rule, with a floor that rounding lets the residual reach for eigenvalues
        near zero (``eps`` of the operator's dtype, ``max |theta|`` about ``||A||``).
    ncv : int
        Basis size, ``k < ncv < n``.
    maxiter : int
        Maximum number of restarts.
    seed : int
        Seeds the start vector (and any vector that continues past an invariant subspace):
        ``torch.randn`` from a private CPU generator.

    Returns
    -------
    values : Tensor, shape (k,), float64, sorted descending
    vectors : Tensor, shape (n, k), orthonormal columns in the operator's dtype and device

    Raises
    ------
    ConvergenceError
        After ``maxiter`` restarts without convergence, or when the operator is exactly zero
        on every vector of the first cycle (ARPACK fails there too).
    """
    n = operator.shape[0]
    if not 1 <= k < ncv < n:
        raise ValueError(f"need 1 <= k < ncv < n, got k={k}, ncv={ncv}, n={n}")
    if maxiter < 1:
        raise ValueError(f"maxiter must be at least 1, got {maxiter}")
    dtype, device = operator.torch_dtype, operator.device
    eps = torch.finfo(dtype).eps
    generator = torch.Generator().manual_seed(seed)
    keep = min(k + (ncv - k) // 2, ncv - 1)  # Ritz vectors kept at a restart (Wu & Simon's choice)
    coords = _Coordinates(n, operator.coordinate_split)
    basis = torch.empty(ncv, coords.size, dtype=dtype, device=device)
    v = coords.random_block(generator, dtype, device)
    basis[0] = v / coords.norm(v)
    del v
    projected = torch.zeros(ncv, ncv, dtype=torch.float64)
    start, scale = 0, 0.0
    for _ in range(maxiter):
        for j in range(start, ncv):
            product = operator.torch_matmat(coords.whole(basis[j])[:, None])[:, 0]
            w = owned_product(coords.block(product), basis)  # changed in place below
            del product
            h = orthogonalise_(w, basis[: j + 1], coords.total)
            projected[j, j] = h[j]  # alpha_j; the other coefficients are rounding, or the couplings set at the restart
            beta = coords.norm(w)
            scale = max(scale, float(h.abs().max()), beta)
            if j + 1 == ncv:
                break
            if beta <= eps * scale:  # the Krylov space is invariant: go on with a new direction (coupling 0)
                basis[j + 1] = _fresh(basis[: j + 1], generator, coords)
                continue
            basis[j + 1] = w.div_(beta)
            projected[j + 1, j] = projected[j, j + 1] = beta
        if scale == 0.0:  # as ARPACK: no Krylov space to work in (e.g. the Hessian of all-zero or saturated weights)
            raise ConvergenceError(f"the operator is exactly zero on all {ncv} vectors tried; no eigenpairs to converge")
        ritz, y = torch.linalg.eigh(projected)
        order = ritz_order(ritz, which)
        wanted = order[:k]
        residuals = beta * y[-1].abs()
        bound = torch.clamp(tol * ritz.abs(), min=RESIDUAL_FLOOR * eps * float(ritz.abs().max()))
        converged = residuals <= bound
        if bool(converged[wanted].all()):
            del w
            wanted = wanted[torch.argsort(ritz[wanted], descending=True, stable=True)]
            _rotate(basis, y[:, wanted])
            if coords.split is not None:  # every process returns the whole vectors
                return ritz[wanted], torch.stack([coords.whole(row) for row in basis[:k]], dim=1)
            # row-major (n, k) like ARPACK's: the layout decides the summation order of later products,
            # so a stored and reloaded basis (row-major) gives bit-identical numbers; the basis is freed on return
            return ritz[wanted], basis[:k].T.contiguous()
        kept = order[:keep]
        _rotate(basis, y[:, kept])
        coupling = beta * y[-1, kept]
        if beta <= eps * scale:  # the residual carries no direction: restart from a new one, uncoupled
            basis[keep] = _fresh(basis[:keep], generator, coords)
            coupling.zero_()
        else:
            basis[keep] = w.div_(beta)
        del w
        projected.zero_()
        projected[range(keep), range(keep)] = ritz[kept]
        projected[keep, :keep] = projected[:keep, keep] = coupling
        start = keep
    done = int(converged[wanted].sum())
    raise ConvergenceError(f"thick-restart Lanczos converged {done} of {k} eigenpairs in {maxiter} restarts (tol={tol}); "
                           "raise tol or maxiter")
