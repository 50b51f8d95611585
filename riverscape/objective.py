"""The Objective: a model, a loss and data, seen as a function of a flat parameter vector.

Every other module of riverscape asks questions of points ``theta`` in weight space
through this one object. The user's ``nn.Module`` is never touched: the Objective keeps
a private copy in eval mode (buffers such as BatchNorm running statistics frozen) and
swaps parameters in with :func:`torch.func.functional_call`.

Shapes: ``dim`` is the number of selected parameters (D); a batch of points is ``(n, D)``;
a block of tangent vectors for :meth:`Objective.hvps` is ``(D, K)``.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap

from .batching import (
    LossFn,
    LossOnBatch,
    ResolvedLoss,
    accuracy,
    call_model,
    causal_lm,
    cross_entropy,
    model_args,
    move,
    mse,
    resolve_loss,
    resolve_objective_loss,
    split_batch,
    upcast,
)
from .io.reading import HALF_DTYPES
from .limits import DEFAULT_MEMORY_LIMIT
from .linalg.operators import HVP_MODES, CompiledHVP, HessianOperator
from .streaming import BatchRecord, collect_batches

__all__ = [
    "Objective",
    "ParamSpec",
    "LossOnBatch",
    "causal_lm",
    "cross_entropy",
    "mse",
    "resolve_loss",
    "HVP_MODES",
]

ParamSelector = Union[None, str, Sequence[str], Callable[[str, Tensor], bool]]
MetricFn = Callable[[Any, Tensor], Tensor]


class Reduction(Protocol):
    """How a data-parallel Objective combines the processes' shares (see :mod:`riverscape.distributed`)."""

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes (every process gets the sum)."""

    def agree(self, value: Any) -> Any:
        """Process 0's ``value`` on every process (a decision that must be shared)."""


class PointSplit(Protocol):
    """How a point-parallel Objective shares out points among processes (see :mod:`riverscape.distributed`).

    Every process holds all the data; point ``i`` of ``n`` is evaluated by process
    ``i % world_size`` and the results are gathered in order.
    """

    rank: int
    world_size: int

    def gather(self, tensor: Tensor, n: int) -> Tensor:
        """Rows ``rank, rank + W, ...`` of an ``(n, ...)`` result from every process: all ``n`` rows in order."""

    def gather_objects(self, values: list, n: int) -> list:
        """Entries ``rank, rank + W, ...`` of a length-``n`` list from every process: all ``n`` in order."""

    def agree(self, value: Any) -> Any:
        """Process 0's ``value`` on every process (a decision that must be shared)."""


