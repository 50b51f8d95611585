"""Interleaved timing (A B A B in one process), result rows, and the agreement check."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

__all__ = ["Outcome", "Contender", "Row", "AgreementError", "alternate", "check_agreement"]


@dataclass
class Outcome:
    """What one call of a contender produced: its answer and the HVPs it spent."""

    value: Any
    hvps: int | None = None


@dataclass
class Contender:
    """One tool on one task: ``run()`` returns an :class:`Outcome`."""

    tool: str
    run: Callable[[], Outcome]
    note: str = ""


@dataclass
class Row:
    """One line of the results table.

    ``error`` is relative to the task's reference (``error_kind`` says which); ``tolerance`` is
    set only on riverscape rows, where it is enforced.
    """

    workload: str
    task: str
    tool: str
    seconds: float | None
    times: list[float] = field(default_factory=list)
    hvps: int | None = None
    error: float | None = None
    error_kind: str = ""
    tolerance: float | None = None
    ratio: float | None = None  # riverscape time / this tool's time (peer rows only)
    note: str = ""
    checked: float | None = None  # the error the tolerance applies to, when it is not ``error``

    @property
    def is_riverscape(self) -> bool:
        return self.tool.startswith("riverscape")

    def to_dict(self) -> dict:
        return asdict(self)


class AgreementError(RuntimeError):
    """A riverscape result disagrees with the reference beyond its tolerance."""


def alternate(contenders: list[Contender], repeats: int, *, warmup: bool = False) -> dict[str, tuple[list[float], Outcome]]:
    """Time every contender ``repeats`` times, interleaved A B C A B C ...

    The outcome kept per tool is that of its first timed call (or of the warm-up call). Load
    drifts on a shared machine hit every tool alike because the calls alternate.
    """
    kept: dict[str, Outcome] = {}
    times: dict[str, list[float]] = {c.tool: [] for c in contenders}
    if warmup:
        for c in contenders:
            kept[c.tool] = c.run()
    for _ in range(repeats):
        for c in contenders:
            start = time.perf_counter()
            outcome = c.run()
            times[c.tool].append(time.perf_counter() - start)
            kept.setdefault(c.tool, outcome)
    return {c.tool: (times[c.tool], kept[c.tool]) for c in contenders}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def check_agreement(rows: list[Row]) -> list[str]:
    """Messages for every riverscape row whose error exceeds its tolerance (or is not finite)."""
    failures = []
    for row in rows:
        if row.tolerance is None:
            continue
        value = row.error if row.checked is None else row.checked
        if value is None or not (value <= row.tolerance):
            kind = row.error_kind if row.checked is None else "checked error, see note"
            failures.append(
                f"{row.workload}/{row.task}/{row.tool}: error {value} ({kind}) exceeds tolerance {row.tolerance}"
            )
    return failures


def fill_ratios(rows: list[Row]) -> None:
    """Set ``ratio = riverscape time / peer time`` on peer rows of the same workload and task.

    The riverscape row used is the first one of the task (the main mode).
    """
    main: dict[tuple[str, str], float] = {}
    for row in rows:
        if row.is_riverscape and row.seconds is not None:
            main.setdefault((row.workload, row.task), row.seconds)
    for row in rows:
        ref = main.get((row.workload, row.task))
        if not row.is_riverscape and ref is not None and row.seconds:
            row.ratio = ref / row.seconds
