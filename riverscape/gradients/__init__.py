"""Gradients at quantized weights, PTQ damage and the hill/river geometry (docs/theory.md §5.9, §6 and §7).

* :func:`alignment` -- does the identity-STE gradient at ``q = Q(w)`` point back into the
  basin? Cosines to ``u_back``, its hill and river parts, the valley floor and a QAT
  solution; the inward component (normalised by ``|g|``; raw as ``inward_raw``); ``chi_k``; both
  null models for every direction (matched random signs with z and empirical p, isotropic);
  the second-order relation.
* :func:`damage` -- measured vs predicted PTQ loss increase, the breakdown scale ``t_b``,
  energy and curvature shares of the hill subspace, basin widths and grid-to-basin ratios,
  recovery by a hill-only correction vs a random subspace.
* :func:`alignment_along_qat` -- the same geometry along a QAT latent trajectory, with a matched null per row.
* :func:`valley_floor` -- R3, the loss minimised inside the hill subspace.
* :func:`floor_alignment` -- does a QAT arm's gradient (at ``Q(w)``, a matched-noise point,
  ``SR(w)`` or ``w``) point to the valley floor below ``Q(w)``, against a matched null?

Coordinates: all quantities live in the Objective's ``theta``. The docs/theory.md §1.2 convention
(``d = dim theta_Q``, non-quantized parameters frozen) holds when the Objective selects
exactly the quantized tensors, e.g. ``Objective(model, loss, data, params="*.weight")``.
With all parameters selected, biases are extra (unperturbed) directions of the landscape;
results report ``dim`` and ``n_quantized`` either way, and per-layer numbers.
"""
from ._common import HillBasis
from .arms import ARM_POINTS, FloorAlignment, NullComparison, floor_alignment, gradient_point
from .alignment import AlignmentResult, NullSample, QATAlignment, alignment, alignment_along_qat, matched_null
from .damage import DamageResult, basin_widths, breakdown_scale, damage
from .floor import FLOOR_METHODS, FloorResult, valley_floor

__all__ = [
    "HillBasis",
    "alignment",
    "AlignmentResult",
    "matched_null",
    "NullSample",
    "alignment_along_qat",
    "QATAlignment",
    "damage",
    "DamageResult",
    "basin_widths",
    "breakdown_scale",
    "valley_floor",
    "FloorResult",
    "FLOOR_METHODS",
    "ARM_POINTS",
    "gradient_point",
    "floor_alignment",
    "FloorAlignment",
    "NullComparison",
]
