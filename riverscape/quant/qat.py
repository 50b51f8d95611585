"""Quantization-aware training on flat weight vectors, with a choice of gradient estimator.

QAT minimises the deployed loss ``L(Q(theta))`` -- a piecewise-constant function of the
latent weights ``theta`` -- by gradient steps whose ``dQ/dtheta`` is an estimator's
surrogate (:mod:`riverscape.quant.estimators`). Everything runs on flat vectors through the
:class:`~riverscape.objective.Objective`; the user's model is never touched. Coordinates
that the :class:`~riverscape.quant.qmap.QuantMap` does not quantize (biases, norms) are
trained in full precision alongside.

Trajectory metrics follow docs/theory.md §3.8: the full-data quantized loss at evaluated steps,
grid flips at every step (Nagel et al. 2022, arXiv 2203.11086), the discretisation error
``||theta - Q(theta)||``, the best iterate and the first hitting time
``T_hit(tau) = min{t : L(Q(theta_t)) <= L(w_ref) + tau}``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import Tensor
from torch.func import grad_and_value
from tqdm.auto import tqdm

from ..batching import index_samples
from ..objective import Objective
from ..training import OPTIMIZERS, _record_set, build_optimizer
from .estimator_configs import ESTIMATOR_REGISTRY, LSQ_INITS, EstimatorConfig, QATContext, build_estimator, estimator_config
from .qmap import QuantizerLike, QuantMap, resolve_quant_map
from .quantizers import QParams, UniformQuantizer

__all__ = [
    "qat",
    "QATResult",
    "SCALE_MODES",
    "LSQ_INITS",
    "first_hitting_time",
    "count_grid_flips",
    "ewgs_deltas",
]

SCALE_MODES = ("frozen", "recomputed", "learned")

# keywords that qat() took before the estimator configs, and where they live now
_MOVED_KEYWORDS = {
    "lsq_init": "estimator=LSQ(init=...)",
    "ewgs_update_every": "estimator=EWGS(update_every=...)",
    "ewgs_matvecs": "estimator=EWGS(matvecs=...)",
    "pege_beta": "estimator=PEGE(beta=...)",
    "pege_lambda": "estimator=PEGE(penalty=...)",
}


@dataclass(frozen=True)
class QATResult:
    """Outcome of :func:`qat`.

    Attributes
    ----------
    theta : Tensor, shape (D,)
        Final latent weights.
    theta_q : Tensor, shape (D,)
        ``Q(theta)`` with the scales in use at the end (the deployed point).
    best_theta_q : Tensor, shape (D,)
        Quantized iterate with the lowest full-data loss among evaluated steps.
    best_step, best_loss : int, float
        Its step and loss ``L(Q(theta_t))``.
    last_loss : float
        ``L(Q(theta))`` at the final step.
    trajectory_steps : list of int
        Evaluated steps (step ``t`` = after ``t`` updates; 0 is the start).
    latent_trajectory, quantized_trajectory : Tensor, shape (n, D)
        ``theta_t`` and ``Q(theta_t)`` at the evaluated steps.
    history : dict of lists
        Per evaluated step: ``step``, ``loss`` (``L(Q(theta_t))`` on the full analysis set),
        ``metric`` (if the objective has one), ``grid_flips`` (codes changed since step
        ``t - 1``), ``discretization_error`` (``||theta_t - Q(theta_t)||``), for PEGE
        ``replaced_fraction`` (of the update that produced ``theta_t``), and with an
        ``eval_objective`` also ``eval_loss`` / ``eval_metric``.
    grid_flips : list of int, length steps + 1
        Flips at every step (entry 0 is 0).
    hit_step : int or None
        ``T_hit(tau)`` over the evaluated steps (``None`` if never reached).
    tau, reference_loss : float
        Tolerance and ``L(w_ref)`` (full precision) defining the hitting threshold.
    estimator, scale_mode, quantizer : str
        What was run (``estimator`` is the registry name); ``loss_kind`` names the minimised loss.
    scales : dict of str to Tensor
        Final scale of every quantized tensor (broadcastable against it).
    qparams : list of QParams
        Final quantization parameters per target (as used for ``theta_q``).
    ewgs_deltas : list of dict
        EWGS only: ``{"step": t, "delta": {layer: delta_weight_units}}`` at each update.
    wall_time : float
        Seconds spent in :func:`qat`.
    estimator_config : EstimatorConfig or None
        The estimator's full config (e.g. ``LSQ(init="calibrated")``).
    """

    theta: Tensor
    theta_q: Tensor
    best_theta_q: Tensor
    best_step: int
    best_loss: float
    last_loss: float
    trajectory_steps: list[int]
    latent_trajectory: Tensor
    quantized_trajectory: Tensor
    history: dict[str, list]
    grid_flips: list[int]
    hit_step: int | None
    tau: float
    reference_loss: float
    estimator: str
    scale_mode: str
    quantizer: str
    scales: dict[str, Tensor]
    qparams: list[QParams]
    ewgs_deltas: list[dict] = field(default_factory=list)
    wall_time: float = 0.0
    loss_kind: str = "L(Q(theta)): full-data loss at the quantized point, minimised over latent theta"
    estimator_config: EstimatorConfig | None = None

    def to_dict(self) -> dict:
        """JSON-friendly scalar parts and the history (no tensors)."""
        return {
            "estimator": self.estimator,
            "scale_mode": self.scale_mode,
            "quantizer": self.quantizer,
            "loss_kind": self.loss_kind,
            "best_step": self.best_step,
            "best_loss": self.best_loss,
            "last_loss": self.last_loss,
            "hit_step": self.hit_step,
            "tau": self.tau,
            "reference_loss": self.reference_loss,
            "trajectory_steps": list(self.trajectory_steps),
            "history": {k: list(v) for k, v in self.history.items()},
            "total_grid_flips": int(sum(self.grid_flips)),
            "ewgs_deltas": self.ewgs_deltas,
            "wall_time": self.wall_time,
        }


# ---------------------------------------------------------------------- small pure helpers
def first_hitting_time(steps: Sequence[int], losses: Sequence[float], threshold: float) -> int | None:
    """``min{t : loss_t <= threshold}`` over the given steps, ``None`` if never.

    >>> first_hitting_time([0, 10, 20, 30], [2.0, 0.6, 0.4, 0.3], 0.5)
    20
    """
    for step, value in sorted(zip(steps, losses)):
        if value <= threshold:
            return int(step)
    return None


def count_grid_flips(previous_codes: Tensor, codes: Tensor) -> int:
    """Number of quantized coordinates whose integer code changed (Nagel et al. 2022).

    >>> count_grid_flips(torch.tensor([-1, 0, 1, 1]), torch.tensor([-1, 1, 1, 0]))
    2
    """
    if previous_codes.shape != codes.shape:
        raise ValueError(f"code vectors differ in shape: {tuple(previous_codes.shape)} vs {tuple(codes.shape)}")
    return int((previous_codes != codes).sum())


def ewgs_deltas(objective: Objective, qmap: QuantMap, theta_q: Tensor, *, matvecs: int = 32, seed: int = 0) -> dict[str, float]:
    """EWGS scaling factor per quantized tensor, in weight units (Lee et al. 2021).

    ``delta_l = max(0, (Tr(H_ll) / N_l) / (3 std(g_l)))`` with ``H_ll`` the diagonal Hessian
    block of layer ``l`` and ``g_l`` its gradient, both with respect to the quantized weights
    at ``theta_q`` on the full analysis set; ``Tr(H_ll)`` by Hutchinson with ``matvecs``
    Rademacher probes (the EWGS code averages Hutchinson traces over 3 mini-batches).
    Multiply by the step ``s`` to get the factor in step units used by
    :func:`~riverscape.quant.estimators.ewgs`.

    Returns
    -------
    dict of str to float
        Layer name to ``delta`` (``>= 0``).
    """
    from ..linalg import BlockOperator, estimate_trace

    theta_q = objective.check_theta(theta_q)
    operator = objective.hessian(theta_q)
    gradient = objective.grad(theta_q)
    deltas = {}
    try:
        for i, target in enumerate(qmap.targets):
            block = BlockOperator(operator, target.spec.slice)
            trace = estimate_trace(block, matvecs=matvecs, method="hutchinson", seed=seed + i)
            spread = float(gradient[target.spec.slice].std())
            value = trace.value / target.spec.numel / (3.0 * spread) if spread > 0 else 0.0
            deltas[target.name] = max(0.0, value)
    finally:
        operator.release()
    return deltas


# ---------------------------------------------------------------------- internals
def _concat(parts: list):
    """Batches joined along the sample axis: tensors, tuples/lists of them, dicts of them, or ``None`` (no targets)."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {key: _concat([p[key] for p in parts]) for key in first}
    return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))


