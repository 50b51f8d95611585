"""Interleaved timing (A B A B in one process), result rows, and the agreement check."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

__all__ = ["Outcome", "Contender", "Row", "AgreementError", "alternate", "check_agreement", "drain_peer_crashes"]


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


_peer_crashes: list[tuple[str, str]] = []


def drain_peer_crashes() -> list[tuple[str, str]]:
    """``(tool, "ExceptionType: message")`` of every peer that raised since the last call."""
    crashes = list(_peer_crashes)
    _peer_crashes.clear()
    return crashes


def alternate(contenders: list[Contender], repeats: int, *, warmup: bool = False) -> dict[str, tuple[list[float], Outcome]]:
    """Time every contender ``repeats`` times, interleaved A B C A B C ...

    The outcome kept per tool is that of its first timed call (or of the warm-up call). Load
    drifts on a shared machine hit every tool alike because the calls alternate. A peer that
    raises is dropped from the results and recorded (:func:`drain_peer_crashes`); a riverscape
    exception propagates (the runner counts it as a failure).
    """
    kept: dict[str, Outcome] = {}
    times: dict[str, list[float]] = {c.tool: [] for c in contenders}
    crashed: set[str] = set()

    def call(c: Contender) -> Outcome | None:
        if c.tool.startswith("riverscape"):
            return c.run()
        try:
            return c.run()
        except Exception as err:  # a peer's bug is a result to report, not a reason to stop
            crashed.add(c.tool)
            _peer_crashes.append((c.tool, f"{type(err).__name__}: {err}"))
            return None

    if warmup:
        for c in contenders:
            outcome = call(c)
            if outcome is not None:
                kept[c.tool] = outcome
    for _ in range(repeats):
        for c in contenders:
            if c.tool in crashed:
                continue
            start = time.perf_counter()
            outcome = call(c)
            if outcome is None:
                continue
            times[c.tool].append(time.perf_counter() - start)
            kept.setdefault(c.tool, outcome)
    return {c.tool: (times[c.tool], kept[c.tool]) for c in contenders if c.tool not in crashed}


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
