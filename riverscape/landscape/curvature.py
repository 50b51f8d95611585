"""Hessian curvature at a point: top eigenpairs, trace, (per block).

All functions work on the Objective's Hessian ``LinearOperator`` (exact HVPs), optionally
restricted to a block of coordinates (one layer: the diagonal block ``H_ll``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

from ..objective import HessianOperator, Objective

__all__ = ["hessian_eigs", "hessian_trace", "TraceEstimate", "block_slice", "BlockOperator"]

Block = Union[None, str, slice]


def block_slice(objective: Objective, block: Block) -> slice:
    """Coordinates of ``theta`` for a block: a parameter name, a slice, or ``None`` (all)."""
    if block is None:
        return slice(0, objective.dim)
    if isinstance(block, slice):
        return block
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


def _operator(objective: Objective, theta: Tensor, block: Block, operator: HessianOperator | None):
    op = operator if operator is not None else objective.hessian(theta)
    s = block_slice(objective, block)
    if s.start == 0 and s.stop == objective.dim:
        return op, s
    return BlockOperator(op, s), s


def hessian_eigs(
    objective: Objective,
    theta: Tensor | None = None,
    k: int = 5,
    *,
    which: str = "LA",
    tol: float = 0.0,
    block: Block = None,
    operator: HessianOperator | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Extreme eigenpairs of the Hessian by ARPACK Lanczos (``scipy.sparse.linalg.eigsh``).

    Parameters
    ----------
    objective : Objective
    theta : Tensor, shape (D,), optional
        Point of evaluation (default ``objective.theta0``).
    k : int
        Number of eigenpairs.
    which : {"LA", "SA", "BE"}
        Largest algebraic (default), smallest algebraic (negative curvature), or both ends.
    tol : float
        ARPACK relative tolerance (0 = machine precision).
    block : str or slice, optional
        Restrict to one parameter tensor (by name) or a coordinate slice: eigenpairs of ``H_ll``.
    operator : HessianOperator, optional
        Reuse an existing operator (its gradient graph and matvec counter).
    seed : int
        Seeds ARPACK's start vector.

    Returns
    -------
    values : Tensor, shape (k,), float64, sorted descending
    vectors : Tensor, shape (D_block, k), orthonormal columns in the Objective's dtype
    """
    if which not in ("LA", "SA", "BE"):
        raise ValueError(f"which must be 'LA', 'SA' or 'BE', got {which!r}")
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    op, s = _operator(objective, theta, block, operator)
    n = s.stop - s.start
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and {n - 1} for a block of dimension {n}, got {k}")
    v0 = np.random.default_rng(seed).standard_normal(n)
    values, vectors = eigsh(op, k=k, which=which, tol=tol, v0=v0)
    order = np.argsort(values)[::-1]
    vals = torch.as_tensor(values[order].copy(), dtype=torch.float64)
    vecs = torch.as_tensor(vectors[:, order].copy(), dtype=objective.dtype, device=objective.device)
    return vals, vecs


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate with its standard error and cost."""

    value: float
    stderr: float
    matvecs: int
    method: str

    def to_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "matvecs": self.matvecs, "method": self.method}


def _rademacher(n: int, m: int, generator: torch.Generator, dtype, device) -> Tensor:
    return (torch.randint(0, 2, (n, m), generator=generator) * 2 - 1).to(dtype=dtype, device=device)


def hessian_trace(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    matvecs: int = 100,
    method: str = "hutch++",
    block: Block = None,
    operator: HessianOperator | None = None,
    seed: int = 0,
) -> TraceEstimate:
    """Stochastic estimate of ``tr H`` (Hutchinson or Hutch++, Meyer et al. 2021).

    Parameters
    ----------
    matvecs : int
        Budget of Hessian-vector products.
    method : {"hutch++", "hutchinson"}
        Hutch++ spends a third of the budget on a sketch ``Q = orth(H S)``, traces
        ``Q^T H Q`` exactly and estimates the remainder with Hutchinson on ``(I - QQ^T)``.
    block : str or slice, optional
        Trace of one diagonal block ``H_ll`` (one layer).

    Returns
    -------
    TraceEstimate
        ``value``, ``stderr`` (standard error of the Hutchinson part), ``matvecs`` used.
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
    if matvecs < 3:
        raise ValueError("matvecs must be at least 3")
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    op, s = _operator(objective, theta, block, operator)
    n = s.stop - s.start
    gen = torch.Generator().manual_seed(seed)
    dtype, device = objective.dtype, objective.device
    if method == "hutchinson":
        z = _rademacher(n, matvecs, gen, dtype, device)
        samples = (z * op.torch_matmat(z)).sum(0).double()
        return TraceEstimate(float(samples.mean()), float(samples.std() / matvecs**0.5), matvecs, method)
    m = matvecs // 3
    sketch = _rademacher(n, m, gen, dtype, device)
    q, _ = torch.linalg.qr(op.torch_matmat(sketch))
    exact = float((q * op.torch_matmat(q)).sum())
    rest = matvecs - 2 * m
    g = _rademacher(n, rest, gen, dtype, device)
    g = g - q @ (q.T @ g)
    samples = (g * op.torch_matmat(g)).sum(0).double()
    return TraceEstimate(exact + float(samples.mean()), float(samples.std() / rest**0.5), 2 * m + rest, method)
