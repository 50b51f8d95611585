"""Resolve a data spec to tensors or batches, and check that model and data fit together."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, InputError
from ..limits import DEFAULT_MEMORY_LIMIT, check_allocation
from .specs import Spec, _first_line, call_factory, make_spec, resolve_factory, spec_label

__all__ = ["ResolvedData", "resolve_data", "check_model_data"]


DataLike = Union[tuple[Tensor, Tensor], Iterable]


@dataclass(frozen=True)
class ResolvedData:
    """Data a spec resolved to.

    Attributes
    ----------
    spec : dict
    train : (inputs, targets) or iterable of batches
        Data to train on / build the landscape on.
    test : (inputs, targets), iterable of batches, or None
        Held-out data (``None`` when the factory returned a single set).
    loss : str or None
        The data's natural loss (``"cross_entropy"``/``"mse"``) when known.
    dataset : riverscape.data.Dataset or None
        The built-in dataset object, when the spec named one (or a factory returned one).
    """

    spec: Spec
    train: Any
    test: Any = None
    loss: Optional[str] = None
    dataset: Any = None

    @property
    def evaluation(self) -> Any:
        """The held-out data if there are any, else the training data."""
        return self.train if self.test is None else self.test


def _from_factory_output(value: Any, spec: Spec) -> ResolvedData:
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    from ..data import Dataset

    if isinstance(value, Dataset):
        return ResolvedData(spec, value.train, value.test, value.loss, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, Tensor) for v in value):
        inputs, targets = value
        if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
            raise InputError(
                f"data factory {spec_label(spec)!r} returned {inputs.shape[0]} inputs and {targets.shape[0]} targets; "
                "they must be equal and non-zero"
            )
        return ResolvedData(spec, (inputs, targets))
    if isinstance(value, DataLoader):
        return ResolvedData(spec, value)
    if isinstance(value, TorchDataset) and hasattr(value, "__len__"):
        return ResolvedData(spec, DataLoader(value, batch_size=256, shuffle=False))
    raise InputError(
        f"data factory {spec_label(spec)!r} returned a {type(value).__name__}; return (inputs, targets) tensors, "
        "a torch Dataset, a DataLoader or a riverscape.data.Dataset"
    )


def resolve_data(
    spec: Union[str, Mapping],
    kwargs: Optional[Mapping] = None,
    *,
    allow_factory: bool = True,
    memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT,
) -> ResolvedData:
    """Resolve a data spec: a built-in dataset name or a factory returning data.

    Parameters
    ----------
    spec : str or dict
        ``"digits"`` (see :func:`riverscape.load_dataset`), ``"pkg.module:fn"`` or
        ``"path/to/file.py:fn"``; the factory returns ``(inputs, targets)`` tensors, a torch
        ``Dataset``, a ``DataLoader`` or a :class:`riverscape.data.Dataset`.
    kwargs : dict, optional
        Keyword arguments of the loader/factory.
    allow_factory : bool
        ``False`` refuses factories (used for specs read from an untrusted checkpoint).
    memory_limit : int or None
        Bound in bytes on a built-in dataset's estimated size, checked before it is
        generated (:func:`riverscape.data.estimated_bytes`); ``None`` for no limit.

    Returns
    -------
    ResolvedData
    """
    from ..data import DATASET_NAMES, estimated_bytes, load_dataset

    spec = make_spec(spec, kwargs, kind="data")
    if "name" in spec:
        if spec["name"] not in DATASET_NAMES:
            raise InputError(f"unknown dataset {spec['name']!r}; built-in datasets are {list(DATASET_NAMES)}, or pass package.module:factory")
        check_allocation(f"the dataset {spec['name']!r} with {spec['kwargs']}", estimated_bytes(spec["name"], **spec["kwargs"]), memory_limit)
        dataset = call_factory(partial(load_dataset, spec["name"]), spec["kwargs"], what=f"dataset {spec['name']!r}")
        return ResolvedData(spec, dataset.train, dataset.test, dataset.loss, dataset)
    if not allow_factory:
        raise CheckpointError(
            f"the checkpoint names the data factory {spec['factory']!r}; importing it runs code chosen by the file: "
            f"confirm with --data {spec['factory']} or pass --trust-checkpoint"
        )
    factory = resolve_factory(spec["factory"], kind="data")
    value = call_factory(factory, spec["kwargs"], what=f"data factory {spec['factory']!r}")
    return _from_factory_output(value, spec)


def _first_batch(data: Any, size: int) -> Any:
    """The first ``size`` samples of the first batch (a tensor pair is cut directly)."""
    from ..batching import take_samples

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(v, Tensor) for v in data):
        return data[0][:size], data[1][:size]
    try:
        batch = next(iter(data))
    except StopIteration:
        raise InputError("the data are empty (no batches)") from None
    return take_samples(batch, size)


def check_model_data(model: nn.Module, data: Any, loss: Union[str, Callable], *, samples: int = 8) -> float:
    """Run the model and the loss on a few samples to catch mismatches early.

    Parameters
    ----------
    model : nn.Module
        Evaluated under ``torch.no_grad`` in its current mode (riverscape-owned modules are
        in eval mode; the module is not modified).
    data : (inputs, targets) or iterable of batches
        Batches as the :class:`~riverscape.objective.Objective` takes them: tuples
        ``(inputs, targets)``, tensors, or dicts (Hugging Face style, passed to the model as
        keyword arguments; see :mod:`riverscape.batching`).
    loss : str, callable or LossOnBatch
        As the Objective takes it (``"model"``: the model's own ``outputs.loss``).
    samples : int
        Samples of the first batch to use.

    Returns
    -------
    float
        The loss on those samples.

    Raises
    ------
    InputError
        "data shape does not fit the model: ...", an output/target mismatch, or a non-finite loss.
    """
    from ..batching import call_model, logits_of, move, resolve_objective_loss, split_batch

    spec = resolve_objective_loss(loss, model)
    try:
        inputs, targets = split_batch(_first_batch(data, samples), keep_labels=spec.keep_labels)
    except TypeError as exc:
        raise InputError(str(exc)) from None
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is not None:
        inputs = move(inputs, first.device, first.dtype)  # as the Objective does: data follow the model's precision
    described = f"input batch {_describe(inputs)}"
    with torch.no_grad():
        try:
            output = call_model(model, inputs)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise InputError(f"data shape does not fit the model: {described}: {_first_line(exc)}") from exc
        try:
            value = float(spec.value(output, inputs, targets))
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            try:
                shown = _describe(logits_of(output))
            except TypeError:
                shown = type(output).__name__
            raise InputError(
                f"model output does not fit the targets: output {shown}, targets {_describe(targets)}, loss {loss!r}: {_first_line(exc)}"
            ) from exc
    if not math.isfinite(value):
        raise InputError(f"the loss is {value} on the first batch: the weights or the data contain NaN/inf")
    return value


def _describe(value: Any) -> str:
    """``(8, 64) float32`` of a tensor; ``{input_ids (8, 32) int64, ...}`` of a dict; ``none`` of ``None``."""
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return "none" if value is None else type(value).__name__
