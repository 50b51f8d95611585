"""R3, the local valley floor: minimise the loss inside the hill subspace (docs/theory.md §5.9).

    Pi_floor(u) = u + V_k c*,   c* = argmin_{c in R^k} L(u + V_k c)

``V_k`` (D, k) holds the top-k Hessian eigenvectors at the reference point (or any
orthonormal frame, e.g. a random one as a control). The floor point is off the
quantization grid: it says *where the basin is*, it is not a quantized solution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from ..io.jsonable import fields_dict
from ..objective import Objective

__all__ = ["FloorResult", "valley_floor", "FLOOR_METHODS"]

FLOOR_METHODS = ("lbfgs", "gd")


@dataclass(frozen=True)
class FloorResult:
    """The floor point below ``u`` and how it was found.

    Attributes
    ----------
    point : Tensor, shape (D,)
        ``Pi_floor(u) = u + V_k c*``.
    coefficients : Tensor, shape (k,), float64
        ``c*``.
    loss_start, loss_floor : float
        ``L(u)`` and ``L(Pi_floor(u))``.
    subspace_grad_norm : float
        ``|V_k^T grad L(Pi_floor(u))|``: 0 at an exact floor point.
    start : str
        ``"zero"`` (c = 0) or ``"quadratic"`` (c = -V_k^T (u - reference)), whichever had the lower loss.
    iterations, evaluations : int
    method : str
    converged : bool
    """

    point: Tensor
    coefficients: Tensor
    loss_start: float
    loss_floor: float
    subspace_grad_norm: float
    start: str
    iterations: int
    evaluations: int
    method: str
    converged: bool

    def to_dict(self) -> dict:
        """JSON-friendly summary (the point itself is left out)."""
        return fields_dict(self, exclude=("point",))


class _SubspaceLoss:
    """``c -> (L(u + V c), V^T grad L(u + V c))`` in float64 numpy, counting evaluations."""

    def __init__(self, objective: Objective, u: Tensor, vectors: Tensor) -> None:
        self.objective = objective
        self.u = u
        self.vectors = vectors
        self.evaluations = 0

    def point(self, c: np.ndarray) -> Tensor:
        coeffs = torch.as_tensor(c, dtype=self.vectors.dtype, device=self.vectors.device)
        return self.u + self.vectors @ coeffs

    def __call__(self, c: np.ndarray) -> tuple[float, np.ndarray]:
        self.evaluations += 1
        value, g = self.objective.value_and_grad(self.point(c))
        return value, (self.vectors.T @ g).cpu().double().numpy()


def _armijo_descent(fun: _SubspaceLoss, c0: np.ndarray, steps: int, gtol: float) -> tuple[np.ndarray, int, bool]:
    """Gradient descent in c with backtracking (Armijo) line search and step growth."""
    c = c0.copy()
    value, g = fun(c)
    step = 1.0
    for it in range(steps):
        if np.linalg.norm(g) <= gtol:
            return c, it, True
        while True:
            trial = c - step * g
            t_value, t_g = fun(trial)
            if t_value <= value - 1e-4 * step * float(g @ g):
                break
            step *= 0.5
            if step < 1e-20:
                return c, it, False
        c, value, g = trial, t_value, t_g
        step *= 2.0
    return c, steps, bool(np.linalg.norm(g) <= gtol)


def valley_floor(
    objective: Objective,
    u: Tensor,
    vectors: Tensor,
    *,
    reference: Tensor | None = None,
    steps: int = 200,
    method: str = "lbfgs",
    gtol: float = 1e-10,
) -> FloorResult:
    """Project a point onto the local valley floor along the hill subspace (R3).

    Solves the k-dimensional problem ``c* = argmin_c L(u + V_k c)`` with the gradient
    ``V_k^T grad L`` (one forward-backward pass per evaluation).

    Parameters
    ----------
    objective : Objective
    u : Tensor, shape (D,)
        The point to project (e.g. a quantized point ``q``).
    vectors : Tensor, shape (D, k)
        Orthonormal frame ``V_k`` (top-k Hessian eigenvectors at ``reference``).
    reference : Tensor, shape (D,), optional
        The FP point ``w_ref``. When given, the quadratic-model solution
        ``c = -V_k^T (u - w_ref)`` (exact for a quadratic with minimum ``w_ref`` and exact
        eigenvectors) is tried as a warm start next to ``c = 0``; the lower loss wins.
    steps : int
        Maximum iterations of the k-dimensional solver.
    method : {"lbfgs", "gd"}
        ``scipy.optimize.minimize(method="L-BFGS-B")`` or gradient descent with Armijo
        backtracking.
    gtol : float
        Stop when ``|V_k^T grad L|_inf`` (L-BFGS) or ``|V_k^T grad L|_2`` (gd) is below this.

    Returns
    -------
    FloorResult

    Examples
    --------
    >>> import torch
    >>> from riverscape import Objective
    >>> obj = Objective(torch.nn.Linear(2, 1, bias=False).double(), "mse",
    ...                 (torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)))
    >>> res = valley_floor(obj, torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)[:, :1])
    >>> round(float(res.point[0]), 6)   # the loss ((w0 - 1)^2 + (w1 - 2)^2) / 2 is minimal at w0 = 1
    1.0
    """
    if method not in FLOOR_METHODS:
        raise ValueError(f"method must be one of {FLOOR_METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    u = objective.check_theta(u)
    vectors = vectors.to(device=objective.device, dtype=objective.dtype)
    if vectors.ndim != 2 or vectors.shape[0] != objective.dim:
        raise ValueError(f"vectors must have shape ({objective.dim}, k), got {tuple(vectors.shape)}")
    fun = _SubspaceLoss(objective, u, vectors)
    k = vectors.shape[1]
    loss_start = objective.loss(u)
    c0, start = np.zeros(k), "zero"
    if reference is not None:
        c_quad = (-(vectors.T @ (u - objective.check_theta(reference)))).cpu().double().numpy()
        if objective.loss(fun.point(c_quad)) < loss_start:
            c0, start = c_quad, "quadratic"
    if method == "lbfgs":
        res = minimize(fun, c0, jac=True, method="L-BFGS-B", options={"maxiter": steps, "gtol": gtol, "ftol": 1e-15})
        c, iterations, converged = res.x, int(res.nit), bool(res.success)
    else:
        c, iterations, converged = _armijo_descent(fun, c0, steps, gtol)
    point = fun.point(c)
    loss_floor, g = objective.value_and_grad(point)
    if loss_floor > loss_start:  # never worse than doing nothing
        c, point, loss_floor = np.zeros(k), u.clone(), loss_start
        g = objective.grad(u)
    return FloorResult(
        point=point,
        coefficients=torch.as_tensor(c, dtype=torch.float64),
        loss_start=loss_start,
        loss_floor=loss_floor,
        subspace_grad_norm=float((vectors.T @ g).double().norm()),
        start=start,
        iterations=iterations,
        evaluations=fun.evaluations,
        method=method,
        converged=converged,
    )
