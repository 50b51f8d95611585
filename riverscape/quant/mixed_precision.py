"""Mixed-precision bit allocation: per-layer sensitivities, an optimal plan under a bit budget, and its check.

For every quantized tensor ``l`` (a "layer") and candidate bit-width ``b`` the perturbation
``u_l(b) = Q_b(w_l) - w_l`` is scored by

* the second-order damage ``0.5 u_l^T H_ll u_l`` (``H_ll`` the layer's diagonal Hessian block,
  exact: one HVP of the zero-padded ``u_l``), and
* the HAWQ-V2 score ``tr(H_ll) / n_l * ||u_l||^2`` (Dong et al. 2020, arXiv 1911.03852;
  HAWQ-V1, Dong et al. 2019, arXiv 1905.03696, used the top eigenvalue instead),

and :func:`plan_bits` picks one bit-width per layer minimising the summed score subject to
the parameter-weighted average bit-width ``sum_l n_l b_l / sum_l n_l <= budget``: a
multiple-choice knapsack, solved exactly by dynamic programming. :func:`verify_plan` measures
the true loss of the plan against the HAWQ plan and random allocations (docs/ptq_search.md §4).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import reduce
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..linalg import BlockOperator, estimate_trace
from ..objective import Objective
from .qmap import QuantizerLike, QuantMap, resolve_quant_map

__all__ = [
    "LayerSensitivity",
    "Sensitivities",
    "BitPlan",
    "PlanVerification",
    "layer_sensitivities",
    "plan_bits",
    "verify_plan",
    "SENSITIVITY_KINDS",
]

SENSITIVITY_KINDS = ("second_order", "hawq")


@dataclass(frozen=True)
class LayerSensitivity:
    """Sensitivities of one quantized tensor to each candidate bit-width.

    Attributes
    ----------
    name : str
    size : int
        Number of weights ``n_l``.
    bits : tuple of int
        Candidate bit-widths (the order of the tuples below).
    second_order : tuple of float
        ``0.5 u^T H_ll u`` per bit-width.
    hawq : tuple of float
        ``tr(H_ll) / n_l * ||u||^2`` per bit-width.
    quant_error : tuple of float
        ``||u||^2`` per bit-width.
    trace, trace_stderr : float
        ``tr(H_ll)`` and its standard error (0 when exact).
    trace_method : str
        ``"exact"``, ``"hutchinson"`` or ``"hutch++"``.
    """

    name: str
    size: int
    bits: tuple[int, ...]
    second_order: tuple[float, ...]
    hawq: tuple[float, ...]
    quant_error: tuple[float, ...]
    trace: float
    trace_stderr: float
    trace_method: str

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class Sensitivities:
    """Output of :func:`layer_sensitivities`: one :class:`LayerSensitivity` per quantized tensor."""

    layers: tuple[LayerSensitivity, ...]
    bits: tuple[int, ...]
    quantizer: str

    def table(self, kind: str = "second_order") -> dict[str, dict[int, float]]:
        """``{layer: {bits: score}}`` of ``kind`` (``"second_order"`` or ``"hawq"``), the input of :func:`plan_bits`."""
        if kind not in SENSITIVITY_KINDS:
            raise ValueError(f"kind must be one of {SENSITIVITY_KINDS}, got {kind!r}")
        return {layer.name: dict(zip(layer.bits, getattr(layer, kind))) for layer in self.layers}

    @property
    def sizes(self) -> dict[str, int]:
        return {layer.name: layer.size for layer in self.layers}

    def to_dict(self) -> dict:
        return {"bits": list(self.bits), "quantizer": self.quantizer, "layers": [layer.to_dict() for layer in self.layers]}


def _bit_maps(objective: Objective, qmap: QuantMap, bits: Sequence[int]) -> dict[int, QuantMap]:
    """The map of each bit-width: ``qmap``'s quantizer and selection with only ``bits`` changed."""
    return {b: QuantMap(objective, dataclasses.replace(qmap.quantizer, bits=b), selection=qmap.selection) for b in bits}


