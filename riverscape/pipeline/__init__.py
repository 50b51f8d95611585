"""The one measurement pipeline: a :class:`Reference` built once per model, and measurements of it.

The command line's analysis (:func:`riverscape.analysis.run_analysis`), every experiment
(:mod:`riverscape.studies`) and the notebooks read these same objects::

    ref, chosen = build_reference(model, loss, analysis_data, evaluation_data, quantizer=UniformQuantizer(2))
    qmap = ref.quant_map(UniformQuantizer(2))
    ptq_point = measure_ptq(ref, qmap)                       # Q(theta_fp), evaluated
    dmg = damage_at(ref, qmap, ptq_point.point)              # second-order damage, hill/river split
    ali = alignment_at(ref, qmap, ptq_point.point)           # gradient at Q(theta_fp) vs the basin
    run = measure_qat(ref, ref.quant_map(UniformQuantizer(2), ref.training), steps=100)
"""
from types import ModuleType as _ModuleType

from .dynamics import LINE_POINTS, Hitting, Tolerance, accuracy_tolerance, arm_alignments, deployed_evaluate, hitting, reestimates_bn
from .measure import (
    PlaneLandscape,
    PointObjectives,
    PTQMeasurement,
    QATMeasurement,
    alignment_along,
    alignment_at,
    analysis_plane,
    damage_at,
    evaluate_point,
    measure_ptq,
    measure_qat,
    measurement_notes,
    plane_landscape,
    point_objectives,
    within_box,
)
from .reference import HILL_K, TAU, Reference, build_reference, cap_samples, trajectory_in_layout

__all__ = sorted(name for name, value in globals().items() if not name.startswith("_") and not isinstance(value, _ModuleType))
