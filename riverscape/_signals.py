"""Signals of the command line: SIGINT exits 130, SIGTERM exits 143, with cleanup, always.

Kept free of heavy imports so the process entry points can install the handlers before
anything else is imported (torch alone takes a second, and an import cut short by
``KeyboardInterrupt`` leaves half-initialised modules behind).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated", "exit_code_of", "handlers_installed"]

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler: unwinds like Ctrl-C (outputs are cleaned up), exits 143."""


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise Terminated if signum == getattr(signal, "SIGTERM", None) else KeyboardInterrupt


def exit_code_of(exc: KeyboardInterrupt) -> int:
    """Print the one line for an interrupt and return its exit code (130 or 143)."""
    if isinstance(exc, Terminated):
        print("riverscape: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    print("riverscape: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


@contextlib.contextmanager
def handlers_installed() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated` inside the block.

    A signal the process inherited as ignored (SIGINT of a background job) stays ignored.
    Outside the main thread, where handlers cannot be set, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None]
    signals = [s for s in signals if signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, _raise_interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