@dataclass(frozen=True)
class ParamSpec:
    """Where one parameter tensor lives inside the flat vector ``theta``.

    Attributes
    ----------
    name : str
        Fully qualified parameter name (``"net.0.weight"``).
    shape : tuple of int
        The tensor's shape.
    offset : int
        Start index in ``theta``.
    numel : int
        Number of entries.
    module_type : str
        Class name of the module that owns the parameter (``"Linear"``, ``"Conv2d"``, ...).
    kind : str
        ``"weight"``, ``"bias"`` or the attribute name for other parameters.
    channel_axis : int or None
        Output-channel axis if the tensor is a weight of a registered layer type
        (:mod:`riverscape.quant.layers`), else ``None``.
    role : str
        ``"weight"``, ``"bias"``, ``"unsupported"`` (a matrix of an unregistered layer type)
        or ``"other"`` (norm scales/shifts, other 1-D tensors); see the weight rule in
        :mod:`riverscape.quant.layers`.
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    module_type: str
    kind: str
    channel_axis: int | None = None
    role: str = "other"

    @property
    def quantizable(self) -> bool:
        """Whether the tensor is a weight of a registered layer type (quantized by default)."""
        return self.channel_axis is not None

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


def _select_names(named: list[tuple[str, Tensor]], params: ParamSelector) -> list[str]:
    names = [n for n, _ in named]
    if params is None:
        return [n for n, p in named if p.requires_grad]
    if callable(params):
        chosen = [n for n, p in named if params(n, p)]
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        chosen = []
        for pattern in patterns:
            hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(f"parameter selector {pattern!r} matches no parameter; available: {names}")
            chosen.extend(h for h in hits if h not in chosen)
        chosen = [n for n in names if n in chosen]  # keep model order
    if not chosen:
        raise ValueError("the parameter selection is empty")
    return chosen


def _to_batches(data, batch_size: int | None, max_batches: int | None) -> list[tuple]:
    """Materialise data as a fixed list of ``(inputs, targets)`` batches (unmoved; dict labels removed)."""
    batches, _, _ = collect_batches(data, split_batch, lambda x, y: 1, lambda y: None, batch_size=batch_size,
                                    max_batches=max_batches, stream=False, memory_limit=None)
    return batches


class Objective:
    """Model + loss + data as a function of a flat parameter vector ``theta``.

    Parameters
    ----------
    model : nn.Module
        The network. It is deep-copied once; the copy is put in eval mode, so the
        caller's module (parameters, buffers, training flag) is never modified.
    loss_fn : str, callable or LossOnBatch
        ``"cross_entropy"``, ``"mse"``, ``"causal_lm"`` (shifted next-token cross-entropy over
        labels != -100), ``"model"`` (the model's own ``outputs.loss``; dict labels go into the
        model), a callable ``loss_fn(outputs, targets) -> scalar`` (mean over the batch), or a
        :class:`~riverscape.batching.LossOnBatch` ``(fn(outputs, batch), count)``. See
        :mod:`riverscape.batching`.
    data : tuple of Tensor or iterable
        ``(inputs, targets)`` tensors, or an iterable of batches (e.g. a DataLoader): tuples
        ``(inputs, targets)``, tensors of inputs, or dicts (HF style, passed to the model as
        keyword arguments; ``targets = batch["labels"]``).
    stream : bool or None
        ``False``: batches are materialised once (every evaluation uses the same analysis set).
        ``True``: the loader is re-iterated for every evaluation and the data are never held at
        once; it must yield the same batches in the same order each pass (checked: a changed
        batch raises ``ValueError``), and HVPs are forward-over-reverse (no graph is kept per
        batch, so ``hvp_mode="reuse"`` is unavailable). ``None`` (default): materialise unless the
        batches would exceed ``memory_limit``, then stream. Tensor data are never streamed.
    memory_limit : int or None
        Bytes the materialised batches may occupy when ``stream=None`` (default 8 GiB,
        :data:`riverscape.limits.DEFAULT_MEMORY_LIMIT`); ``None`` for no limit.
    chunk_size : int or None
        Points evaluated together by :meth:`evaluate` (and by the slices, paths and basin scans
        built on it) when no ``chunk_size`` is passed there: bounds the memory of batched point
        evaluation. ``None``: :meth:`default_chunk_size`'s activation budget.
    params : None, str, list of str, or callable, optional
        Which parameters form ``theta``: ``None`` for all trainable parameters, names or
        glob patterns (``"*.weight"``), or a predicate ``(name, tensor) -> bool``.
    max_batches : int, optional
        Use only the first ``max_batches`` batches.
    batch_size : int, optional
        Split tensor data into batches of this size (bounds memory; the result is the
        same full-data average).
    device : optional
        Where to evaluate (``"cpu"``, ``"cuda"``, ``"mps"``, ...). Default: the model's device.
        Every tensor the Objective makes (``theta``, gradients, HVPs) lives there.
    dtype : optional
        The dtype of the flat vectors: ``theta``, gradients, HVPs, and the float32-or-wider
        accumulation of loss, gradient and HVP over batches (``torch.float64`` for exact
        tests). float16/bfloat16 are never used for vectors: a half-precision ``dtype`` (or
        model) gives float32 vectors. Default: the model's own dtype, float32 for a
        half-precision model.
    compute_dtype : optional
        The dtype the private model copy runs in: forward, backward and HVP. Default: ``dtype``
        when it is given (then the whole computation is in that precision, as before), else the
        model's own dtype, so a bfloat16/float16 model is evaluated *natively* in half precision
        with float32 vectors. Must not be wider than the vector dtype. See Notes.
    metric : "auto", None or callable
        ``"auto"`` gives accuracy for classification losses (cross-entropy, or the model's own
        loss with one integer label per sample) with integer targets, and perplexity
        ``exp(loss)`` for token-level losses (``"causal_lm"``, ``"model"`` on a causal LM or
        token labels); :attr:`metric_name` says which. A callable
        ``metric(outputs, targets) -> Tensor`` (mean over the batch) is used as is.
    hvp_mode : {"auto", "reuse", "forward", "reverse", "compiled", "finite_difference"}
        How :meth:`hessian` computes repeated HVPs at one point: ``"reuse"`` keeps the
        gradient graph and runs only the second backward (about 1.5 gradients per HVP),
        ``"forward"`` is forward-over-reverse (``jvp`` of ``grad``; no memory held between
        calls), ``"reverse"`` is reverse-over-reverse. ``"compiled"`` is forward-over-reverse
        through ``torch.compile`` (also for :meth:`hvp` and :meth:`hvps`): the first product
        compiles (seconds), later ones are faster on small models (README "Performance");
        never chosen by ``"auto"``. ``"auto"`` reuses the graph when the
        analysis set has at most ``reuse_max_batches`` batches. ``"finite_difference"``
        makes *every* HVP (:meth:`hvp`, :meth:`hvps`, :meth:`hessian`) a central difference
        of exact gradients (see :meth:`finite_difference_hvp`), for models with an op
        that has no double backward; :func:`riverscape.differentiability.ensure_twice_differentiable`
        switches to it when nothing else works.

    Notes
    -----
    The loss is the exact average over all samples: ``sum_b n_b * loss_b / sum_b n_b``, with
    ``n_b`` the batch's samples, or its counted tokens for token-level losses, so results do
    not depend on how the data are split into batches.

    **Mixed precision** (``compute_dtype`` narrower than ``dtype``, e.g. a bfloat16 model with
    float32 vectors). The cast happens at the boundary: ``theta`` (float32) is cast to the
    compute dtype where it enters the model, floating inputs are cast to it, and the model's
    floating outputs are cast up to ``dtype`` before the loss and metric (as ``torch.autocast``
    runs cross-entropy in float32). Autograd carries the casts, so gradients and HVPs come back
    as ``dtype`` vectors while every matmul of the forward, backward and double backward runs
    in the compute dtype; the sums over batches, the probes, Lanczos bases and dot products of
    :mod:`riverscape.linalg` are all in ``dtype``. The finite-difference step and accuracy use
    the compute dtype's machine epsilon (bfloat16: ``2^-7``).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> obj = Objective(model, "cross_entropy", (x, y))
    >>> obj.dim
    8
    >>> g = obj.grad(obj.theta0); g.shape
    torch.Size([8])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Union[str, LossFn, LossOnBatch],
        data,
        *,
        params: ParamSelector = None,
        max_batches: int | None = None,
        batch_size: int | None = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
        metric: Union[str, None, MetricFn] = "auto",
        hvp_mode: str = "auto",
        reuse_max_batches: int = 32,
        stream: bool | None = None,
        memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {HVP_MODES}, got {hvp_mode!r}")
        if stream not in (None, True, False):
            raise ValueError(f"stream must be True, False or None (automatic), got {stream!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.loss_spec: ResolvedLoss = resolve_objective_loss(loss_fn, model)
        # the (outputs, targets) callable where there is one; "model" and LossOnBatch as given
        self.loss_fn = loss_fn if self.loss_spec.name in ("model", "batch") else resolve_loss(loss_fn)
        first = next(iter(model.parameters()), None)
        if first is None:
            raise ValueError("the model has no parameters")
        self.device = torch.device(device) if device is not None else first.device
        self.dtype, self.compute_dtype = _precision(first.dtype, dtype, compute_dtype)
        module = copy.deepcopy(model).to(device=self.device)
        if dtype is not None or compute_dtype is not None:
            module = module.to(dtype=self.compute_dtype)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module
        self.notes: list[str] = _eager_attention_notes(module)
        if stream and hvp_mode == "reuse":
            raise ValueError("hvp_mode='reuse' keeps a gradient graph per batch, which a streaming Objective does not hold; use 'forward'")
        self.hvp_mode = hvp_mode
        self.reuse_max_batches = reuse_max_batches

        from .quant.layers import channel_axis_of, param_role  # lazy: riverscape.quant imports this module

        named = list(model.named_parameters())
        owner = {}
        for mod_name, mod in model.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                owner[f"{mod_name}.{p_name}" if mod_name else p_name] = (
                    type(mod).__name__, p_name, channel_axis_of(mod, p_name), param_role(mod, p_name, p.ndim)
                )
        selected = _select_names(named, params)
        module_params = dict(module.named_parameters())
        layout, offset = [], 0
        for name in selected:
            p = module_params[name]
            fallback = ("", name.rsplit(".", 1)[-1], None, "unsupported" if p.ndim >= 2 else "other")
            mtype, kind, axis, role = owner.get(name, fallback)
            layout.append(ParamSpec(name, tuple(p.shape), offset, p.numel(), mtype, kind, axis, role))
            offset += p.numel()
        self.layout: tuple[ParamSpec, ...] = tuple(layout)
        self._param_dtypes = {name: module_params[name].dtype for name in selected}
        self.dim = offset
        self.theta0 = torch.cat([module_params[s.name].detach().reshape(-1) for s in self.layout]).to(self.dtype).clone()

        self._batches, self._stream, records = collect_batches(
            data, self._prepare, self.loss_spec.count, self.loss_spec.auto_metric,
            batch_size=batch_size, max_batches=max_batches, stream=stream, memory_limit=memory_limit,
        )
        self._records: list[BatchRecord] = records
        self.batch_sizes = [r.samples for r in records]
        self.batch_counts = [r.count for r in records]
        self.n_samples = sum(self.batch_sizes)
        self.n_counted = sum(self.batch_counts)
        if self.n_counted == 0:
            raise ValueError("the data hold no sample or token the loss counts (every label is -100?)")
        self._weights = [n / self.n_counted for n in self.batch_counts]
        self._largest_numel = max(r.numel for r in records)
        self.reduction: Reduction | None = None  # data-parallel: set by riverscape.distributed.data_parallel
        self.point_split: PointSplit | None = None  # point-parallel: set by riverscape.distributed.point_parallel

        self.metric_name: str | None
        if metric == "auto":
            kinds = {r.metric for r in records}
            self.metric_name = kinds.pop() if len(kinds) == 1 else None
            self._metric = accuracy if self.metric_name == "accuracy" else None
        elif metric is None or callable(metric):
            self._metric = metric
            self.metric_name = None if metric is None else getattr(metric, "__name__", "metric")
        else:
            raise ValueError(f"metric must be 'auto', None or a callable, got {metric!r}")
        self._reverse_hvp = hvp_mode == "reverse"
        self._compiled_hvp = CompiledHVP(self) if hvp_mode == "compiled" else None  # compiles at its first product
        self._vmap_ok = True
        self._selected: list[tuple[Tensor, ParamSpec]] | None = None  # for plain forwards (_load)
        self._forward_context: Callable[[], ContextManager] = contextlib.nullcontext

    # ------------------------------------------------------------------ data
    def _prepare(self, batch) -> tuple:
        """A raw batch as ``(inputs, targets)`` on the Objective's device: floating inputs in the
        compute dtype (they enter the model), floating targets in the vector dtype (the loss's)."""
        x, y = split_batch(batch, keep_labels=self.loss_spec.keep_labels)
        return move(x, self.device, self.compute_dtype), move(y, self.device, self.dtype)

    @property
    def streaming(self) -> bool:
        """Whether the data are re-read from the loader on every pass (see ``stream``)."""
        return self._stream is not None

    @property
    def n_batches(self) -> int:
        """Number of batches in one pass over the analysis set."""
        return len(self._records)

    @property
    def batches(self) -> list[tuple]:
        """The materialised ``(inputs, targets)`` batches (a streaming Objective holds none)."""
        if self._stream is not None:
            raise RuntimeError(
                "a streaming Objective holds no batches: iterate objective.weighted_batches(), or build it with stream=False"
            )
        return self._batches

    def weighted_batches(self) -> Iterator[tuple[float, Any, Any]]:
        """``(weight, inputs, targets)`` of every batch of one pass; the weights sum to 1.

        Batches of weight 0 (no counted token) are skipped. A streaming Objective reads its
        loader afresh and raises ``ValueError`` if the batches differ from the first pass.
        """
        if self._stream is None:
            pairs = ((w, x, y) for w, (x, y) in zip(self._weights, self._batches))
        else:
            pairs = ((self._weights[i], x, y) for i, x, y in self._stream)
        for w, x, y in pairs:
            if w > 0:
                yield w, x, y

    def first_batch(self) -> tuple:
        """The first ``(inputs, targets)`` batch (read from the loader when streaming)."""
        if self._stream is None:
            return self._batches[0]
        return next(iter(self._stream.raw()))

    def batch_count(self, inputs, targets) -> int:
        """A batch's weight in the full-data average: its samples, or its counted tokens."""
        return int(self.loss_spec.count(inputs, targets))

    @property
    def has_metric(self) -> bool:
        """Whether :meth:`metric` gives a number (accuracy for classifiers, perplexity for LMs)."""
        return self._metric is not None or self.metric_name == "perplexity"

    @property
    def mixed_precision(self) -> bool:
        """Whether the model runs in a narrower dtype than the vectors (see Notes)."""
        return self.compute_dtype != self.dtype

    @property
    def param_names(self) -> list[str]:
        return [s.name for s in self.layout]

    def check_theta(self, theta: Tensor) -> Tensor:
        """Validate a point and bring it to the Objective's device and dtype."""
        if not isinstance(theta, Tensor):
            theta = torch.as_tensor(np.asarray(theta))
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {tuple(theta.shape)}")
        return theta.to(device=self.device, dtype=self.dtype)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of ``theta`` as named parameter tensors.

        One ``split`` rather than a slice per tensor: its backward concatenates the parameter
        gradients in one pass, where slices would each scatter into a zero-filled ``D``-vector
        and add those up (``O(tensors x D)`` per gradient; at 1e7 parameters in 6 tensors that
        was 60 % of a gradient).
        """
        pieces = torch.split(theta, [s.numel for s in self.layout])
        return {s.name: piece.view(s.shape) for s, piece in zip(self.layout, pieces)}

    def model_params(self, theta: Tensor) -> dict[str, Tensor]:
        """``theta`` as named tensors in the compute dtype, ready for ``functional_call`` on :attr:`module`.

        Views of ``theta`` when the dtypes agree; otherwise differentiable casts to each
        parameter's dtype in the private module (the boundary of mixed precision: gradients flow
        back into ``theta``'s dtype).
        """
        params = self.unflatten(theta)
        if all(theta.dtype == d for d in self._param_dtypes.values()):
            return params
        return {name: t.to(self._param_dtypes[name]) for name, t in params.items()}

    def outputs(self, outputs: Any) -> Any:
        """Model outputs as the loss and metric see them: floating tensors cast up to :attr:`dtype`."""
        return upcast(outputs, self.dtype) if self.mixed_precision else outputs

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten` (missing names raise ``KeyError``)."""
        return torch.cat([tensors[s.name].reshape(-1).to(self.device, self.dtype) for s in self.layout])

    def _load(self, theta: Tensor) -> None:
        """Copy ``theta`` into the private module's parameters (plain forwards, no autograd).

        The private module's selected parameters are scratch space: every functional call
        passes all of them explicitly, and every plain forward loads its point first.
        """
        if self._selected is None:
            named = dict(self.module.named_parameters())
            self._selected = [(named[spec.name], spec) for spec in self.layout]
        with torch.no_grad():
            for param, spec in self._selected:
                param.copy_(theta[spec.offset : spec.offset + spec.numel].view(spec.shape))

    def set_forward_context(self, factory: Callable[[], ContextManager]) -> None:
        """Run every forward of the private module inside ``factory()``.

        Used by :mod:`riverscape.differentiability` to select the math backend of
        ``scaled_dot_product_attention`` (twice differentiable) for this Objective only.
        """
        self._forward_context = factory

    def forward(self, theta: Tensor, inputs) -> Any:
        """Model outputs at ``theta`` (functional; the stored module is untouched)."""
        args, kwargs = model_args(inputs)
        with self._forward_context():
            return self.outputs(functional_call(self.module, self.model_params(theta), args, kwargs))

    def batch_loss(self, theta: Tensor, inputs, targets) -> Tensor:
        """Mean loss of one batch at ``theta`` (over its samples or counted tokens) as a differentiable tensor."""
        return self.loss_spec.value(self.forward(theta, inputs), inputs, targets)

    def loss_tensor(self, theta: Tensor) -> Tensor:
        """Full-data loss as a differentiable tensor (autograd flows into ``theta``).

        In a data-parallel Objective this is this process's share (not reduced: autograd does
        not cross processes); :meth:`loss` and :meth:`value_and_grad` give the full-data mean.
        """
        return sum(w * self.batch_loss(theta, x, y) for w, x, y in self.weighted_batches())

    # ------------------------------------------------------------------ data parallel
    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """A per-process weighted sum combined over the processes of a data-parallel Objective.

        Every weight ``n_b / n_counted`` uses the count of *all* processes, so the sum of the
        processes' shares is exactly the full-data mean. In one process (``reduction`` is
        ``None``) ``tensor`` is returned as is.
        """
        return tensor if self.reduction is None else self.reduction.sum(tensor)

    def shared(self, value: Any) -> Any:
        """Process 0's ``value`` on every process of a data- or point-parallel Objective (``value`` itself in one process)."""
        group = self.reduction if self.reduction is not None else self.point_split
        return value if group is None else group.agree(value)

    # ------------------------------------------------------------------ point parallel
    def point_share(self, n: int) -> range:
        """Indices of the ``n`` points (or draws) this process computes.

        ``range(n)`` in one process and when data-parallel; ``range(rank, n, world_size)`` when
        point-parallel (:func:`riverscape.distributed.point_parallel`). Pair with :meth:`gather_points`.
        """
        return range(n) if self.point_split is None else range(self.point_split.rank, n, self.point_split.world_size)

    def gather_points(self, values: list, n: int) -> list:
        """The results of all ``n`` points in order, from this process's ``values`` (one per :meth:`point_share` index).

        A collective when point-parallel (every process calls it with its share); ``values`` itself otherwise.
        """
        if len(values) != len(self.point_share(n)):
            raise ValueError(f"this process computes {len(self.point_share(n))} of the {n} points, got {len(values)} values")
        return list(values) if self.point_split is None else self.point_split.gather_objects(list(values), n)

    @contextlib.contextmanager
    def points_here(self) -> Iterator[None]:
        """Within the block, batched evaluations run whole on this process (no split, no collective).

        For work that is itself split across processes: a null draw computed by one process must
        not wait for the others inside :meth:`evaluate`.
        """
        split, self.point_split = self.point_split, None
        try:
            yield
        finally:
            self.point_split = split

    def _reduce_float(self, value: float) -> float:
        if self.reduction is None:
            return value
        return float(self.reduction.sum(torch.tensor([value], dtype=torch.float64, device=self.device))[0])

    # ------------------------------------------------------------------ values
    def loss(self, theta: Tensor) -> float:
        """Full-data mean loss ``L(theta)``."""
        theta = self.check_theta(theta)
        with torch.no_grad():
            return self._reduce_float(float(self.loss_tensor(theta)))

    def metric(self, theta: Tensor) -> float | None:
        """Full-data metric (accuracy in [0, 1], perplexity ``exp(loss)``), ``None`` if there is none."""
        if self.metric_name == "perplexity" and self._metric is None:
            value = self.loss(theta)
            return math.exp(value) if value < 709.0 else math.inf  # exp overflows float64 past 709.78
        if self._metric is None:
            return None
        theta = self.check_theta(theta)
        with torch.no_grad():
            total = sum(w * float(self._metric(self.forward(theta, x), y)) for w, x, y in self.weighted_batches())
        return self._reduce_float(float(total))

    def loss_and_metric(self, theta: Tensor) -> tuple[float, float | None]:
        """Loss and metric from one pass over the data."""
        losses, metrics = self.evaluate(self.check_theta(theta)[None])
        return float(losses[0]), (None if metrics is None else float(metrics[0]))

    def grad(self, theta: Tensor) -> Tensor:
        """Gradient ``dL/dtheta`` (shape ``(D,)``)."""
        if self.reduction is not None:  # the same single message as value_and_grad on every rank
            return self.value_and_grad(theta)[1]
        return self._grad_terms(theta)[1]

    def value_and_grad(self, theta: Tensor) -> tuple[float, Tensor]:
        """Loss and gradient from one forward-backward pass per batch."""
        values, g = self._grad_terms(theta)
        total_l = sum(w * float(value) for w, value in values)
        if self.reduction is not None and g.dtype == torch.float64:  # one message: the gradient and the loss
            both = self.reduction.sum(torch.cat([g, g.new_tensor([total_l])]))
            total_l, g = float(both[-1]), both[:-1]
        elif self.reduction is not None:
            # The loss in its own float64 message: summed in the gradient's float32 it is rounded
            # to ~1e-7, and line searches on it (the valley floor) then took 2x the evaluations.
            g = self.reduction.sum(g)
            total_l = self._reduce_float(total_l)
        return total_l, g

    def _grad_terms(self, theta: Tensor) -> tuple[list[tuple[float, Tensor]], Tensor]:
        """``(weight, batch loss)`` pairs and the full gradient; no host synchronisation per batch
        (the losses stay on the device until :meth:`value_and_grad` reads them)."""
        theta = self.check_theta(theta)
        total_g = torch.zeros_like(theta)
        values = []
        gv = grad_and_value(self.batch_loss)
        for w, x, y in self.weighted_batches():
            g, value = gv(theta, x, y)
            total_g.add_(g, alpha=w)
            values.append((w, value.detach()))
        return values, total_g

    # ------------------------------------------------------------------ curvature
    @property
    def finite_difference(self) -> bool:
        """Whether HVPs are central differences of gradients (``hvp_mode="finite_difference"``)."""
        return self.hvp_mode == "finite_difference"

    def use_finite_difference(self) -> None:
        """Switch every HVP of this Objective to :meth:`finite_difference_hvp`."""
        self.hvp_mode = "finite_difference"

    def finite_difference_step(self, theta: Tensor, v: Tensor) -> float:
        """Step ``h`` of the central difference along ``v``: ``eps^(1/3) * max(1, ||theta||) / ||v||``.

        ``eps`` is the machine epsilon of the compute dtype (the gradients' precision). The perturbation ``h v`` then
        has norm ``eps^(1/3) * max(1, ||theta||)``: relative to the weights it is the step that
        balances the truncation error ``O(h^2)`` against the rounding error ``O(eps / h)``
        (both ``~ eps^(2/3)`` relative, see :attr:`finite_difference_accuracy`).
        """
        v_norm = float(v.norm())
        if v_norm == 0.0:
            return 0.0
        eps = torch.finfo(self.compute_dtype).eps
        return eps ** (1.0 / 3.0) * max(1.0, float(theta.norm())) / v_norm

    @property
    def finite_difference_accuracy(self) -> float:
        """Nominal relative accuracy of a finite-difference HVP, ``eps^(2/3)`` of the compute dtype.

        About 2.4e-5 in float32, 3.7e-11 in float64 and 0.04 in bfloat16; the constant depends on the third
        derivative of the loss along ``v`` (truncation) and on ``||g|| / ||H v||`` (rounding).
        """
        return torch.finfo(self.compute_dtype).eps ** (2.0 / 3.0)

    def finite_difference_hvp(
        self, theta: Tensor, v: Tensor, batches: Sequence[tuple] | None = None, *, step: float | None = None
    ) -> Tensor:
        """``H(theta) v`` by central differences of exact gradients.

        ``(g(theta + h v) - g(theta - h v)) / (2 h)`` with ``h`` from
        :meth:`finite_difference_step`: truncation error ``O(h^2)`` (third derivatives) plus
        rounding error ``O(eps / h)``, i.e. relative accuracy about ``eps^(2/3)``. Costs two
        gradients and needs only first derivatives, so it works for every model whose
        gradient exists.

        Parameters
        ----------
        theta, v : Tensor, shape (D,)
        batches : list of (inputs, targets), optional
            Average over these batches (weighted by :meth:`batch_count`) instead of the analysis set.
        step : float, optional
            The step ``h`` (default :meth:`finite_difference_step`).
        """
        theta = self.check_theta(theta)
        v = self.check_theta(v)
        h = self.finite_difference_step(theta, v) if step is None else float(step)
        if h == 0.0:
            return torch.zeros_like(theta)
        if batches is None:
            g_plus, g_minus = self.grad(theta + h * v), self.grad(theta - h * v)
        else:
            counts = [self.batch_count(x, y) for x, y in batches]
            total = sum(counts)
            g = grad(self.batch_loss)
            g_plus = sum(c / total * g(theta + h * v, x, y) for c, (x, y) in zip(counts, batches))
            g_minus = sum(c / total * g(theta - h * v, x, y) for c, (x, y) in zip(counts, batches))
        return (g_plus - g_minus) / (2.0 * h)

    def _grad_graph(self, theta: Tensor, x, y) -> tuple[Tensor, Tensor]:
        """``(leaf, g)``: a leaf copy of ``theta`` and the batch gradient with its graph kept."""
        leaf = theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self.batch_loss(leaf, x, y)
            (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        return leaf, g

    def _hvp_batch(self, theta: Tensor, v: Tensor, x, y, *, reverse: bool | None = None) -> Tensor:
        """One batch's ``H v``: forward-over-reverse, or reverse-over-reverse when ``reverse``
        (default: when forward mode failed before or ``hvp_mode="reverse"``)."""
        grad_fn = grad(self.batch_loss)
        if not (self._reverse_hvp if reverse is None else reverse):
            try:
                return jvp(lambda t: grad_fn(t, x, y), (theta,), (v,))[1]
            except RuntimeError as err:  # pytorch issue 123996: jvp(grad(mse_loss)) -> ZeroTensor
                if "ZeroTensor" not in str(err):
                    raise
                self._reverse_hvp = True
        _, pullback = vjp(lambda t: grad_fn(t, x, y), theta)
        return pullback(v)[0]

    def hvp(self, theta: Tensor, v: Tensor) -> Tensor:
        """Exact Hessian-vector product ``H(theta) v`` (forward-over-reverse).

        Falls back to reverse-over-reverse for losses that hit PyTorch issue 123996. With
        ``hvp_mode="finite_difference"`` it is :meth:`finite_difference_hvp` instead; with
        ``hvp_mode="compiled"`` the forward-over-reverse kernel runs through ``torch.compile``
        (the same exact product; the first call compiles, seconds).
        """
        return self._hvp_sum(theta, v, self._compiled_hvp or self._hvp_batch)

    def hvps(self, theta: Tensor, vectors: Tensor) -> Tensor:
        """Hessian times a block of vectors: ``(D, K) -> (D, K)``, vectorised with ``vmap``.

        With ``hvp_mode="compiled"``: one compiled product per column instead of ``vmap``.
        """
        return self._hvps_sum(theta, vectors, self._compiled_hvp)

    def _hvp_sum(self, theta: Tensor, v: Tensor, batch_hvp: Callable[[Tensor, Tensor, Any, Any], Tensor]) -> Tensor:
        """``H v`` over the analysis set from ``batch_hvp(theta, v, x, y)`` per batch (or finite differences)."""
        theta = self.check_theta(theta)
        v = self.check_theta(v)
        if self.finite_difference:
            return self.finite_difference_hvp(theta, v)
        out = torch.zeros_like(theta)
        for w, x, y in self.weighted_batches():
            out.add_(batch_hvp(theta, v, x, y), alpha=w)
        return self.reduce_sum(out)

    def _hvps_sum(self, theta: Tensor, vectors: Tensor, compiled: Callable[[Tensor, Tensor, Any, Any], Tensor] | None) -> Tensor:
        """``H V`` for a block: ``vmap`` of the eager batch HVP, or ``compiled`` column by column."""
        theta = self.check_theta(theta)
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        if vectors.ndim != 2 or vectors.shape[0] != self.dim:
            raise ValueError(f"vectors must have shape ({self.dim}, K), got {tuple(vectors.shape)}")
        if self.finite_difference:
            return torch.stack([self.finite_difference_hvp(theta, v) for v in vectors.T], dim=1)
        out = torch.zeros_like(vectors)
        columns = None if compiled is None else vectors.T.contiguous()  # a strided column would compile the kernel again
        for w, x, y in self.weighted_batches():
            if columns is not None:
                for k, column in enumerate(columns):
                    out[:, k].add_(compiled(theta, column, x, y), alpha=w)
                continue
            batched = vmap(lambda v: self._hvp_batch(theta, v, x, y))(vectors.T)
            out.add_(batched.T, alpha=w)
        return self.reduce_sum(out)

    def hessian(self, theta: Tensor, *, mode: str | None = None) -> HessianOperator:
        """The Hessian at ``theta`` as a :class:`~riverscape.linalg.HessianOperator`.

        A symmetric operator on torch tensors and a float64 scipy ``LinearOperator`` (see
        :mod:`riverscape.linalg.operators`) that counts its products in ``matvecs``.

        Parameters
        ----------
        theta : Tensor, shape (D,)
            Point of evaluation.
        mode : {"auto", "reuse", "forward", "reverse", "compiled", "finite_difference"}, optional
            The operator's HVP mode (default: the Objective's ``hvp_mode``), owned by the
            operator: this Objective is not modified. An Objective in ``"finite_difference"``
            mode, whose exact HVPs fail, always gives differences.
        """
        return HessianOperator(self, theta, mode or self.hvp_mode)

    def dense_hessian(self, theta: Tensor) -> Tensor:
        """The full ``(D, D)`` Hessian (D HVPs, vectorised). Only for small models."""
        theta = self.check_theta(theta)
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        chunks = [self.hvps(theta, eye[:, i : i + 256]) for i in range(0, self.dim, 256)]
        h = torch.cat(chunks, dim=1)
        return 0.5 * (h + h.T)

    # ------------------------------------------------------------------ batched
    def _point_eval(self, theta: Tensor, x, y) -> tuple[Tensor, Tensor]:
        return self._loss_and_score(self.forward(theta, x), x, y)

    def _loss_and_score(self, out, x, y) -> tuple[Tensor, Tensor]:
        value = self.loss_spec.value(out, x, y)
        score = self._metric(out, y).to(value.dtype) if self._metric is not None else value
        return value, score

    def _evaluate_chunk(self, chunk: Tensor) -> tuple[Tensor, Tensor]:
        losses = torch.zeros(chunk.shape[0], dtype=self.dtype, device=self.device)
        metrics = torch.zeros_like(losses)
        single = chunk.shape[0] == 1
        if single:  # one point: load it into the private module and run a plain forward
            self._load(chunk[0])
        for w, x, y in self.weighted_batches():
            if single:
                with self._forward_context():
                    out = self.outputs(call_model(self.module, x))
                value, score = self._loss_and_score(out, x, y)
                losses += w * value
                metrics += w * score
                continue
            if self._vmap_ok:
                try:
                    l, m = vmap(self._point_eval, in_dims=(0, None, None))(chunk, x, y)
                except (RuntimeError, NotImplementedError) as err:
                    if not _is_batching_error(err):  # a genuine error in the model or loss
                        raise
                    self._vmap_ok = False  # an op without a batching rule: loop from now on
            if not self._vmap_ok:
                pairs = [self._point_eval(t, x, y) for t in chunk]
                l = torch.stack([p[0] for p in pairs])
                m = torch.stack([p[1] for p in pairs])
            losses += w * l
            metrics += w * m
        return losses, metrics

    def evaluate(self, thetas: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Loss (and metric) at many points in one batched pass.

        A data-parallel Objective adds the processes' shares (one all-reduce per call); a
        point-parallel one evaluates the points ``rank, rank + W, ...`` here and gathers all
        ``n`` in order (one all-gather per call; see :mod:`riverscape.distributed`).

        Parameters
        ----------
        thetas : Tensor, shape (n, D)
        chunk_size : int, optional
            Points evaluated together by ``vmap``; default bounds the activations held
            at once to roughly 2e7 numbers.

        Returns
        -------
        losses : Tensor, shape (n,)
        metrics : Tensor of shape (n,) or None
        """
        thetas = thetas.to(device=self.device, dtype=self.dtype)
        if thetas.ndim != 2 or thetas.shape[1] != self.dim:
            raise ValueError(f"thetas must have shape (n, {self.dim}), got {tuple(thetas.shape)}")
        n, split = thetas.shape[0], self.point_split
        if split is not None and self.reduction is not None:
            raise ValueError("an Objective cannot be data-parallel (a shard per process) and point-parallel at once")
        if split is not None:  # point-parallel: this process's points rank, rank + W, ...
            thetas = thetas[split.rank :: split.world_size]
        chunk = chunk_size or self.default_chunk_size()
        losses, metrics = [thetas.new_zeros(0)], [thetas.new_zeros(0)]  # a share may be empty
        with torch.no_grad():
            for i in range(0, thetas.shape[0], chunk):
                l, m = self._evaluate_chunk(thetas[i : i + chunk])
                losses.append(l)
                metrics.append(m)
        loss, scores = torch.cat(losses), torch.cat(metrics)
        if self.reduction is not None:  # one message per call, however the points were chunked
            loss, scores = self.reduction.sum(torch.stack([loss, scores]))
        if split is not None:  # one message per call: every process gets all n in order
            both = split.gather(torch.stack([loss, scores], dim=1), n)
            loss, scores = both[:, 0].contiguous(), both[:, 1].contiguous()
        if self._metric is None:
            metric = loss.exp() if self.metric_name == "perplexity" else None
        else:
            metric = scores
        return loss, metric

    def losses(self, thetas: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """Losses at many points, shape ``(n, D) -> (n,)`` (batched with ``vmap``)."""
        return self.evaluate(thetas, chunk_size=chunk_size)[0]

    def default_chunk_size(self) -> int:
        """Points per vmap call: the Objective's ``chunk_size``, else bounded by a rough activation budget."""
        if self.chunk_size is not None:
            return self.chunk_size
        largest = self._largest_numel  # the largest of every process's batches when data-parallel
        budget = 2e7 / max(1, largest * 8)
        return int(max(1, min(64, math.floor(budget))))


def _precision(model_dtype: torch.dtype, dtype: torch.dtype | None, compute_dtype: torch.dtype | None) -> tuple[torch.dtype, torch.dtype]:
    """``(vector dtype, compute dtype)`` of an Objective from the model's dtype and the requested ones."""
    for label, value in (("dtype", dtype), ("compute_dtype", compute_dtype)):
        if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point or value.is_complex):
            raise TypeError(f"{label} must be a real floating torch.dtype (e.g. torch.float32), got {value!r}")
    compute = compute_dtype or dtype or model_dtype
    vector = dtype or model_dtype
    if vector in HALF_DTYPES:
        vector = torch.float32  # vectors, probes and sums over batches are never half precision
    if torch.finfo(compute).bits > torch.finfo(vector).bits:
        raise ValueError(f"compute_dtype {compute} is wider than the vector dtype {vector}: the model's precision would be lost at the boundary")
    return vector, compute


def _eager_attention_notes(module: nn.Module) -> list[str]:
    """Switch HF SDPA/flash attention of the private copy to eager (twice differentiable); the note says so."""
    from .differentiability import prefer_eager_attention

    return prefer_eager_attention(module)


def _is_batching_error(err: BaseException) -> bool:
    """Whether an exception raised under ``vmap`` means "this op cannot be batched"."""
    text = str(err).lower()
    return any(hint in text for hint in ("vmap", "batching rule", "batched", "functorch", "vmapped"))
