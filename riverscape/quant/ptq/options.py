"""Validation of the options shared by the PTQ configs (calibration set size and seed)."""
from __future__ import annotations

import math

__all__ = ["check_calibration_options", "check_integer", "check_fraction"]


def check_integer(value, what: str, low: int) -> None:
    """``ValueError`` unless ``value`` is an int (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")


def check_fraction(value, what: str, low: float, high: float, *, open_low: bool = False) -> None:
    """``ValueError`` unless ``value`` is a finite number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{what} must be a number in {'(' if open_low else '['}{low}, {high}], got {value!r}")


def check_calibration_options(config, *, allow_none: bool) -> None:
    """Check ``config.calibration_samples`` (a positive int, or ``None`` when allowed) and ``config.seed`` (an int >= 0)."""
    name = type(config).__name__
    if not (allow_none and config.calibration_samples is None):
        check_integer(config.calibration_samples, f"{name} calibration_samples", 1)
    check_integer(config.seed, f"{name} seed", 0)
