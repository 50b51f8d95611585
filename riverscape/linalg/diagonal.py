"""Diagonal of a symmetric operator: Hutchinson's estimator (Bekas, Kokiopoulou, Saad 2007) or exact.

Shapes: ``n`` the operator's dimension.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .operators import Operator
from .trace import rademacher

__all__ = ["DiagonalEstimate", "estimate_diagonal"]


@dataclass(frozen=True)
class DiagonalEstimate:
    """Estimate of ``diag(A)`` with per-coordinate standard errors (shapes ``(n,)``)."""

    values: Tensor
    stderr: Tensor
    matvecs: int
    method: str

    def to_dict(self) -> dict:
        return {
            "values": self.values.tolist(),
            "stderr": self.stderr.tolist(),
            "matvecs": self.matvecs,
            "method": self.method,
        }


def estimate_diagonal(operator: Operator, *, matvecs: int = 100, seed: int = 0, batch_size: int = 32) -> DiagonalEstimate:
    """Hutchinson diagonal estimator ``diag(A) ~ mean_i z_i * (A z_i)``, Rademacher ``z_i``.

    Coordinate ``j`` of one sample is ``A_jj + sum_{l != j} A_jl z_j z_l``, so its variance is
    ``sum_{l != j} A_jl^2``; the reported stderr is the sample standard deviation over
    ``sqrt(matvecs)``. Operators with ``n <= matvecs`` are computed exactly
    (``method="exact"``, stderr 0).

    Parameters
    ----------
    operator : Operator, shape (n, n)
    matvecs : int
        Number of probes (at least 2).
    seed : int
        Seeds the probes (a private ``torch.Generator``).
    batch_size : int
        Probes per ``torch_matmat`` call (bounds memory at ``n * batch_size`` numbers).

    Returns
    -------
    DiagonalEstimate
        ``values`` and ``stderr`` of shape ``(n,)`` (float64, on the CPU).
    """
    if matvecs < 2:
        raise ValueError(f"matvecs must be at least 2, got {matvecs}")
    n = operator.shape[0]
    if n <= matvecs:
        d = torch.diagonal(operator.to_dense()).cpu()
        return DiagonalEstimate(d, torch.zeros_like(d), n, "exact")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(n, dtype=torch.float64)
    total_sq = torch.zeros(n, dtype=torch.float64)
    for start in range(0, matvecs, batch_size):
        z = rademacher(n, min(batch_size, matvecs - start), gen, operator.torch_dtype, operator.device)
        samples = (z * operator.torch_matmat(z)).cpu().double()  # to the CPU first: MPS has no float64
        total += samples.sum(1)
        total_sq += (samples**2).sum(1)
    mean = total / matvecs
    var = (total_sq - matvecs * mean**2).clamp_min(0.0) / (matvecs - 1)
    return DiagonalEstimate(mean, torch.sqrt(var / matvecs), matvecs, "hutchinson")
