"""Symmetric linear operators on torch tensors: what every algorithm of :mod:`riverscape.linalg` takes.

An :class:`Operator` is a symmetric ``(n, n)`` matrix known only through products. Subclasses
implement one method, :meth:`Operator._apply` (a block of vectors ``(n, K) -> (n, K)``); the base
class counts products in ``matvecs`` and exposes them twice:

- on torch tensors, in the operator's ``torch_dtype`` and ``device``: :meth:`Operator.torch_matvec`,
  :meth:`Operator.torch_matmat`, and :meth:`Operator.matvec` / :meth:`Operator.matmat` /
  ``operator @ x`` when given a Tensor;
- on numpy arrays in float64, as a scipy ``LinearOperator`` (``rmatvec = matvec``): every
  Operator *is* one, so ``scipy.sparse.linalg.eigsh(operator, ...)`` works and
  :meth:`Operator.to_scipy` returns the operator itself. Its ``dtype`` attribute is therefore
  scipy's (``float64``, the dtype of the numpy interface); the torch dtype is ``torch_dtype``.

Concrete operators: :class:`DenseOperator` (a known matrix, for tests), :class:`BlockOperator`
(a diagonal block ``A[s, s]``), :class:`ScaledOperator` (``S A S`` for a diagonal ``S``) and
:class:`HessianOperator` (the exact Hessian of an :class:`~riverscape.objective.Objective`).
This module never imports the Objective (``riverscape.objective`` imports it): linalg
imports no riverscape module but ``errors``.

Shapes: ``n`` the operator's dimension, ``K`` vectors in a block.
"""
from __future__ import annotations

import warnings
from typing import Any, Protocol, Union

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor
from torch.func import grad, jvp, vmap

__all__ = [
    "CompiledHVP",
    "CoordinateSplit",
    "Operator",
    "DenseOperator",
    "BlockOperator",
    "ScaledOperator",
    "HessianOperator",
    "as_operator",
    "HVP_MODES",
]

HVP_MODES = ("auto", "reuse", "forward", "reverse", "compiled", "finite_difference")


class CoordinateSplit(Protocol):
    """How processes that all hold the same products share out the coordinates of vectors.

    :class:`riverscape.distributed.AllReduce` is one. Process ``r`` of ``W`` owns the
    contiguous coordinates :meth:`coordinates`; sums over coordinates are completed with
    :meth:`sum` and whole vectors rebuilt with :meth:`gather_coordinates`.
    """

    def coordinates(self, n: int) -> slice:
        """This process's coordinates of an ``n``-vector (contiguous; together they cover ``0..n``)."""

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes, in place (every process gets the sum)."""

    def gather_coordinates(self, part: Tensor, n: int) -> Tensor:
        """The whole ``n``-vector from every process's :meth:`coordinates` part of it."""


