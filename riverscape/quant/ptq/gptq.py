"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, arXiv 2210.17323): column-wise quantization with error compensation.

For one layer with weight matrix ``W`` (``(out, n)``) and input second moment ``H = X^T X``
(docs/ptq_methods.md §4), columns are quantized one at a time; the rounding error of column
``j`` is spread over the not yet quantized columns through the inverse Hessian, which minimises
``||X W^T - X Q^T||_F^2`` greedily (the Optimal Brain Quantization update)::

    U = chol(H_damped^{-1})^T  (upper),  q_j = Q(w_j),  e_j = (w_j - q_j) / U_jj,
    w_k <- w_k - e_j U_jk   for every later column k.

Lazy block updates apply the updates to columns beyond the current block once per block
(``block_size`` columns) with the same result. ``act_order`` processes columns by decreasing
``diag(H)`` and undoes the permutation at the end. Per-group grids choose a group's scale when
the first of its columns is reached, from the current (error-updated) weights of the whole group;
groups are consecutive input columns of the original layout also under ``act_order`` (the
reference code's ``static_groups`` layout). Columns with ``diag(H) = 0`` (no input) are set to 0
before quantization, as in the reference code; per-channel and per-tensor scales are those of
round-to-nearest at ``theta`` (bit for bit, in the working dtype).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ...objective import Objective
from ..qmap import QuantMap
from ..quantizers import QParams, UniformQuantizer, tensor_eps
from .base import PTQConfig
from .layerwise import quantize_layerwise
from .options import check_calibration_options, check_fraction, check_integer

__all__ = ["GPTQ", "gptq_quantize", "gptq"]


@dataclass(frozen=True)
class GPTQ(PTQConfig):
    """GPTQ options (docs/ptq_methods.md §4).

    Parameters
    ----------
    percdamp : float
        Dampening ``lambda = percdamp * mean(diag H)`` added to the diagonal of ``H``, in ``[0, 1]``
        (``0`` needs a positive definite ``H``, i.e. at least as many input rows as columns).
    block_size : int
        Columns per lazy block update (a speed option; the result does not depend on it up to
        floating-point rounding).
    act_order : bool
        Quantize columns in order of decreasing ``diag(H)`` ("activation order").
    calibration_samples : int
        Number of samples drawn from the objective's data for ``H``.
    seed : int
        Seed of that draw.
    """

    method: ClassVar[str] = "gptq"
    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    calibration_samples: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_fraction(self.percdamp, "GPTQ percdamp", 0.0, 1.0)
        check_integer(self.block_size, "GPTQ block_size", 1)
        if not isinstance(self.act_order, bool):
            raise ValueError(f"GPTQ act_order must be True or False, got {self.act_order!r}")
        check_calibration_options(self, allow_none=False)


def matrix_rows(qparams: QParams, quantizer: UniformQuantizer, like: Tensor) -> QParams:
    """Per-channel or per-tensor parameters of ``like`` as float64 rows ``(C, 1)`` of its matrix view."""
    fields = [None if t is None else quantizer.as_matrix(t.expand(like.shape))[:, :1].to(torch.float64)
              for t in (qparams.scale, qparams.zero_point, qparams.threshold)]
    return QParams(fields[0], fields[1], qparams.qmin, qparams.qmax, fields[2])


def _upper_inverse_cholesky(hessian: Tensor, percdamp: float) -> Tensor:
    """``U`` upper triangular with ``U^T U = (H + lambda I)^{-1}``."""
    damp = percdamp * torch.diagonal(hessian).mean()
    damped = hessian + damp * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise ValueError(f"GPTQ: H + {percdamp} * mean(diag H) * I is not positive definite (too few calibration rows "
                         "for the layer's inputs?); increase percdamp or calibration_samples")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    quantizer: UniformQuantizer,
    like: Optional[Tensor] = None,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[Tensor, QParams]:
    """GPTQ of one weight matrix.

    Parameters
    ----------
    weight : Tensor, shape (out, n)
        The layer's weight as a matrix (``quantizer.as_matrix``); computed in float64.
    hessian : Tensor, shape (n, n)
        ``H = X^T X`` of the layer's inputs.
    quantizer : UniformQuantizer
        Grid and granularity (per tensor, per channel = per row, or per group of columns).
    like : Tensor, optional
        The weight in its own shape, for the shape of the returned parameters (default ``weight``).
    percdamp, block_size, act_order
        See :class:`GPTQ`.

    Returns
    -------
    quantized : Tensor, shape (out, n), float64
    qparams : QParams
        Shaped for ``like`` as :meth:`UniformQuantizer.qparams` shapes them.
    """
    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(torch.float64).clone()
    like = weight if like is None else like
    rows, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"hessian must have shape ({n}, {n}) for a weight with {n} columns, got {tuple(H.shape)}")
    eps = tensor_eps(W)
    grouped = quantizer.granularity_of(tuple(like.shape)) == "per-group"
    if not grouped:  # round-to-nearest's parameters at the original weights, in like's dtype
        rtn = quantizer.qparams(like)
        fixed = matrix_rows(rtn, quantizer, like)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    position = torch.argsort(perm)  # position[c] = where original column c is processed
    W, H = W[:, perm], H[perm][:, perm]
    U = _upper_inverse_cholesky(H, percdamp)
    Q = torch.zeros_like(W)
    size = quantizer.group_size
    groups: dict[int, QParams] = {}
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if grouped:
                g = int(perm[j]) // size
                if g not in groups:  # first column of group g: scales from the group's current weights
                    pos = position[g * size : min((g + 1) * size, n)]
                    current = W[:, pos] - Err1[:, :i] @ U[i1:j, pos]
                    groups[g] = quantizer.row_qparams(current, eps)
                qp = groups[g]
            else:
                qp = fixed
            column = W1[:, i]
            q = quantizer.quantize_with(column[:, None], qp)[:, 0]
            Q[:, j] = q
            err = (column - q) / U[j, j]
            W1[:, i:] -= err[:, None] * U[j, j:i2][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    Q = Q[:, position]
    if grouped:
        return Q, quantizer.grouped_qparams([groups[g] for g in sorted(groups)], like)
    return Q, rtn


def gptq(config: GPTQ, objective: Objective, qmap: QuantMap, theta: Tensor) -> tuple:
    """Handler of :class:`GPTQ`: GPTQ on every Linear/Conv1d/Conv2d weight with inputs, round-to-nearest elsewhere."""

    def layer(weight: Tensor, hessian: Tensor, quantizer: UniformQuantizer, like: Tensor) -> tuple[Tensor, QParams]:
        return gptq_quantize(weight, hessian, quantizer, like, percdamp=config.percdamp, block_size=config.block_size,
                             act_order=config.act_order)

    return quantize_layerwise(objective, qmap, theta, layer, calibration_samples=config.calibration_samples, seed=config.seed)
