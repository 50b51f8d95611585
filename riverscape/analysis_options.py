"""Validated settings of one ``riverscape analyze`` run (the seam between CLI and analysis).

The command line only parses strings into an :class:`AnalyzeOptions`;
``riverscape.analysis.analyze(loaded, data, options, out_dir)`` reads nothing else.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Optional, Union

import torch

from .budget import BUDGETS, SKIPPABLE_STAGES, Budget, parse_budget
from .errors import InputError
from .limits import DEFAULT_MEMORY_LIMIT
from .precision import PRECISIONS
from .quant.estimators import ESTIMATORS as QAT_ESTIMATORS
from .quant.quantizers import MAX_BITS, RANGE_METHODS

__all__ = ["AnalyzeOptions", "QAT_ESTIMATORS", "RANGE_METHODS", "MAX_BITS", "MAX_TOP_K", "MIXED_PRECISION_BITS"]

MAX_TOP_K = 500
"""Largest ``top_k``: ARPACK keeps about ``2 k + 1`` basis vectors of the parameter count."""
MIXED_PRECISION_BITS = (2, 3, 4, 8)
"""Candidate bit-widths per layer of the mixed-precision plan (``bits_budget``)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _names(value: Iterable[str] | str | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    names = tuple(part.strip() for item in items for part in str(item).split(",") if part.strip())
    for name in names:
        if any(c.isspace() for c in name):
            raise InputError(f"{what} pattern {name!r} contains whitespace; give layer names or globs such as '0.weight' or 'fc*'")
    return names


def _ptq_methods(value: Iterable[str] | str) -> tuple[str, ...]:
    """Registered PTQ method names, comma lists split, duplicates dropped (first kept)."""
    from .quant.ptq import PTQ_CONFIGS

    methods: list[str] = []
    for name in _names(value, "ptq_methods"):
        selectable = [n for n, c in PTQ_CONFIGS.items() if c.selectable_by_name]
        if name == "external":
            raise InputError("the external PTQ point is given as a file: use --quantized-weights FILE")
        if name not in selectable:
            raise InputError(f"unknown PTQ method {name!r}; choose from {', '.join(selectable)}")
        if name not in methods:
            methods.append(name)
    if not methods:
        raise InputError("give at least one PTQ method, e.g. --ptq rtn")
    return tuple(methods)


@dataclass(frozen=True)
class AnalyzeOptions:
    """Everything ``riverscape analyze`` can be told, validated on construction.

    Attributes
    ----------
    bits : tuple of int
        Bit-widths to analyse, each 1..16; stored unique and sorted from high to low.
    range_method : {"minmax", "mse", "percentile"}
        How the quantizer picks its clipping range.
    per_channel, symmetric : bool
        Quantizer granularity (per output channel vs per tensor) and grid (restricted
        symmetric vs affine with zero point).
    include, exclude : tuple of str
        Parameter names, layer names or glob patterns selecting the quantized tensors (empty
        include = every weight of a registered layer type, see :mod:`riverscape.quant.layers`;
        a named tensor of an unregistered type is quantized too). Comma-separated strings are
        split.
    keep_first_last : bool
        Keep the first and last quantized layers in full precision.
    params : tuple of str
        Names or globs (``"transformer.h.3.*"``) narrowing the tensors ``include``/``exclude``/
        ``keep_first_last`` quantize on the whole model to those that match (empty: no
        narrowing). Curvature, slices, alignment and QAT are then taken on that block while
        everything else stays at full precision; unlike ``include`` it never widens the choice
        (biases and normalisation scales stay FP). Comma-separated strings are split.
    top_k : int or None
        Number of top Hessian eigenpairs (1 .. :data:`MAX_TOP_K`, and fewer than the
        number of quantized parameters, checked when the model is known). ``None``: the budget's.
    grid_steps : int or None
        Points per axis of the 1-D/2-D landscape slices (3..401). ``None``: the budget's.
    grid_span : float
        Extent of the slices around their centre, in units of the slice directions' norms
        (> 0).
    max_samples : int or None
        Evaluate losses/curvature on at most this many samples (0 = all; ``None``: the budget's).
    qat_steps : int or None
        Steps of quantization-aware training per bit-width (0 = skip QAT; ``None``: the budget's).
    qat_estimator : {"ste", "clipped_ste", "lsq", "ewgs", "pege"}
        Gradient estimator of the QAT run.
    qat_lr : float
        Adam learning rate of the QAT run (> 0; default 1e-2, which suits the small built-in
        models; large pretrained networks usually need 1e-4 to 1e-3).
    ptq_methods : tuple of str
        Registered PTQ methods (:data:`riverscape.quant.ptq.PTQ_METHODS`, e.g. ``("rtn", "gptq")``)
        measured at every bit-width; the first one gives the quantized point that the curvature,
        damage, alignment and slices are computed at, the others are compared with it in a table.
    seed : int
        Seed of every random choice (directions, probes, subsets), >= 0.
    device : str
        Torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    dtype : {"auto", "native", "float32", "float64"}
        Precision (:mod:`riverscape.precision`): ``"auto"`` runs half-precision weights in float32
        and others in their own dtype; ``"native"`` runs float16/bfloat16 models in their dtype
        with float32 accumulation; ``"float32"``/``"float64"`` run everything in that dtype.
    bn_recalibrate : bool
        Re-estimate the BatchNorm running statistics on the analysis data before analysing
        (:func:`riverscape.batchnorm.recalibrate_batchnorm`; the checkpoint is not changed).
        Without it the statistics are only checked, and a mismatch is reported in the notes.
    budget : str or float
        ``"quick"``, ``"standard"`` (default) or ``"thorough"`` (:data:`riverscape.budget.BUDGETS`),
        or a number of minutes: the run then times one gradient and one forward and takes the
        largest preset estimated to fit. Explicit ``top_k``, ``grid_steps``, ``max_samples`` and
        ``qat_steps`` win over the budget's.
    skip : tuple of str
        Stages to leave out (:data:`riverscape.budget.SKIPPABLE_STAGES`).
    bits_budget : float or None
        Plan one bit-width per quantized tensor from :data:`MIXED_PRECISION_BITS` minimising the
        summed second-order damage at ``theta_fp`` under this parameter-weighted average bit-width
        (:func:`riverscape.quant.mixed_precision.plan_bits`, docs/ptq_search.md §4), and measure
        the plan against the HAWQ plan and random allocations. ``None``: no plan. A number from
        ``min(MIXED_PRECISION_BITS)`` to ``max(MIXED_PRECISION_BITS)``.
    group_size : int or None
        Per-group scales of this many input weights (``W{b}g{G}``; docs/ptq_methods.md §1);
        ``None``: per channel (or per tensor).
    quantized_weights : str or None
        A state dict (``.pt``/``.safetensors``) of the same model's weights quantized elsewhere and
        dequantized: analysed as the PTQ point (method ``external``, docs/ptq_methods.md §6), with the
        ``ptq_methods`` compared against it. Needs exactly one bit-width (the one it was quantized to).
    chunk_size : int or None
        Points evaluated together in one batched (``vmap``) pass by the slices, loss paths and
        basin-width scan, and points built at once by the scan: memory for points and
        activations grows with it. ``None``: automatic (an activation budget, and for slices and
        paths a timed choice between one point and a batch). A positive integer.
    memory_limit : int or None
        Bytes the analysis data may occupy when materialised; a loader of batches over it is
        streamed instead (re-read on every evaluation, see :class:`riverscape.Objective`'s
        ``stream=None``). ``None``: no limit. The command line's ``--memory-limit GB``.
    resume : bool
        Cache every finished stage in the output's work folder and load the stages a previous,
        interrupted run with the same inputs finished (:mod:`riverscape.stage_cache`). Does
        not change any number.
    bn_reestimate : bool
        Re-estimate the BatchNorm running statistics at every PTQ point on the analysis data
        before its loss and the curvature there are measured (default; no effect without
        BatchNorm; docs/ptq_search.md §2). The metrics record ``ptq.bn_reestimation.samples`` and
        the stale-statistics numbers (``ptq.stale_bn``).
    act_bits : int or None
        Also fake-quantize the inputs of the quantized layers to this many bits (per tensor,
        min-max range calibrated on 128 analysis samples; ``W4A8``, docs/ptq_methods.md §7): the
        PTQ loss and accuracy are then of weights+activations (``ptq.loss_measured``), the
        weights-only ones under ``ptq.weights_only``. ``None``: weights only.
    json : bool
        Print the metrics as JSON on stdout (machine-readable output).
    """

    bits: tuple[int, ...] = (8, 4, 2)
    range_method: str = "mse"
    per_channel: bool = True
    symmetric: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = False
    top_k: Optional[int] = None
    grid_steps: Optional[int] = None
    grid_span: float = 1.0
    max_samples: Optional[int] = None
    qat_steps: Optional[int] = None
    qat_estimator: str = "ste"
    qat_lr: float = 1e-2
    ptq_methods: tuple[str, ...] = ("rtn",)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    bn_recalibrate: bool = False
    budget: Union[str, float] = "standard"
    skip: tuple[str, ...] = ()
    bits_budget: Optional[float] = None
    group_size: Optional[int] = None
    quantized_weights: Optional[str] = None
    params: tuple[str, ...] = ()
    chunk_size: Optional[int] = None
    memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT
    resume: bool = field(default=True, compare=False)
    bn_reestimate: bool = True
    act_bits: Optional[int] = None
    json: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        bits = (self.bits,) if _is_int(self.bits) else tuple(self.bits)
        if not bits:
            raise InputError("give at least one bit-width, e.g. --bits 4 2")
        for b in bits:
            if not _is_int(b) or not 1 <= b <= MAX_BITS:
                raise InputError(f"bits must be integers from 1 to {MAX_BITS}, got {b!r}")
        object.__setattr__(self, "bits", tuple(sorted(set(bits), reverse=True)))
        if self.range_method not in RANGE_METHODS:
            raise InputError(f"unknown range method {self.range_method!r}; choose one of {list(RANGE_METHODS)}")
        if self.qat_estimator not in QAT_ESTIMATORS:
            raise InputError(f"unknown QAT estimator {self.qat_estimator!r}; choose one of {list(QAT_ESTIMATORS)}")
        if isinstance(self.qat_lr, bool) or not isinstance(self.qat_lr, (int, float)) or not math.isfinite(self.qat_lr) or self.qat_lr <= 0:
            raise InputError(f"qat_lr must be a positive number, got {self.qat_lr!r}")
        object.__setattr__(self, "ptq_methods", _ptq_methods(self.ptq_methods))
        object.__setattr__(self, "include", _names(self.include, "include"))
        object.__setattr__(self, "exclude", _names(self.exclude, "exclude"))
        object.__setattr__(self, "params", _names(self.params, "params"))
        for name, low, high in (("top_k", 1, MAX_TOP_K), ("grid_steps", 3, 401), ("qat_steps", 0, None), ("seed", 0, None), ("max_samples", 0, None)):
            value = getattr(self, name)
            if value is None and name != "seed":
                continue  # taken from the budget by resolve()
            if not _is_int(value) or value < low or (high is not None and value > high):
                allowed = f"from {low} to {high}" if high is not None else f">= {low}"
                raise InputError(f"{name} must be an integer {allowed}, got {value!r}")
        try:
            object.__setattr__(self, "budget", parse_budget(self.budget))
        except ValueError as exc:
            raise InputError(str(exc)) from None
        skip = _names(self.skip, "skip")
        unknown = [stage for stage in skip if stage not in SKIPPABLE_STAGES]
        if unknown:
            raise InputError(f"cannot skip {', '.join(map(repr, unknown))}; stages that can be skipped: {', '.join(SKIPPABLE_STAGES)}")
        object.__setattr__(self, "skip", tuple(dict.fromkeys(skip)))
        span = self.grid_span
        if isinstance(span, bool) or not isinstance(span, (int, float)) or not math.isfinite(span) or span <= 0:
            raise InputError(f"grid_span must be a positive finite number, got {span!r}")
        object.__setattr__(self, "grid_span", float(span))
        self._check_bits_budget()
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise InputError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.quantized_weights is not None:
            if not isinstance(self.quantized_weights, str) or not self.quantized_weights:
                raise InputError(f"quantized_weights must be a file path, got {self.quantized_weights!r}")
            if len(self.bits) != 1:
                raise InputError("--quantized-weights analyses one quantized point: give the one bit-width it was quantized to, e.g. --bits 4")
        for name, what in (("chunk_size", "a positive integer (points per batched evaluation)"),
                           ("memory_limit", "a positive number of bytes, or None for no limit")):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise InputError(f"{name} must be {what}, got {value!r}")
        if self.act_bits is not None and (not _is_int(self.act_bits) or not 2 <= self.act_bits <= MAX_BITS):
            raise InputError(f"act_bits must be an integer from 2 to {MAX_BITS}, got {self.act_bits!r}")
        for name in ("per_channel", "symmetric", "keep_first_last", "bn_recalibrate", "bn_reestimate", "resume", "json"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_device()
        if self.dtype not in PRECISIONS:
            raise InputError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(PRECISIONS)}")

    def _check_bits_budget(self) -> None:
        budget = self.bits_budget
        if budget is None:
            return
        low, high = min(MIXED_PRECISION_BITS), max(MIXED_PRECISION_BITS)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or not low <= budget <= high:
            raise InputError(f"bits_budget must be a number from {low} to {high} (average bits per quantized weight, "
                             f"candidates {list(MIXED_PRECISION_BITS)}), got {budget!r}")
        object.__setattr__(self, "bits_budget", float(budget))

    def _check_device(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise InputError(f"unknown device {self.device!r}; use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
        if device.type == "meta":
            raise InputError("device 'meta' holds no values and cannot evaluate a loss; use e.g. 'cpu' or 'cuda'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {self.device!r} requested but CUDA is not available; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise InputError(f"device {self.device!r} requested but MPS is not available; use --device cpu")

    def resolve(self, budget: Budget) -> "AnalyzeOptions":
        """These options with every field left to the budget (``None``) taken from ``budget``.

        ``max_samples=0`` (all samples) and explicitly given values are kept; ``budget`` becomes
        the preset's name, and ``qat_steps`` is 0 when ``"qat"`` is skipped.
        """
        values = {name: getattr(budget, name) for name in ("top_k", "grid_steps", "max_samples", "qat_steps") if getattr(self, name) is None}
        if "qat" in self.skip:
            values["qat_steps"] = 0
        return replace(self, budget=budget.name, **values)

    @property
    def preset(self) -> Budget:
        """The :class:`~riverscape.budget.Budget` preset of resolved options (``budget`` must name one)."""
        if not isinstance(self.budget, str):
            raise ValueError(f"a budget of {self.budget} minutes is resolved to a preset when the run starts")
        return BUDGETS[self.budget]

    @property
    def sample_cap(self) -> Optional[int]:
        """``max_samples`` as :func:`riverscape.pipeline.cap_samples` takes it (``None`` = all samples)."""
        return self.max_samples or None

    def quantizer(self, bits: int):
        """The :class:`~riverscape.quant.UniformQuantizer` these options describe at ``bits``."""
        from .quant import UniformQuantizer

        return UniformQuantizer(bits, symmetric=self.symmetric, per_channel=self.per_channel, range=self.range_method,
                                group_size=self.group_size)

    def ptq_measure_options(self) -> dict:
        """Keywords of :func:`riverscape.pipeline.measure_ptq`: ``bn_reestimate`` and ``activations`` (``act_bits``)."""
        from .quant.ptq import ActivationQuantization

        activations = None if self.act_bits is None else ActivationQuantization(self.act_bits, seed=self.seed)
        return {"bn_reestimate": self.bn_reestimate, "activations": activations}

    def selection(self):
        """The :class:`~riverscape.quant.LayerSelection` of ``include``, ``exclude`` and ``keep_first_last``."""
        from .quant import LayerSelection

        return LayerSelection(include=self.include or None, exclude=self.exclude or None, keep_first_last=self.keep_first_last)

    def qmap_options(self) -> dict:
        """Keyword arguments of :class:`~riverscape.quant.QuantMap`: ``{"selection": self.selection()}``."""
        return {"selection": self.selection()}

    def to_dict(self) -> dict:
        """JSON-friendly copy (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
