"""Small shared pieces of the gradient/damage analyses: coordinates, cosines, subspaces.

Coordinates
-----------
Every quantity is computed in the coordinates ``theta`` that the :class:`~riverscape.Objective`
selects (its ``params``). docs/theory.md §1.2 defines the landscape with respect to the
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
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..landscape.curvature import hessian_eigs
from ..linalg import random_signs
from ..objective import HessianOperator, Objective
from ..quant import QuantizerLike, QuantMap, resolve_quant_map

Quantizer = QuantizerLike


def as_quant_map(objective: Objective, quantizer: Quantizer, map_options: dict) -> QuantMap:
    """A :class:`QuantMap` for ``objective`` from a bit-width or quantizer (with ``map_options``: ``selection`` or
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


HILL_K_DEFAULT = 10
"""Hill-subspace size used when no :class:`HillBasis` is given."""


@dataclass(frozen=True)
class HillBasis:
    """The hill subspace at a reference point: top-``k`` Hessian eigenpairs and the operator they came from.

    Passed to :func:`~riverscape.gradients.damage`, :func:`~riverscape.gradients.alignment` and
    :func:`~riverscape.gradients.alignment_along_qat` instead of threading ``k``, eigenpairs
    and operator through every call (docs/theory.md §6.1).

    Attributes
    ----------
    values : Tensor, shape (k,), float64, descending
    vectors : Tensor, shape (D, k), orthonormal columns, the Objective's dtype and device
    operator : HessianOperator
        ``H`` at the reference point (its products are reused, e.g. for quadratic predictions).
    """

    values: Tensor
    vectors: Tensor
    operator: HessianOperator

    @property
    def k(self) -> int:
        """Size of the subspace."""
        return int(self.vectors.shape[1])

    @classmethod
    def compute(cls, objective: Objective, theta: Tensor | None = None, *, k: int = HILL_K_DEFAULT,
                operator: HessianOperator | None = None, seed: int = 0) -> "HillBasis":
        """Top-``k`` eigenpairs of ``H(theta)`` (``theta`` defaults to ``objective.theta0``) by :func:`hessian_eigs`."""
        theta = objective.theta0 if theta is None else objective.check_theta(theta)
        op = operator if operator is not None else objective.hessian(theta)
        values, vectors = hessian_eigs(objective, theta, k=k, operator=op, seed=seed)
        return cls(values, vectors, op)

    @classmethod
    def from_vectors(cls, objective: Objective, theta: Tensor | None, vectors: Tensor, *, values: Tensor | None = None,
                     operator: HessianOperator | None = None) -> "HillBasis":
        """A basis from given eigenvectors (``values`` default to the Rayleigh quotients ``v_i^T H v_i``, one block of k HVPs)."""
        theta = objective.theta0 if theta is None else objective.check_theta(theta)
        op = operator if operator is not None else objective.hessian(theta)
        vectors = vectors.to(device=objective.device, dtype=objective.dtype)
        if vectors.ndim != 2 or vectors.shape[0] != objective.dim:
            raise ValueError(f"vectors must have shape ({objective.dim}, k), got {tuple(vectors.shape)}")
        if values is None:
            values = (vectors * op.torch_matmat(vectors)).sum(0)
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if values.shape[0] != vectors.shape[1]:
            raise ValueError(f"{values.shape[0]} values for {vectors.shape[1]} vectors")
        return cls(values, vectors, op)


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
    """Independent random signs +-1 in ``like``'s dtype and device (:func:`riverscape.linalg.random_signs`)."""
    return random_signs(shape, generator, like.dtype, like.device)


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
    basis: HillBasis | None,
    seed: int,
    map_options: dict,
) -> Setup:
    """Reference point (default ``theta0``), quantization map, and the hill basis there (computed if ``None``)."""
    theta_fp = objective.theta0 if theta_fp is None else objective.check_theta(theta_fp)
    qmap = as_quant_map(objective, quantizer, map_options)
    if basis is None:
        basis = HillBasis.compute(objective, theta_fp, seed=seed)
    elif basis.vectors.shape[0] != objective.dim:
        raise ValueError(f"the hill basis has vectors of dimension {basis.vectors.shape[0]}, the objective {objective.dim}")
    return Setup(theta_fp, qmap, basis.operator, basis.values, basis.vectors)


@dataclass(frozen=True)
class NullComparison:
    """An observed statistic against its matched-null draws.

    Attributes
    ----------
    observed : float or None
    null_mean, null_sd : float or None
    z : float or None
        ``(observed - null_mean) / null_sd``.
    p_value : float or None
        Empirical one-sided ``(1 + #{null >= observed}) / (1 + n)``.
    draws : list of float
    """

    observed: float | None
    null_mean: float | None
    null_sd: float | None
    z: float | None
    p_value: float | None
    draws: list = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, observed: float | None, draws: Sequence[float | None]) -> "NullComparison":
        """Compare ``observed`` with the non-``None`` ``draws`` (z and p need at least two and a spread)."""
        from ..stats import empirical_p, null_z  # lazily: the statistics package is optional for the rest of gradients

        clean = [d for d in draws if d is not None]
        mean = sd = z = p = None
        if len(clean) >= 2:
            mean = sum(clean) / len(clean)
            sd = math.sqrt(sum((c - mean) ** 2 for c in clean) / (len(clean) - 1))
            if observed is not None:
                p = empirical_p(observed, clean, alternative="greater")
                z = null_z(observed, clean) if sd > 0 else None
        return cls(observed, mean, sd, z, p, list(draws))

    def to_dict(self, *, draws: bool = False) -> dict:
        """The fields as a JSON-friendly dict (non-finite floats become ``None``; ``draws`` only when asked)."""
        out = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        if not draws:
            out.pop("draws")
        return out

    def summary(self, prefix: str) -> dict:
        """``{prefix}_mean``, ``{prefix}_sd``, ``{prefix}_z``, ``{prefix}_p``: the flat fields of a result dataclass."""
        return {f"{prefix}_mean": self.null_mean, f"{prefix}_sd": self.null_sd, f"{prefix}_z": self.z, f"{prefix}_p": self.p_value}
