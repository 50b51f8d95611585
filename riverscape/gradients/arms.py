"""Where a QAT arm takes its gradient, and whether that gradient points to the valley floor (docs/theory.md §7).

The QAT-dynamics experiment compares arms that differ only in the point ``p`` at which the
gradient is taken from the latent iterate ``w`` (``delta = Q(w) - w``):

=====================  ===============================================
arm                    gradient point ``p``
=====================  ===============================================
``ste``                ``Q(w)``
``matched_noise``      ``w + |delta| * eps``, random signs ``eps``
``stochastic_rounding``  ``SR(w)`` on the same grid
``latent``             ``w``
=====================  ===============================================

:func:`floor_alignment` measures, with ``F = Pi_floor(Q(w))`` the valley floor below the deployed
point (:func:`~riverscape.gradients.valley_floor`, minimised inside the hill frame),

* ``A = cos(-grad L(p), u)`` with the fixed direction ``u = F - Q(w)`` (recomputed at every
  ``Q(w_t)``), and
* ``A_p = cos(-grad L(p), F - p)``, the way from the gradient point itself to the same floor point,

each against a matched null: the same statistic at ``p' = w + |delta| * eps`` for ``n_null``
independent sign patterns (the rounding magnitudes in random orthants). Both targets are built
at ``Q(w)``, which is the STE's own gradient point: the first step of the floor solve from ``Q(w)``
is along ``-V V^T grad L(Q(w))``, so the STE arm is favoured by construction (docs/qat_dynamics.md §3.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..objective import Objective
from ..quant import QParams, QuantMap
from ..quant.estimators import GRADIENT_POINT_ARMS, matched_noise, random_signs, stochastic_rounding
from ._common import NullComparison, cosine, finite_or_none
from .floor import valley_floor

__all__ = ["ARM_POINTS", "gradient_point", "NullComparison", "FloorAlignment", "floor_alignment"]

#: the gradient points compared: STE's ``Q(w)`` and the control arms
ARM_POINTS = ("ste",) + GRADIENT_POINT_ARMS


def gradient_point(qmap: QuantMap, theta: Tensor, qparams: Sequence[QParams], arm: str, generator: torch.Generator) -> Tensor:
    """The point where ``arm`` takes its gradient at latent ``theta`` (fresh draws from ``generator``).

    Parameters
    ----------
    qmap : QuantMap
    theta : Tensor, shape (D,)
        Latent weights ``w``.
    qparams : list of QParams
        The grid in use (e.g. the frozen calibration of the QAT run).
    arm : {"ste", "matched_noise", "stochastic_rounding", "latent"}
    generator : torch.Generator
        CPU generator for the signs or uniforms (targets in ``qmap.targets`` order).
    """
    if arm not in ARM_POINTS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARM_POINTS}")
    theta = theta.detach()
    binary = qmap.quantizer.bits == 1
    if arm == "latent":
        return theta.clone()
    if arm == "ste":
        return qmap(theta, list(qparams))

    def point(target, w, i):
        if arm == "matched_noise":
            return matched_noise(w, qparams[i], signs=random_signs(w.shape, generator, dtype=w.dtype, device=w.device), binary=binary)
        u = torch.rand(tuple(w.shape), generator=generator, dtype=w.dtype).to(w.device)
        return stochastic_rounding(w, qparams[i], uniforms=u, binary=binary)

    return qmap.map_targets(theta, point)


@dataclass(frozen=True)
class FloorAlignment:
    """Alignment of one arm's gradient with the valley floor below ``Q(w)``, with matched nulls.

    Attributes
    ----------
    arm : str
    fixed : NullComparison
        ``A = cos(-grad L(p), F - Q(w))`` (the direction recomputed at ``Q(w)``).
    from_point : NullComparison
        ``A_p = cos(-grad L(p), F - p)``.
    floor_loss, deployed_loss, point_loss : float
        ``L(F)``, ``L(Q(w))`` and ``L(p)``.
    floor_distance : float
        ``|F - Q(w)|``.
    """

    arm: str
    fixed: NullComparison
    from_point: NullComparison
    floor_loss: float
    deployed_loss: float
    point_loss: float
    floor_distance: float

    def to_dict(self, *, draws: bool = False) -> dict:
        """Flat JSON-friendly dict: ``cosine, null_mean, null_sd, z, p_value`` of ``fixed``, the same with the
        prefix ``point_`` for ``from_point``, and the losses (``draws``: also ``null_cosines``, ``point_null_cosines``)."""
        out = {"arm": self.arm}
        for prefix, comparison in (("", self.fixed), ("point_", self.from_point)):
            d = comparison.to_dict(draws=draws)
            out[f"{prefix}cosine"] = d.pop("observed")
            if draws:
                out[f"{prefix}null_cosines"] = d.pop("draws")
            out.update({f"{prefix}{k}": v for k, v in d.items()})
        out.update(floor_loss=finite_or_none(self.floor_loss), deployed_loss=finite_or_none(self.deployed_loss),
                   point_loss=finite_or_none(self.point_loss), floor_distance=self.floor_distance)
        return out


def floor_alignment(
    objective: Objective,
    qmap: QuantMap,
    theta: Tensor,
    qparams: Sequence[QParams],
    vectors: Tensor,
    *,
    arm: str,
    reference: Tensor | None = None,
    n_null: int = 100,
    floor_steps: int = 50,
    generator: torch.Generator,
) -> FloorAlignment:
    """Alignment of ``arm``'s gradient at latent ``theta`` with the way to the valley floor below ``Q(theta)``.

    Parameters
    ----------
    objective : Objective
        Loss and data of the measurement (e.g. the analysis set).
    qmap : QuantMap
        Built on ``objective``.
    theta : Tensor, shape (D,)
        Latent iterate ``w``.
    qparams : list of QParams
        The grid the run deploys with.
    vectors : Tensor, shape (D, k)
        Orthonormal hill frame of the floor (e.g. top-k Hessian eigenvectors at ``theta_fp``).
    arm : str
        One of :data:`ARM_POINTS`.
    reference : Tensor, shape (D,), optional
        ``theta_fp``: warm start of the floor solve (see :func:`valley_floor`).
    n_null : int
        Matched-null draws (at least 2); one gradient each.
    floor_steps : int
        L-BFGS iterations of the floor solve.
    generator : torch.Generator
        Draws the null's sign patterns first, then the arm's point (so arms share their null at one point).

    Returns
    -------
    FloorAlignment
    """
    if n_null < 2:
        raise ValueError(f"n_null must be at least 2, got {n_null}")
    theta = objective.check_theta(theta).detach()
    deployed = qmap(theta, list(qparams))
    floor = valley_floor(objective, deployed, vectors, reference=reference, steps=floor_steps)
    target = floor.point
    fixed = target - deployed

    def statistics(point: Tensor) -> tuple[float, float | None, float | None]:
        value, g = objective.value_and_grad(point)
        return value, cosine(-g, fixed), cosine(-g, target - point)

    # the null first: every arm at the same latent point with the same generator state gets the same null draws
    null = [statistics(gradient_point(qmap, theta, qparams, "matched_noise", generator))[1:] for _ in range(n_null)]
    point_loss, observed, observed_point = statistics(gradient_point(qmap, theta, qparams, arm, generator))
    return FloorAlignment(
        arm=arm, fixed=NullComparison.of(observed, [n[0] for n in null]), from_point=NullComparison.of(observed_point, [n[1] for n in null]),
        floor_loss=floor.loss_floor, deployed_loss=floor.loss_start, point_loss=point_loss, floor_distance=float(fixed.norm()),
    )
