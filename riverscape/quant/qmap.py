"""Weight-layout-aware quantization of a flat parameter vector.

A :class:`QuantMap` knows which slices of ``theta`` are weights (registered parameters of
registered layer types, see :mod:`riverscape.quant.layers`; quantized per output channel
along each layer type's own channel axis) and which are biases or normalisation parameters
(kept in full precision). Calling it maps ``theta -> Q(theta)``.

Which tensors are quantized is decided in one place, a :class:`LayerSelection`
(``include``, ``exclude``, ``keep_first_last``, ``quantize_bias``); :meth:`QuantMap.status`
lists every parameter with its status and, when kept, the reason.
"""
from __future__ import annotations

import fnmatch
import glob
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..objective import Objective, ParamSpec
from .layers import unsupported_weight_warning
from .quantizers import QParams, UniformQuantizer

__all__ = [
    "QuantMap",
    "QuantTarget",
    "LayerSelection",
    "WeightStatus",
    "KEPT_REASONS",
    "resolve_quant_map",
    "QuantizerLike",
    "QUANTIZABLE_MODULES",
]

# Names of the built-in registered layer types (informational; the registry in
# riverscape.quant.layers decides, matching classes with isinstance).
QUANTIZABLE_MODULES = (
    "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Embedding",
    "EmbeddingBag", "Bilinear", "LazyLinear", "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell",
    "MultiheadAttention", "Conv1D",
)

LayerSelector = Union[None, str, Sequence[str], Callable[[ParamSpec], bool]]
QuantizerLike = Union[int, UniformQuantizer, "QuantMap"]
"""What functions taking a quantizer accept: a bit-width, a :class:`UniformQuantizer` or a ready :class:`QuantMap`."""

NOT_A_WEIGHT = "not a weight"
EXCLUDED = "excluded"
NOT_INCLUDED = "not included"
FIRST_LAST = "first/last layer kept"
UNSUPPORTED = "unsupported layer type"
KEPT_REASONS = (NOT_A_WEIGHT, EXCLUDED, NOT_INCLUDED, FIRST_LAST, UNSUPPORTED)


@dataclass(frozen=True)
class QuantTarget:
    """One quantized tensor inside ``theta``: its spec and its output-channel axis."""

    spec: ParamSpec
    channel_axis: int = 0

    @property
    def name(self) -> str:
        return self.spec.name


def _matches(spec: ParamSpec, selector: LayerSelector) -> bool:
    if selector is None:
        return False
    if callable(selector):
        return bool(selector(spec))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    layer = spec.name.rsplit(".", 1)[0]
    return any(spec.name == p or layer == p or fnmatch.fnmatchcase(spec.name, p) for p in patterns)


def _layer(spec: ParamSpec) -> str:
    return spec.name.rsplit(".", 1)[0] if "." in spec.name else ""


def _normalise_selector(value: LayerSelector, what: str) -> LayerSelector:
    """``None``/callable unchanged; a pattern or list of patterns as a tuple (empty means ``None``)."""
    if value is None or callable(value):
        return value
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{what} patterns must be non-empty strings, got {item!r}")
    return items or None


