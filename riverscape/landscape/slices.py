"""1D and 2D slices of the loss surface, ``L(theta)`` or the quantized ``L(Q(theta))``.

Grid points are built chunk by chunk (never all ``n x D`` at once) and evaluated with
``Objective.evaluate`` (one vmapped pass per chunk). The Objective evaluates its private copy of
the model in eval mode, so BatchNorm uses its running statistics and no user module is touched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..objective import Objective
from ..quant.bn_reestimate import reestimated_evaluate
from ..quant.qmap import QuantMap, resolve_quant_map
from ..quant.quantizers import UniformQuantizer
from .directions import plane_coordinates

__all__ = [
    "Slice1D",
    "Slice2D",
    "slice_1d",
    "slice_2d",
    "evaluate_points",
    "as_quant_map",
    "describe_quantizer",
    "grid_axis",
    "WHICH_FP",
    "WHICH_Q",
]

WHICH_FP = "L(theta)"
WHICH_Q = "L(Q(theta))"

Quantizer = Union[UniformQuantizer, QuantMap, None]
Span = Union[float, Sequence[float]]


def as_quant_map(objective: Objective, quantizer: Quantizer) -> QuantMap | None:
    """``None`` stays ``None``; a UniformQuantizer becomes ``QuantMap(objective, quantizer)`` (default selection)."""
    if quantizer is None or isinstance(quantizer, QuantMap):
        return quantizer
    if isinstance(quantizer, UniformQuantizer):
        return resolve_quant_map(objective, quantizer)
    raise TypeError(f"quantizer must be None, a UniformQuantizer or a QuantMap, got {type(quantizer).__name__}")


def describe_quantizer(qmap: QuantMap | None) -> str | None:
    """A one-line description of the map (quantizer settings and number of quantized tensors)."""
    if qmap is None:
        return None
    return f"{qmap.quantizer.describe()} on {len(qmap.targets)} tensors ({qmap.n_quantized} weights)"


def evaluate_points(
    objective: Objective,
    points: Callable[[int, int], Tensor],
    n: int,
    *,
    qmap: QuantMap | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    desc: str = "evaluating",
    reestimate_bn: Any = None,
) -> tuple[Tensor, Tensor | None]:
    """Loss (and metric) at ``n`` points produced lazily, one chunk at a time.

    Parameters
    ----------
    objective : Objective
    points : callable
        ``points(start, stop) -> Tensor (stop - start, D)``: the points with indices in ``[start, stop)``.
    n : int
        Number of points.
    qmap : QuantMap, optional
        Evaluate ``L(Q(theta))`` instead of ``L(theta)``.
    chunk_size : int, optional
        Points per vmapped pass; bounds memory to ``chunk_size x D`` parameters plus the
        activations of ``chunk_size`` forward passes. Default: the Objective's ``chunk_size``,
        and without one adaptive. The first point is
        evaluated alone (warm-up), the second alone (a plain forward, timed) and the next
        ``objective.default_chunk_size()`` points together (vmapped, timed); the faster of
        the two per point is kept (vmapped convolutions with per-point weights
        become grouped convolutions, which on CPU can be slower than one point at a time).
    progress : bool
        tqdm bar over points.
    reestimate_bn : (inputs, targets) or iterable of batches, optional
        Calibration data: re-estimate the BatchNorm running statistics on them at *every*
        evaluated point (:func:`~riverscape.quant.bn_reestimate.reestimated_evaluate`,
        docs/ptq_search.md §2). Cost: one extra forward pass over these data per point, and
        points are evaluated one at a time. ``None`` (default): the FP running statistics.

    Returns
    -------
    losses : Tensor, shape (n,), float64 on CPU
    metrics : Tensor of shape (n,) or None
    """
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk_size = chunk_size or objective.chunk_size  # the Objective's bound (set by the user) is not adaptive
    if reestimate_bn is not None:
        return _reestimated_points(objective, points, n, qmap, chunk_size, progress, desc, reestimate_bn)
    adaptive = chunk_size is None
    chunk = int(chunk_size or objective.default_chunk_size())
    # points built per step: a user's chunk_size bounds memory; adaptive one-by-one evaluation
    # still builds a default-sized block at a time (less Python overhead per point)
    block = chunk if not adaptive else objective.default_chunk_size()
    losses, metrics, per_point = [], [], {}
    start = 0
    with tqdm(total=n, disable=not progress, desc=desc, leave=False, unit="pt") as bar:
        while start < n:
            # adaptive: point 0 alone warms up (untimed), point 1 alone and then one chunk are
            # timed, and the faster of the two sizes is kept for the rest
            timing = adaptive and len(per_point) < 2
            size = 1 if adaptive and (start == 0 or 1 not in per_point) else chunk
            stop = min(start + (size if timing else max(size, block)), n)
            began = time.perf_counter()
            thetas = points(start, stop)
            if qmap is not None:
                thetas = torch.stack([qmap(theta) for theta in thetas.to(objective.dtype)])
            loss, metric = objective.evaluate(thetas, chunk_size=size)
            losses.append(loss.detach().cpu().double())
            if metric is not None:
                metrics.append(metric.detach().cpu().double())
            if timing and start > 0:
                per_point[size] = (time.perf_counter() - began) / (stop - start)
                if len(per_point) == 2 or stop - start < size:
                    chunk = objective.shared(min(per_point, key=per_point.get))  # a timed choice: process 0's
            bar.update(stop - start)
            start = stop
    return torch.cat(losses), (torch.cat(metrics) if metrics else None)


def _reestimated_points(objective: Objective, points: Callable[[int, int], Tensor], n: int, qmap: QuantMap | None,
                        chunk_size: int | None, progress: bool, desc: str, data: Any) -> tuple[Tensor, Tensor | None]:
    """:func:`evaluate_points` with BatchNorm statistics re-estimated on ``data`` at every point (one point at a time)."""
    block = int(chunk_size or objective.default_chunk_size())
    losses, metrics = [], []
    with tqdm(total=n, disable=not progress, desc=f"{desc} (BN re-estimated)", leave=False, unit="pt") as bar:
        for start in range(0, n, block):
            stop = min(start + block, n)
            thetas = points(start, stop)
            if qmap is not None:
                thetas = torch.stack([qmap(theta) for theta in thetas.to(objective.dtype)])
            loss, metric = reestimated_evaluate(objective, thetas, data)
            losses.append(loss.detach().double().cpu())
            if metric is not None:
                metrics.append(metric.detach().double().cpu())
            bar.update(stop - start)
    return torch.cat(losses), (torch.cat(metrics) if metrics else None)


def grid_axis(span: Sequence[float], steps: int) -> Tensor:
    """``steps`` equally spaced values from ``span[0]`` to ``span[1]`` (float64).

    For a symmetric span ``(-s, s)`` the grid is made exactly antisymmetric, so with an odd
    number of steps its middle value is exactly ``0.0`` (the slice contains its centre).
    """
    lo, hi = (float(v) for v in span)
    if not lo < hi:
        raise ValueError(f"span must satisfy lo < hi, got ({lo}, {hi})")
    if int(steps) < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    axis = torch.linspace(lo, hi, int(steps), dtype=torch.float64)
    if lo == -hi:
        axis = 0.5 * (axis - axis.flip(0))
    return axis


def _span_pair(span: Span) -> tuple[float, float]:
    if isinstance(span, (int, float)):
        if span <= 0:
            raise ValueError(f"a scalar span must be positive, got {span}")
        return -float(span), float(span)
    pair = tuple(span)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair):
        raise ValueError(f"span must be a positive number or a pair (lo, hi), got {span!r}")
    return float(pair[0]), float(pair[1])


def _span_2d(span) -> tuple[tuple[float, float], tuple[float, float]]:
    if isinstance(span, (int, float)):
        pair = _span_pair(span)
        return pair, pair
    items = tuple(span)
    if len(items) == 2 and all(isinstance(v, (int, float)) for v in items):
        pair = _span_pair(items)
        return pair, pair
    if len(items) == 2:
        return _span_pair(items[0]), _span_pair(items[1])
    raise ValueError(f"span must be s, (lo, hi) or ((x0, x1), (y0, y1)), got {span!r}")


def _steps_2d(steps) -> tuple[int, int]:
    if isinstance(steps, int):
        return steps, steps
    items = tuple(steps)
    if len(items) != 2:
        raise ValueError(f"steps must be an int or a pair (nx, ny), got {steps!r}")
    return int(items[0]), int(items[1])


def _direction(objective: Objective, direction: Tensor, name: str) -> Tensor:
    direction = objective.check_theta(direction)
    if not bool(torch.isfinite(direction).all()):
        raise ValueError(f"{name} has non-finite entries")
    return direction


@dataclass(frozen=True)
class Slice1D:
    """``loss[i] = L(center + alphas[i] * direction)`` (or ``L(Q(...))``, see ``which``).

    Attributes
    ----------
    alphas : Tensor, shape (n,), float64
    loss : Tensor, shape (n,), float64
    metric : Tensor of shape (n,) or None
    center, direction : Tensor, shape (D,)
    which : str
        ``"L(theta)"`` or ``"L(Q(theta))"``.
    quantizer : str or None
        Description of the quantization map used.
    """

    alphas: Tensor
    loss: Tensor
    metric: Tensor | None
    center: Tensor
    direction: Tensor
    which: str
    quantizer: str | None

    def to_dict(self) -> dict:
        return {
            "alphas": self.alphas.tolist(),
            "loss": self.loss.tolist(),
            "metric": None if self.metric is None else self.metric.tolist(),
            "which": self.which,
            "quantizer": self.quantizer,
            "direction_norm": float(self.direction.norm()),
        }


@dataclass(frozen=True)
class Slice2D:
    """``loss[i, j] = L(center + alphas[i] * d1 + betas[j] * d2)`` (or ``L(Q(...))``).

    Orientation: the first axis follows ``alphas`` (``d1``), the second ``betas`` (``d2``). Plotting
    libraries that take ``z[row = y][col = x]`` (matplotlib ``contour(X, Y, Z)``, plotly
    ``Contour(z=...)``) want ``loss.T`` to put ``d1`` on the horizontal axis.

    Attributes
    ----------
    alphas : Tensor, shape (nx,), float64
    betas : Tensor, shape (ny,), float64
    loss : Tensor, shape (nx, ny), float64
    metric : Tensor of shape (nx, ny) or None
    center, d1, d2 : Tensor, shape (D,)
    which : str
        ``"L(theta)"`` or ``"L(Q(theta))"``.
    quantizer : str or None
    """

    alphas: Tensor
    betas: Tensor
    loss: Tensor
    metric: Tensor | None
    center: Tensor
    d1: Tensor
    d2: Tensor
    which: str
    quantizer: str | None

    def coordinates(self, point: Tensor) -> tuple[float, float, float]:
        """Least-squares ``(alpha, beta)`` of ``point`` in the slice's basis, and its distance off the plane."""
        return plane_coordinates(point.to(self.center.device), self.center, self.d1, self.d2)

    def to_dict(self) -> dict:
        return {
            "alphas": self.alphas.tolist(),
            "betas": self.betas.tolist(),
            "loss": self.loss.tolist(),
            "metric": None if self.metric is None else self.metric.tolist(),
            "orientation": "loss[i][j] = L(center + alphas[i] * d1 + betas[j] * d2)",
            "which": self.which,
            "quantizer": self.quantizer,
            "d1_norm": float(self.d1.norm()),
            "d2_norm": float(self.d2.norm()),
        }