def _check_bits(bits: Sequence[int]) -> tuple[int, ...]:
    bits = tuple(bits)
    if not bits or any(isinstance(b, bool) or not isinstance(b, int) for b in bits) or len(set(bits)) != len(bits):
        raise ValueError(f"bits must be a non-empty sequence of distinct integers, got {bits!r}")
    return tuple(sorted(bits))


def layer_sensitivities(
    objective: Objective,
    quantizer: QuantizerLike,
    theta: Optional[Tensor] = None,
    *,
    bits: Sequence[int] = (2, 3, 4, 8),
    trace_method: str = "hutch++",
    trace_matvecs: int = 100,
    seed: int = 0,
) -> Sensitivities:
    """Second-order and HAWQ-V2 sensitivity of every quantized tensor to each bit-width.

    ``u_l(b)`` is the RTN perturbation of layer ``l`` at ``b`` bits (its quantizer with only
    the bit-width changed, calibrated at ``theta``). The quadratic forms ``u^T H_ll u`` are
    exact (one HVP of the zero-padded ``u_l`` each, ``L * len(bits)`` HVPs in all); the traces
    ``tr(H_ll)`` are exact for layers with at most ``trace_matvecs`` weights (unit vectors)
    and estimated with ``trace_method`` otherwise (:func:`riverscape.linalg.estimate_trace`
    on the layer's block). docs/ptq_search.md §4.1.

    Parameters
    ----------
    objective : Objective
    quantizer : int, UniformQuantizer or QuantMap
        Which tensors are layers and how they are quantized (the bit-width is replaced).
    theta : Tensor, optional
        Full-precision point (default ``objective.theta0``).
    bits : sequence of int
        Candidate bit-widths.
    trace_method : {"hutch++", "hutchinson", "exact"}
    trace_matvecs : int
        Probe budget per layer trace.
    seed : int

    Returns
    -------
    Sensitivities
    """
    bits = _check_bits(bits)
    qmap = resolve_quant_map(objective, quantizer)
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    maps = _bit_maps(objective, qmap, bits)
    deltas = {b: m(theta) - theta for b, m in maps.items()}
    layers = qmap.per_layer()
    padded = torch.zeros(objective.dim, len(layers) * len(bits), dtype=theta.dtype, device=theta.device)
    for i, (_, sl) in enumerate(layers):
        for j, b in enumerate(bits):
            padded[sl, i * len(bits) + j] = deltas[b][sl]
    operator = objective.hessian(theta)
    products = operator.torch_matmat(padded)
    out = []
    for i, (name, sl) in enumerate(layers):
        trace = estimate_trace(BlockOperator(operator, sl), matvecs=trace_matvecs, method=trace_method, seed=seed + i)
        size = sl.stop - sl.start
        columns = range(i * len(bits), (i + 1) * len(bits))
        quadratic = tuple(0.5 * float(padded[sl, c] @ products[sl, c]) for c in columns)
        errors = tuple(float(deltas[b][sl] @ deltas[b][sl]) for b in bits)
        hawq = tuple(trace.value / size * e for e in errors)
        out.append(LayerSensitivity(name, size, bits, quadratic, hawq, errors, trace.value, trace.stderr, trace.method))
    return Sensitivities(tuple(out), bits, qmap.quantizer.describe())


