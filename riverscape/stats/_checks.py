"""Input checks shared by the statistics modules: clear ``ValueError``/``TypeError`` for bad data."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def sample(values, name: str, *, min_size: int = 1) -> np.ndarray:
    """``values`` as a 1-D float64 array of at least ``min_size`` finite numbers.

    Raises
    ------
    TypeError
        When ``values`` is not numeric.
    ValueError
        When it is not one-dimensional, holds NaN or infinity, or has fewer than ``min_size`` entries.
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}") from exc
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size < min_size:
        raise ValueError(f"{name} needs at least {min_size} value(s), got {array.size}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values at positions {np.flatnonzero(~np.isfinite(array)).tolist()[:10]}")
    return array


def same_length(first: np.ndarray, second: np.ndarray, names: tuple[str, str]) -> None:
    """Raise ``ValueError`` unless the two arrays have the same length."""
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same length, got {first.size} and {second.size}")


def scalar(value, name: str) -> float:
    """``value`` as a finite float."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from exc
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def level(value: float) -> float:
    """A confidence level strictly between 0 and 1."""
    number = scalar(value, "level")
    if not 0.0 < number < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {number}")
    return number


def choice(value: str, allowed: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(allowed)}")
    return value


def positive_int(value: int, name: str) -> int:
    """A positive integer (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
