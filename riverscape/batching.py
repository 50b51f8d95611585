"""Batches, model outputs and losses of any shape: what the Objective needs to know about them.

**Batches.** The :class:`~riverscape.objective.Objective` keeps every batch as a pair
``(inputs, targets)``:

* a tuple or list ``(inputs, targets, ...)`` gives ``inputs = batch[0]``, ``targets = batch[1]``
  (further elements are ignored); ``inputs`` may itself be a tuple of positional arguments;
* a bare Tensor is inputs without targets (``targets = None``), e.g. token ids of a causal LM;
* a mapping (Hugging Face style: ``input_ids``, ``attention_mask``, ``labels``) is passed to the
  model as keyword arguments; ``targets = batch["labels"]`` (``None`` without labels). The labels
  stay in the inputs only when the model computes its own loss (``loss="model"``).

The sample count of a batch is the leading dimension of its first tensor.

**Outputs.** Named losses and the built-in metrics read the logits of a Tensor, of a tuple or list
(its first element), of a mapping (``["logits"]``) or of an object with ``.logits`` (HF
``ModelOutput``). User callables ``loss(outputs, targets)`` receive the raw outputs.

**Losses** (:func:`resolve_objective_loss`):

* ``"cross_entropy"`` / ``"ce"``, ``"mse"``: means over the batch, weighted by samples;
* ``"causal_lm"``: next-token cross-entropy, logits at position ``t`` predict label ``t + 1``,
  averaged over labels not equal to ``-100`` (without targets the labels are the input ids);
  weighted by the number of counted tokens, so the full-data value is the mean over all tokens
  however the data are batched;
* ``"model"``: the model's own ``outputs.loss`` (HF causal LM, masked LM, sequence classification;
  the labels go into the model). Weighted by counted tokens for a causal LM (shifted labels) and
  for token labels (``labels.ndim >= 2``, unshifted), else by samples. A causal LM is a module
  whose class name ends in ``ForCausalLM`` or ``LMHeadModel``, or whose ``config.is_decoder`` is
  true. (HF's causal-LM loss upcasts the logits with ``.float()``, which rounds float64 logits
  to float32: use ``"causal_lm"`` for float64-exact values.)
* a callable ``loss(outputs, targets)``, mean over the batch, weighted by samples;
* :class:`LossOnBatch` ``(fn, count=None)``: ``fn(outputs, batch)`` sees the whole batch (the
  mapping with its labels, or ``(inputs, targets)``); ``count(batch)`` gives the batch's weight
  (default: samples). An explicit wrapper, not signature sniffing: ``(outputs, targets)`` and
  ``(outputs, batch)`` callables both take two arguments.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IGNORE_INDEX",
    "LossOnBatch",
    "ResolvedLoss",
    "causal_lm",
    "call_model",
    "cross_entropy",
    "first_tensor",
    "index_samples",
    "is_causal_lm",
    "join_batch",
    "logits_of",
    "model_args",
    "model_loss_of",
    "move",
    "mse",
    "numel",
    "resolve_loss",
    "resolve_objective_loss",
    "sample_count",
    "split_batch",
    "take_samples",
    "upcast",
]

IGNORE_INDEX = -100
"""Label value excluded from token-level losses (PyTorch's and Hugging Face's convention)."""

LossFn = Callable[[Any, Tensor], Tensor]


# ----------------------------------------------------------------------------- batches
def split_batch(batch: Any, *, keep_labels: bool = False) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch (a tuple/list, a Tensor or a mapping; see the module docstring).

    Parameters
    ----------
    batch : tuple, list, Tensor or Mapping
    keep_labels : bool
        Leave ``"labels"`` in a mapping's inputs (the model computes its own loss).

    Raises
    ------
    TypeError
        Any other kind of batch, or a tuple with fewer than two elements.
    """
    if isinstance(batch, Mapping):
        if not batch:
            raise TypeError("a dict batch must hold at least one tensor (e.g. input_ids)")
        targets = batch.get("labels")
        inputs = dict(batch) if keep_labels else {k: v for k, v in batch.items() if k != "labels"}
        return inputs, targets
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"each batch must be a tuple (inputs, targets), a tensor of inputs or a dict of tensors, got a {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def join_batch(inputs: Any, targets: Any) -> Any:
    """The batch as a user's :class:`LossOnBatch` sees it: the mapping with its labels, else ``(inputs, targets)``."""
    if isinstance(inputs, Mapping):
        return dict(inputs) if targets is None or "labels" in inputs else {**inputs, "labels": targets}
    return (inputs, targets)


