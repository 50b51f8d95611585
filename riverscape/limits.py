"""Bounds on what an input file may make riverscape allocate.

A checkpoint is data, not code, but its contents decide sizes: a stored model spec can ask
for ``hidden=[160000, 160000]`` (100 GB), a stored data spec for a 800 GB synthetic set, and
a 13 KB tensor made with ``expand`` becomes 38 GB once copied. Every such size is checked
against one limit *before* anything is allocated; the error names the limit and how to
lift it (``--memory-limit GB`` on the command line, ``memory_limit=`` in the library).
"""
from __future__ import annotations

from typing import Iterable

import torch

from .errors import InputError

__all__ = ["DEFAULT_MEMORY_LIMIT", "check_allocation", "logical_bytes", "format_bytes"]

DEFAULT_MEMORY_LIMIT = 8 * 2**30
"""Default bound in bytes (8 GiB: a third of a 24 GB machine, far above every built-in workload)."""


def format_bytes(n: float) -> str:
    """``1.5 GB``-style size (powers of 1024)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def logical_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the tensors occupy once materialised (``numel * element_size``, whatever their strides)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def check_allocation(what: str, nbytes: int, limit: int | None) -> None:
    """Raise :class:`InputError` if ``nbytes`` (for ``what``) exceeds ``limit`` (``None``: no limit).

    >>> check_allocation("the model", 10, 100)
    >>> check_allocation("the model", 2**40, DEFAULT_MEMORY_LIMIT)
    Traceback (most recent call last):
    ...
    riverscape.errors.InputError: the model would need 1.0 TB, over the memory limit of 8.0 GB; raise it with --memory-limit GB (memory_limit= in the library) if this machine has the memory
    """
    if limit is not None and nbytes > limit:
        raise InputError(
            f"{what} would need {format_bytes(nbytes)}, over the memory limit of {format_bytes(limit)}; "
            "raise it with --memory-limit GB (memory_limit= in the library) if this machine has the memory"
        )
