"""Paths in weight space and the loss along them: lines, polylines (the river), Bezier curves.

A path is a curve ``gamma: [0, 1] -> R^D``; calling it on ``t`` of shape ``(n,)`` returns the
points ``(n, D)``. On top: loss profiles (optionally of the quantized loss ``L(Q(gamma(t)))``),
the loss barrier of Entezari et al., the trajectory river R1 (docs/theory.md §5.7), the projection of
a point onto a path, and two ways of finding low-loss curves between two points: Garipov et
al.'s Bezier curves and the nudged elastic band (NEB).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..io.jsonable import JsonRecord
from ..objective import Objective
from ..training import TrainResult, build_optimizer
from .slices import Quantizer, as_quant_map, describe_quantizer, evaluate_points

__all__ = [
    "WeightPath",
    "LinearPath",
    "PolylinePath",
    "BezierPath",
    "PathProfile",
    "Barrier",
    "PathProjection",
    "path_losses",
    "loss_barrier",
    "river",
    "project_onto_path",
    "fit_bezier",
    "nudged_elastic_band",
    "refine_path",
    "SMOOTHINGS",
    "REFINE_METHODS",
]

SMOOTHINGS = ("ema", "window", None)
REFINE_METHODS = ("bezier", "neb")
_LENGTH_SAMPLES = 1025  # dense polyline used for the arc length of curved paths
_PROJECTION_BUDGET = 2e7  # numbers held at once when projecting onto long paths


def _as_t(t, *, unit: bool) -> Tensor:
    """Path parameters as a float64 CPU vector (checked to lie in [0, 1] when ``unit``)."""
    t = torch.as_tensor(t, dtype=torch.float64, device="cpu").reshape(-1)
    if unit and bool(((t < 0) | (t > 1)).any()):
        raise ValueError("t must lie in [0, 1]")
    return t


class WeightPath(ABC):
    """A curve ``gamma: [0, 1] -> R^D``. ``path(t)`` maps ``t`` of shape (n,) to points (n, D)."""

    @abstractmethod
    def __call__(self, t) -> Tensor:
        """Points on the path, shape ``(n, D)``."""

    @property
    @abstractmethod
    def length(self) -> float:
        """Arc length ``int_0^1 |gamma'(t)| dt``."""

    @property
    def dim(self) -> int:
        return int(self(torch.zeros(1)).shape[1])

    @property
    def start(self) -> Tensor:
        return self(torch.zeros(1))[0]

    @property
    def end(self) -> Tensor:
        return self(torch.ones(1))[0]


class PolylinePath(WeightPath):
    """Straight segments through ``points (m, D)``, parameterised by arc length.

    ``t`` is the fraction of the total length travelled, so vertex ``k`` is reached exactly at
    ``vertex_t[k] = (length of the first k segments) / length`` and ``path(vertex_t) == points``.
    """

    def __init__(self, points: Tensor) -> None:
        if points.ndim != 2 or points.shape[0] < 2:
            raise ValueError(f"points must have shape (m >= 2, D), got {tuple(points.shape)}")
        self.vertices = points.detach().clone()
        segments = (self.vertices[1:] - self.vertices[:-1]).double().norm(dim=1)
        cumulative = torch.cat([segments.new_zeros(1), torch.cumsum(segments, 0)])
        total = float(cumulative[-1])
        if not total > 0:
            raise ValueError("the polyline has zero length (all points coincide)")
        self.segment_lengths = segments.cpu()
        self._length = total
        self.vertex_t = (cumulative / cumulative[-1]).cpu()

    @property
    def length(self) -> float:
        return self._length

    def __call__(self, t) -> Tensor:
        t = _as_t(t, unit=True)
        knots = self.vertex_t
        idx = torch.searchsorted(knots, t)  # knots[idx - 1] < t <= knots[idx]
        on_vertex = knots[idx] == t
        seg = (idx - 1).clamp(min=0)
        span = knots[seg + 1] - knots[seg]
        frac = torch.where(on_vertex | (span == 0), torch.zeros_like(t), (t - knots[seg]) / span)
        device = self.vertices.device
        seg, idx = seg.to(device), idx.to(device)
        frac = frac.to(device=device, dtype=self.vertices.dtype)[:, None]
        out = torch.lerp(self.vertices[seg], self.vertices[seg + 1], frac)
        return torch.where(on_vertex.to(device)[:, None], self.vertices[idx], out)


