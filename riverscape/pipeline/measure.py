"""Measurements of a :class:`~riverscape.pipeline.Reference`: PTQ and QAT points, damage, alignment, planes.

Every function takes the reference (objectives, ``theta_fp``, the cached hill basis, basin
widths and FP Hessian operator) instead of threading ``k, values, vectors, operator, seed``
through each call, and returns a typed, frozen result. The command line's analysis
(:mod:`riverscape.analysis`) and the experiments (:mod:`riverscape.studies`) are both built
from these functions, so they measure the same things the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import Tensor

from ..gradients import alignment, alignment_along_qat, damage
from ..gradients.alignment import AlignmentResult, QATAlignment
from ..gradients.damage import DamageResult
from ..landscape.directions import Plane, plane_through, random_direction
from ..landscape.paths import Barrier, loss_barrier
from ..landscape.slices import slice_2d
from ..objective import Objective
from ..quant import QuantMap
from ..quant.ptq import PTQResult, ptq_result
from ..quant.qat import QATResult, qat
from .reference import HILL_K, TAU, Reference

__all__ = [
    "PTQMeasurement",
    "QATMeasurement",
    "PlaneLandscape",
    "measure_ptq",
    "measure_qat",
    "damage_at",
    "alignment_at",
    "alignment_along",
    "analysis_plane",
    "plane_landscape",
    "within_box",
]


@dataclass(frozen=True)
class PTQMeasurement:
    """The PTQ point ``Q(theta_fp)`` of one quantizer and its evaluation.

    Attributes
    ----------
    qmap : QuantMap
    point : Tensor, shape (D,)
    metrics : dict
        ``loss``, ``accuracy`` (evaluation set), ``train_loss`` (analysis set), ``perplexity``
        when asked for, ``delta_norm`` and ``relative_delta_norm`` of ``Q(theta_fp) - theta_fp``;
        ``ptq_method`` (the registry name); for data-aware methods (GPTQ, AdaRound) the per-layer relative reconstruction
        error ``||XW - XQ||^2 / ||XW||^2`` and its mean, the calibration size, and the layers that
        fell back to round-to-nearest.
    result : PTQResult
        The method's full outcome (config, per-tensor quantization parameters).
    """

    qmap: QuantMap
    point: Tensor
    metrics: dict
    result: Optional[PTQResult] = None

    @property
    def finite(self) -> bool:
        """Whether the analysis-set loss at the point is finite (else curvature-based measurements are skipped)."""
        value = self.metrics["train_loss"]
        return value == value and abs(value) != float("inf")


@dataclass(frozen=True)
class QATMeasurement:
    """A QAT run from ``theta_fp`` and its deployed point ``Q(theta_T)``.

    Attributes
    ----------
    result : QATResult
    point : Tensor, shape (D,)
        ``result.theta_q``.
    metrics : dict
        As :attr:`PTQMeasurement.metrics`, at ``point``.
    barrier : Barrier
        The loss barrier of ``L`` on the segment ``theta_fp -> point`` (25 points).
    """

    result: QATResult
    point: Tensor
    metrics: dict
    barrier: Barrier


def _point_metrics(ref: Reference, point: Tensor, perplexity: bool) -> dict:
    delta = point - ref.theta_fp
    return {
        **ref.evaluate(point, perplexity=perplexity),
        "delta_norm": float(delta.norm()),
        "relative_delta_norm": float(delta.norm() / ref.theta_fp.norm()),
    }


def measure_ptq(ref: Reference, qmap: QuantMap, *, method: Any = "rtn", perplexity: bool = False,
                calibration: Optional[Objective] = None) -> PTQMeasurement:
    """Quantize ``theta_fp`` with ``qmap`` (PTQ ``method``) and evaluate the point.

    Parameters
    ----------
    ref : Reference
    qmap : QuantMap
        Built on ``ref`` (:meth:`Reference.quant_map`).
    method : str or PTQ config
        The PTQ method (round-to-nearest by default).
    perplexity : bool
        Also report ``exp(loss)``.
    calibration : Objective, optional
        The data a data-aware method calibrates on (same layout as ``ref.analysis``, e.g. a
        split of the training data); default ``ref.analysis``.
    """
    result = ptq_result(ref.analysis if calibration is None else calibration, qmap, method=method)
    point = result.theta_q
    metrics = {"ptq_method": result.method, **_point_metrics(ref, point, perplexity)}
    if result.reconstruction_error:
        errors = list(result.reconstruction_error.values())
        metrics["reconstruction_error_mean"] = sum(errors) / len(errors)
        metrics["reconstruction_error"] = dict(result.reconstruction_error)
    if result.calibration:
        metrics["calibration_samples"] = result.calibration.get("n_samples")
    residuals = (result.calibration or {}).get("grid_residual")
    if residuals:
        metrics["grid_residual_max"] = max(residuals.values())  # external weights: how far off a uniform grid (in steps)
    if result.fallback:
        metrics["rtn_fallback"] = dict(result.fallback)
    return PTQMeasurement(qmap, point, metrics, result)


def measure_qat(ref: Reference, qmap: QuantMap, *, perplexity: bool = False, barrier_points: int = 25, **qat_options: Any) -> QATMeasurement:
    """Run QAT from ``theta_fp`` on ``ref.training`` and evaluate the deployed point.

    Parameters
    ----------
    ref : Reference
    qmap : QuantMap
        Built on ``ref.training`` (its layout equals the analysis objective's).
    perplexity : bool
    barrier_points : int
        Points of the loss barrier ``theta_fp -> Q(theta_T)``.
    **qat_options
        Keywords of :func:`riverscape.quant.qat` (``estimator``, ``steps``, ``lr``, ...);
        ``eval_objective`` defaults to ``ref.evaluation`` and ``theta0`` to ``theta_fp``.
    """
    qat_options.setdefault("eval_objective", ref.evaluation)
    result = qat(ref.training, qmap, **qat_options)
    point = result.theta_q
    barrier = loss_barrier(ref.analysis, ref.theta_fp, point, n=barrier_points, progress=False)
    return QATMeasurement(result, point, _point_metrics(ref, point, perplexity), barrier)


def damage_at(ref: Reference, qmap: QuantMap, point: Tensor, *, k: int = HILL_K, tau: float = TAU, **options: Any) -> DamageResult:
    """:func:`riverscape.gradients.damage` of ``point - theta_fp`` with the reference's hill basis and widths.

    ``options`` go to :func:`~riverscape.gradients.damage` (``floor``, ``random_control``, ``rtn_matvecs``, ...).
    """
    return damage(ref.analysis, ref.theta_fp, qmap, theta_q=point, basis=ref.basis(k), tau=tau, widths=ref.widths(k, tau),
                  seed=ref.seed, progress=False, **options)


def alignment_at(ref: Reference, qmap: QuantMap, point: Tensor, *, k: int = HILL_K, theta_qat: Optional[Tensor] = None,
                 **options: Any) -> AlignmentResult:
    """:func:`riverscape.gradients.alignment` of the gradient at ``point`` with the reference's hill basis.

    ``options`` go to :func:`~riverscape.gradients.alignment` (``floor``, ``per_layer``, ``n_null``, ...).
    """
    return alignment(ref.analysis, ref.theta_fp, qmap, theta_q=point, basis=ref.basis(k), theta_qat=theta_qat, seed=ref.seed,
                     progress=False, **options)


def alignment_along(ref: Reference, qmap: QuantMap, run: QATResult, *, k: int = HILL_K, n_null: int = 50) -> Optional[QATAlignment]:
    """Alignment at every recorded QAT iterate, quantized with QAT's own grid; ``None`` with learned step sizes.

    With frozen scales every latent iterate is quantized with the grid QAT used, not one
    recomputed from the iterate; with learned (LSQ) scales the grid of each iterate is not
    stored, so nothing is measured. ``n_null`` matched null draws per recorded iterate (0: none).
    """
    if run.scale_mode == "learned":
        return None
    frozen = run.qparams if run.scale_mode == "frozen" else None
    return alignment_along_qat(ref.analysis, ref.theta_fp, qmap, run.latent_trajectory, steps=run.trajectory_steps, basis=ref.basis(k),
                               qparams=frozen, seed=ref.seed, n_null=n_null, progress=False)


# ---------------------------------------------------------------------- planes
def within_box(xs: Sequence[float], ys: Sequence[float], span: float) -> tuple[list, list]:
    """The points of a projected path that fall inside ``[-span, span]^2`` (keeps figures on the sliced window)."""
    keep = [(x, y) for x, y in zip(xs, ys) if abs(x) <= span and abs(y) <= span]
    return [p[0] for p in keep], [p[1] for p in keep]


def analysis_plane(ref: Reference, qmap: QuantMap, point: Tensor, third: Optional[Tensor]) -> Plane:
    """The orthonormal plane through ``theta_fp``, ``point`` and ``third`` (or a random filter-normalised direction).

    The random direction is scaled to ``|point - theta_fp|`` so both axes are on one scale.
    """
    fp = ref.theta_fp
    if third is not None and float((third - point).norm()) > 1e-12 * float(point.norm()):
        try:
            return plane_through(fp, point, third)
        except ValueError:
            pass
    direction = random_direction(ref.analysis, seed=ref.seed, mask=qmap, theta=fp)
    scaled = fp + direction * (float((point - fp).norm()) / max(float(direction.norm()), 1e-30))
    return plane_through(fp, point, scaled)


@dataclass(frozen=True)
class PlaneLandscape:
    """``L(theta)`` and ``L(Q(theta))`` on one plane through ``theta_fp``.

    Attributes
    ----------
    plane : Plane
    alphas, betas : Tensor
        Grid coordinates (origin ``theta_fp``).
    fp_loss, quantized_loss : Tensor, shape (len(alphas), len(betas))
    span : float
        Half-width of the window.
    markers : dict
        ``{label: (x, y)}`` of the named points.
    paths : dict
        ``{label: (xs, ys)}`` of projected trajectories, clipped to the window.
    off_plane : dict
        ``{label: [distance of each path point from the plane]}``.
    fp_slice, quantized_slice : Slice2D
        The full slice results (accuracy grids included).
    """

    plane: Plane
    span: float
    markers: dict
    paths: dict
    off_plane: dict
    fp_slice: Any
    quantized_slice: Any = field(repr=False)

    def to_dict(self) -> dict:
        """JSON-friendly form (lists), as the experiments store it."""
        return {
            "alphas": self.fp_slice.alphas.tolist(), "betas": self.fp_slice.betas.tolist(),
            "fp_loss": self.fp_slice.loss.tolist(), "quantized_loss": self.quantized_slice.loss.tolist(),
            "markers": {k: list(v) for k, v in self.markers.items()},
            "paths": {k: list(v) for k, v in self.paths.items()}, "off_plane": self.off_plane, "span": self.span,
        }


def plane_landscape(
    ref: Reference,
    qmap: QuantMap,
    plane: Plane,
    markers: dict,
    *,
    paths: Optional[dict] = None,
    span: float,
    steps: int,
    clip: bool = True,
    progress: bool = False,
) -> PlaneLandscape:
    """Slice ``L`` and ``L(Q(.))`` on ``plane`` over ``[-span, span]^2`` and project ``paths`` onto it.

    Parameters
    ----------
    ref : Reference
    qmap : QuantMap
    plane : Plane
        Through ``theta_fp`` (its origin).
    markers : dict
        ``{label: point (D,) or (x, y)}`` of named points, stored as plane coordinates.
    paths : dict, optional
        ``{label: points (n, D)}`` projected onto the plane (clipped to the window when ``clip``).
    span : float
    steps : int
        Grid points per axis.
    """
    coords = {label: tuple(p) if isinstance(p, tuple) else tuple(plane.coordinates(p)) for label, p in markers.items()}
    projected, off_plane = {}, {}
    for label, points in (paths or {}).items():
        if points is None:
            continue
        xy = [plane.coordinates(p) for p in points]
        xs, ys = [c[0] for c in xy], [c[1] for c in xy]
        projected[label] = within_box(xs, ys, span) if clip else (xs, ys)
        off_plane[label] = [plane.distance(p) for p in points]
    fp_slice = slice_2d(ref.analysis, ref.theta_fp, plane.d1, plane.d2, span=span, steps=steps, progress=progress)
    q_slice = slice_2d(ref.analysis, ref.theta_fp, plane.d1, plane.d2, span=span, steps=steps, quantizer=qmap, progress=progress)
    return PlaneLandscape(plane, span, coords, projected, off_plane, fp_slice, q_slice)