def first_tensor(value: Any) -> Tensor:
    """The first tensor of a (nested) tuple, list or mapping."""
    if isinstance(value, Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        try:
            return first_tensor(item)
        except TypeError:
            continue
    raise TypeError(f"no tensor found in a batch's {type(value).__name__}")


def sample_count(inputs: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor."""
    t = first_tensor(inputs)
    if t.ndim == 0:
        raise ValueError("the first tensor of a batch is a scalar; batches need a leading sample dimension")
    return int(t.shape[0])


def numel(value: Any) -> int:
    """Numbers held by the tensors of a batch part (nested tuples, lists, mappings)."""
    if isinstance(value, Tensor):
        return value.numel()
    if isinstance(value, Mapping):
        return sum(numel(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(numel(v) for v in value)
    return 0


def move(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``value`` on ``device``, floating tensors in ``dtype`` (integer and bool tensors keep theirs)."""
    if isinstance(value, Tensor):
        value = value.to(device)
        return value.to(dtype) if torch.is_floating_point(value) else value
    if isinstance(value, Mapping):
        return {k: move(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device, dtype) for v in value)
    return value


def index_samples(value: Any, index: Tensor) -> Any:
    """The samples ``index`` (a 1-D index tensor) of a batch part: tensors, or tuples/lists/mappings of them.

    0-d tensors and non-tensor leaves (``None``, numbers) are kept as they are.
    """
    if isinstance(value, Tensor):
        return value[index.to(value.device)] if value.ndim else value
    if isinstance(value, Mapping):
        return {k: index_samples(v, index) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(index_samples(v, index) for v in value)
    return value


def upcast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating tensors narrower than ``dtype`` cast up to it (model outputs).

    Tensors, tuples, lists and mappings are walked; a mapping keeps its type where it can be
    rebuilt from keyword arguments (an HF ``ModelOutput``), else becomes a ``dict``. Wider and
    non-floating tensors are returned unchanged. The cast is differentiable: gradients flow
    back into the narrower tensor.
    """
    if isinstance(value, Tensor):
        if torch.is_floating_point(value) and torch.finfo(value.dtype).bits < torch.finfo(dtype).bits:
            return value.to(dtype)
        return value
    if isinstance(value, Mapping):
        items = {k: upcast(v, dtype) for k, v in value.items()}
        try:
            return type(value)(**items)
        except TypeError:
            return items
    if isinstance(value, (tuple, list)):
        items = [upcast(v, dtype) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples take fields
    return value


def take_samples(value: Any, n: int) -> Any:
    """The first ``n`` samples of a batch part (tensors, or tuples/lists/mappings of them)."""
    if isinstance(value, Tensor):
        return value[:n] if value.ndim > 0 else value
    if isinstance(value, Mapping):
        return {k: take_samples(v, n) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(take_samples(v, n) for v in value)
    return value


def model_args(inputs: Any) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the model for a batch's inputs."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}


def call_model(module: nn.Module, inputs: Any) -> Any:
    """``module(*inputs)``, ``module(inputs)`` or ``module(**inputs)`` as the inputs ask."""
    args, kwargs = model_args(inputs)
    return module(*args, **kwargs)


# ----------------------------------------------------------------------------- outputs
def logits_of(outputs: Any) -> Tensor:
    """The logits of a model's outputs: a Tensor, ``.logits``, ``["logits"]`` or the first element."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, Mapping):
        if isinstance(outputs.get("logits"), Tensor):
            return outputs["logits"]
        raise TypeError(f"the model returned a mapping without 'logits' (keys: {list(outputs)[:8]})")
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in the model's {type(outputs).__name__} output; pass a loss callable that reads it")


def model_loss_of(outputs: Any) -> Tensor:
    """The model's own loss: ``outputs.loss`` or ``outputs["loss"]`` (HF models given ``labels``)."""
    value = getattr(outputs, "loss", None)
    if value is None and isinstance(outputs, Mapping):
        value = outputs.get("loss")
    if not isinstance(value, Tensor):
        raise ValueError(
            "loss='model' needs the model to return its loss (outputs.loss): put 'labels' in the batch dict, "
            "or pass a loss such as 'causal_lm' or 'cross_entropy'"
        )
    return value


# ----------------------------------------------------------------------------- losses
def cross_entropy(outputs: Any, targets: Tensor) -> Tensor:
    """Mean cross-entropy over all leading dimensions (works for (N, C) and (N, T, C))."""
    logits = logits_of(outputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mse(outputs: Any, targets: Tensor) -> Tensor:
    """Mean squared error with the output squeezed to the target's shape."""
    return F.mse_loss(logits_of(outputs).reshape(targets.shape), targets)


def causal_lm(outputs: Any, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: logits ``(N, T, V)`` at position ``t`` predict ``labels[:, t + 1]``.

    The mean runs over the labels ``labels[:, 1:]`` not equal to :data:`IGNORE_INDEX` (-100),
    as in Hugging Face's causal-LM loss.
    """
    logits = logits_of(outputs)
    if logits.ndim < 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"causal_lm needs logits (N, T, V) and labels (N, T), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    shifted = logits[..., :-1, :]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[..., 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def _shifted_tokens(labels: Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def _tokens(labels: Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


_NAMED_LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "ce": cross_entropy, "mse": mse, "causal_lm": causal_lm}


def resolve_loss(loss_fn: Union[str, LossFn]) -> LossFn:
    """Turn a loss name (``"cross_entropy"``, ``"mse"``, ``"causal_lm"``) or callable into a callable ``(outputs, targets)``."""
    if isinstance(loss_fn, str):
        try:
            return _NAMED_LOSSES[loss_fn]
        except KeyError:
            raise ValueError(
                f"unknown loss {loss_fn!r}; choose one of {sorted([*_NAMED_LOSSES, 'model'])} or pass a callable"
            ) from None
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable or a name, got {type(loss_fn).__name__}")
    return loss_fn


@dataclass(frozen=True)
class LossOnBatch:
    """A loss computed from the model's outputs and the whole batch.

    Parameters
    ----------
    fn : callable
        ``fn(outputs, batch) -> scalar``: the mean over the batch's counted units. ``batch`` is
        the dict with its ``labels`` for dict batches, else ``(inputs, targets)``.
    count : callable, optional
        ``count(batch) -> int``: the batch's weight in the full-data average (its number of
        counted units, e.g. non-padding tokens). Default: the number of samples.

    Examples
    --------
    >>> import torch
    >>> loss = LossOnBatch(lambda out, batch: (out - batch[1]).pow(2).mean())
    >>> float(loss.fn(torch.ones(3), (None, torch.zeros(3))))
    1.0
    """

    fn: Callable[[Any, Any], Tensor]
    count: Optional[Callable[[Any], int]] = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"LossOnBatch needs a callable fn(outputs, batch), got {type(self.fn).__name__}")
        if self.count is not None and not callable(self.count):
            raise TypeError(f"LossOnBatch count must be a callable count(batch) -> int, got {type(self.count).__name__}")


def is_causal_lm(module: nn.Module) -> bool:
    """Whether ``module`` is a causal language model (HF naming or ``config.is_decoder``)."""
    name = type(module).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    return bool(getattr(getattr(module, "config", None), "is_decoder", False))


def _input_ids(inputs: Any) -> Tensor:
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError("causal_lm without labels needs 'input_ids' in the batch dict (or give 'labels')")
        return inputs["input_ids"]
    return first_tensor(inputs)


@dataclass(frozen=True)
class ResolvedLoss:
    """A loss as the Objective uses it.

    Attributes
    ----------
    name : str
        ``"cross_entropy"``, ``"mse"``, ``"causal_lm"``, ``"model"``, ``"callable"`` or ``"batch"``.
    value : callable
        ``value(outputs, inputs, targets) -> Tensor``: the mean over the batch's counted units.
    count : callable
        ``count(inputs, targets) -> int``: the batch's weight (samples or counted tokens).
    keep_labels : bool
        Dict labels stay in the model's inputs (``"model"``).
    token_level : callable
        ``token_level(targets) -> bool``: whether the loss averages over tokens (then the
        metric is the perplexity ``exp(loss)``).
    classification : bool
        Whether the loss is a cross-entropy over classes (accuracy applies with integer targets).
    """

    name: str
    value: Callable[[Any, Any, Any], Tensor]
    count: Callable[[Any, Any], int]
    keep_labels: bool = False
    token_level: Callable[[Any], bool] = lambda targets: False
    classification: bool = False

    def auto_metric(self, targets: Any) -> Optional[str]:
        """``"perplexity"`` for token-level losses, ``"accuracy"`` for classification with integer targets, else ``None``."""
        if self.token_level(targets):
            return "perplexity"
        if self.classification and isinstance(targets, Tensor) and not torch.is_floating_point(targets):
            return "accuracy"
        return None


def _samples(inputs: Any, targets: Any) -> int:
    return sample_count(inputs)


def _needs_targets(name: str, fn: LossFn) -> Callable[[Any, Any, Any], Tensor]:
    def value(outputs: Any, inputs: Any, targets: Any) -> Tensor:
        if targets is None:
            raise ValueError(f"loss {name!r} needs targets: give (inputs, targets) batches or 'labels' in a dict batch")
        return fn(outputs, targets)

    return value


def _is_classification(fn: Any) -> bool:
    return fn is cross_entropy or fn is F.cross_entropy or isinstance(fn, nn.CrossEntropyLoss)


def resolve_objective_loss(loss: Union[str, LossFn, LossOnBatch], module: nn.Module) -> ResolvedLoss:
    """The :class:`ResolvedLoss` of a loss name, a callable ``(outputs, targets)`` or a :class:`LossOnBatch`.

    Parameters
    ----------
    loss : str, callable or LossOnBatch
        See the module docstring.
    module : nn.Module
        The model (``"model"`` weights causal LMs by shifted tokens).
    """
    if isinstance(loss, LossOnBatch):
        user_count = loss.count
        count = _samples if user_count is None else (lambda x, y: int(user_count(join_batch(x, y))))
        return ResolvedLoss("batch", lambda out, x, y: loss.fn(out, join_batch(x, y)), count)
    if loss == "model":
        causal = is_causal_lm(module)

        def model_count(inputs: Any, targets: Any) -> int:
            if targets is None:
                return sample_count(inputs)
            if causal:
                return _shifted_tokens(targets)
            return _tokens(targets) if targets.ndim >= 2 else sample_count(inputs)

        def model_tokens(targets: Any) -> bool:
            return isinstance(targets, Tensor) and (causal or targets.ndim >= 2)

        return ResolvedLoss("model", lambda out, x, y: model_loss_of(out), model_count, keep_labels=True,
                            token_level=model_tokens, classification=True)
    if loss == "causal_lm":
        def labels(inputs: Any, targets: Any) -> Tensor:
            return _input_ids(inputs) if targets is None else targets

        return ResolvedLoss("causal_lm", lambda out, x, y: causal_lm(out, labels(x, y)), lambda x, y: _shifted_tokens(labels(x, y)),
                            token_level=lambda targets: True)
    fn = resolve_loss(loss)
    name = loss if isinstance(loss, str) else "callable"
    return ResolvedLoss(name, _needs_targets(name, fn), _samples, classification=_is_classification(fn))


def accuracy(outputs: Any, targets: Tensor) -> Tensor:
    """Fraction of samples (or tokens) whose arg-max logit is the target."""
    logits = logits_of(outputs)
    pred = logits.argmax(dim=-1)
    return (pred.reshape(-1) == targets.reshape(-1)).to(logits.dtype).mean()
