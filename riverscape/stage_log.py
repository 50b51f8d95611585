"""One line per finished stage of a long run, with the time it took and an estimate of what is left.

Progress bars only show on a terminal; a run in a batch job or behind a pipe still needs to say
where it is. :class:`StageLog` prints (through a callable, the command line's ``stderr``
printer) one line each time a stage finishes::

    riverscape: [3/12] curvature at Q(θ), 4 bits: 12.4 s (estimated 9.8 s); about 2.3 min left

The time left is the estimate of the stages not yet run (:func:`riverscape.budget.estimate`),
scaled by how far the finished stages ran over or under their own estimates. A stage loaded
from the stage cache of an interrupted run (:mod:`riverscape.stage_cache`) says ``cached``
and does not count towards that ratio.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Optional

__all__ = ["StageLog", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``"850 ms"``, ``"12.4 s"``, ``"3.2 min"`` or ``"1.6 h"``.

    >>> format_seconds(0.00034), format_seconds(0.85), format_seconds(12.44), format_seconds(192), format_seconds(5800)
    ('0.34 ms', '850 ms', '12.4 s', '3.2 min', '1.6 h')
    """
    if seconds < 0.01:
        return f"{seconds * 1000:.2g} ms"
    if seconds < 1.0:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90.0:
        return f"{seconds:.1f} s"
    if seconds < 5400.0:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class StageLog:
    """Report finished stages with their time and the estimated time left.

    Parameters
    ----------
    emit : callable or None
        Receives each line (``None``: silent; the timings are still kept).
    estimates : mapping of str to float, optional
        Estimated seconds of each stage over the whole run (a stage repeated per bit-width has
        its total here), as :func:`riverscape.budget.estimate` returns them.
    repeats : mapping of str to int, optional
        How many times each stage runs (per-bit-width stages: the number of bit-widths).
    """

    def __init__(
        self,
        emit: Optional[Callable[[str], None]] = None,
        estimates: Optional[Mapping[str, float]] = None,
        repeats: Optional[Mapping[str, int]] = None,
    ) -> None:
        self.emit = emit
        self.estimates = {k: v for k, v in (estimates or {}).items() if k != "total"}
        self.repeats = dict(repeats or {})
        self.timings: dict[str, float] = {}
        self._done_estimate = 0.0
        self._done_actual = 0.0
        self._skipped_estimate = 0.0
        self._count = 0
        self.cached: list[str] = []
        self._total = sum(self.repeats.get(name, 1) for name in self.estimates) or None

    def say(self, message: str) -> None:
        """Emit a free-form line (the plan, a note)."""
        if self.emit is not None:
            self.emit(message)

    def done(self, stage: str, seconds: float, label: Optional[str] = None, *, skipped: bool = False, cached: bool = False) -> None:
        """Record that one run of ``stage`` took ``seconds`` (or was ``skipped``, or loaded from the cache) and emit its line."""
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        self._count += 1
        expected = self.estimates.get(stage, 0.0) / max(1, self.repeats.get(stage, 1))
        if cached:
            self.cached.append(stage)
            self._skipped_estimate += expected
        else:
            self._done_estimate += expected
            self._done_actual += seconds
        if self.emit is None:
            return
        counter = f"[{self._count}/{self._total}] " if self._total else ""
        line = f"{counter}{label or stage}: " + ("skipped" if skipped else "cached" if cached else format_seconds(seconds))
        if expected > 0 and not skipped and not cached:
            line += f" (estimated {format_seconds(expected)})"
        left = self.seconds_left()
        if self._total and self._count >= self._total:
            line += "; done"
        elif left is not None:
            line += f"; about {format_seconds(left)} left"
        self.emit(line)

    def seconds_left(self) -> Optional[float]:
        """Estimated seconds of the stages not run yet, scaled by the observed/estimated ratio so far."""
        if not self.estimates:
            return None
        remaining = max(0.0, sum(self.estimates.values()) - self._done_estimate - self._skipped_estimate)
        ratio = self._done_actual / self._done_estimate if self._done_estimate > 0 else 1.0
        return remaining * min(max(ratio, 0.1), 10.0)

    def lap(self, stage: str, since: float, label: Optional[str] = None, *, skipped: bool = False, cached: bool = False) -> float:
        """:meth:`done` with the time since ``since`` (a ``time.perf_counter()`` value); returns now."""
        now = time.perf_counter()
        self.done(stage, now - since, label, skipped=skipped, cached=cached)
        return now