class Operator(LinearOperator):
    """A symmetric ``(n, n)`` linear operator applied to torch tensors (and a float64 scipy one).

    Parameters
    ----------
    n : int
        Dimension.
    dtype : torch.dtype
        Dtype of the vectors the products are computed in (``torch_dtype``).
    device : torch.device or str
        Device of those vectors.

    Attributes
    ----------
    shape : tuple of int
        ``(n, n)``.
    torch_dtype : torch.dtype
    device : torch.device
    matvecs : int
        Products computed so far (a block of ``K`` vectors counts ``K``).
    coordinate_split : CoordinateSplit or None
        Set when every process of a group computes the same products (a data-parallel Hessian):
        vector work on top of them (the Lanczos basis) can then be split by coordinates.
    """

    coordinate_split: "CoordinateSplit | None" = None

    def __init__(self, n: int, dtype: torch.dtype, device: Union[torch.device, str]) -> None:
        super().__init__(dtype=np.float64, shape=(int(n), int(n)))
        self.torch_dtype = dtype
        self.device = torch.device(device)
        self.matvecs = 0

    # ------------------------------------------------------------------ to implement
    def _apply(self, vectors: Tensor) -> Tensor:
        """``A V`` for a block ``(n, K)`` in ``torch_dtype`` (uncounted; subclasses implement it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _apply")

    def _apply_vector(self, v: Tensor) -> Tensor:
        """``A v`` for one vector ``(n,)``; default: a block of one column."""
        return self._apply(v[:, None])[:, 0]

    # ------------------------------------------------------------------ torch interface
    def torch_matmat(self, vectors: Tensor) -> Tensor:
        """``A V``: ``(n, K) -> (n, K)`` torch tensors (counts ``K`` products)."""
        if vectors.ndim != 2 or vectors.shape[0] != self.shape[0]:
            raise ValueError(f"vectors must have shape ({self.shape[0]}, K), got {tuple(vectors.shape)}")
        self.matvecs += vectors.shape[1]
        return self._apply(vectors)

    def torch_matvec(self, v: Tensor) -> Tensor:
        """``A v``: ``(n,) -> (n,)`` torch tensors (counts one product)."""
        if v.shape != (self.shape[0],):
            raise ValueError(f"v must have shape ({self.shape[0]},), got {tuple(v.shape)}")
        self.matvecs += 1
        return self._apply_vector(v)

    def matvec(self, v: Any) -> Any:
        """``A v``: a Tensor ``(n,)`` gives a Tensor; a numpy array gives float64 numpy (scipy's contract)."""
        return self.torch_matvec(v) if isinstance(v, Tensor) else super().matvec(v)

    def matmat(self, vectors: Any) -> Any:
        """``A V``: a Tensor ``(n, K)`` gives a Tensor; a numpy array gives float64 numpy (scipy's contract)."""
        return self.torch_matmat(vectors) if isinstance(vectors, Tensor) else super().matmat(vectors)

    def __matmul__(self, x: Any) -> Any:
        if isinstance(x, Tensor):
            return self.torch_matvec(x) if x.ndim == 1 else self.torch_matmat(x)
        return super().__matmul__(x)

    def to_dense(self) -> Tensor:
        """The ``(n, n)`` float64 matrix on the CPU from ``n`` unit-vector products, symmetrised ``(A + A^T) / 2``."""
        h = self.torch_matmat(torch.eye(self.shape[0], dtype=self.torch_dtype, device=self.device)).cpu().double()  # MPS has no float64
        return 0.5 * (h + h.T)

    # ------------------------------------------------------------------ scipy interface
    def to_scipy(self) -> LinearOperator:
        """The operator as a float64 scipy ``LinearOperator`` (symmetric: ``rmatvec = matvec``).

        Every Operator already is one (numpy products go through the counted torch products), so
        this returns ``self``; it marks where an algorithm leaves torch for scipy.
        """
        return self

    def _as_tensor(self, x: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(x), dtype=self.torch_dtype, device=self.device)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self.torch_matvec(self._as_tensor(x).reshape(-1)).detach().cpu().double().numpy()

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return self.torch_matmat(self._as_tensor(x)).detach().cpu().double().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:  # symmetric
        return self._matvec(x)

    def _rmatmat(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(x)

    def _adjoint(self) -> "Operator":
        return self


class DenseOperator(Operator):
    """A known symmetric matrix as an :class:`Operator` (tests, small problems).

    Parameters
    ----------
    matrix : Tensor, shape (n, n)
        Symmetric to rounding (checked against ``matrix.T``); products are in its dtype and device.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        if not torch.allclose(matrix, matrix.T):
            raise ValueError("matrix must be symmetric")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _apply(self, vectors: Tensor) -> Tensor:
        return self.matrix @ vectors


class BlockOperator(Operator):
    """The diagonal block ``A[s, s]`` of an operator: vectors are embedded with zeros outside ``s``.

    Parameters
    ----------
    operator : Operator
        The full ``(N, N)`` operator.
    block : slice
        Contiguous coordinates ``slice(start, stop)`` with ``0 <= start < stop <= N`` (step 1).
    """

    def __init__(self, operator: Operator, block: slice) -> None:
        full = operator.shape[0]
        start = 0 if block.start is None else block.start
        stop = full if block.stop is None else block.stop
        if block.step not in (None, 1) or not 0 <= start < stop <= full:
            raise ValueError(f"block must be a contiguous non-empty slice within [0, {full}], got {block}")
        super().__init__(stop - start, operator.torch_dtype, operator.device)
        self.operator = operator
        self.block = slice(start, stop)

    def _apply(self, vectors: Tensor) -> Tensor:
        full = torch.zeros(self.operator.shape[0], vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
        full[self.block] = vectors
        return self.operator.torch_matmat(full)[self.block]


class ScaledOperator(Operator):
    """``S A S`` with ``S = diag(scales)``: e.g. ``tr(S H S) = sum_j H_jj s_j^2``.

    Parameters
    ----------
    operator : Operator
    scales : Tensor, shape (n,)
    """

    def __init__(self, operator: Operator, scales: Tensor) -> None:
        if scales.shape != (operator.shape[0],):
            raise ValueError(f"scales must have shape ({operator.shape[0]},), got {tuple(scales.shape)}")
        super().__init__(operator.shape[0], operator.torch_dtype, operator.device)
        self.operator = operator
        self.scales = scales

    def _apply(self, vectors: Tensor) -> Tensor:
        s = self.scales[:, None].to(vectors)
        return s * self.operator.torch_matmat(s * vectors)


class _MatmatOperator(Operator):
    """Any object with ``shape`` and ``torch_matmat(V (n, K)) -> (n, K)`` as an Operator."""

    def __init__(self, wrapped: Any, dtype: torch.dtype, device: Union[torch.device, str]) -> None:
        n, m = tuple(wrapped.shape)
        if n != m:
            raise ValueError(f"operator must be square, got shape {(n, m)}")
        super().__init__(n, dtype, device)
        self.wrapped = wrapped

    def _apply(self, vectors: Tensor) -> Tensor:
        return self.wrapped.torch_matmat(vectors)


def as_operator(
    operator: Any, dtype: torch.dtype | None = None, device: Union[torch.device, str, None] = None
) -> Operator:
    """An :class:`Operator` from an Operator (returned as is), a square Tensor (:class:`DenseOperator`)
    or any object with ``shape`` and ``torch_matmat`` (wrapped; ``dtype`` and ``device`` required)."""
    if isinstance(operator, Operator):
        return operator
    if isinstance(operator, Tensor):
        return DenseOperator(operator)
    if hasattr(operator, "torch_matmat") and hasattr(operator, "shape"):
        if dtype is None or device is None:
            raise ValueError("wrapping a torch_matmat object needs its dtype and device")
        return _MatmatOperator(operator, dtype, device)
    raise TypeError(f"cannot use a {type(operator).__name__} as an operator: need an Operator, a Tensor or torch_matmat")


class CompiledHVP:
    """One batch's forward-over-reverse HVP of an Objective through ``torch.compile`` (HVP mode ``"compiled"``).

    Called as ``(theta, v, x, y) -> H_batch v`` like the Objective's eager ``_hvp_batch``; compiles
    at the first call (seconds; a new batch shape compiles again). If that first compile fails
    (an op the compiler does not support), a ``RuntimeWarning`` says so and the eager kernel,
    the same exact product, is used from then on.

    Parameters
    ----------
    objective : Objective
        Typed ``Any``: linalg imports no model code.
    """

    def __init__(self, objective: Any) -> None:
        self.objective = objective
        self._kernel: Any = None
        self.failed = False

    def __call__(self, theta: Tensor, v: Tensor, x: Any, y: Any) -> Tensor:
        if self.failed:
            return self.objective._hvp_batch(theta, v, x, y)
        if self._kernel is not None:
            return self._kernel(theta, v, x, y)
        grad_fn = grad(self.objective.batch_loss)
        self._kernel = torch.compile(lambda t, u, xb, yb: jvp(lambda s: grad_fn(s, xb, yb), (t,), (u,))[1])
        try:
            return self._kernel(theta, v, x, y)
        except Exception as err:  # noqa: BLE001 - the compiler raises many error types; the eager kernel is exact
            first = (str(err).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile of the HVP failed ({type(err).__name__}: {first}); using the eager "
                          "forward-over-reverse HVP", RuntimeWarning, stacklevel=2)
            self.failed = True
            return self.objective._hvp_batch(theta, v, x, y)


class HessianOperator(Operator):
    """The exact Hessian ``H(theta)`` of an Objective as an :class:`Operator`.

    The HVP mode belongs to the operator: it is resolved once here, and the Objective is never
    modified (two operators in different modes can share one Objective).

    Parameters
    ----------
    objective : Objective
        The :class:`~riverscape.objective.Objective` (typed ``Any``: linalg imports no model code).
    theta : Tensor, shape (D,)
        Point of evaluation.
    mode : {"auto", "reuse", "forward", "reverse", "compiled", "finite_difference"}
        ``"reuse"`` builds every batch's gradient graph once (create_graph) and runs only the
        second backward per product; ``"forward"`` is the Objective's forward-over-reverse
        :meth:`~riverscape.objective.Objective.hvp` (with its reverse fallback for ops without
        a forward-mode derivative); ``"compiled"`` the same through ``torch.compile`` (compiled
        at the first product); ``"reverse"`` is reverse-over-reverse; ``"finite_difference"``
        central differences of gradients. ``"auto"``: ``"reuse"`` when the analysis set has at
        most ``objective.reuse_max_batches`` batches and holds them (it does not stream), else
        ``"forward"``; ``"reuse"`` on a streaming Objective raises ``ValueError``. An Objective in
        ``"finite_difference"`` mode (its exact HVPs fail) always gives ``"finite_difference"``.

    Attributes
    ----------
    mode : str
        The resolved mode (never ``"auto"``).
    """

    def __init__(self, objective: Any, theta: Tensor, mode: str = "auto") -> None:
        if mode not in HVP_MODES:
            raise ValueError(f"mode must be one of {HVP_MODES}, got {mode!r}")
        super().__init__(objective.dim, objective.dtype, objective.device)
        self.objective = objective
        self.theta = objective.check_theta(theta)
        if objective.finite_difference:
            mode = "finite_difference"
        elif mode == "auto":
            reuse = not objective.streaming and objective.n_batches <= objective.reuse_max_batches
            mode = "reuse" if reuse else "forward"
        elif mode == "reuse" and objective.streaming:
            raise ValueError("mode 'reuse' keeps a gradient graph per batch, which a streaming Objective does not hold; use 'forward'")
        self.mode = mode
        self._graphs: list[tuple[float, Tensor, Tensor]] | None = None
        # mode "compiled": the Objective's kernel when it has one (hvp_mode="compiled"), else this operator's own
        self._compiled = (getattr(objective, "_compiled_hvp", None) or CompiledHVP(objective)) if mode == "compiled" else None
        # every process of a data-parallel Objective gets the same all-reduced products; a
        # reduction that can also split coordinates (riverscape.distributed.AllReduce) lets the
        # eigensolver share out its basis instead of repeating the vector work in every process
        reduction = getattr(objective, "reduction", None)
        if hasattr(reduction, "gather_coordinates"):
            self.coordinate_split = reduction

    def _build_graphs(self) -> None:
        obj = self.objective
        self._graphs = [(w, *obj._grad_graph(self.theta, x, y)) for w, x, y in obj.weighted_batches()]

    def _reverse(self, vectors: Tensor) -> Tensor:
        """Reverse-over-reverse ``H V`` for a block ``(D, K)`` (vmapped over the columns)."""
        obj = self.objective
        out = torch.zeros_like(vectors)
        for w, x, y in obj.weighted_batches():
            batched = vmap(lambda v: obj._hvp_batch(self.theta, v, x, y, reverse=True))(vectors.T)
            out.add_(batched.T, alpha=w)
        return obj.reduce_sum(out)

    def _reuse(self, v: Tensor) -> Tensor:
        """``H v`` from the stored gradient graphs, summed over this process's batches only."""
        if self._graphs is None:
            self._build_graphs()
        out = None
        for w, leaf, g in self._graphs:
            (hv,) = torch.autograd.grad(g, leaf, v, retain_graph=True)
            out = hv * w if out is None else out.add_(hv, alpha=w)  # a new tensor: hv may be v itself (a linear gradient)
        return torch.zeros_like(v) if out is None else out

    # A data-parallel Objective combines the processes' shares with ``reduce_sum``: exactly once
    # per product call in the modes "reuse", "forward" and "reverse", so processes that resolved
    # "auto" differently (their shards differ in size) still exchange the same messages.
    def _apply_vector(self, v: Tensor) -> Tensor:
        if self.mode == "reuse":
            return self.objective.reduce_sum(self._reuse(v))
        if self.mode == "finite_difference":
            return self.objective.finite_difference_hvp(self.theta, v)
        if self.mode == "reverse":
            return self._reverse(v[:, None])[:, 0]
        if self.mode == "compiled":
            return self.objective._hvp_sum(self.theta, v, self._compiled)
        return self.objective.hvp(self.theta, v)

    def _apply(self, vectors: Tensor) -> Tensor:
        if self.mode == "reuse":
            if vectors.shape[1] == 1:  # one column (Lanczos): no stacked copy
                return self.objective.reduce_sum(self._reuse(vectors[:, 0]))[:, None]
            return self.objective.reduce_sum(torch.stack([self._reuse(v) for v in vectors.T], dim=1))
        if self.mode == "finite_difference":
            return torch.stack([self._apply_vector(v) for v in vectors.T], dim=1)
        if self.mode == "reverse":
            return self._reverse(vectors)
        if self.mode == "compiled":
            return self.objective._hvps_sum(self.theta, vectors, self._compiled)
        return self.objective.hvps(self.theta, vectors)

    def release(self) -> None:
        """Free the stored gradient graphs (``"reuse"`` mode); the next product rebuilds them."""
        self._graphs = None
