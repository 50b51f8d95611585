"""How much work one ``riverscape analyze`` run does: budgets, a cost model and the time estimate.

A :class:`Budget` scales every knob that drives the run time together: the analysis-set size,
the number of Hessian eigenpairs, Hutch++ and Lanczos (SLQ) matvecs, the per-layer stage, the
slice grid, the QAT steps and the valley-floor solves. ``"standard"`` is riverscape's default
(the numbers every earlier version used); ``"quick"`` is meant for a first look at a large
model, ``"thorough"`` for the figures of a paper.

:func:`estimate` turns a budget into seconds from two timed quantities of the model at hand
(one gradient over the analysis set, and the loss of one point when points are evaluated in a
batch, as slices, paths and basin widths do) and a count of gradient and point evaluations per
stage (:func:`stage_costs`), calibrated on runs of the digits MLP and the MNIST-1D CNN. With
``--budget MINUTES`` :func:`choose_budget` takes the largest preset whose estimate fits.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

from .io.jsonable import Record

__all__ = [
    "Budget",
    "BUDGETS",
    "Timing",
    "RunShape",
    "stage_costs",
    "estimate",
    "choose_budget",
    "time_model",
    "parse_budget",
    "SKIPPABLE_STAGES",
]

HVP_IN_GRADIENTS = 3.0
"""One HVP in gradient units, as measured inside the analysis on CPU (an MLP and a 1-D CNN: 1 to 3.5;
the ~1.5 and ~2.5 of the HVP benchmarks are the kernels alone, without Lanczos bookkeeping)."""

SKIPPABLE_STAGES = ("density", "layers", "damage", "alignment", "qat", "slices", "paths")
"""Stages ``--skip`` may leave out (the FP eigenpairs, trace and PTQ points are always measured)."""


@dataclass(frozen=True)
class Budget(Record):
    """The work knobs of one analysis run (see the module docstring).

    Attributes
    ----------
    name : str
        ``"quick"``, ``"standard"`` or ``"thorough"``.
    max_samples : int
        Cap on the analysis and evaluation samples.
    top_k : int
        Hessian eigenpairs reported at each point.
    trace_matvecs : int
        Hutch++ matvecs of each Hessian trace.
    density_steps, density_probes : int
        Lanczos steps and probe vectors of each spectral density (SLQ).
    layer_matvecs : int
        Hutch++ matvecs of each layer's Hessian-block trace.
    max_layers : int or None
        The per-layer curvature stage covers the ``max_layers`` largest quantized tensors
        (``None``: all of them).
    grid_steps : int
        Points per axis of the 2D slices.
    qat_steps : int
        QAT steps per bit-width.
    floor_steps : int
        L-BFGS iterations of each valley-floor solve.
    rtn_matvecs : int
        Hutch++ matvecs of the expected round-to-nearest damage.
    null_draws : int
        Matched random-sign draws of the gradient-alignment null at each quantized point
        (docs/theory.md §7; at least 50 so the empirical p can reach 0.02).
    floor_null : bool
        Whether every null draw also re-solves the valley floor (the null of ``cosine_floor``):
        ``floor_steps`` gradients per draw, so only the thorough preset does it.
    qat_null_draws : int
        Matched null draws at each recorded QAT iterate (0: the along-QAT alignment has no null).
    """

    name: str
    max_samples: int
    top_k: int
    trace_matvecs: int
    density_steps: int
    density_probes: int
    layer_matvecs: int
    max_layers: Optional[int]
    grid_steps: int
    qat_steps: int
    floor_steps: int
    rtn_matvecs: int
    null_draws: int
    floor_null: bool
    qat_null_draws: int


BUDGETS: Mapping[str, Budget] = {
    "quick": Budget("quick", max_samples=256, top_k=3, trace_matvecs=30, density_steps=30, density_probes=1,
                    layer_matvecs=10, max_layers=8, grid_steps=11, qat_steps=100, floor_steps=30, rtn_matvecs=20,
                    null_draws=50, floor_null=False, qat_null_draws=0),
    "standard": Budget("standard", max_samples=1024, top_k=5, trace_matvecs=99, density_steps=60, density_probes=2,
                       layer_matvecs=30, max_layers=None, grid_steps=25, qat_steps=300, floor_steps=100, rtn_matvecs=60,
                       null_draws=50, floor_null=False, qat_null_draws=0),
    "thorough": Budget("thorough", max_samples=4096, top_k=10, trace_matvecs=300, density_steps=100, density_probes=4,
                       layer_matvecs=60, max_layers=None, grid_steps=41, qat_steps=1000, floor_steps=200, rtn_matvecs=120,
                       null_draws=100, floor_null=True, qat_null_draws=50),
}
"""The presets, cheapest first. ``standard`` reproduces the defaults of earlier versions exactly, except the
alignment null: 50 draws (it was 8) since the nulls give empirical p-values."""


def parse_budget(value: Union[str, float, int]) -> Union[str, float]:
    """A preset name, or a positive number of minutes (``"20"``, ``20``, ``"7.5"``).

    Raises
    ------
    ValueError
        Anything else, with the allowed values.
    """
    if isinstance(value, str) and value in BUDGETS:
        return value
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        minutes = float("nan")
    if isinstance(value, bool) or not math.isfinite(minutes) or minutes <= 0:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)} or a positive number of minutes, got {value!r}")
    return minutes


@dataclass(frozen=True)
class Timing(Record):
    """Measured cost of the model at hand, in seconds.

    Attributes
    ----------
    gradient : float
        One loss and gradient over the analysis set.
    forward : float
        The loss of one point over the analysis set when points are evaluated in a batch
        (:meth:`riverscape.Objective.losses`), per point.
    """

    gradient: float
    forward: float


@dataclass(frozen=True)
class RunShape:
    """What the cost depends on besides the budget.

    Attributes
    ----------
    n_bits : int
        Bit-widths analysed.
    n_layers : int
        Quantized tensors.
    n_ptq_methods : int
        PTQ methods measured per bit-width.
    hill_k : int
        Hill-subspace dimension (eigenpairs at ``theta_fp``).
    qat_batch_fraction : float
        QAT mini-batch size over the analysis-set size (1 for full-batch QAT).
    """

    n_bits: int
    n_layers: int
    n_ptq_methods: int = 1
    hill_k: int = 10
    qat_batch_fraction: float = 1.0


def _eig_matvecs(k: int) -> float:
    """ARPACK/Lanczos HVPs for ``k`` extreme eigenpairs: about 4k + 20 in our runs."""
    return 4.0 * k + 20.0


def stage_costs(budget: Budget, shape: RunShape, skip: tuple[str, ...] = ()) -> dict[str, tuple[float, float]]:
    """Work per stage as ``(gradients, point evaluations)`` over the analysis set (HVPs counted as gradients).

    Parameters
    ----------
    budget : Budget
    shape : RunShape
    skip : tuple of str
        Stages of :data:`SKIPPABLE_STAGES` left out (they cost nothing).

    Returns
    -------
    dict
        Stage name to ``(gradient equivalents, forward equivalents)``; stages repeated per
        bit-width are already multiplied by ``shape.n_bits``.
    """
    hvp = HVP_IN_GRADIENTS
    k = shape.hill_k
    density = 0.0 if "density" in skip else budget.density_steps * budget.density_probes
    layers = 0 if "layers" in skip else (shape.n_layers if budget.max_layers is None else min(shape.n_layers, budget.max_layers))
    bits = shape.n_bits
    costs = {
        "curvature_fp": (hvp * (_eig_matvecs(max(k, budget.top_k)) + budget.trace_matvecs + density), 0.0),
        "layer_curvature": (hvp * layers * (budget.layer_matvecs + _eig_matvecs(1)), 0.0),
        "basin_widths": (0.0, 2.0 * k * 50.0),
        "ptq": (0.0, bits * 2.0 * shape.n_ptq_methods),
        "curvature_quantized": (bits * hvp * (_eig_matvecs(budget.top_k) + budget.trace_matvecs + density), 0.0),
        "damage": (0.0, 0.0) if "damage" in skip else (bits * (6.0 * budget.floor_steps + hvp * budget.rtn_matvecs), bits * 20.0),
        "qat": (0.0, 0.0) if "qat" in skip else (bits * budget.qat_steps * 2.0 * shape.qat_batch_fraction
                                                  + bits * 20 * (1.0 + hvp + budget.qat_null_draws),
                                                  bits * (2.0 * budget.qat_steps + 25.0)),
        "alignment": (0.0, 0.0) if "alignment" in skip else (bits * (budget.null_draws * (1.0 + (3.0 * budget.floor_steps if budget.floor_null else 0.0))
                                                              + 3.0 * budget.floor_steps + 5.0), 0.0),
        # L(Q(.)) points re-calibrate the quantizer at every point (the MSE range search): about 2 evaluations each
        "slices": (0.0, 0.0) if "slices" in skip else (0.0, bits * 3.0 * budget.grid_steps**2),
        "paths": (0.0, 0.0) if "paths" in skip else (0.0, bits * 330.0),
    }
    return costs


def estimate(budget: Budget, shape: RunShape, timing: Timing, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Estimated seconds per stage (see :func:`stage_costs`) and their ``"total"``.

    >>> est = estimate(BUDGETS["quick"], RunShape(n_bits=1, n_layers=2), Timing(gradient=0.01, forward=0.004))
    >>> round(est["total"], 2) == round(sum(v for k, v in est.items() if k != "total"), 2)
    True
    """
    seconds = {name: g * timing.gradient + f * timing.forward for name, (g, f) in stage_costs(budget, shape, skip).items()}
    seconds["total"] = sum(seconds.values())
    return seconds


def choose_budget(minutes: float, shape: RunShape, timing: Timing, skip: tuple[str, ...] = ()) -> tuple[Budget, float, bool]:
    """The largest preset whose estimate fits in ``minutes``.

    Returns
    -------
    (Budget, float, bool)
        The preset, its estimated seconds, and whether it fits (``False``: even ``quick`` is
        estimated above ``minutes``; ``quick`` is returned so the caller can say so).
    """
    chosen, seconds = BUDGETS["quick"], estimate(BUDGETS["quick"], shape, timing, skip)["total"]
    fits = seconds <= 60.0 * minutes
    for budget in BUDGETS.values():
        total = estimate(budget, shape, timing, skip)["total"]
        if total <= 60.0 * minutes:
            chosen, seconds = budget, total
    return chosen, seconds, fits


def time_model(gradient: Callable[[], object], points: Callable[[], object], n_points: int, *, repeats: int = 2) -> Timing:
    """Time one gradient and a batched evaluation of ``n_points`` points (best of ``repeats`` after a warm-up call each)."""

    def best(call: Callable[[], object]) -> float:
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)

    return Timing(gradient=best(gradient), forward=best(points) / n_points)