def slice_1d(
    objective: Objective,
    center: Tensor,
    direction: Tensor,
    *,
    span: Span = (-1.0, 1.0),
    steps: int = 51,
    quantizer: Quantizer = None,
    chunk_size: int | None = None,
    progress: bool = True,
    reestimate_bn: Any = None,
) -> Slice1D:
    """The loss along a line, ``f(alpha) = L(center + alpha * direction)``.

    Parameters
    ----------
    objective : Objective
    center, direction : Tensor, shape (D,)
    span : float or (lo, hi)
        Range of ``alpha``; a number ``s`` means ``(-s, s)``. A symmetric span with odd ``steps``
        contains ``alpha = 0`` exactly.
    steps : int
        Number of grid values.
    quantizer : UniformQuantizer or QuantMap, optional
        Evaluate ``L(Q(center + alpha * direction))`` (piecewise constant in ``alpha``).
    chunk_size, progress, reestimate_bn
        As in :func:`evaluate_points`, whose points are the grid values here
        (``reestimate_bn``: the BatchNorm statistics re-estimated at every grid point).

    Returns
    -------
    Slice1D

    Examples
    --------
    >>> import torch, riverscape as rs
    >>> obj = rs.Objective(torch.nn.Linear(3, 2), "cross_entropy", (torch.randn(8, 3), torch.randint(0, 2, (8,))))
    >>> s = slice_1d(obj, obj.theta0, torch.ones(obj.dim), steps=5, progress=False)
    >>> s.alphas.tolist()
    [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    center = objective.check_theta(center)
    direction = _direction(objective, direction, "direction")
    alphas = grid_axis(_span_pair(span), steps)
    coeffs = alphas.to(device=objective.device, dtype=objective.dtype)
    qmap = as_quant_map(objective, quantizer)

    def points(start: int, stop: int) -> Tensor:
        return torch.addmm(center, coeffs[start:stop, None], direction[None, :])

    loss, metric = evaluate_points(
        objective, points, len(alphas), qmap=qmap, chunk_size=chunk_size, progress=progress, desc="1D slice",
        reestimate_bn=reestimate_bn,
    )
    return Slice1D(
        alphas, loss, metric, center.clone(), direction.clone(), WHICH_Q if qmap is not None else WHICH_FP, describe_quantizer(qmap)
    )


def slice_2d(
    objective: Objective,
    center: Tensor,
    d1: Tensor,
    d2: Tensor,
    *,
    span=1.0,
    steps: Union[int, Sequence[int]] = 25,
    quantizer: Quantizer = None,
    reestimate_bn: Any = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> Slice2D:
    """The loss on a plane, ``f(alpha, beta) = L(center + alpha * d1 + beta * d2)``.

    Parameters
    ----------
    objective : Objective
    center, d1, d2 : Tensor, shape (D,)
        Directions are used as given (not normalised): pass filter-normalised random
        directions (:func:`random_direction`), Hessian eigenvectors, or an orthonormal
        :class:`~riverscape.landscape.directions.Plane`'s ``d1, d2``.
    span : float, (lo, hi) or ((x0, x1), (y0, y1))
        Ranges of ``alpha`` and ``beta``; a number ``s`` means ``(-s, s)`` on both axes.
        Symmetric spans with odd steps contain ``(0, 0)`` exactly, so the slice holds ``L(center)``.
    steps : int or (nx, ny)
        Grid size.
    quantizer : UniformQuantizer or QuantMap, optional
        Evaluate ``L(Q(center + alpha d1 + beta d2))`` (scales recomputed at every point).
    chunk_size, progress, reestimate_bn
        As in :func:`evaluate_points`, whose points are the grid points here: only
        ``chunk_size x D`` parameters are held at once; ``reestimate_bn`` re-estimates the
        BatchNorm statistics at every grid point.

    Returns
    -------
    Slice2D
        ``loss[i, j]`` at ``(alphas[i], betas[j])``.
    """
    center = objective.check_theta(center)
    basis = torch.stack([_direction(objective, d1, "d1"), _direction(objective, d2, "d2")])  # (2, D)
    (x_span, y_span), (nx, ny) = _span_2d(span), _steps_2d(steps)
    alphas, betas = grid_axis(x_span, nx), grid_axis(y_span, ny)
    grid = torch.cartesian_prod(alphas, betas).to(device=objective.device, dtype=objective.dtype)  # (nx*ny, 2)
    qmap = as_quant_map(objective, quantizer)

    def points(start: int, stop: int) -> Tensor:
        return torch.addmm(center, grid[start:stop], basis)

    loss, metric = evaluate_points(
        objective, points, nx * ny, qmap=qmap, chunk_size=chunk_size, progress=progress, desc="2D slice",
        reestimate_bn=reestimate_bn,
    )
    return Slice2D(
        alphas,
        betas,
        loss.view(nx, ny),
        None if metric is None else metric.view(nx, ny),
        center.clone(),
        basis[0].clone(),
        basis[1].clone(),
        WHICH_Q if qmap is not None else WHICH_FP,
        describe_quantizer(qmap),
    )