class LinearPath(PolylinePath):
    """The segment ``gamma(t) = (1 - t) a + t b``; ``t`` outside ``[0, 1]`` extrapolates the line.

    Exact at the endpoints (``torch.lerp``): ``path(0) == a`` and ``path(1) == b`` bit for bit.
    """

    def __init__(self, a: Tensor, b: Tensor) -> None:
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError("a and b must be vectors of one shape")
        super().__init__(torch.stack([a, b]))

    @property
    def a(self) -> Tensor:
        return self.vertices[0]

    @property
    def b(self) -> Tensor:
        return self.vertices[1]

    def __call__(self, t) -> Tensor:
        t = _as_t(t, unit=False).to(self.vertices)
        return torch.lerp(self.a[None], self.b[None], t[:, None])


class BezierPath(WeightPath):
    """A Bezier curve of any degree, ``gamma(t) = sum_j C(n, j) t^j (1 - t)^(n - j) P_j``.

    ``control_points`` has shape ``(n + 1, D)``; with three points it is Garipov et al.'s quadratic
    curve ``(1 - t)^2 a + 2 t (1 - t) theta + t^2 b`` (arXiv 1802.10026). The curve starts at
    ``P_0`` and ends at ``P_n`` exactly.
    """

    def __init__(self, control_points: Tensor) -> None:
        if control_points.ndim != 2 or control_points.shape[0] < 2:
            raise ValueError(f"control_points must have shape (m >= 2, D), got {tuple(control_points.shape)}")
        self.control_points = control_points.detach().clone()

    @property
    def degree(self) -> int:
        return self.control_points.shape[0] - 1

    def weights(self, t) -> Tensor:
        """Bernstein basis ``B_j(t)``, shape ``(n_t, degree + 1)`` (also ``d gamma(t) / d P_j``)."""
        t = _as_t(t, unit=True)
        n = self.degree
        j = torch.arange(n + 1, dtype=torch.float64)
        binom = torch.tensor([math.comb(n, k) for k in range(n + 1)], dtype=torch.float64)
        return binom * t[:, None] ** j * (1 - t[:, None]) ** (n - j)

    def __call__(self, t) -> Tensor:
        return self.weights(t).to(self.control_points) @ self.control_points

    @cached_property
    def _dense_length(self) -> float:
        return PolylinePath(self(torch.linspace(0, 1, _LENGTH_SAMPLES))).length

    @property
    def length(self) -> float:
        """Arc length of a dense inscribed polyline (1025 points; a lower bound, converging as h^2)."""
        return self._dense_length


# ---------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class PathProfile:
    """Loss along a path at the parameters ``t``.

    Attributes
    ----------
    t : Tensor, shape (n,), float64
    loss : Tensor, shape (n,)
        ``L(gamma(t))``.
    metric : Tensor of shape (n,) or None
    quantized_loss : Tensor of shape (n,) or None
        ``L(Q(gamma(t)))`` when a quantizer was given.
    quantized_metric : Tensor of shape (n,) or None
    quantizer : str or None
        Description of the quantization map.
    """

    t: Tensor
    loss: Tensor
    metric: Tensor | None = None
    quantized_loss: Tensor | None = None
    quantized_metric: Tensor | None = None
    quantizer: str | None = None

    def to_dict(self) -> dict:
        def listed(x: Tensor | None):
            return None if x is None else x.tolist()

        return {
            "t": self.t.tolist(),
            "loss": self.loss.tolist(),
            "metric": listed(self.metric),
            "quantized_loss": listed(self.quantized_loss),
            "quantized_metric": listed(self.quantized_metric),
            "quantizer": self.quantizer,
        }


