"""Where an Objective's batches come from: held in memory, or read afresh from a loader on every pass.

:func:`collect_batches` turns the ``data`` of an :class:`~riverscape.objective.Objective` into
either a list of prepared ``(inputs, targets)`` batches (materialised: today's default) or a
:class:`BatchStream` that re-iterates the user's loader for every evaluation, so the data set is
never held at once (peak memory: one batch plus the model and its activations).

A streamed loader must yield the same batches in the same order on every pass (a
``DataLoader`` with ``shuffle=False``, no random augmentation). The first pass records every
batch's sample count, loss weight and a fingerprint (the float64 sums of its first input tensor
and of its targets); every later pass is checked against that record and raises ``ValueError``
at the first batch that differs, or when the number of batches changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from torch import Tensor

from .batching import first_tensor, numel, sample_count
from .limits import check_allocation, logical_bytes

__all__ = ["BatchRecord", "BatchStream", "collect_batches", "is_tensor_pair", "tensor_batches"]

Prepare = Callable[[Any], tuple[Any, Any]]
"""``prepare(raw_batch) -> (inputs, targets)`` on the Objective's device and dtype."""
Count = Callable[[Any, Any], int]
"""``count(inputs, targets) -> int``: a batch's weight (samples or counted tokens)."""


def is_tensor_pair(data: Any) -> bool:
    """Whether ``data`` is an ``(inputs, targets)`` pair of tensors (one data set, not a list of batches)."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor) and isinstance(data[1], Tensor)


def tensor_batches(data: tuple[Tensor, Tensor], batch_size: Optional[int]) -> list[tuple[Tensor, Tensor]]:
    """Split an ``(inputs, targets)`` pair into batches of ``batch_size`` (views, no copy)."""
    x, y = data
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"inputs and targets disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
    if batch_size is None or batch_size >= x.shape[0]:
        return [(x, y)]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def _sum(value: Any) -> float:
    try:
        t = first_tensor(value)
    except TypeError:
        return 0.0
    if t.is_meta:  # no values: an Objective on the meta device checks shapes and devices only
        return 0.0
    return float(t.detach().double().sum())


@dataclass(frozen=True)
class BatchRecord:
    """What the Objective remembers of one batch.

    Attributes
    ----------
    samples : int
        Leading dimension of the batch's first input tensor.
    count : int
        The batch's weight in the full-data average (samples, or counted tokens); a batch
        with 0 (every label ignored) is skipped.
    numel : int
        Numbers in the batch's inputs (sizes the ``vmap`` chunks).
    fingerprint : tuple of float
        Float64 sums of the first input tensor and of the targets (checks a streamed re-read).
    metric : str or None
        The metric the loss suggests for this batch's targets (``"accuracy"``, ``"perplexity"``).
    """

    samples: int
    count: int
    numel: int
    fingerprint: tuple[float, float]
    metric: Optional[str]


def _record(x: Any, y: Any, count: Count, metric: Callable[[Any], Optional[str]], index: int) -> BatchRecord:
    n = count(x, y)
    if n < 0:
        raise ValueError(f"batch {index} has a negative weight {n} (count(batch) must be >= 0)")
    return BatchRecord(sample_count(x), int(n), numel(x), (_sum(x), _sum(y)), metric(y))


class BatchStream:
    """A re-iterable source of prepared batches, checked against the record of its first pass.

    Parameters
    ----------
    data : iterable
        Re-iterable (``iter(data)`` gives a fresh iterator each time: a DataLoader, a list, an
        object whose ``__iter__`` is a generator). A one-shot iterator is refused.
    prepare : callable
        ``prepare(raw_batch) -> (inputs, targets)``.
    max_batches : int, optional
        Read only the first ``max_batches`` batches of every pass.
    records : list of BatchRecord
        The first pass (see :func:`collect_batches`).
    """

    def __init__(self, data: Any, prepare: Prepare, max_batches: Optional[int], records: list[BatchRecord]) -> None:
        self.data = data
        self.prepare = prepare
        self.max_batches = max_batches
        self.records = records

    def raw(self) -> Iterator[tuple[Any, Any]]:
        """Prepared batches of one pass, unchecked."""
        for i, batch in enumerate(self.data):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield self.prepare(batch)

    def __iter__(self) -> Iterator[tuple[int, Any, Any]]:
        """``(index, inputs, targets)`` of one pass; ``ValueError`` if the data differ from the first pass."""
        seen = 0
        for i, (x, y) in enumerate(self.raw()):
            if i >= len(self.records):
                raise ValueError(f"the streamed data yielded more than the {len(self.records)} batches of the first pass; {_SAME_BATCHES}")
            expected = self.records[i]
            found = (sample_count(x), _sum(x), _sum(y))
            if found != (expected.samples, *expected.fingerprint):
                raise ValueError(f"streamed batch {i} differs from the first pass ({found[0]} samples, was {expected.samples}); {_SAME_BATCHES}")
            seen = i + 1
            yield i, x, y
        if seen != len(self.records):
            raise ValueError(f"the streamed data yielded {seen} batches, the first pass {len(self.records)}; {_SAME_BATCHES}")


_SAME_BATCHES = "a streamed loader must yield the same batches in the same order on every pass (shuffle=False, no random augmentation)"


def collect_batches(
    data: Any,
    prepare: Prepare,
    count: Count,
    metric: Callable[[Any], Optional[str]],
    *,
    batch_size: Optional[int],
    max_batches: Optional[int],
    stream: Optional[bool],
    memory_limit: Optional[int],
) -> tuple[Optional[list[tuple[Any, Any]]], Optional[BatchStream], list[BatchRecord]]:
    """Materialise ``data`` or set up a :class:`BatchStream` over it.

    Parameters
    ----------
    data : (inputs, targets) tensors or iterable of batches
    prepare, count, metric : callables
        Split and move a raw batch; its loss weight; the metric its targets suggest.
    batch_size : int, optional
        Split tensor data into batches of this size.
    max_batches : int, optional
        Use only the first ``max_batches`` batches.
    stream : bool or None
        ``False``: materialise. ``True``: stream (needs a re-iterable). ``None``: materialise
        unless the prepared batches exceed ``memory_limit`` bytes, then stream (a one-shot
        iterator over the limit raises :class:`~riverscape.errors.InputError`). Tensor data are
        never streamed: their batches are views of tensors already in memory.
    memory_limit : int or None
        Bytes the materialised batches may occupy in ``stream=None`` mode.

    Returns
    -------
    batches : list of (inputs, targets) or None
        ``None`` when streaming.
    stream : BatchStream or None
    records : list of BatchRecord
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError("max_batches must be at least 1")
    can_stream = False
    if is_tensor_pair(data):
        raw: Any = tensor_batches(data, batch_size)[:max_batches]
        stream = False
    else:
        raw = data
        try:
            can_stream = iter(data) is not data
        except TypeError:
            raise TypeError("data must be a tuple (inputs, targets) of tensors or an iterable of batches") from None
        if stream and not can_stream:
            raise TypeError("stream=True needs data that can be iterated again (a DataLoader, a list, or an object whose __iter__ yields batches), not a one-shot iterator or generator")
    if stream:
        records = [_record(x, y, count, metric, i) for i, (x, y) in enumerate(BatchStream(raw, prepare, max_batches, []).raw())]
        if not records:
            raise ValueError("data holds no batch")
        return None, BatchStream(raw, prepare, max_batches, records), records
    batches, records, nbytes = [], [], 0
    for i, batch in enumerate(raw):
        if max_batches is not None and i >= max_batches:
            break
        x, y = prepare(batch)
        if stream is None:  # tensor data (stream=False) are in memory already
            nbytes += logical_bytes(_tensors((x, y)))
            if can_stream and memory_limit is not None and nbytes > memory_limit:
                return collect_batches(data, prepare, count, metric, batch_size=batch_size, max_batches=max_batches, stream=True, memory_limit=None)
            check_allocation("the analysis data (a one-shot iterator cannot be streamed)", nbytes, memory_limit)
        batches.append((x, y))
        records.append(_record(x, y, count, metric, i))
    if not batches:
        raise ValueError("data holds no batch")
    return batches, None, records


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)