@dataclass(frozen=True)
class BitPlan:
    """A bit-width per layer chosen by :func:`plan_bits`.

    Attributes
    ----------
    bits : dict of str to int
        Layer name to bit-width (input order).
    predicted_damage : float
        Sum of the chosen scores.
    average_bits : float
        ``sum_l n_l b_l / sum_l n_l`` (never above ``budget_bits``).
    budget_bits : float
    sizes : dict of str to int
    kind : str
        Which score was minimised (``"second_order"``, ``"hawq"`` or ``"custom"``).
    method : {"dp-exact", "dp-rounded"}
        ``"dp-exact"``: costs in units of their greatest common divisor, the optimum of the
        additive model. ``"dp-rounded"``: too many states, costs rounded up to a coarser unit
        (the budget is still met; optimal up to that rounding).
    """

    bits: dict[str, int]
    predicted_damage: float
    average_bits: float
    budget_bits: float
    sizes: dict[str, int]
    kind: str
    method: str

    def to_dict(self) -> dict:
        return {"bits": dict(self.bits), "predicted_damage": self.predicted_damage, "average_bits": self.average_bits,
                "budget_bits": self.budget_bits, "sizes": dict(self.sizes), "kind": self.kind, "method": self.method}


def _fits(cost: int, total: int, budget_bits: float) -> bool:
    """Whether ``cost`` bits over ``total`` weights meet the budget, exactly as ``average_bits <= budget_bits`` is checked."""
    return cost / total <= budget_bits


def _capacity_units(unit: int, total: int, budget_bits: float) -> int:
    """The largest ``W`` with ``W * unit`` bits within the budget (``budget * total`` is not exact in floats)."""
    width = int(math.floor(budget_bits * total / unit))
    while width >= 0 and not _fits(width * unit, total, budget_bits):
        width -= 1
    while _fits((width + 1) * unit, total, budget_bits):
        width += 1
    return width