def path_losses(
    objective: Objective,
    path: WeightPath,
    n: int = 41,
    *,
    t: Tensor | None = None,
    quantizer: Quantizer = None,
    chunk_size: int | None = None,
    progress: bool = True,
    reestimate_bn: Any = None,
) -> PathProfile:
    """Loss (and metric) along a path, batched through ``objective.evaluate``.

    Parameters
    ----------
    objective : Objective
    path : WeightPath
    n : int
        Number of equally spaced ``t`` in ``[0, 1]`` (ignored when ``t`` is given).
    t : Tensor, shape (n,), optional
        Explicit parameters.
    quantizer : UniformQuantizer or QuantMap, optional
        Also evaluate the quantized loss ``L(Q(gamma(t)))``.
    chunk_size, progress, reestimate_bn
        As in :func:`~riverscape.landscape.slices.evaluate_points` (points are generated chunk
        by chunk; ``reestimate_bn`` re-estimates the BatchNorm statistics at every evaluated
        point, ``gamma(t)`` and ``Q(gamma(t))`` alike).

    Returns
    -------
    PathProfile
    """
    if t is None:
        if n < 2:
            raise ValueError(f"n must be at least 2, got {n}")
        t = torch.linspace(0, 1, n, dtype=torch.float64)
    ts = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    qmap = as_quant_map(objective, quantizer)

    def points(start: int, stop: int) -> Tensor:
        return path(ts[start:stop])

    common = dict(chunk_size=chunk_size, progress=progress, desc="path", reestimate_bn=reestimate_bn)
    loss, metric = evaluate_points(objective, points, len(ts), **common)
    q_loss = q_metric = None
    if qmap is not None:
        q_loss, q_metric = evaluate_points(objective, points, len(ts), qmap=qmap, **common)
    return PathProfile(ts, loss, metric, q_loss, q_metric, describe_quantizer(qmap))


@dataclass(frozen=True)
class Barrier(JsonRecord):
    """The loss barrier ``B = max_t [L(gamma(t)) - ((1 - t) L(a) + t L(b))]`` (Entezari et al. 2021).

    Attributes
    ----------
    height : float
        ``B``; ``<= 0`` means no barrier on the sampled path (e.g. convex along it).
    t : float
        Where the maximum is attained.
    loss_a, loss_b : float
        Losses at the endpoints.
    excess : Tensor, shape (n,)
        ``L(gamma(t)) - ((1 - t) L(a) + t L(b))`` at every sampled ``t``.
    profile : PathProfile
    """

    height: float
    t: float
    loss_a: float
    loss_b: float
    excess: Tensor
    profile: PathProfile


def loss_barrier(
    objective: Objective,
    a: Tensor,
    b: Tensor,
    n: int = 41,
    path: WeightPath | None = None,
    *,
    chunk_size: int | None = None,
    progress: bool = True,
) -> Barrier:
    """Loss barrier between ``a`` and ``b`` along a path (default: the straight line).

    Definition of Entezari et al. (arXiv 2110.06296), with the maximum over ``n`` equally
    spaced ``t`` (endpoints included, so ``B >= 0`` up to rounding whenever the grid is used)::

        B = max_t [ L(gamma(t)) - ((1 - t) L(a) + t L(b)) ]

    Parameters
    ----------
    objective : Objective
    a, b : Tensor, shape (D,)
    n : int
        Number of ``t`` values.
    path : WeightPath, optional
        A path from ``a`` to ``b`` (a fitted Bezier curve, a river); default ``LinearPath(a, b)``.

    Returns
    -------
    Barrier
    """
    a, b = objective.check_theta(a), objective.check_theta(b)
    if path is None:
        path = LinearPath(a, b)
    else:
        ends = path(torch.tensor([0.0, 1.0])).to(a)
        scale = 1e-6 * (1.0 + float(torch.maximum(a.norm(), b.norm())))
        if float((ends[0] - a).norm()) > scale or float((ends[1] - b).norm()) > scale:
            raise ValueError("the path must start at a and end at b")
    profile = path_losses(objective, path, n, chunk_size=chunk_size, progress=progress)
    t, loss = profile.t, profile.loss
    excess = loss - ((1 - t) * loss[0] + t * loss[-1])
    i = int(torch.argmax(excess))
    return Barrier(float(excess[i]), float(t[i]), float(loss[0]), float(loss[-1]), excess, profile)