@dataclass(frozen=True)
class LayerSelection:
    """Which parameters a :class:`QuantMap` quantizes: the one place where the choice is made.

    Parameters
    ----------
    include : str, sequence of str, or callable, optional
        Quantize only these parameters: names, layer names or ``fnmatch`` globs, or a
        predicate on :class:`~riverscape.objective.ParamSpec`. A named tensor is quantized
        even when it is not a weight of a registered layer type (its channel axis is then the
        quantizer's ``channel_axis``, 0 by default). Default (``None`` or empty): every
        weight of a registered layer type (:mod:`riverscape.quant.layers`).
    exclude : same as ``include``, optional
        Keep these in full precision.
    keep_first_last : bool
        Keep every selected tensor of the first and of the last layer (module) that owns a
        selected weight in full precision (a common choice).
    quantize_bias : bool
        Also quantize biases of registered layer types (per tensor).

    Examples
    --------
    >>> LayerSelection(include="fc*", keep_first_last=True).include
    ('fc*',)
    """

    include: LayerSelector = None
    exclude: LayerSelector = None
    keep_first_last: bool = False
    quantize_bias: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _normalise_selector(self.include, "include"))
        object.__setattr__(self, "exclude", _normalise_selector(self.exclude, "exclude"))
        for name in ("keep_first_last", "quantize_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def exactly(cls, names: Iterable[str]) -> "LayerSelection":
        """The selection of exactly these parameter names (e.g. chosen earlier on a larger Objective)."""
        return cls(include=tuple(glob.escape(n) for n in names))

    def build(self, objective: Objective, quantizer: UniformQuantizer) -> "QuantMap":
        """``QuantMap(objective, quantizer, selection=self)``."""
        return QuantMap(objective, quantizer, selection=self)

    def select(self, layout: Sequence[ParamSpec]) -> tuple[list[ParamSpec], dict[str, str]]:
        """Split a layout into quantized specs (layout order) and ``{name: reason}`` of kept ones.

        Raises
        ------
        ValueError
            When nothing is selected.
        """
        default = self._default_reasons(layout)
        kept: dict[str, str] = {}
        chosen = []
        for spec in layout:
            if self.include is not None and not _matches(spec, self.include):
                kept[spec.name] = default[spec.name] or NOT_INCLUDED
            elif self.include is None and default[spec.name] is not None:
                kept[spec.name] = default[spec.name]
            else:
                chosen.append(spec)
        if self.keep_first_last:
            edges = self._first_last_layers(chosen)
            kept.update({s.name: FIRST_LAST for s in chosen if _layer(s) in edges})
            chosen = [s for s in chosen if _layer(s) not in edges]
        if self.exclude is not None:
            kept.update({s.name: EXCLUDED for s in chosen if _matches(s, self.exclude)})
            chosen = [s for s in chosen if not _matches(s, self.exclude)]
        if not chosen:
            raise ValueError("no parameter is selected for quantization (check include/exclude)")
        return chosen, kept

    def _default_reasons(self, layout: Sequence[ParamSpec]) -> dict[str, Optional[str]]:
        """``None`` for tensors quantized by default, else why they are kept."""
        registered = {_layer(s) for s in layout if s.quantizable}
        reasons: dict[str, Optional[str]] = {}
        for s in layout:
            if s.quantizable or (self.quantize_bias and s.role == "bias" and _layer(s) in registered):
                reasons[s.name] = None
            else:
                reasons[s.name] = UNSUPPORTED if s.role == "unsupported" else NOT_A_WEIGHT
        return reasons

    @staticmethod
    def _first_last_layers(chosen: Sequence[ParamSpec]) -> set[str]:
        layers = list(dict.fromkeys(_layer(s) for s in chosen if s.quantizable or len(s.shape) >= 2))
        return {layers[0], layers[-1]} if len(layers) >= 2 else set()

    def to_dict(self) -> dict:
        """JSON-friendly form (a callable selector is shown by its name)."""
        def show(value: LayerSelector):
            return getattr(value, "__name__", repr(value)) if callable(value) else (None if value is None else list(value))

        return {"include": show(self.include), "exclude": show(self.exclude), "keep_first_last": self.keep_first_last,
                "quantize_bias": self.quantize_bias}


@dataclass(frozen=True)
class WeightStatus:
    """One parameter of the model and what the quantizer does with it.

    Attributes
    ----------
    name, shape, numel, module_type
        The parameter and the class name of the module owning it.
    status : {"quantized", "kept"}
    reason : str or None
        Why a kept tensor stays in full precision (one of :data:`KEPT_REASONS`).
    bits : int or None
        Bit-width of a quantized tensor.
    granularity : {"per-channel", "per-group", "per-tensor"} or None
    channel_axis : int or None
        Axis of the per-channel (per-group) scales (``None`` per tensor).
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    module_type: str
    status: str
    reason: Optional[str] = None
    bits: Optional[int] = None
    granularity: Optional[str] = None
    channel_axis: Optional[int] = None

    @property
    def quantized(self) -> bool:
        return self.status == "quantized"

    def to_dict(self) -> dict:
        """JSON-friendly copy (shape as a list)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


def _target_axis(spec: ParamSpec, quantizer: UniformQuantizer) -> int:
    """The spec's registered channel axis (else the quantizer's), normalised to ``0..ndim-1``."""
    axis = spec.channel_axis if spec.channel_axis is not None else quantizer.channel_axis
    ndim = len(spec.shape)
    if ndim < 2:
        return 0
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for {spec.name} of shape {spec.shape}")
    return axis % ndim


class QuantMap:
    """The map ``theta -> Q(theta)`` for one Objective's parameter layout.

    Parameters
    ----------
    objective : Objective
        Supplies the layout of ``theta`` (names, shapes, channel axes of registered weights).
    quantizer : UniformQuantizer
        Applied to every target tensor, with per-channel scales along that target's own
        channel axis (the quantizer's ``channel_axis`` only for tensors of unregistered types).
    selection : LayerSelection, optional
        Which tensors are quantized. Give either ``selection`` or the keywords below (the
        same fields), not both.
    include, exclude, keep_first_last, quantize_bias
        See :class:`LayerSelection`.

    Examples
    --------
    >>> import torch
    >>> from riverscape import Objective
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    >>> obj = Objective(model, "cross_entropy", (torch.randn(5, 4), torch.randint(0, 2, (5,))))
    >>> qmap = QuantMap(obj, UniformQuantizer(2))
    >>> [t.name for t in qmap.targets]
    ['0.weight', '1.weight']
    """

    def __init__(
        self,
        objective: Objective,
        quantizer: UniformQuantizer,
        *,
        selection: LayerSelection | None = None,
        include: LayerSelector = None,
        exclude: LayerSelector = None,
        keep_first_last: bool = False,
        quantize_bias: bool = False,
    ) -> None:
        if not isinstance(quantizer, UniformQuantizer):
            raise TypeError(f"quantizer must be a UniformQuantizer, got {type(quantizer).__name__}")
        keywords = LayerSelection(include, exclude, keep_first_last, quantize_bias)
        if selection is None:
            selection = keywords
        elif not isinstance(selection, LayerSelection):
            raise TypeError(f"selection must be a LayerSelection, got {type(selection).__name__}")
        elif keywords != LayerSelection():
            raise ValueError("give either selection= or include/exclude/keep_first_last/quantize_bias, not both")
        self.quantizer = quantizer
        self.selection = selection
        self.dim = objective.dim
        self.layout = objective.layout
        chosen, self._kept = selection.select(objective.layout)
        self.targets: tuple[QuantTarget, ...] = tuple(QuantTarget(s, _target_axis(s, quantizer)) for s in chosen)
        self._quantizers = tuple(
            quantizer if t.channel_axis == quantizer.channel_axis else replace(quantizer, channel_axis=t.channel_axis)
            for t in self.targets
        )
        mask = torch.zeros(objective.dim, dtype=torch.bool)
        for t in self.targets:
            mask[t.spec.slice] = True
        self._mask = mask

    @property
    def mask(self) -> Tensor:
        """Boolean vector, ``True`` on the quantized coordinates of ``theta``."""
        return self._mask

    @property
    def n_quantized(self) -> int:
        return int(self._mask.sum())

    def tensor(self, theta: Tensor, target: QuantTarget) -> Tensor:
        """The target's slice of ``theta`` as a tensor of its own shape (a view)."""
        return theta[target.spec.slice].view(target.spec.shape)

    def qparams(self, theta: Tensor) -> list[QParams]:
        """Scale and zero point of every target at ``theta`` (one entry per target)."""
        return [q.qparams(self.tensor(theta, t)) for q, t in zip(self._quantizers, self.targets)]

    def map_targets(self, theta: Tensor, fn: Callable[[QuantTarget, Tensor, int], Tensor]) -> Tensor:
        """Apply ``fn(target, tensor, index)`` to every target tensor, other coordinates unchanged.

        Built from ``torch.cat`` so it is differentiable and works under ``torch.func``.
        """
        pieces, cursor = [], 0
        for i, t in enumerate(self.targets):
            start, stop = t.spec.offset, t.spec.offset + t.spec.numel
            if start > cursor:
                pieces.append(theta[cursor:start])
            pieces.append(fn(t, self.tensor(theta, t), i).reshape(-1))
            cursor = stop
        if cursor < theta.shape[0]:
            pieces.append(theta[cursor:])
        return torch.cat(pieces)

    def __call__(self, theta: Tensor, qparams: Sequence[QParams] | None = None) -> Tensor:
        """``Q(theta)``: targets fake-quantized, everything else copied.

        Parameters
        ----------
        theta : Tensor, shape (D,)
        qparams : list of QParams, optional
            Frozen parameters (e.g. calibrated at the FP point); default: chosen at ``theta``.
        """
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {tuple(theta.shape)}")
        with torch.no_grad():
            if qparams is None:
                return self.map_targets(theta, lambda t, w, i: self._quantizers[i](w))
            return self.map_targets(theta, lambda t, w, i: self._quantizers[i].quantize_with(w, qparams[i]))

    def codes(self, theta: Tensor, qparams: Sequence[QParams] | None = None) -> Tensor:
        """Integer grid codes of all quantized coordinates, concatenated (for grid flips)."""
        out = []
        for i, t in enumerate(self.targets):
            w = self.tensor(theta, t)
            out.append(self._quantizers[i].codes(w, None if qparams is None else qparams[i]).reshape(-1))
        return torch.cat(out)

    def per_layer(self) -> list[tuple[str, slice]]:
        """``(name, slice)`` of each quantized tensor, for per-layer reports."""
        return [(t.name, t.spec.slice) for t in self.targets]

    def quantizer_for(self, index: int) -> UniformQuantizer:
        """The quantizer of target ``index`` (the map's quantizer with that target's channel axis)."""
        return self._quantizers[index]

    def status(self) -> list[WeightStatus]:
        """Every parameter of the Objective's layout with its status (layout order).

        Quantized tensors carry bits, granularity and channel axis; kept ones the reason
        (one of :data:`KEPT_REASONS`). Build the map on an Objective of all parameters to
        list the whole model.
        """
        by_name = {t.name: t for t in self.targets}
        return [self._status_row(spec, by_name.get(spec.name)) for spec in self.layout]

    def _status_row(self, spec: ParamSpec, target: QuantTarget | None) -> WeightStatus:
        base = (spec.name, spec.shape, spec.numel, spec.module_type)
        if target is None:
            return WeightStatus(*base, status="kept", reason=self._kept[spec.name])
        granularity = self.quantizer_for(self.targets.index(target)).granularity_of(spec.shape)
        return WeightStatus(
            *base,
            status="quantized",
            bits=self.quantizer.bits,
            granularity=granularity,
            channel_axis=None if granularity == "per-tensor" else target.channel_axis,
        )

    def unsupported(self) -> list[WeightStatus]:
        """Kept tensors that look like weights of an unsupported layer type (matrices of unregistered modules)."""
        return [row for row in self.status() if row.reason == UNSUPPORTED]

    def warnings(self) -> list[str]:
        """One message per :meth:`unsupported` tensor (no ``riverscape: warning:`` prefix)."""
        return [unsupported_weight_warning(row.name, row.shape, row.module_type) for row in self.unsupported()]


def resolve_quant_map(objective: Objective, quantizer: QuantizerLike, **map_options) -> QuantMap:
    """A :class:`QuantMap` for ``objective`` from a bit-width, a quantizer or a ready map.

    The one coercion used by every function of riverscape that takes a quantizer.

    Parameters
    ----------
    objective : Objective
    quantizer : int, UniformQuantizer or QuantMap
        A bit-width ``b >= 1`` (``UniformQuantizer(b)``: symmetric, per channel, min-max),
        a quantizer, or a map built for ``objective``'s layout (returned as is).
    **map_options
        ``selection`` or ``include``, ``exclude``, ``keep_first_last``, ``quantize_bias``;
        only with a bit-width or a UniformQuantizer.

    Raises
    ------
    ValueError
        Options given with a ready map, or a map built for another dimension.
    TypeError
        Neither an int, a UniformQuantizer nor a QuantMap.

    Examples
    --------
    >>> import torch
    >>> from riverscape import Objective
    >>> obj = Objective(torch.nn.Linear(4, 3), "cross_entropy", (torch.randn(5, 4), torch.randint(0, 3, (5,))))
    >>> resolve_quant_map(obj, 4).quantizer.bits
    4
    """
    if isinstance(quantizer, QuantMap):
        if map_options:
            raise ValueError(f"map options {sorted(map_options)} only apply to a UniformQuantizer, not to a QuantMap")
        if quantizer.dim != objective.dim:
            raise ValueError(f"the QuantMap was built for dim {quantizer.dim}, the objective has dim {objective.dim}")
        return quantizer
    if isinstance(quantizer, int) and not isinstance(quantizer, bool):
        quantizer = UniformQuantizer(quantizer)
    if isinstance(quantizer, UniformQuantizer):
        return QuantMap(objective, quantizer, **map_options)
    raise TypeError(f"quantizer must be a bit-width (int), a UniformQuantizer or a QuantMap, got {type(quantizer).__name__}")
