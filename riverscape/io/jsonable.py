"""Plain JSON values from results: one conversion for results.json, metrics.json and summaries.

The result dataclasses get their ``to_dict()`` from one of two mixins: :class:`Record` (the fields
as they are, :func:`dataclasses.asdict`) or :class:`JsonRecord` (the fields as JSON values,
:func:`fields_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

__all__ = ["to_jsonable", "fields_dict", "Record", "JsonRecord"]


def to_jsonable(value: Any) -> Any:
    """``value`` converted to plain JSON types (dict, list, str, int, float, bool, None).

    * mappings become dicts with string keys, tuples and lists become lists (recursively);
    * torch tensors and numpy arrays and scalars become Python numbers or nested lists
      (``tolist()``; torch is never imported here);
    * NaN and infinities become ``None`` (JSON has no NaN; ``json.dumps(..., allow_nan=False)``
      then succeeds);
    * paths become strings;
    * objects with a ``to_dict()`` method (riverscape results, options) are converted through
      it, other dataclass instances field by field.

    Parameters
    ----------
    value : Any

    Returns
    -------
    Any
        A value ``json.dumps`` accepts with ``allow_nan=False``.

    Raises
    ------
    TypeError
        For anything else ("cannot store a ... as JSON"), rather than a silent ``str()``.

    Examples
    --------
    >>> to_jsonable({"a": (1, 2.0), "b": float("nan"), 3: [float("inf")]})
    {'a': [1, 2.0], 'b': None, '3': [None]}
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars (any dtype, gradients or not)
        return to_jsonable(value.tolist())
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    raise TypeError(f"cannot store a {type(value).__name__} as JSON: {value!r}")


def fields_dict(result: Any, *, exclude: tuple[str, ...] = (), **extra: Any) -> dict:
    """The ``to_dict()`` of a result dataclass: its fields (minus ``exclude``) plus ``extra``, as JSON values.

    Parameters
    ----------
    result : dataclass instance
    exclude : tuple of str
        Fields left out (e.g. a full weight vector).
    **extra
        Derived values to add (e.g. properties), after the fields.

    Returns
    -------
    dict
        ``{field: to_jsonable(value)}`` in field order, then ``extra``.

    Examples
    --------
    >>> @dataclasses.dataclass
    ... class R:
    ...     loss: float
    ...     point: list
    >>> fields_dict(R(0.5, [1, 2]), exclude=("point",), kind="demo")
    {'loss': 0.5, 'kind': 'demo'}
    """
    values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in exclude}
    return to_jsonable({**values, **extra})


class Record:
    """Mixin of result and config dataclasses: ``to_dict()`` is :func:`dataclasses.asdict`.

    Fields keep their values (tuples stay tuples, NaN stays NaN); nested dataclasses become dicts.

    Examples
    --------
    >>> @dataclasses.dataclass(frozen=True)
    ... class Hit(Record):
    ...     hit: bool
    ...     time: int
    >>> Hit(True, 10).to_dict()
    {'hit': True, 'time': 10}
    """

    def to_dict(self) -> dict:
        """The fields as a dict, in field order (nested dataclasses as dicts)."""
        return dataclasses.asdict(self)


class JsonRecord:
    """Mixin of result dataclasses whose fields hold tensors or arrays: ``to_dict()`` is :func:`fields_dict`.

    Every field becomes plain JSON values (tensors as lists, NaN as ``None``, nested results through
    their own ``to_dict()``).
    """

    def to_dict(self) -> dict:
        """Every field as JSON values, in field order."""
        return fields_dict(self)