# ---------------------------------------------------------------------------- river R1
def river(
    trajectory: Union[Tensor, TrainResult],
    *,
    smoothing: str | None = "ema",
    ema: float = 0.5,
    window: int = 3,
) -> PolylinePath:
    """The trajectory river R1 (docs/theory.md §5.7): a smoothed polyline through training checkpoints.

    Smoothing removes the oscillation across the valley ("hill" directions):

    * ``"ema"``: ``s_0 = theta_0``, ``s_j = (1 - ema) s_{j-1} + ema theta_j``;
    * ``"window"``: trailing mean of the last ``window`` checkpoints;
    * ``None``: the raw checkpoints.

    The first and last checkpoints stay the endpoints (the smoothed last vertex is replaced by
    the final weights), so the river runs from the initialisation to the trained model.

    Parameters
    ----------
    trajectory : Tensor of shape (m, D), or TrainResult
        Checkpoints in order (``TrainResult.trajectory`` is on the layout of an Objective built
        with the default parameter selection).
    smoothing : {"ema", "window", None}
    ema : float in (0, 1]
        Weight of the newest checkpoint (1 = no smoothing).
    window : int >= 1

    Returns
    -------
    PolylinePath
        Parameterised by arc length.
    """
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    points = trajectory.trajectory if isinstance(trajectory, TrainResult) else trajectory
    if not isinstance(points, Tensor) or points.ndim != 2 or points.shape[0] < 2:
        raise ValueError("trajectory must be a TrainResult or a tensor of shape (m >= 2, D)")
    if smoothing == "ema":
        if not 0 < ema <= 1:
            raise ValueError(f"ema must lie in (0, 1], got {ema}")
        rows = [points[0]]
        for theta in points[1:]:
            rows.append((1 - ema) * rows[-1] + ema * theta)
        smoothed = torch.stack(rows)
    elif smoothing == "window":
        if int(window) < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        smoothed = torch.stack([points[max(0, j - int(window) + 1) : j + 1].mean(0) for j in range(points.shape[0])])
    else:
        smoothed = points.clone()
    smoothed[0], smoothed[-1] = points[0], points[-1]
    return PolylinePath(smoothed)


class PathProjection(NamedTuple):
    """Closest point of a path to a query point."""

    distance: float
    t: float
    point: Tensor


