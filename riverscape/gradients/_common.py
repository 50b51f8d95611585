"""Small shared pieces of the gradient/damage analyses: coordinates, cosines, subspaces.

Coordinates
-----------
Every quantity is computed in the coordinates ``theta`` that the :class:`~riverscape.Objective`
selects (its ``params``). THEORY.md section 7 defines the landscape with respect to the
quantized tensors only (``d = dim theta_Q``, everything else frozen). To get exactly that
convention build the Objective with ``params`` selecting the quantized weights, e.g.
``Objective(model, loss, data, params="*.weight")`` for models whose weights are all Linear/Conv.
With the default selection (all parameters) the non-quantized coordinates (biases, norms)
are free directions of the landscape: the rounding perturbation is zero on them, but the
gradient, the Hessian eigenvectors and the isotropic baseline ``1/sqrt(dim)`` include them.
Every result reports both ``dim`` (= D) and ``n_quantized``, plus per-layer numbers over the
quantized tensors (``QuantMap.per_layer()``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch
from torch import Tensor

from ..landscape.curvature import hessian_eigs
from ..objective import HessianOperator, Objective
from ..quant import QuantMap, UniformQuantizer, resolve_quant_map

Quantizer = Union[UniformQuantizer, QuantMap]


def as_quant_map(objective: Objective, quantizer: Quantizer, map_options: dict) -> QuantMap:
    """A :class:`QuantMap` for ``objective`` from a quantizer (with ``map_options``: ``selection`` or
    ``include``/``exclude``/``keep_first_last``/``quantize_bias``) or a ready map (see
    :func:`riverscape.quant.resolve_quant_map`)."""
    return resolve_quant_map(objective, quantizer, **map_options)


def quantized_point(objective: Objective, qmap: QuantMap, theta_fp: Tensor, theta_q: Tensor | None) -> Tensor:
    """``theta_q`` validated, or ``Q(theta_fp)`` (round to nearest) when it is ``None``."""
    if theta_q is None:
        return qmap(theta_fp)
    return objective.check_theta(theta_q)


def cosine(a: Tensor, b: Tensor) -> float | None:
    """``a.b / (|a| |b|)`` in float64; ``None`` when either vector is zero."""
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return float(a @ b) / (na * nb)


def dot(a: Tensor, b: Tensor) -> float:
    """Inner product in float64."""
    return float(a.double() @ b.double())


def sq_norm(a: Tensor) -> float:
    """Squared Euclidean norm in float64."""
    return float(a.double() @ a.double())


def safe_ratio(num: float, den: float) -> float | None:
    """``num / den``, ``None`` when the denominator is zero."""
    return None if den == 0.0 else num / den


def eigenpairs(
    objective: Objective,
    theta: Tensor,
    k: int,
    values: Tensor | None,
    vectors: Tensor | None,
    operator: HessianOperator,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` Hessian eigenpairs at ``theta``: given, completed, or computed.

    ``vectors`` (D, k) given without ``values``: the values are the Rayleigh quotients
    ``v_i^T H v_i`` (one block of k HVPs). Neither given: :func:`hessian_eigs` (Lanczos).

    Returns
    -------
    values : Tensor, shape (k,), float64
    vectors : Tensor, shape (D, k), the Objective's dtype and device
    """
    if vectors is None:
        if values is not None:
            raise ValueError("values were given without vectors; pass both, only vectors, or neither")
        return hessian_eigs(objective, theta, k=k, operator=operator, seed=seed)
    vectors = vectors.to(device=objective.device, dtype=objective.dtype)
    if vectors.ndim != 2 or vectors.shape[0] != objective.dim:
        raise ValueError(f"vectors must have shape ({objective.dim}, k), got {tuple(vectors.shape)}")
    if values is None:
        values = (vectors * operator.torch_matmat(vectors)).sum(0)
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if values.shape[0] != vectors.shape[1]:
        raise ValueError(f"{values.shape[0]} values for {vectors.shape[1]} vectors")
    return values, vectors


def split(delta: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hill/river split of a vector: ``c = V^T delta``, ``V c`` and ``delta - V c``.

    Parameters
    ----------
    delta : Tensor, shape (D,)
    vectors : Tensor, shape (D, k), orthonormal columns

    Returns
    -------
    coords : Tensor, shape (k,)
    hill : Tensor, shape (D,)
    river : Tensor, shape (D,)
    """
    coords = vectors.T @ delta
    hill = vectors @ coords
    return coords, hill, delta - hill


def random_orthonormal(dim: int, k: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """A uniformly random orthonormal ``(dim, k)`` frame (QR of a Gaussian matrix)."""
    gauss = torch.randn(dim, k, generator=generator, dtype=torch.float64)
    frame, _ = torch.linalg.qr(gauss)
    return frame.to(dtype=like.dtype, device=like.device)


def rademacher(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Independent random signs +-1."""
    signs = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return signs.to(dtype=like.dtype, device=like.device)


def per_coordinate_scale(qmap: QuantMap, theta: Tensor) -> Tensor:
    """Grid step ``s_j`` of every coordinate at ``theta`` (0 on non-quantized coordinates), shape (D,)."""
    scales = torch.zeros_like(theta)
    for target, params in zip(qmap.targets, qmap.qparams(theta)):
        scales[target.spec.slice] = params.scale.expand(target.spec.shape).reshape(-1).to(theta.dtype)
    return scales


def finite_or_none(value: float | None) -> float | None:
    """JSON-friendly float: ``None`` for ``None``, infinities and NaN."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


class Setup(NamedTuple):
    """What every analysis needs at the reference point."""

    theta_fp: Tensor
    qmap: QuantMap
    operator: HessianOperator
    values: Tensor
    vectors: Tensor


def prepare(
    objective: Objective,
    theta_fp: Tensor | None,
    quantizer: Quantizer,
    *,
    k: int,
    values: Tensor | None,
    vectors: Tensor | None,
    operator: HessianOperator | None,
    seed: int,
    map_options: dict,
) -> Setup:
    """Reference point (default ``theta0``), quantization map, Hessian operator and top-k eigenpairs there."""
    theta_fp = objective.theta0 if theta_fp is None else objective.check_theta(theta_fp)
    qmap = as_quant_map(objective, quantizer, map_options)
    op = operator if operator is not None else objective.hessian(theta_fp)
    lam, V = eigenpairs(objective, theta_fp, k, values, vectors, op, seed)
    return Setup(theta_fp, qmap, op, lam, V)
