"""Stochastic trace of a symmetric operator: Hutchinson and Hutch++, with optional early stopping.

Shapes: ``n`` the operator's dimension, ``K`` probe vectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .operators import Operator

__all__ = [
    "TraceEstimate",
    "TRACE_METHODS",
    "estimate_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "exact_trace",
    "rademacher",
    "random_signs",
    "PROBE_BLOCK",
    "MIN_PROBES",
]

TRACE_METHODS = ("hutch++", "hutchinson", "exact")
PROBE_BLOCK = 4  # probes per block when stopping early (one product each)
MIN_PROBES = 8  # before trusting a sample standard deviation for the stopping rule


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate with its standard error and cost.

    ``method`` is the estimator that was run: ``"hutch++"``, ``"hutchinson"`` or
    ``"exact"`` (from unit vectors; stderr 0).
    """

    value: float
    stderr: float
    matvecs: int
    method: str

    def to_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "matvecs": self.matvecs, "method": self.method}


def random_signs(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Independent random signs (+1 / -1) of ``shape``, drawn on the CPU from ``generator``.

    The bits are drawn as int8, the same draws as int64 (``randint`` takes one 32-bit number
    per entry whatever the dtype), and mapped to signs in ``dtype`` in place: a block of
    ``N`` signs costs ``N`` bytes plus the result, not two int64 blocks (at ``N = 1e8``: 1.6 GB).
    """
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(dtype=dtype, device=device)
    return signs.mul_(2).sub_(1)


def rademacher(n: int, m: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(n, m)`` Rademacher probes: :func:`random_signs` of that shape."""
    return random_signs((n, m), generator, dtype, device)


def _stderr(samples: Tensor) -> float:
    return float(samples.std() / math.sqrt(samples.numel())) if samples.numel() > 1 else float("inf")


def _quadratic_form_samples(
    operator: Operator,
    count: int,
    gen: torch.Generator,
    *,
    rtol: float | None = None,
    deflate: Tensor | None = None,
    offset: float = 0.0,
) -> Tensor:
    """Hutchinson samples ``g^T A g`` (``g`` Rademacher, projected off ``deflate``), float64 ``(m,)``.

    Without ``rtol`` all ``count`` probes run as one block. With ``rtol`` they run in blocks
    of ``PROBE_BLOCK`` until ``2 * stderr <= rtol * |offset + mean|`` (at least ``MIN_PROBES``).
    """
    n = operator.shape[0]
    samples: list[Tensor] = []
    drawn = 0
    block = count if rtol is None else PROBE_BLOCK
    while drawn < count:
        width = min(block, count - drawn)
        g = rademacher(n, width, gen, operator.torch_dtype, operator.device)
        if deflate is not None:
            g = g - deflate @ (deflate.T @ g)
        samples.append((g * operator.torch_matmat(g)).sum(0).cpu().double())  # to the CPU first: MPS has no float64
        drawn += width
        if rtol is not None and drawn >= min(MIN_PROBES, count):
            done = torch.cat(samples)
            if 2.0 * _stderr(done) <= rtol * abs(offset + float(done.mean())):
                break
    return torch.cat(samples)


def _check(matvecs: int, rtol: float | None) -> None:
    if matvecs < 3:
        raise ValueError(f"matvecs must be at least 3, got {matvecs}")
    if rtol is not None and not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")


def exact_trace(operator: Operator) -> TraceEstimate:
    """``tr A`` from ``n`` unit-vector products (stderr 0)."""
    n = operator.shape[0]
    return TraceEstimate(float(torch.diagonal(operator.to_dense()).sum()), 0.0, n, "exact")


def hutchinson_trace(
    operator: Operator, matvecs: int = 100, *, seed: int = 0, rtol: float | None = None
) -> TraceEstimate:
    """Hutchinson's estimate: the mean of ``z^T A z`` over ``matvecs`` Rademacher probes ``z``.

    The stderr is ``std(z^T A z) / sqrt(probes)``. ``seed`` seeds a private ``torch.Generator``;
    ``rtol`` stops early as in :func:`estimate_trace`.
    """
    _check(matvecs, rtol)
    gen = torch.Generator().manual_seed(seed)
    samples = _quadratic_form_samples(operator, matvecs, gen, rtol=rtol)
    return TraceEstimate(float(samples.mean()), _stderr(samples), samples.numel(), "hutchinson")


def hutchpp_trace(operator: Operator, matvecs: int = 100, *, seed: int = 0, rtol: float | None = None) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021, arXiv 2010.09649).

    ``matvecs // 3`` products sketch ``Q = orth(A S)``, ``matvecs // 3`` trace ``Q^T A Q``
    exactly, and the rest estimate the deflated remainder ``tr((I - QQ^T) A (I - QQ^T))`` by
    Hutchinson on projected probes; the stderr is that of the remainder (the sketch part has
    no sampling error given ``Q``). ``seed`` and ``rtol`` as in :func:`estimate_trace`
    (``rtol`` stops only the remainder probes).
    """
    _check(matvecs, rtol)
    gen = torch.Generator().manual_seed(seed)
    n = operator.shape[0]
    sketch_size = matvecs // 3
    sketch = rademacher(n, sketch_size, gen, operator.torch_dtype, operator.device)
    q, _ = torch.linalg.qr(operator.torch_matmat(sketch))
    sketched = float((q * operator.torch_matmat(q)).sum())
    samples = _quadratic_form_samples(operator, matvecs - 2 * sketch_size, gen, rtol=rtol, deflate=q, offset=sketched)
    return TraceEstimate(sketched + float(samples.mean()), _stderr(samples), 2 * sketch_size + samples.numel(), "hutch++")


def estimate_trace(
    operator: Operator,
    *,
    matvecs: int = 100,
    method: str = "hutch++",
    seed: int = 0,
    rtol: float | None = None,
) -> TraceEstimate:
    """Trace of a symmetric operator within a budget of ``matvecs`` products.

    Parameters
    ----------
    operator : Operator, shape (n, n)
    matvecs : int
        Budget of products (at least 3).
    method : {"hutch++", "hutchinson", "exact"}
        :func:`hutchpp_trace`, :func:`hutchinson_trace` or :func:`exact_trace`. Whenever
        ``n <= matvecs`` the exact trace is cheaper and is used.
    seed : int
        Seeds the probes (a private ``torch.Generator``).
    rtol : float, optional
        Stop early: Hutchinson probes (the remainder probes of Hutch++) are drawn in blocks
        of ``PROBE_BLOCK`` and sampling stops once ``2 * stderr <= rtol * |estimate|``
        (about 95% confidence of a relative error below ``rtol``), after at least
        ``MIN_PROBES`` probes. ``matvecs`` is then a cap, and ``TraceEstimate.matvecs``
        says how many were used. Default: spend the whole budget.

    Returns
    -------
    TraceEstimate
        ``value``, ``stderr``, ``matvecs`` used and the ``method`` run.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    _check(matvecs, rtol)
    if method == "exact" or operator.shape[0] <= matvecs:
        return exact_trace(operator)
    estimator = hutchinson_trace if method == "hutchinson" else hutchpp_trace
    return estimator(operator, matvecs, seed=seed, rtol=rtol)
