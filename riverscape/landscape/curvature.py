"""Hessian curvature at a point: eigenpairs, trace, diagonal, spectral density, per layer.

The glue from an :class:`~riverscape.objective.Objective` to :mod:`riverscape.linalg`
(docs/theory.md §4): each function builds the exact Hessian operator
(:meth:`Objective.hessian`), optionally restricted to a block of coordinates (one layer: the
diagonal block ``H_ll``, :class:`~riverscape.linalg.BlockOperator`), and runs the operator
algorithm on it. Pass ``operator=`` to reuse one operator (its gradient graph and ``matvecs``
counter) across calls; any :class:`~riverscape.linalg.Operator`, or any object with
``shape`` and ``torch_matmat(V (D, K)) -> (D, K)``, works.

Shapes: ``D`` parameters (``objective.dim``), ``n`` coordinates of a block (``n = D``
without one), ``k`` eigenpairs, ``m`` Lanczos steps, ``K`` probe vectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import linalg
from ..linalg import (
    EIG_WHICH,
    TRACE_METHODS,
    BlockOperator,
    DiagonalEstimate,
    HessianOperator,
    Operator,
    SpectralDensity,
    TraceEstimate,
    default_ncv,
    lanczos,
)
from ..objective import Objective
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
    "default_ncv",
]

Block = Union[None, str, slice]


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


def _resolve(objective: Objective, theta: Tensor | None, block: Block, operator: Any) -> Operator:
    """The (block) operator ``(n, n)`` for a call.

    Without ``operator``, the Objective's Hessian at ``theta`` (default ``theta0``). A passed
    ``operator`` is used as is (restricted to ``block``); when it knows its point
    (``operator.theta``) and ``theta`` is given too, the two must agree.
    """
    s = block_slice(objective, block)
    if operator is None:
        theta = objective.theta0 if theta is None else objective.check_theta(theta)
        op = objective.hessian(theta)
    else:
        if tuple(operator.shape) != (objective.dim, objective.dim):
            raise ValueError(f"operator has shape {tuple(operator.shape)}, the objective needs ({objective.dim}, {objective.dim})")
        at = getattr(operator, "theta", None)
        if theta is not None and at is not None and not torch.equal(at, objective.check_theta(theta)):
            raise ValueError("operator was built at another point than theta; pass one of them, or matching ones")
        op = linalg.as_operator(operator, objective.dtype, objective.device)
    if s.start == 0 and s.stop == objective.dim:
        return op
    return BlockOperator(op, s)


# ---------------------------------------------------------------------------- eigenpairs
def hessian_eigs(
    objective: Objective,
    theta: Tensor | None = None,
    k: int = 5,
    *,
    which: str = "LA",
    tol: float | None = None,
    solver: str = "auto",
    block: Block = None,
    operator: HessianOperator | None = None,
    seed: int = 0,
    ncv: int | None = None,
    maxiter: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Extreme eigenpairs of the Hessian (or of one block ``H_ll``): :func:`riverscape.linalg.eigenpairs`.

    Restarted Lanczos with a start vector seeded by ``seed``: ARPACK (``eigsh``) for a float64
    Objective, the torch thick-restart Lanczos (basis in the Objective's dtype on its device)
    otherwise (``solver``); blocks with ``n <= ncv`` are solved densely from ``n`` HVPs.

    Parameters
    ----------
    objective : Objective
    theta : Tensor, shape (D,), optional
        Point of evaluation (default: ``objective.theta0``, or the ``operator``'s point).
    k : int
        Number of eigenpairs.
    which : {"LA", "SA", "BE", "LM"}
        Largest algebraic (default), smallest algebraic (negative curvature at quantized
        points), both ends, or largest magnitude (eigsh semantics).
    tol : float, optional
        The solver's relative tolerance (Ritz residual). Default: ``1e-8`` in float64
        (eigenvalues to machine precision; on digits MLP/CNN Hessians top-5 converges in 21
        HVPs vs 33 for ``tol=0``), ``1e-5`` in lower precision.
    solver : {"auto", "arpack", "lanczos"}
        As in :func:`riverscape.linalg.eigenpairs`: ARPACK in float64, the torch thick-restart
        Lanczos otherwise.
    block : str or slice, optional
        Restrict to one parameter tensor (by name) or a coordinate slice: eigenpairs of ``H_ll``.
    operator : HessianOperator, optional
        Reuse an existing operator (its gradient graph and matvec counter).
    seed, ncv, maxiter
        As in :func:`riverscape.linalg.eigenpairs`.

    Returns and raises as :func:`riverscape.linalg.eigenpairs` (vectors in the Objective's dtype
    and device).
    """
    op = _resolve(objective, theta, block, operator)
    return linalg.eigenpairs(op, k, which=which, tol=tol, seed=seed, ncv=ncv, maxiter=maxiter, solver=solver)


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

    See :func:`riverscape.linalg.eigenpair_residuals`.

    Parameters
    ----------
    values : Tensor, shape (k,)
    vectors : Tensor, shape (n, k)
        As returned by :func:`hessian_eigs` (same ``block``).

    Returns
    -------
    Tensor, shape (k,), float64
    """
    return linalg.eigenpair_residuals(_resolve(objective, theta, block, operator), values, vectors)


# ---------------------------------------------------------------------------- trace, diagonal
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
    """Stochastic estimate of ``tr H`` (or ``tr H_ll``): :func:`riverscape.linalg.estimate_trace`.

    Hutch++ (Meyer et al. 2021, arXiv 2010.09649) or Hutchinson on Rademacher probes applied
    in blocks; exact from unit vectors when the block has at most ``matvecs`` coordinates.

    Parameters
    ----------
    matvecs : int
        Budget of Hessian-vector products (at least 3).
    method : {"hutch++", "hutchinson", "exact"}
    block : str or slice, optional
        Trace of one diagonal block ``H_ll`` (one layer).
    operator : HessianOperator, optional
        Reuse an operator (any Operator, or object with ``shape`` and ``torch_matmat``).
    seed : int
        Seeds the probes (a private ``torch.Generator``).
    rtol : float, optional
        Stop once ``2 * stderr <= rtol * |estimate|``; ``matvecs`` is then a cap.

    Returns
    -------
    TraceEstimate
        ``value``, ``stderr``, ``matvecs`` used and the ``method`` run.
    """
    op = _resolve(objective, theta, block, operator)
    return linalg.estimate_trace(op, matvecs=matvecs, method=method, seed=seed, rtol=rtol)


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
    """Hutchinson estimate of ``diag(H)`` (or of a block's): :func:`riverscape.linalg.estimate_diagonal`.

    Blocks with at most ``matvecs`` coordinates are computed exactly. Used for the expected
    RTN damage ``(1/24) sum_j H_jj s_j^2`` (docs/theory.md §6.6).

    Parameters
    ----------
    matvecs : int
        Number of probes (at least 2).
    block, operator, seed
        As in :func:`hessian_trace`.
    batch_size : int
        As in :func:`riverscape.linalg.estimate_diagonal`, which gives the returned
        :class:`DiagonalEstimate`.
    """
    op = _resolve(objective, theta, block, operator)
    return linalg.estimate_diagonal(op, matvecs=matvecs, seed=seed, batch_size=batch_size)


# ---------------------------------------------------------------------------- SLQ
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
    """Hessian eigenvalue density by SLQ: :func:`riverscape.linalg.spectral_density`.

    Ghorbani, Krishnan, Xiao 2019 (arXiv 1901.10159), as in PyHessian's ``density``.

    Parameters
    ----------
    lanczos_steps, probes, grid_points, sigma, tol
        As in :func:`riverscape.linalg.spectral_density`.
    block, operator, seed
        As in :func:`hessian_trace`.

    Returns
    -------
    SpectralDensity
    """
    op = _resolve(objective, theta, block, operator)
    return linalg.spectral_density(
        op, lanczos_steps=lanczos_steps, probes=probes, grid_points=grid_points, sigma=sigma, seed=seed, tol=tol
    )


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
