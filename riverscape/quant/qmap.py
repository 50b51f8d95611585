"""Weight-layout-aware quantization of a flat parameter vector, and PTQ.

A :class:`QuantMap` knows which slices of ``theta`` are weight tensors of Linear, Conv
and Embedding layers (quantized per output channel by default) and which are biases or
normalisation parameters (kept in full precision). Calling it maps ``theta -> Q(theta)``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import Tensor

from ..objective import Objective, ParamSpec
from .quantizers import QParams, UniformQuantizer

__all__ = ["QuantMap", "QuantTarget", "ptq", "QUANTIZABLE_MODULES"]

QUANTIZABLE_MODULES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "Bilinear", "LazyLinear")

LayerSelector = Union[None, str, Sequence[str], Callable[[ParamSpec], bool]]


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


class QuantMap:
    """The map ``theta -> Q(theta)`` for one Objective's parameter layout.

    Parameters
    ----------
    objective : Objective
        Supplies the layout of ``theta`` (names, shapes, owning module types).
    quantizer : UniformQuantizer
        Applied to every target tensor (scales chosen per tensor/channel).
    include : str, list of str, or callable, optional
        Quantize only these parameters (names, layer names or glob patterns, or a
        predicate on :class:`~riverscape.objective.ParamSpec`). Default: every weight of
        a Linear/Conv/Embedding layer.
    exclude : same as ``include``, optional
        Keep these in full precision.
    keep_first_last : bool
        Keep the first and the last quantizable weight in full precision (a common choice).
    quantize_bias : bool
        Also quantize biases of quantizable layers (per tensor).

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
        include: LayerSelector = None,
        exclude: LayerSelector = None,
        keep_first_last: bool = False,
        quantize_bias: bool = False,
    ) -> None:
        if not isinstance(quantizer, UniformQuantizer):
            raise TypeError(f"quantizer must be a UniformQuantizer, got {type(quantizer).__name__}")
        self.quantizer = quantizer
        self.dim = objective.dim
        self.layout = objective.layout
        candidates = [
            s
            for s in objective.layout
            if s.module_type in QUANTIZABLE_MODULES and (s.kind == "weight" or (quantize_bias and s.kind == "bias"))
        ]
        if include is not None:
            candidates = [s for s in objective.layout if _matches(s, include)]
        weights = [s for s in candidates if s.kind == "weight"]
        if keep_first_last and len(weights) >= 2:
            dropped = {weights[0].name, weights[-1].name}
            candidates = [s for s in candidates if s.name not in dropped]
        if exclude is not None:
            candidates = [s for s in candidates if not _matches(s, exclude)]
        if not candidates:
            raise ValueError("no parameter is selected for quantization (check include/exclude)")
        self.targets: tuple[QuantTarget, ...] = tuple(QuantTarget(s, quantizer.channel_axis) for s in candidates)
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
        return [self.quantizer.qparams(self.tensor(theta, t)) for t in self.targets]

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
                return self.map_targets(theta, lambda t, w, i: self.quantizer(w))
            return self.map_targets(theta, lambda t, w, i: self.quantizer.quantize_with(w, qparams[i]))

    def codes(self, theta: Tensor, qparams: Sequence[QParams] | None = None) -> Tensor:
        """Integer grid codes of all quantized coordinates, concatenated (for grid flips)."""
        out = []
        for i, t in enumerate(self.targets):
            w = self.tensor(theta, t)
            out.append(self.quantizer.codes(w, None if qparams is None else qparams[i]).reshape(-1))
        return torch.cat(out)

    def per_layer(self) -> list[tuple[str, slice]]:
        """``(name, slice)`` of each quantized tensor, for per-layer reports."""
        return [(t.name, t.spec.slice) for t in self.targets]


def ptq(
    objective: Objective,
    quantizer: Union[UniformQuantizer, QuantMap],
    theta: Tensor | None = None,
    **map_options,
) -> Tensor:
    """Post-training quantization by round-to-nearest: ``theta_q = Q(theta)``.

    Parameters
    ----------
    objective : Objective
    quantizer : UniformQuantizer or QuantMap
        A quantizer (wrapped in a :class:`QuantMap` with ``map_options``) or a ready map.
    theta : Tensor, optional
        Full-precision point; default ``objective.theta0``.
    **map_options
        ``include``, ``exclude``, ``keep_first_last``, ``quantize_bias`` for :class:`QuantMap`.

    Returns
    -------
    Tensor, shape (D,)
        The quantized point (weights of Linear/Conv/Embedding layers on their grids,
        biases and normalisation parameters unchanged unless configured).
    """
    qmap = quantizer if isinstance(quantizer, QuantMap) else QuantMap(objective, quantizer, **map_options)
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    return qmap(theta)
