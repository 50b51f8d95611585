"""QAT gradient estimators as frozen configs with handlers, in one registry.

Each estimator of :mod:`riverscape.quant.estimators` has a frozen config (its options,
validated in ``__post_init__``) and a handler class that carries its run-time behaviour inside
:func:`riverscape.quant.qat.qat`: the keyword options passed to the estimator function for each
quantized tensor, work done before every update (EWGS re-estimates ``delta``, PEGE grows its
replacement mask), an extra loss term (PEGE's penalty), extra history columns and, for LSQ, the
learnable step sizes. :data:`ESTIMATOR_REGISTRY` maps a name to ``(config class, builder)``;
``qat(..., estimator="lsq")`` uses ``LSQ()``, ``qat(..., estimator=LSQ(init="lsq"))`` a
configured one. A new estimator is one config class, one handler and one
:func:`register_estimator` call.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, ClassVar, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..objective import Objective
from .estimators import clipped_ste, ewgs, latent, lsq, lsq_grad_scale, lsq_initial_scale, matched_noise, pege, pege_mask, pege_rho
from .estimators import random_signs, ste, stochastic_rounding
from .qmap import QuantMap
from .quantizers import QParams, UniformQuantizer
from .registry import check_registration, resolve_config

__all__ = [
    "EstimatorConfig",
    "STE",
    "ClippedSTE",
    "LSQ",
    "EWGS",
    "PEGE",
    "MatchedNoise",
    "StochasticRounding",
    "Latent",
    "ARM_SEED_OFFSET",
    "LSQ_INITS",
    "QATContext",
    "EstimatorHandler",
    "EstimatorEntry",
    "ESTIMATOR_REGISTRY",
    "register_estimator",
    "estimator_config",
    "build_estimator",
]

LSQ_INITS = ("calibrated", "lsq")
#: the control arms' private generator is seeded with ``seed + ARM_SEED_OFFSET`` (not the mini-batch stream's seed)
ARM_SEED_OFFSET = 0x5EED_A4A5


# ---------------------------------------------------------------------- configs
@dataclass(frozen=True)
class EstimatorConfig:
    """Base class of the options of one QAT gradient estimator (a frozen dataclass).

    Subclasses set the class attributes ``name`` (the registry name) and, when the estimator
    learns the quantizer's step size, ``learns_scale = True``; they validate their fields in
    ``__post_init__`` (raising :class:`ValueError` with the allowed values).
    """

    name: ClassVar[str] = ""
    learns_scale: ClassVar[bool] = False

    def check_quantizer(self, quantizer: UniformQuantizer) -> None:
        """Raise :class:`ValueError` when the estimator cannot run with ``quantizer``.

        Default: any grid but ternary (the estimators round at half a step; TWN's dead zone
        ``0.7 mean|w|`` is not a rounding threshold), any granularity.
        """
        if quantizer.grid == "ternary":
            raise ValueError(f"estimator={self.name!r} does not support grid='ternary' (TWN's threshold is not a rounding "
                             "of w / s); use grid='symmetric' with bits=2 for the {-s, 0, s} grid")

    def to_dict(self) -> dict:
        """``{"name": name, **fields}``."""
        return {"name": self.name, **asdict(self)}


def _number(value, what: str, allowed: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{what} must be {allowed}, got {value!r}")


def _integer(value, what: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class STE(EstimatorConfig):
    """Straight-through estimator: backward identity (Bengio, Leonard, Courville 2013, arXiv 1308.3432)."""

    name: ClassVar[str] = "ste"


@dataclass(frozen=True)
class ClippedSTE(EstimatorConfig):
    """Clipped STE: gradient passes only inside the grid range, ``1[q_min <= w/s + z <= q_max]``.

    The hardtanh derivative of BinaryConnect / BNN at 1 bit (Courbariaux et al. 2016,
    arXiv 1602.02830); see :func:`riverscape.quant.estimators.clipped_ste`.
    """

    name: ClassVar[str] = "clipped_ste"


@dataclass(frozen=True)
class LSQ(EstimatorConfig):
    """Learned step size quantization (Esser et al. 2020, arXiv 1902.08153).

    Trains the step sizes with the latent weights (``scale="learned"``, required) using the
    LSQ gradient with ``g = 1/sqrt(N_W Q_P)``; needs a symmetric quantizer (no zero point).

    Parameters
    ----------
    init : {"calibrated", "lsq"}
        Initial step: the quantizer's calibrated scale at the start point (default, so LSQ
        starts from the PTQ point) or LSQ's ``2 mean|w| / sqrt(Q_P)`` per channel.
    """

    name: ClassVar[str] = "lsq"
    learns_scale: ClassVar[bool] = True
    init: str = "calibrated"

    def __post_init__(self) -> None:
        if self.init not in LSQ_INITS:
            raise ValueError(f"LSQ init must be one of {LSQ_INITS}, got {self.init!r}")

    def check_quantizer(self, quantizer: UniformQuantizer) -> None:
        super().check_quantizer(quantizer)
        if not quantizer.symmetric:
            raise ValueError("estimator='lsq' needs a symmetric quantizer (LSQ's grid has no zero point)")
        if quantizer.group_size is not None:
            raise ValueError("estimator='lsq' learns one step per channel or tensor; it does not support "
                             f"group_size={quantizer.group_size} (use a per-channel quantizer, or STE with per-group scales)")


@dataclass(frozen=True)
class EWGS(EstimatorConfig):
    """Element-wise gradient scaling (Lee, Kim, Ham 2021, arXiv 2104.00903).

    Backward ``g * (1 + delta * sign(g) * (x_n - x_q))`` inside the grid range.

    Parameters
    ----------
    delta : float or None
        ``None`` (default): EWGS's Hessian-based factor, re-estimated per layer every
        ``update_every`` steps as ``max(0, (Tr(H_ll)/N_l) / (3 std(g_l)))`` at the quantized
        point (:func:`riverscape.quant.qat.ewgs_deltas`; Hutchinson with ``matvecs`` probes)
        and converted to step units with the current scale. A number ``>= 0``: a fixed factor
        in units of the grid step for every tensor (no Hessian work; ``0`` is the clipped STE).
    update_every : int
        Steps between re-estimates of ``delta`` (the EWGS paper does it once per epoch).
    matvecs : int
        Hutchinson probes per layer for ``delta`` (at least 3).
    """

    name: ClassVar[str] = "ewgs"
    delta: Optional[float] = None
    update_every: int = 50
    matvecs: int = 32

    def __post_init__(self) -> None:
        if self.delta is not None:
            _number(self.delta, "EWGS delta", "None (Hessian-based, re-estimated) or a finite number >= 0", lambda v: v >= 0)
        _integer(self.update_every, "EWGS update_every", 1)
        _integer(self.matvecs, "EWGS matvecs", 3)


@dataclass(frozen=True)
class PEGE(EstimatorConfig):
    """PEGE placeholder [P]: progressive element-wise replacement by quantized weights.

    arXiv 2509.00097 (Zhao 2025) is known from its abstract only; this implements the
    mechanism it describes, not the paper's exact method (see
    :func:`riverscape.quant.estimators.pege`). The update producing step ``t`` replaces a
    fraction ``rho(t / steps)`` of every quantized tensor (nested random masks), with the
    logarithmic curriculum ``rho(e) = log(1 + (beta - 1) e / E) / log(beta)``
    (:func:`~riverscape.quant.estimators.pege_rho`), and adds ``penalty * ||w - Q(w)||^2``.

    Parameters
    ----------
    beta : float
        Curriculum sharpness, ``> 1``.
    penalty : float
        ``lambda >= 0`` of the discretisation penalty.
    """

    name: ClassVar[str] = "pege"
    beta: float = 10.0
    penalty: float = 1e-4

    def __post_init__(self) -> None:
        _number(self.beta, "PEGE beta", "a finite number > 1", lambda v: v > 1)
        _number(self.penalty, "PEGE penalty", "a finite number >= 0", lambda v: v >= 0)


@dataclass(frozen=True)
class MatchedNoise(EstimatorConfig):
    """Control arm: gradient at ``w + |Q(w) - w| * eps`` with fresh random signs ``eps`` every step.

    The update goes to the latent weights as with the STE and ``Q(w_t)`` is deployed; only the
    point where the gradient is taken differs (:func:`riverscape.quant.estimators.matched_noise`).
    Signs come from a private generator seeded by ``qat(..., seed=)``.
    """

    name: ClassVar[str] = "matched_noise"


@dataclass(frozen=True)
class StochasticRounding(EstimatorConfig):
    """Control arm: gradient at ``SR(w)``, stochastic rounding onto the same grid, fresh draws every step.

    Unbiased inside the range (:func:`riverscape.quant.estimators.stochastic_rounding`); the
    update goes to the latent weights and ``Q(w_t)`` (round to nearest) is deployed.
    """

    name: ClassVar[str] = "stochastic_rounding"


@dataclass(frozen=True)
class Latent(EstimatorConfig):
    """Control arm: gradient at the latent ``w`` (plain FP training), ``Q(w_t)`` deployed.

    With the same seed the latent trajectory is exactly that of FP training with the same
    optimiser and batches (:func:`riverscape.quant.estimators.latent`).
    """

    name: ClassVar[str] = "latent"


# ---------------------------------------------------------------------- handlers
@dataclass(frozen=True)
class QATContext:
    """What an estimator handler sees of a :func:`~riverscape.quant.qat.qat` run.

    Attributes
    ----------
    objective : Objective
        The training objective (full analysis set).
    qmap : QuantMap
        The map being trained.
    steps, seed : int
        Number of updates and the run's seed.
    scale_mode : {"frozen", "recomputed", "learned"}
    calibrated : list of QParams
        Quantization parameters chosen at the start point (``qmap.targets`` order).
    ranks : list of Tensor
        A random permutation of ``0..numel-1`` per target, shaped like it (drawn by ``qat``
        for every estimator so that the mini-batch stream does not depend on the estimator).
    """

    objective: Objective
    qmap: QuantMap
    steps: int
    seed: int
    scale_mode: str
    calibrated: list
    ranks: list


class EstimatorHandler:
    """Run-time behaviour of one estimator inside ``qat`` (this base: none beyond the function).

    Subclasses set ``function`` (``fn(w, qparams, *, binary, **options) -> w_hat``) and
    override the hooks they need. ``qat`` calls, per update ``t``: :meth:`before_update`, then
    the loss with ``function(w, qp, binary=..., **options(i))`` per target plus
    :meth:`penalty`; at each evaluated step it stores :meth:`record`.
    """

    function: ClassVar[Callable[..., Tensor]] = staticmethod(ste)

    def __init__(self, config: EstimatorConfig, context: QATContext) -> None:
        self.config = config
        self.context = context

    def initial_scales(self, theta: Tensor) -> list[Tensor]:
        """Learnable step sizes (leaf tensors) at the start point; only for ``learns_scale`` configs."""
        raise NotImplementedError(f"estimator {self.config.name!r} does not learn the step size")

    def before_update(self, step: int, hard: Tensor, qparams: list[QParams]) -> None:
        """Prepare update ``step`` from the quantized point ``hard = Q(theta_step)`` and the qparams in use."""

    def options(self, index: int) -> dict:
        """Keyword options of :attr:`function` for target ``index``."""
        return {}

    def penalty(self, point: Tensor) -> Optional[Tensor]:
        """Extra loss term at the latent point (differentiable under ``torch.func``), or ``None``."""
        return None

    def record(self) -> dict[str, float]:
        """Values stored in the history at each evaluated step (keys are history columns)."""
        return {}

    @property
    def log(self) -> list[dict]:
        """Per-update log kept in ``QATResult.ewgs_deltas`` (EWGS's ``delta`` estimates)."""
        return []


class _STEHandler(EstimatorHandler):
    function = staticmethod(ste)


class _ClippedSTEHandler(EstimatorHandler):
    function = staticmethod(clipped_ste)


class _LSQHandler(EstimatorHandler):
    function = staticmethod(lsq)

    def __init__(self, config: LSQ, context: QATContext) -> None:
        super().__init__(config, context)
        qmax = context.calibrated[0].qmax
        self.grad_scales = [
            lsq_grad_scale(t.spec.numel // context.calibrated[i].scale.numel(), qmax) for i, t in enumerate(context.qmap.targets)
        ]

    def initial_scales(self, theta: Tensor) -> list[Tensor]:
        qmap, calibrated = self.context.qmap, self.context.calibrated
        scales = []
        for i, target in enumerate(qmap.targets):
            if self.config.init == "lsq":
                s = lsq_initial_scale(qmap.tensor(theta, target), calibrated[i])
            else:
                s = calibrated[i].scale
            scales.append(s.detach().clone().requires_grad_(True))
        return scales

    def options(self, index: int) -> dict:
        return {"grad_scale": self.grad_scales[index]}


class _EWGSHandler(EstimatorHandler):
    function = staticmethod(ewgs)

    def __init__(self, config: EWGS, context: QATContext) -> None:
        super().__init__(config, context)
        self._log: list[dict] = []
        self.delta: list = [config.delta] * len(context.qmap.targets)

    def before_update(self, step: int, hard: Tensor, qparams: list[QParams]) -> None:
        if self.config.delta is not None:
            return
        targets = self.context.qmap.targets
        if step % self.config.update_every == 0:
            from .qat import ewgs_deltas  # qat imports this module at load time

            ctx = self.context
            layer_deltas = ewgs_deltas(ctx.objective, ctx.qmap, hard, matvecs=self.config.matvecs, seed=ctx.seed + 7919 * step)
            self._log.append({"step": step, "delta": layer_deltas})
            self.delta = [layer_deltas[tg.name] * qp.scale for tg, qp in zip(targets, qparams)]
        elif self.context.scale_mode == "recomputed":
            last = self._log[-1]["delta"]
            self.delta = [last[tg.name] * qp.scale for tg, qp in zip(targets, qparams)]

    def options(self, index: int) -> dict:
        return {"delta": self.delta[index]}

    @property
    def log(self) -> list[dict]:
        return self._log


class _PEGEHandler(EstimatorHandler):
    function = staticmethod(pege)

    def __init__(self, config: PEGE, context: QATContext) -> None:
        super().__init__(config, context)
        self.fraction = 0.0
        self.masks: list[Tensor] = []
        self.hard: Optional[Tensor] = None

    def before_update(self, step: int, hard: Tensor, qparams: list[QParams]) -> None:
        self.hard = hard
        rho = pege_rho(step + 1, self.context.steps, self.config.beta)
        self.masks = [pege_mask(r, rho) for r in self.context.ranks]
        self.fraction = sum(int(m.sum()) for m in self.masks) / self.context.qmap.n_quantized

    def options(self, index: int) -> dict:
        return {"mask": self.masks[index]}

    def penalty(self, point: Tensor) -> Optional[Tensor]:
        if self.config.penalty > 0:
            return self.config.penalty * ((point - self.hard) ** 2).sum()
        return None

    def record(self) -> dict[str, float]:
        return {"replaced_fraction": self.fraction}


class _RandomPointHandler(EstimatorHandler):
    """Draws one random tensor per quantized target before every update from a private seeded generator."""

    option: ClassVar[str] = ""

    def __init__(self, config: EstimatorConfig, context: QATContext) -> None:
        super().__init__(config, context)
        self.generator = torch.Generator().manual_seed(context.seed + ARM_SEED_OFFSET)
        self.draws: list[Tensor] = []

    def draw(self, shape: torch.Size, like: Tensor) -> Tensor:
        """One random tensor of ``shape`` (dtype and device of ``like``)."""
        raise NotImplementedError

    def before_update(self, step: int, hard: Tensor, qparams: list[QParams]) -> None:
        self.draws = [self.draw(t.spec.shape, hard) for t in self.context.qmap.targets]

    def options(self, index: int) -> dict:
        return {self.option: self.draws[index]}


class _MatchedNoiseHandler(_RandomPointHandler):
    function = staticmethod(matched_noise)
    option = "signs"

    def draw(self, shape: torch.Size, like: Tensor) -> Tensor:
        return random_signs(shape, self.generator, dtype=like.dtype, device=like.device)


class _StochasticRoundingHandler(_RandomPointHandler):
    function = staticmethod(stochastic_rounding)
    option = "uniforms"

    def draw(self, shape: torch.Size, like: Tensor) -> Tensor:
        return torch.rand(tuple(shape), generator=self.generator, dtype=like.dtype).to(like.device)


class _LatentHandler(EstimatorHandler):
    function = staticmethod(latent)


# ---------------------------------------------------------------------- registry
EstimatorBuilder = Callable[[EstimatorConfig, QATContext], EstimatorHandler]


class EstimatorEntry(NamedTuple):
    """One registered estimator: its config class and the builder of its handler."""

    config_cls: type
    builder: EstimatorBuilder


ESTIMATOR_REGISTRY: dict[str, EstimatorEntry] = {}
"""Registered QAT estimators: name -> :class:`EstimatorEntry` ``(config_cls, builder)``."""


def register_estimator(name: str, config_cls: type, builder: EstimatorBuilder) -> None:
    """Register a QAT estimator under ``name`` (re-registering replaces it).

    Parameters
    ----------
    name : str
        Must equal ``config_cls.name``.
    config_cls : type
        A frozen dataclass subclass of :class:`EstimatorConfig` whose fields all have defaults.
    builder : callable
        ``builder(config, context) -> EstimatorHandler`` (a handler class works).
    """
    check_registration("estimator", EstimatorConfig, "name", name, config_cls, builder)
    ESTIMATOR_REGISTRY[name] = EstimatorEntry(config_cls, builder)


def estimator_config(estimator: Union[str, EstimatorConfig]) -> EstimatorConfig:
    """The config of ``estimator``: a registered name (its default config) or a config instance (checked).

    Errors are those of :func:`riverscape.quant.registry.resolve_config` (``ValueError`` for an
    unregistered name or config class, ``TypeError`` for anything else).

    Examples
    --------
    >>> estimator_config("ewgs")
    EWGS(delta=None, update_every=50, matvecs=32)
    >>> estimator_config(PEGE(beta=4.0)).beta
    4.0
    """
    configs = {name: entry.config_cls for name, entry in ESTIMATOR_REGISTRY.items()}
    return resolve_config("estimator", EstimatorConfig, "name", configs, estimator)


def build_estimator(config: EstimatorConfig, context: QATContext) -> EstimatorHandler:
    """The handler of a (registered) config for one QAT run."""
    return ESTIMATOR_REGISTRY[estimator_config(config).name].builder(config, context)


register_estimator("ste", STE, _STEHandler)
register_estimator("clipped_ste", ClippedSTE, _ClippedSTEHandler)
register_estimator("lsq", LSQ, _LSQHandler)
register_estimator("ewgs", EWGS, _EWGSHandler)
register_estimator("pege", PEGE, _PEGEHandler)
register_estimator("matched_noise", MatchedNoise, _MatchedNoiseHandler)
register_estimator("stochastic_rounding", StochasticRounding, _StochasticRoundingHandler)
register_estimator("latent", Latent, _LatentHandler)
