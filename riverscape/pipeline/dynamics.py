"""Measurements of the QAT-dynamics experiment on a :class:`~riverscape.pipeline.Reference`.

* :func:`accuracy_tolerance` -- the held-out loss increase that costs one accuracy point,
  read off the line from ``theta_fp`` through the PTQ point (the hitting tolerance ``tau``);
* :func:`hitting` -- first hitting time of ``L_eval(Q(theta_t)) <= L_eval(theta_fp) + tau``,
  censored (not dropped) when never reached;
* :func:`arm_alignments` -- :func:`~riverscape.gradients.floor_alignment` of one arm at the
  logged latent iterates of a QAT run, with the reference's hill frame;
* :func:`deployed_evaluate` -- held-out loss and accuracy of deployed points, with BatchNorm
  statistics re-estimated at each point on calibration data (docs/qat_dynamics.md §2.3).

Every function takes an optional ``calibration`` Objective: on a model with BatchNorm it
re-estimates the running statistics at each measured point on its data
(:mod:`riverscape.quant.bn_reestimate`); without BatchNorm, or without ``calibration``, the
reference's own objectives (and statistics) are used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..gradients import floor_alignment
from ..io.jsonable import Record
from ..objective import Objective
from ..quant import QParams, QuantMap, ptq
from ..quant.bn_reestimate import calibration_data, has_batchnorm, objective_with_reestimated_bn, reestimated_evaluate
from ..quant.qat import first_hitting_time
from .reference import HILL_K, Reference

__all__ = ["Tolerance", "accuracy_tolerance", "Hitting", "hitting", "arm_alignments", "deployed_evaluate", "reestimates_bn",
           "LINE_POINTS"]

#: positions ``t`` on the line ``theta_fp + t (Q(theta_fp) - theta_fp)`` searched for the one-point drop
LINE_POINTS = tuple([i / 40 for i in range(41)] + [1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0])


@dataclass(frozen=True)
class Tolerance(Record):
    """The hitting tolerance ``tau``: the held-out loss increase at a given accuracy drop.

    Attributes
    ----------
    tau : float or None
        ``L_eval(theta_fp + t* u) - L_eval(theta_fp)`` at the first line point ``t*`` whose held-out
        accuracy is at least ``drop`` below the FP accuracy (``None`` if no point of
        :data:`LINE_POINTS` loses that much).
    t_star : float or None
    drop : float
    fp_loss, fp_accuracy : float
        Held-out loss and accuracy at ``theta_fp``.
    ptq_loss, ptq_accuracy : float
        The same at the PTQ point ``Q(theta_fp)`` (``t = 1``).
    """

    tau: float | None
    t_star: float | None
    drop: float
    fp_loss: float
    fp_accuracy: float
    ptq_loss: float
    ptq_accuracy: float


def reestimates_bn(ref: Reference, calibration: Optional[Objective]) -> bool:
    """Whether measurements with this ``calibration`` re-estimate BatchNorm statistics (given, and the model has BatchNorm)."""
    if calibration is None:
        return False
    if not isinstance(calibration, Objective):
        raise TypeError(f"calibration must be an Objective or None, got {type(calibration).__name__}")
    if calibration.dim != ref.analysis.dim:
        raise ValueError(f"calibration has dimension {calibration.dim}, expected {ref.analysis.dim} (the reference's quantized tensors)")
    return has_batchnorm(ref.analysis)


def deployed_evaluate(ref: Reference, points: Tensor, *, calibration: Optional[Objective] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Held-out (``ref.evaluation``) loss and metric at every row of ``points``.

    With ``calibration`` on a BatchNorm model each point is evaluated with running statistics
    re-estimated at that point on ``calibration``'s data
    (:func:`~riverscape.quant.bn_reestimate.reestimated_evaluate`: one forward pass over the
    calibration data per point, exact statistics when it is one batch); otherwise with the
    reference's statistics in one batched pass (:meth:`~riverscape.objective.Objective.evaluate`).

    Returns
    -------
    losses : Tensor, shape (n,)
    metrics : Tensor of shape (n,) or None
    """
    if reestimates_bn(ref, calibration):
        return reestimated_evaluate(ref.evaluation, points, calibration_data(calibration))
    return ref.evaluation.evaluate(points)


