"""Exceptions for expected, user-facing failures (bad input, unreadable checkpoints).

The command line turns every :class:`InputError` into one line
``riverscape: error: <message>`` and exit code 2, so messages are single sentences that say
what is wrong and, where possible, what to do about it.

::

    RiverscapeError
    ├── InputError (also a ValueError)      bad argument, spec, data or output path
    │   └── CheckpointError                 a checkpoint that cannot be read or used
    └── ConvergenceError (a RuntimeError)   an iterative solver did not converge at these weights
"""
from __future__ import annotations

__all__ = ["RiverscapeError", "InputError", "CheckpointError", "ConvergenceError"]


class RiverscapeError(Exception):
    """Base class of the errors riverscape reports as one line, without a traceback."""


class InputError(RiverscapeError, ValueError):
    """A bad argument, model/data spec, data set or output path."""


class CheckpointError(InputError):
    """A checkpoint that is missing, empty, corrupt, unsafe to load or does not fit the model."""


class ConvergenceError(RiverscapeError, RuntimeError):
    """An iterative solver (ARPACK) did not converge: a property of the weights, not a bug.

    Degenerate points (all-zero or saturated weights) give Hessians with huge clusters of
    equal eigenvalues; the command line reports it as input (exit code 2).
    """