def _closest_on_polyline(point: Tensor, vertices: Tensor) -> tuple[float, int, float, Tensor]:
    """Exact closest point on a polyline: ``(distance, segment, fraction, point)``."""
    best: tuple[float, int, float, Tensor] = (math.inf, 0, 0.0, vertices[0])
    per_chunk = max(1, int(_PROJECTION_BUDGET // max(1, vertices.shape[1])))
    for s in range(0, vertices.shape[0] - 1, per_chunk):
        start, stop = vertices[s : s + per_chunk], vertices[s + 1 : s + 1 + per_chunk]
        start = start[: stop.shape[0]]
        u = stop - start
        uu = (u * u).sum(1)
        frac = torch.where(uu > 0, ((point - start) * u).sum(1) / uu.clamp(min=torch.finfo(uu.dtype).tiny), 0.0)
        frac = frac.clamp(0, 1)
        closest = torch.lerp(start, stop, frac[:, None])
        dist = (point - closest).norm(dim=1)
        i = int(torch.argmin(dist))
        if float(dist[i]) < best[0]:
            best = (float(dist[i]), s + i, float(frac[i]), closest[i])
    return best


def project_onto_path(point: Tensor, path: WeightPath, dense: int = 400) -> PathProjection:
    """Closest point of ``path`` to ``point`` (docs/theory.md §5.7 ``project_polyline``).

    Exact for polylines and lines (per segment, ``t`` clipped to the segment); other paths are
    sampled at ``dense + 1`` equally spaced ``t`` and the inscribed polyline is projected onto
    (``t`` interpolated linearly inside the closest chord).

    Parameters
    ----------
    point : Tensor, shape (D,)
    path : WeightPath
    dense : int
        Chords for curved paths.

    Returns
    -------
    PathProjection
        ``(distance, t, point)``; for a polyline ``t`` is the arc-length fraction of the closest point.
    """
    if isinstance(path, PolylinePath):
        vertices, knots = path.vertices, path.vertex_t
    else:
        if dense < 1:
            raise ValueError(f"dense must be at least 1, got {dense}")
        knots = torch.linspace(0, 1, dense + 1, dtype=torch.float64)
        vertices = path(knots)
    point = point.to(device=vertices.device, dtype=vertices.dtype)
    if point.shape != vertices.shape[1:]:
        raise ValueError(f"point must have shape ({vertices.shape[1]},), got {tuple(point.shape)}")
    distance, seg, frac, closest = _closest_on_polyline(point, vertices)
    t = float(knots[seg]) + frac * float(knots[seg + 1] - knots[seg])
    return PathProjection(distance, t, closest)


# ---------------------------------------------------------------------------- low-loss curves
class _InteriorPoints:
    """The trainable points of a curve between its fixed endpoints ``a`` and ``b``, with their optimiser.

    ``count`` points, shape (count, D), start equally spaced strictly between ``a`` and ``b``.
    """

    def __init__(self, a: Tensor, b: Tensor, count: int, optimizer: str, lr: float, momentum: float) -> None:
        self.a, self.b = a, b
        fractions = torch.arange(1, count + 1, dtype=a.dtype, device=a.device) / (count + 1)
        self.points = torch.lerp(a[None], b[None], fractions[:, None]).requires_grad_(True)
        self.optimizer = build_optimizer(optimizer, [self.points], lr, momentum=momentum)

    def chain(self) -> Tensor:
        """``a``, the interior points and ``b``, shape (count + 2, D), detached."""
        return torch.cat([self.a[None], self.points.detach(), self.b[None]])

    def step(self, grad: Tensor) -> None:
        """One optimiser step of the interior points along ``-grad``."""
        self.points.grad = grad
        self.optimizer.step()


def fit_bezier(
    objective: Objective,
    a: Tensor,
    b: Tensor,
    *,
    bends: int = 1,
    steps: int = 300,
    lr: float = 1e-2,
    optimizer: str = "adam",
    momentum: float = 0.9,
    samples_per_step: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> BezierPath:
    """A low-loss Bezier curve from ``a`` to ``b`` (Garipov et al. 2018, arXiv 1802.10026).

    Minimises ``E_{t ~ U[0, 1]} L(phi(t))`` over the interior control points ``P_1..P_bends``
    (endpoints fixed, interior initialised equally spaced on the segment). The gradient is the
    exact chain rule ``dL(phi(t))/dP_j = B_j(t) grad L(phi(t))`` with the Bernstein weight
    ``B_j``: one ``objective.grad`` per sampled ``t``, no autograd through the curve.

    Parameters
    ----------
    objective : Objective
    a, b : Tensor, shape (D,)
    bends : int
        Interior control points (1 = the quadratic curve).
    steps : int
        Optimiser steps.
    lr, optimizer, momentum
        ``"adam"`` or ``"sgd"`` (with ``momentum``) on the control points.
    samples_per_step : int
        ``t`` values per step, stratified: ``t_i = (i + u_i) / k``, unbiased with lower variance.
    seed : int
        Seeds the ``t`` samples (private generator).
    progress : bool
        tqdm bar over steps.

    Returns
    -------
    BezierPath
        Control points ``(bends + 2, D)``.

    Notes
    -----
    The full analysis set is used at every ``t`` (Garipov et al. draw one mini-batch per ``t``);
    no weight decay is applied; BatchNorm statistics are not re-estimated along the curve.
    """
    a, b = objective.check_theta(a), objective.check_theta(b)
    if bends < 1 or steps < 1 or samples_per_step < 1:
        raise ValueError("bends, steps and samples_per_step must be at least 1")
    interior = _InteriorPoints(a, b, bends, optimizer, lr, momentum)
    gen = torch.Generator().manual_seed(seed)
    k = samples_per_step
    bar = tqdm(range(steps), disable=not progress, desc="fit_bezier", leave=False)
    for _ in bar:
        t = (torch.arange(k, dtype=torch.float64) + torch.rand(k, generator=gen, dtype=torch.float64)) / k
        curve = BezierPath(interior.chain())
        weights = curve.weights(t).to(a)  # (k, bends + 2)
        points = weights @ curve.control_points
        pairs = [objective.value_and_grad(p) for p in points]
        grads = torch.stack([g for _, g in pairs])  # (k, D)
        interior.step(weights[:, 1:-1].T @ grads / k)
        bar.set_postfix(loss=sum(v for v, _ in pairs) / k)
    return BezierPath(interior.chain())


def _improved_tangents(chain: Tensor, energies: Tensor) -> Tensor:
    """Unit tangents at the interior pivots (Henkelman and Jonsson 2000, J. Chem. Phys. 113, 9978).

    Uphill neighbour's segment when the energy is monotone through a pivot; at a local extremum
    the two segments are mixed with weights ``max`` / ``min`` of the energy differences.
    """
    forward, backward = chain[2:] - chain[1:-1], chain[1:-1] - chain[:-2]
    e_next, e_here, e_prev = energies[2:], energies[1:-1], energies[:-2]
    up, down = (e_next - e_here)[:, None], (e_prev - e_here)[:, None]
    big, small = torch.maximum(up.abs(), down.abs()), torch.minimum(up.abs(), down.abs())
    mixed = torch.where(e_next[:, None] > e_prev[:, None], forward * big + backward * small, forward * small + backward * big)
    rising = ((e_next > e_here) & (e_here > e_prev))[:, None]
    falling = ((e_next < e_here) & (e_here < e_prev))[:, None]
    tangent = torch.where(rising, forward, torch.where(falling, backward, mixed))
    bisector = forward / forward.norm(dim=1, keepdim=True) + backward / backward.norm(dim=1, keepdim=True)
    norms = tangent.norm(dim=1, keepdim=True)
    tangent = torch.where(norms > 0, tangent, bisector)  # flat energies: no uphill side
    return tangent / tangent.norm(dim=1, keepdim=True)


def nudged_elastic_band(
    objective: Objective,
    a: Tensor,
    b: Tensor,
    *,
    pivots: int = 8,
    steps: int = 200,
    lr: float = 1e-2,
    optimizer: str = "adam",
    momentum: float = 0.9,
    progress: bool = True,
) -> PolylinePath:
    """A minimum-energy path from ``a`` to ``b`` by the nudged elastic band.

    Draxler et al. 2018 (arXiv 1803.00885) with their ``spring-constant: inf`` variant: each
    step moves the interior pivots along the loss gradient projected perpendicular to the
    improved tangent (Henkelman and Jonsson 2000), then redistributes them at equal arc length
    along the current chain. Endpoints stay fixed. The saddle is the maximum loss on the result.

    Parameters
    ----------
    objective : Objective
    a, b : Tensor, shape (D,)
    pivots : int
        Interior pivots (the chain has ``pivots + 2`` points), initialised on the segment.
    steps : int
    lr, optimizer, momentum
        ``"adam"`` or ``"sgd"`` on the pivots.
    progress : bool

    Returns
    -------
    PolylinePath
        Through ``a``, the pivots and ``b``.
    """
    a, b = objective.check_theta(a), objective.check_theta(b)
    if pivots < 1 or steps < 1:
        raise ValueError("pivots and steps must be at least 1")
    interior = _InteriorPoints(a, b, pivots, optimizer, lr, momentum)
    end_losses = [objective.loss(a), objective.loss(b)]
    equal_spacing = torch.linspace(0, 1, pivots + 2, dtype=torch.float64)[1:-1]
    bar = tqdm(range(steps), disable=not progress, desc="NEB", leave=False)
    for _ in bar:
        chain = interior.chain()
        pairs = [objective.value_and_grad(p) for p in chain[1:-1]]
        energies = torch.tensor([end_losses[0]] + [v for v, _ in pairs] + [end_losses[1]], dtype=torch.float64)
        grads = torch.stack([g for _, g in pairs])
        tangents = _improved_tangents(chain, energies.to(chain))
        interior.step(grads - (grads * tangents).sum(1, keepdim=True) * tangents)
        with torch.no_grad():  # back to equal arc length along the moved chain
            interior.points.copy_(PolylinePath(interior.chain())(equal_spacing))
        bar.set_postfix(max_loss=max(v for v, _ in pairs))
    return PolylinePath(interior.chain())


def refine_path(objective: Objective, a: Tensor, b: Tensor, method: str = "bezier", **options) -> WeightPath:
    """A low-loss path from ``a`` to ``b``: ``"bezier"`` (:func:`fit_bezier`) or ``"neb"``
    (:func:`nudged_elastic_band`); ``options`` go to the chosen function."""
    if method not in REFINE_METHODS:
        raise ValueError(f"method must be one of {REFINE_METHODS}, got {method!r}")
    if method == "bezier":
        return fit_bezier(objective, a, b, **options)
    return nudged_elastic_band(objective, a, b, **options)