def _plan(names: list[str], sizes: Mapping[str, int], options: list[list[tuple[int, float]]], budget_bits: float,
          kind: str, max_states: int) -> BitPlan:
    """Multiple-choice knapsack by dynamic programming over the discretised budget."""
    total = sum(sizes[n] for n in names)
    costs = [[sizes[n] * b for b, _ in opts] for n, opts in zip(names, options)]
    capacity = budget_bits * total
    unit = reduce(math.gcd, (c for row in costs for c in row))
    method = "dp-exact"
    if capacity / unit > max_states:
        unit, method = math.ceil(capacity / max_states), "dp-rounded"
    width = _capacity_units(unit, total, budget_bits)
    units = [[-(-c // unit) for c in row] for row in costs]  # ceil: a rounded plan never exceeds the budget
    if sum(min(row) for row in units) > width:
        cheapest = sum(sizes[n] * min(b for b, _ in opts) for n, opts in zip(names, options)) / total
        raise ValueError(f"budget_bits {budget_bits} is below the smallest achievable average bit-width {cheapest:.6g}")
    best = np.zeros(width + 1)  # best[w]: least damage of the layers so far with cost <= w
    choices = []
    for row_units, opts in zip(units, options):
        candidates = np.full((len(opts), width + 1), np.inf)
        for k, (c, (_, damage)) in enumerate(zip(row_units, opts)):
            if c <= width:
                candidates[k, c:] = best[: width + 1 - c] + damage
        choice = np.argmin(candidates, axis=0)
        best = candidates[choice, np.arange(width + 1)]
        choices.append(choice.astype(np.int16))
    picked, w = [], width
    for row_units, choice in zip(reversed(units), reversed(choices)):
        k = int(choice[w])
        picked.append(k)
        w -= row_units[k]
    picked.reverse()
    bits = {n: opts[k][0] for n, opts, k in zip(names, options, picked)}
    damage = float(sum(opts[k][1] for opts, k in zip(options, picked)))
    average = sum(sizes[n] * bits[n] for n in names) / total
    return BitPlan(bits, damage, average, float(budget_bits), {n: int(sizes[n]) for n in names}, kind, method)


def plan_bits(
    sensitivities: Union[Sensitivities, Mapping[str, Mapping[int, float]]],
    sizes: Optional[Mapping[str, int]] = None,
    budget_bits: float = 4.0,
    *,
    kind: str = "second_order",
    max_states: int = 1_000_000,
) -> BitPlan:
    """Bit-widths minimising the summed per-layer damage under an average bit budget.

    Minimise ``sum_l D_l(b_l)`` subject to ``sum_l n_l b_l <= budget_bits * sum_l n_l``, one
    ``b_l`` per layer from its candidates: a multiple-choice knapsack, solved by dynamic
    programming over the budget in units of the greatest common divisor of all costs
    ``n_l b``, which is exact (the optimum of the additive model) whenever the budget then
    has at most ``max_states`` units; otherwise costs are rounded up to a coarser unit, which
    still meets the budget (``method="dp-rounded"``). Time ``O(L * K * states)``.
    docs/ptq_search.md §4.2.

    Parameters
    ----------
    sensitivities : Sensitivities or mapping
        A :class:`Sensitivities` (its ``table(kind)`` and sizes are used) or
        ``{layer: {bits: damage}}``.
    sizes : mapping of str to int, optional
        Weights per layer; required with a mapping, taken from a Sensitivities otherwise.
    budget_bits : float
        Largest allowed parameter-weighted average bit-width.
    kind : {"second_order", "hawq"}
        The score of a :class:`Sensitivities` to minimise (ignored for a mapping).
    max_states : int
        Largest number of budget units of the exact table.

    Returns
    -------
    BitPlan

    Raises
    ------
    ValueError
        Missing sizes, non-positive sizes, non-finite damages, or a budget below the
        all-smallest allocation.

    Examples
    --------
    >>> plan = plan_bits({"a": {2: 5.0, 4: 1.0}, "b": {2: 0.5, 4: 0.1}}, {"a": 10, "b": 30}, 2.5)
    >>> plan.bits, plan.average_bits
    ({'a': 4, 'b': 2}, 2.5)
    """
    if isinstance(sensitivities, Sensitivities):
        table, sizes, kind = sensitivities.table(kind), dict(sensitivities.sizes if sizes is None else sizes), kind
    else:
        table, kind = {name: dict(row) for name, row in sensitivities.items()}, "custom"
        if sizes is None:
            raise ValueError("sizes are required when sensitivities is a mapping")
    names = list(table)
    if not names:
        raise ValueError("no layer to plan")
    missing = [n for n in names if n not in sizes]
    if missing:
        raise ValueError(f"no size for layers {missing}")
    if any(isinstance(sizes[n], bool) or not isinstance(sizes[n], (int, np.integer)) or sizes[n] < 1 for n in names):
        raise ValueError("sizes must be positive integers")
    options = []
    for name in names:
        row = sorted(table[name].items())
        if not row or not all(math.isfinite(float(v)) for _, v in row):
            raise ValueError(f"layer {name!r} needs at least one bit-width with a finite damage")
        options.append([(int(b), float(v)) for b, v in row])
    if not math.isfinite(budget_bits) or budget_bits <= 0:
        raise ValueError(f"budget_bits must be a positive number, got {budget_bits!r}")
    if max_states < 1:
        raise ValueError("max_states must be at least 1")
    return _plan(names, {n: int(sizes[n]) for n in names}, options, float(budget_bits), kind, max_states)


@dataclass(frozen=True)
class PlanVerification:
    """True losses of a plan, of the HAWQ plan at the same budget and of random allocations.

    Attributes
    ----------
    plan, hawq_plan : BitPlan
    loss_fp, loss_plan, loss_hawq : float
        Measured losses at ``theta`` and at the two mixed-precision RTN points.
    random_losses, random_average_bits : tuple of float
        Each random allocation's loss and average bit-width (all within the budget).
    """

    plan: BitPlan
    hawq_plan: BitPlan
    loss_fp: float
    loss_plan: float
    loss_hawq: float
    random_losses: tuple[float, ...]
    random_average_bits: tuple[float, ...]

    @property
    def random_mean(self) -> float:
        return float(np.mean(self.random_losses)) if self.random_losses else math.nan

    @property
    def random_std(self) -> float:
        return float(np.std(self.random_losses, ddof=1)) if len(self.random_losses) > 1 else math.nan

    def to_dict(self) -> dict:
        def finite(x: float) -> Optional[float]:
            return x if math.isfinite(x) else None

        return {
            "plan": self.plan.to_dict(), "hawq_plan": self.hawq_plan.to_dict(), "loss_fp": self.loss_fp,
            "loss_plan": self.loss_plan, "loss_hawq": self.loss_hawq, "random_losses": list(self.random_losses),
            "random_average_bits": list(self.random_average_bits), "random_mean": finite(self.random_mean),
            "random_std": finite(self.random_std),
            "random_min": min(self.random_losses) if self.random_losses else None,
            "random_max": max(self.random_losses) if self.random_losses else None,
        }


def _random_allocation(sizes: Mapping[str, int], bits: Sequence[int], budget: float, gen: np.random.Generator) -> dict[str, int]:
    """A random maximal allocation: from all-smallest, random affordable upgrades until none fits."""
    names = list(sizes)
    current = {n: bits[0] for n in names}
    total = sum(sizes.values())
    used = sum(sizes[n] * current[n] for n in names)
    while True:
        moves = [(n, b) for n in names for b in bits if b > current[n] and _fits(used + sizes[n] * (b - current[n]), total, budget)]
        if not moves:
            return current
        n, b = moves[int(gen.integers(len(moves)))]
        used += sizes[n] * (b - current[n])
        current[n] = b


def verify_plan(
    objective: Objective,
    plan: BitPlan,
    sensitivities: Sensitivities,
    quantizer: QuantizerLike,
    theta: Optional[Tensor] = None,
    *,
    n_random: int = 10,
    seed: int = 0,
) -> PlanVerification:
    """Measure a plan's true loss against the HAWQ plan and random allocations with the same budget.

    Each allocation is RTN per layer at its bit-width (the quantizer of ``quantizer`` with only
    the bit-width changed, calibrated at ``theta``). The HAWQ plan is
    ``plan_bits(sensitivities, budget_bits=plan.budget_bits, kind="hawq")``; a random
    allocation starts from the smallest candidate everywhere and applies uniformly chosen
    affordable upgrades (layer, larger bit-width) until none fits, so it is maximal under the
    budget (its average bit-width is reported). All points are evaluated in one batched
    ``objective.losses`` call. docs/ptq_search.md §4.3.

    Parameters
    ----------
    objective : Objective
    plan : BitPlan
    sensitivities : Sensitivities
        Candidate bit-widths and the HAWQ scores.
    quantizer : int, UniformQuantizer or QuantMap
        The same as given to :func:`layer_sensitivities`.
    theta : Tensor, optional
        Full-precision point (default ``objective.theta0``).
    n_random : int
        Number of random allocations.
    seed : int

    Returns
    -------
    PlanVerification
    """
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be an integer >= 0, got {n_random!r}")
    qmap = resolve_quant_map(objective, quantizer)
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    layers = dict(qmap.per_layer())
    if set(plan.bits) != set(layers):
        raise ValueError(f"the plan's layers {sorted(plan.bits)} are not the quantized tensors {sorted(layers)}")
    hawq = plan_bits(sensitivities, budget_bits=plan.budget_bits, kind="hawq")
    gen = np.random.default_rng(seed)
    randoms = [_random_allocation(sensitivities.sizes, sensitivities.bits, plan.budget_bits, gen) for _ in range(n_random)]
    allocations = [plan.bits, hawq.bits, *randoms]
    points = {b: m(theta) for b, m in _bit_maps(objective, qmap, sorted({b for a in allocations for b in a.values()})).items()}
    stacked = [theta]
    for allocation in allocations:
        point = theta.clone()
        for name, b in allocation.items():
            point[layers[name]] = points[b][layers[name]]
        stacked.append(point)
    losses = [float(v) for v in objective.losses(torch.stack(stacked))]
    total = sum(plan.sizes.values())
    averages = tuple(sum(plan.sizes[n] * b for n, b in a.items()) / total for a in randoms)
    return PlanVerification(plan, hawq, losses[0], losses[1], losses[2], tuple(losses[3:]), averages)