class _MiniBatches:
    """Seeded mini-batches without replacement (per epoch) from the objective's batches.

    Works for every batch form the Objective accepts (tensor pairs, tuples, HF-style dicts, no
    targets); the sample count is the leading size of the first tensor of a batch.
    """

    def __init__(self, objective: Objective, batch_size: int, generator: torch.Generator) -> None:
        if objective.streaming:
            raise ValueError("mini-batch QAT needs the analysis set in memory: build the Objective with stream=False, "
                             "or use batch_size=None (full-batch steps, which stream)")
        batches = objective.batches
        self.x = _concat([b[0] for b in batches])
        self.y = _concat([b[1] for b in batches])
        self.n = sum(objective.batch_sizes)
        self.size = min(batch_size, self.n)
        self.generator = generator
        self.order, self.cursor = torch.randperm(self.n, generator=generator), 0

    def next(self) -> tuple:
        if self.cursor + self.size > self.n:
            self.order, self.cursor = torch.randperm(self.n, generator=self.generator), 0
        index = self.order[self.cursor : self.cursor + self.size]
        self.cursor += self.size
        return index_samples(self.x, index), index_samples(self.y, index)


def _resolve_scale_mode(config: EstimatorConfig, scale: str | None, quantizer: UniformQuantizer) -> str:
    if scale is None:
        scale = "learned" if config.learns_scale else "frozen"
    if scale not in SCALE_MODES:
        raise ValueError(f"unknown scale mode {scale!r}; choose one of {SCALE_MODES}")
    if config.learns_scale and scale != "learned":
        raise ValueError(f"estimator={config.name!r} learns the step size: use scale='learned' (or None), got {scale!r}")
    if scale == "learned" and not config.learns_scale:
        learners = [name for name, entry in ESTIMATOR_REGISTRY.items() if entry.config_cls.learns_scale]
        raise ValueError(f"scale='learned' is a learnable step: use an estimator that learns it ({learners}), got {config.name!r}")
    config.check_quantizer(quantizer)
    return scale


