"""Measurements of a :class:`~riverscape.pipeline.Reference`: PTQ and QAT points, damage, alignment, planes.

Every function takes the reference (objectives, ``theta_fp``, the cached hill basis, basin
widths and FP Hessian operator) instead of threading ``k, values, vectors, operator, seed``
through each call, and returns a typed, frozen result. The command line's analysis
(:mod:`riverscape.analysis`) and the experiments (:mod:`riverscape.studies`) are both built
from these functions, so they measure the same things the same way.
"""
from __future__ import annotations

import dataclasses
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
from ..quant.bn_reestimate import calibration_data, has_batchnorm, objective_on_module, reestimated_module
from ..quant.ptq import PTQResult, ptq_result
from ..quant.ptq.activations import ActivationCalibration, ActivationQuantization, calibrate_activations, setting_name, with_activation_quantization
from ..quant.qat import QATResult, qat
from .reference import HILL_K, TAU, Reference

__all__ = [
    "PointObjectives",
    "point_objectives",
    "PTQMeasurement",
    "QATMeasurement",
    "PlaneLandscape",
    "measure_ptq",
    "evaluate_point",
    "measurement_notes",
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
        ``loss_measured`` says which loss the numbers are (``"weights-only"`` or
        ``"weights+activations"``) and ``setting`` names it (``W4``, ``W4A8``); with BatchNorm
        re-estimation, ``bn_reestimation`` (samples, batches) and the stale-statistics numbers
        under ``stale_bn``; with activations, the weights-only numbers under ``weights_only``.
    result : PTQResult
        The method's full outcome (config, per-tensor quantization parameters).
    objectives : PointObjectives or None
        The objectives the metrics were measured with (re-estimated statistics, activation
        quantizers); ``None`` when they are the reference's own.
    """

    qmap: QuantMap
    point: Tensor
    metrics: dict
    result: Optional[PTQResult] = None
    objectives: Optional["PointObjectives"] = None

    def curvature_objective(self, ref: Reference) -> Objective:
        """The weights-only analysis objective at the point (statistics re-estimated when they were): curvature there."""
        return ref.analysis if self.objectives is None else self.objectives.reference.analysis

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


@dataclass(frozen=True)
class PointObjectives:
    """The objectives one quantized point is measured with: BatchNorm re-estimated there, activations quantized.

    Attributes
    ----------
    reference : Reference
        ``ref`` with ``analysis``, ``training`` and ``evaluation`` replaced by objectives whose
        private module has the BatchNorm statistics re-estimated at the point (``ref`` itself
        when not re-estimated): the weights-only loss. Its caches are empty (the FP hill basis
        belongs to ``ref``). Curvature at the point is measured on ``reference.analysis``.
    activation_reference : Reference or None
        The same objectives with the activation quantizers in their forward context (the
        weights+activations loss ``L_A``), when activations are quantized.
    bn_samples : int or None
        Samples the statistics were re-estimated on (``None``: not re-estimated).
    bn_batches : int or None
        Batches of that pass (each weighs equally in the running averages).
    activations : ActivationCalibration or None
    module : nn.Module or None
        The module with the re-estimated statistics (evaluate other data sets with
        :func:`~riverscape.quant.bn_reestimate.objective_on_module`).
    """

    reference: Reference
    activation_reference: Optional[Reference] = None
    bn_samples: Optional[int] = None
    bn_batches: Optional[int] = None
    activations: Optional[ActivationCalibration] = None
    module: Any = field(default=None, repr=False)

    @property
    def measured(self) -> Reference:
        """The reference of the reported loss: with activations when they are quantized."""
        return self.activation_reference if self.activation_reference is not None else self.reference

    def to_dict(self) -> dict:
        out = {}
        if self.bn_samples is not None:
            out["bn_reestimation"] = {"samples": self.bn_samples, "batches": self.bn_batches}
        if self.activations is not None:
            out["activations"] = self.activations.to_dict()
        return out


def _replaced(ref: Reference, change) -> Reference:
    """``ref`` with ``change(objective)`` for analysis, training and evaluation (shared objects stay shared) and empty caches."""
    analysis = change(ref.analysis)
    training = analysis if ref.training is ref.analysis else change(ref.training)
    return dataclasses.replace(ref, analysis=analysis, training=training, evaluation=change(ref.evaluation), _cache={})


def point_objectives(ref: Reference, qmap: QuantMap, point: Tensor, *, bn_reestimate: bool = False,
                     calibration: Optional[Objective] = None,
                     activations: Optional[ActivationQuantization] = None) -> Optional[PointObjectives]:
    """The objectives that measure ``point`` (see :class:`PointObjectives`), or ``None`` when nothing changes.

    Parameters
    ----------
    ref : Reference
    qmap : QuantMap
        The quantized layers (their inputs are quantized with ``activations``).
    point : Tensor, shape (D,)
    bn_reestimate : bool
        Re-estimate the BatchNorm running statistics at ``point`` on the calibration data
        (:func:`~riverscape.quant.bn_reestimate.reestimated_module`, one forward pass;
        docs/ptq_search.md §2). Ignored for a model without BatchNorm.
    calibration : Objective, optional
        Its batches are the calibration data (default ``ref.analysis``).
    activations : ActivationQuantization, optional
        Calibrate per-tensor input quantizers at ``point`` (after the re-estimation) on the
        calibration data and evaluate with them (docs/ptq_methods.md §7).
    """
    source = ref.analysis if calibration is None else calibration
    reestimate = bn_reestimate and has_batchnorm(ref.analysis)
    if not reestimate and activations is None:
        return None
    base, bn_samples, bn_batches, module = ref, None, None, None
    if reestimate:
        data = calibration_data(source)
        module = reestimated_module(ref.analysis, point, data)
        base = _replaced(ref, lambda obj: objective_on_module(obj, module))
        bn_samples, bn_batches = source.n_samples, len(data)
        source = objective_on_module(source, module)
    if activations is None:
        return PointObjectives(base, None, bn_samples, bn_batches, None, module)
    acts = calibrate_activations(source, qmap, point, activations)
    quantized = _replaced(base, lambda obj: with_activation_quantization(obj, acts))
    return PointObjectives(base, quantized, bn_samples, bn_batches, acts, module)


def evaluate_point(ref: Reference, qmap: QuantMap, point: Tensor, *, perplexity: bool = False, bn_reestimate: bool = False,
                   calibration: Optional[Objective] = None,
                   activations: Optional[ActivationQuantization] = None) -> tuple[dict, Optional[PointObjectives]]:
    """Metrics of ``point`` (as :attr:`PTQMeasurement.metrics`) and the objectives that measured them.

    Arguments as :func:`point_objectives`. Without re-estimation or activations the metrics are
    ``ref.evaluate(point)`` plus the norms of ``point - theta_fp``.
    """
    objectives = point_objectives(ref, qmap, point, bn_reestimate=bn_reestimate, calibration=calibration, activations=activations)
    metrics = _point_metrics(ref if objectives is None else objectives.measured, point, perplexity)
    metrics["setting"] = setting_name(qmap.quantizer, activations)
    metrics["loss_measured"] = "weights-only" if activations is None else "weights+activations"
    if objectives is None:
        return metrics, None
    metrics.update(objectives.to_dict())
    if activations is not None:
        metrics["weights_only"] = objectives.reference.evaluate(point, perplexity=perplexity)
    if objectives.bn_samples is not None:
        metrics["stale_bn"] = ref.evaluate(point, perplexity=perplexity)
    return metrics, objectives


def measurement_notes(metrics: dict) -> list[str]:
    """Report lines saying what a PTQ point's numbers are: BatchNorm re-estimation and the loss measured."""
    notes = []
    bn = metrics.get("bn_reestimation")
    if bn is not None:
        stale = metrics.get("stale_bn", {})
        notes.append(f"BatchNorm running statistics re-estimated at Q(theta) (and at the QAT point) on {bn['samples']} analysis samples "
                     f"({bn['batches']} batches) before the PTQ loss and the curvature at Q(theta) were measured (loss with the stale FP statistics: "
                     f"{stale.get('loss', float('nan')):.4g}; --no-bn-reestimate turns this off); damage, alignment, slices and paths "
                     f"use the FP statistics")
    if metrics.get("loss_measured") == "weights+activations":
        acts = metrics.get("activations", {})
        notes.append(f"PTQ loss and accuracy are of {metrics.get('setting')}: weights and the inputs of {len(acts.get('layers', {}))} "
                     f"quantized layers fake-quantized ({acts.get('bits')}-bit per tensor, {acts.get('range')} range on "
                     f"{acts.get('n_samples')} samples); weights-only loss {metrics['weights_only']['loss']:.4g}; curvature, damage, "
                     f"alignment, slices and paths are of the weights-only loss")
    return notes


def _point_metrics(ref: Reference, point: Tensor, perplexity: bool) -> dict:
    delta = point - ref.theta_fp
    return {
        **ref.evaluate(point, perplexity=perplexity),
        "delta_norm": float(delta.norm()),
        "relative_delta_norm": float(delta.norm() / ref.theta_fp.norm()),
    }


def measure_ptq(ref: Reference, qmap: QuantMap, *, method: Any = "rtn", perplexity: bool = False,
                calibration: Optional[Objective] = None, bn_reestimate: bool = False,
                activations: Optional[ActivationQuantization] = None) -> PTQMeasurement:
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
        split of the training data); default ``ref.analysis``. BatchNorm re-estimation and
        activation calibration use the same data.
    bn_reestimate : bool
        Measure the point with BatchNorm running statistics re-estimated there on the
        calibration data (no effect without BatchNorm); ``metrics["bn_reestimation"]`` records
        the samples, ``metrics["stale_bn"]`` the numbers with the FP statistics.
    activations : ActivationQuantization, optional
        Also quantize the inputs of the quantized layers (``W4A8``; docs/ptq_methods.md §7):
        ``loss``/``accuracy``/``train_loss`` are then of the weights+activations network and
        ``metrics["weights_only"]`` holds the weights-only numbers.
    """
    result = ptq_result(ref.analysis if calibration is None else calibration, qmap, method=method)
    point = result.theta_q
    measured, objectives = evaluate_point(ref, qmap, point, perplexity=perplexity, bn_reestimate=bn_reestimate,
                                          calibration=calibration, activations=activations)
    metrics = {"ptq_method": result.method, **measured}
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
    return PTQMeasurement(qmap, point, metrics, result, objectives)


def measure_qat(ref: Reference, qmap: QuantMap, *, perplexity: bool = False, barrier_points: int = 25, bn_reestimate: bool = False,
                **qat_options: Any) -> QATMeasurement:
    """Run QAT from ``theta_fp`` on ``ref.training`` and evaluate the deployed point.

    Parameters
    ----------
    ref : Reference
    qmap : QuantMap
        Built on ``ref.training`` (its layout equals the analysis objective's).
    perplexity : bool
    barrier_points : int
        Points of the loss barrier ``theta_fp -> Q(theta_T)``.
    bn_reestimate : bool
        Evaluate the deployed point with BatchNorm statistics re-estimated there on the analysis
        data, as :func:`measure_ptq` (QAT itself trains with the frozen FP statistics).
    **qat_options
        Keywords of :func:`riverscape.quant.qat` (``estimator``, ``steps``, ``lr``, ...);
        ``eval_objective`` defaults to ``ref.evaluation`` and ``theta0`` to ``theta_fp``.
    """
    qat_options.setdefault("eval_objective", ref.evaluation)
    result = qat(ref.training, qmap, **qat_options)
    point = result.theta_q
    barrier = loss_barrier(ref.analysis, ref.theta_fp, point, n=barrier_points, progress=False)
    metrics, _ = evaluate_point(ref, qmap, point, perplexity=perplexity, bn_reestimate=bn_reestimate)
    return QATMeasurement(result, point, metrics, barrier)


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