def accuracy_tolerance(ref: Reference, qmap: QuantMap, *, drop: float = 0.01, calibration: Optional[Objective] = None) -> Tolerance:
    """The loss increase that costs ``drop`` held-out accuracy along ``theta_fp -> Q(theta_fp)`` (round to nearest).

    Parameters
    ----------
    ref : Reference
        Its ``evaluation`` objective must have an accuracy metric.
    qmap : QuantMap
        The quantizer whose PTQ point sets the direction.
    drop : float
        Accuracy drop (a fraction: 0.01 is one point).
    calibration : Objective, optional
        On a BatchNorm model, every line point (``theta_fp`` included) is evaluated with
        statistics re-estimated there on its data (:func:`deployed_evaluate`), the same way as
        the deployed points whose hitting time ``tau`` defines. Each such point costs its own
        forward passes, so the line is then walked point by point and stops at the first drop
        (plus ``t = 1``); the result is the same as evaluating every point.
    """
    if not 0 < drop < 1:
        raise ValueError(f"drop must be in (0, 1), got {drop}")
    fp = ref.theta_fp
    direction = ptq(ref.analysis, qmap) - fp
    ts = torch.tensor(LINE_POINTS, dtype=fp.dtype, device=fp.device)
    points = fp[None] + ts[:, None] * direction[None]
    if reestimates_bn(ref, calibration):
        values: dict[int, tuple[float, float]] = {}

        def at(i: int) -> tuple[float, float]:
            if i not in values:
                loss, metric = deployed_evaluate(ref, points[i:i + 1], calibration=calibration)
                if metric is None:
                    raise ValueError("the evaluation objective has no accuracy metric")
                values[i] = float(loss[0]), float(metric[0])
            return values[i]
    else:
        losses, accuracy = ref.evaluation.evaluate(points)
        if accuracy is None:
            raise ValueError("the evaluation objective has no accuracy metric")
        pairs = list(zip(losses.tolist(), accuracy.tolist()))
        at = pairs.__getitem__
    fp_loss, fp_accuracy = at(0)
    tau = t_star = None
    for i, t in enumerate(LINE_POINTS):
        loss, acc = at(i)
        if acc <= fp_accuracy - drop:
            tau, t_star = loss - fp_loss, t
            break
    ptq_loss, ptq_accuracy = at(LINE_POINTS.index(1.0))
    return Tolerance(tau, t_star, drop, fp_loss, fp_accuracy, ptq_loss, ptq_accuracy)


@dataclass(frozen=True)
class Hitting(Record):
    """First hitting time of a threshold, right-censored at the last step when never reached."""

    hit: bool
    time: int
    threshold: float


def hitting(steps: Sequence[int], losses: Sequence[float], threshold: float) -> Hitting:
    """``T_hit = min{t : loss_t <= threshold}``; ``hit=False`` and ``time = max(steps)`` (censored) if never.

    >>> hitting([0, 10, 20], [1.0, 0.4, 0.3], 0.5).to_dict()
    {'hit': True, 'time': 10, 'threshold': 0.5}
    >>> hitting([0, 10, 20], [1.0, 0.9, 0.8], 0.5).time
    20
    """
    step = first_hitting_time(steps, losses, threshold)
    if step is None:
        return Hitting(False, int(max(steps)), float(threshold))
    return Hitting(True, int(step), float(threshold))


def arm_alignments(
    ref: Reference,
    qmap: QuantMap,
    latents: Tensor,
    steps: Sequence[int],
    qparams: Sequence[QParams],
    *,
    arm: str,
    n_null: int = 100,
    floor_steps: int = 50,
    seed: int = 0,
    k: int = HILL_K,
    calibration: Optional[Objective] = None,
) -> list[dict]:
    """:func:`~riverscape.gradients.floor_alignment` of ``arm`` at each latent iterate (analysis set).

    The hill frame is the reference's top-``k`` eigenvectors at ``theta_fp``; the floor is
    recomputed below every ``Q(w_t)``. Each step draws from its own generator seeded by
    ``(seed, step)``, so two arms at the same latent point share their null draws.

    With ``calibration`` on a BatchNorm model, each step is measured on the analysis objective
    whose running statistics were re-estimated at the deployed point ``Q(w_t)`` on
    ``calibration``'s data (:func:`~riverscape.quant.bn_reestimate.objective_with_reestimated_bn`).
    Those statistics stay fixed within the step: the floor solve, the arm's gradient and every
    null gradient use them (BatchNorm in eval mode), not the batch statistics and not statistics
    re-estimated at each gradient point.

    Returns
    -------
    list of dict
        ``{"step": t, **FloorAlignment.to_dict()}`` per row of ``latents``.
    """
    if len(steps) != latents.shape[0]:
        raise ValueError(f"{len(steps)} steps for {latents.shape[0]} latent iterates")
    if not len(steps):
        return []  # nothing logged: no hill frame needed
    reestimate = reestimates_bn(ref, calibration)
    data = calibration_data(calibration) if reestimate else None
    vectors = ref.basis(k).vectors
    rows = []
    for step, w in zip(steps, latents):
        generator = torch.Generator().manual_seed(1_000_003 * int(seed) + int(step))
        objective = objective_with_reestimated_bn(ref.analysis, qmap(w, list(qparams)), data) if reestimate else ref.analysis
        result = floor_alignment(objective, qmap, w, qparams, vectors, arm=arm, reference=ref.theta_fp, n_null=n_null,
                                 floor_steps=floor_steps, generator=generator)
        rows.append({"step": int(step), **result.to_dict()})
    return rows