def _validate(steps, lr, optimizer, batch_size, tau, record_every):
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be None (full analysis set) or at least 1, got {batch_size}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if record_every is not None and record_every < 1:
        raise ValueError(f"record_every must be at least 1, got {record_every}")


# ---------------------------------------------------------------------- QAT
def qat(
    objective: Objective,
    quantizer: QuantizerLike,
    *,
    estimator: Union[str, EstimatorConfig] = "ste",
    steps: int = 300,
    lr: float = 1e-2,
    optimizer: str = "adam",
    momentum: float = 0.9,
    batch_size: int | None = None,
    scale: str | None = None,
    theta0: Tensor | None = None,
    reference: Tensor | None = None,
    tau: float = 0.05,
    record_every: int | None = 10,
    record_steps: Sequence[int] | None = None,
    eval_objective: Objective | None = None,
    seed: int = 0,
    progress: bool = True,
    **map_options,
) -> QATResult:
    """Quantization-aware training: minimise ``L(Q(theta))`` over latent weights ``theta``.

    Each step evaluates ``objective.batch_loss(Q_est(theta), x, y)`` (or the full-data loss)
    where ``Q_est`` has the exact forward value ``Q(theta)`` and the estimator's backward,
    differentiates it with ``torch.func.grad_and_value`` and takes an Adam or SGD step on
    the latent weights (and, for LSQ, the step sizes). Unquantized coordinates train in
    full precision.

    Parameters
    ----------
    objective : Objective
        Loss and analysis set (e.g. the training split). Never modified.
    quantizer : int, UniformQuantizer or QuantMap
        A bit-width or quantizer (wrapped in a QuantMap with ``map_options``) or a ready map.
    estimator : str or EstimatorConfig
        Gradient estimator: a registered name (``"ste"``, ``"clipped_ste"``, ``"lsq"``,
        ``"ewgs"``, ``"pege"``; its default config) or a config with its options --
        :class:`~riverscape.quant.estimator_configs.STE`, ``ClippedSTE``, ``LSQ(init=...)``,
        ``EWGS(delta=..., update_every=..., matvecs=...)``, ``PEGE(beta=..., penalty=...)``
        (see :mod:`riverscape.quant.estimator_configs` and :mod:`riverscape.quant.estimators`).
    steps : int
        Number of updates.
    lr, optimizer, momentum
        ``optimizer`` is ``"adam"`` or ``"sgd"`` (heavy ball with ``momentum``). The default
        Adam lr 1e-2 suits weights of order 0.1-1 (the built-in digits MLP: 300 steps
        recover 2-bit accuracy); Adam moves each latent weight by about ``lr`` per step, so
        keep ``lr`` a small fraction of the grid step ``s`` for models with smaller weights.
    batch_size : int or None
        ``None``: every step uses the full analysis set (the objective's batches, exact
        average). Otherwise mini-batches sampled without replacement per epoch from the
        objective's batches with a generator seeded by ``seed``.
    scale : {"frozen", "recomputed", "learned"} or None
        ``frozen``: calibrated once at the start point; ``recomputed``: re-chosen by the
        quantizer's range method from the latent weights at every step (no gradient through
        it); ``learned``: LSQ's learnable step (only with ``estimator="lsq"``, which requires
        it). ``None`` picks ``learned`` for LSQ and ``frozen`` otherwise.
    theta0 : Tensor, shape (D,), optional
        Start of the latent weights (default ``objective.theta0``).
    reference : Tensor, shape (D,), optional
        ``w_ref`` of the hitting time (default: the start point).
    tau : float
        Hitting tolerance: ``T_hit = min{t : L(Q(theta_t)) <= L(w_ref) + tau}``.
    record_every : int or None
        Evaluate and store every this many steps (``None``: 20 records); 0 and ``steps``
        are always evaluated. ``T_hit`` and the best iterate are resolved on this grid
        (``record_every=1`` gives them exactly).
    record_steps : sequence of int, optional
        Evaluate exactly at these steps instead.
    eval_objective : Objective, optional
        Also record ``eval_loss`` / ``eval_metric`` of ``Q(theta_t)`` on it (e.g. the test split).
    seed : int
        Seeds mini-batches, PEGE masks and Hutchinson probes (private generators).
    progress : bool
        Show a tqdm progress bar.
    **map_options
        ``selection`` or ``include``, ``exclude``, ``keep_first_last``, ``quantize_bias`` for
        :class:`QuantMap`.

    Returns
    -------
    QATResult

    Examples
    --------
    >>> import torch, riverscape as rs
    >>> from riverscape.quant import UniformQuantizer
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> obj = rs.Objective(model, "cross_entropy", (x, y))
    >>> res = qat(obj, UniformQuantizer(2), steps=20, lr=1e-2, progress=False)
    >>> res.latent_trajectory.shape, res.trajectory_steps[-1]
    (torch.Size([3, 67]), 20)
    """
    started = time.perf_counter()
    moved = sorted(set(map_options) & set(_MOVED_KEYWORDS))
    if moved:
        raise TypeError(f"qat() no longer takes {moved}: pass " + ", ".join(_MOVED_KEYWORDS[k] for k in moved))
    config = estimator_config(estimator)
    _validate(steps, lr, optimizer, batch_size, tau, record_every)
    if objective.reduction is not None:
        raise ValueError("qat() on a data-parallel Objective would train every process on its own shard and the processes would "
                         "diverge: train on an Objective over all the training data (riverscape analyze does so in every process)")
    qmap = resolve_quant_map(objective, quantizer, **map_options)
    quant = qmap.quantizer
    scale_mode = _resolve_scale_mode(config, scale, quant)
    if eval_objective is not None and eval_objective.dim != objective.dim:
        raise ValueError(f"eval_objective has dimension {eval_objective.dim}, expected {objective.dim}")
    binary = quant.bits == 1

    theta = (objective.theta0 if theta0 is None else objective.check_theta(theta0)).detach().clone()
    w_ref = theta.clone() if reference is None else objective.check_theta(reference).detach().clone()
    reference_loss = objective.loss(w_ref)
    calibrated = qmap.qparams(theta)
    zero_points = [qp.zero_point for qp in calibrated]
    qmin, qmax = calibrated[0].qmin, calibrated[0].qmax

    generator = torch.Generator().manual_seed(seed)
    sampler = _MiniBatches(objective, batch_size, generator) if batch_size is not None else None
    # drawn for every estimator (only PEGE uses them) so the mini-batch stream does not depend on the estimator
    ranks = [torch.randperm(t.spec.numel, generator=generator).reshape(t.spec.shape).to(theta.device) for t in qmap.targets]
    handler = build_estimator(config, QATContext(objective, qmap, steps, seed, scale_mode, calibrated, ranks))
    fn = handler.function

    latent = theta.requires_grad_(True)
    scales = handler.initial_scales(theta.detach()) if scale_mode == "learned" else []
    opt = build_optimizer(optimizer, [latent, *scales], lr, momentum=momentum)

    def current_qparams(point: Tensor) -> list[QParams]:
        if scale_mode == "frozen":
            return calibrated
        if scale_mode == "recomputed":
            return qmap.qparams(point)
        return [QParams(s.detach().clone(), z, qmin, qmax) for s, z in zip(scales, zero_points)]

    def step_loss(point: Tensor, step_scales: tuple, qparams: list[QParams], batch) -> Tensor:
        def quantize(target, w, i):
            qp = QParams(step_scales[i], zero_points[i], qmin, qmax) if step_scales else qparams[i]
            return fn(w, qp, binary=binary, **handler.options(i))

        q = qmap.map_targets(point, quantize)
        value = objective.loss_tensor(q) if batch is None else objective.batch_loss(q, *batch)
        extra = handler.penalty(point)
        if extra is not None:
            value = value + extra
        return value

    value_and_grads = grad_and_value(step_loss, argnums=(0, 1))
    record = _record_set(steps, record_every, record_steps)
    latents, quantized, recorded = [], [], []
    extras: dict[str, list] = {}
    flips: list[int] = []
    previous_codes = None
    bar = tqdm(total=steps, disable=not progress, desc=f"qat {config.name}", leave=False)
    for t in range(steps + 1):
        point = latent.detach()
        qparams = current_qparams(point)
        hard = qmap(point, qparams)
        codes = qmap.codes(point, qparams)
        flips.append(0 if previous_codes is None else count_grid_flips(previous_codes, codes))
        previous_codes = codes
        if t in record:
            latents.append(point.clone())
            quantized.append(hard)
            recorded.append(t)
            for key, entry in handler.record().items():
                extras.setdefault(key, []).append(entry)
        if t == steps:
            break
        handler.before_update(t, hard, qparams)
        batch = sampler.next() if sampler is not None else None
        (g_latent, g_scales), value = value_and_grads(point, tuple(s.detach() for s in scales), qparams, batch)
        if not torch.isfinite(value):
            raise FloatingPointError(f"QAT loss became {float(value)} at step {t}; lower the learning rate")
        latent.grad = g_latent
        for s, g in zip(scales, g_scales):
            s.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for s in scales:  # keep learned steps positive (projection)
                s.clamp_(min=1e-8 * float(s.abs().max()) + 1e-12)
        bar.update(1)
    bar.close()

    latent_traj = torch.stack(latents)
    quant_traj = torch.stack(quantized)
    losses, metrics = objective.evaluate(quant_traj)
    history: dict[str, list] = {"step": list(recorded), "loss": [float(v) for v in losses]}
    if metrics is not None:
        history["metric"] = [float(v) for v in metrics]
    history["grid_flips"] = [flips[t] for t in recorded]
    history["discretization_error"] = [float(v) for v in (latent_traj - quant_traj).norm(dim=1)]
    history.update(extras)
    if eval_objective is not None:
        eval_losses, eval_metrics = eval_objective.evaluate(quant_traj)
        history["eval_loss"] = [float(v) for v in eval_losses]
        if eval_metrics is not None:
            history["eval_metric"] = [float(v) for v in eval_metrics]
    best = int(torch.argmin(losses))
    final_qparams = current_qparams(latent.detach())
    return QATResult(
        theta=latent.detach().clone(),
        theta_q=quant_traj[-1].clone(),
        best_theta_q=quant_traj[best].clone(),
        best_step=recorded[best],
        best_loss=float(losses[best]),
        last_loss=float(losses[-1]),
        trajectory_steps=recorded,
        latent_trajectory=latent_traj,
        quantized_trajectory=quant_traj,
        history=history,
        grid_flips=flips,
        hit_step=first_hitting_time(recorded, history["loss"], reference_loss + tau),
        tau=tau,
        reference_loss=reference_loss,
        estimator=config.name,
        scale_mode=scale_mode,
        quantizer=quant.describe(),
        scales={tg.name: qp.scale.detach().clone() for tg, qp in zip(qmap.targets, final_qparams)},
        qparams=final_qparams,
        ewgs_deltas=handler.log,
        wall_time=time.perf_counter() - started,
        estimator_config=config,
    )
