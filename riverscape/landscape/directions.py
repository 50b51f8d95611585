"""Directions in weight space: filter-normalised random vectors, Hessian eigenvectors,
the quantization direction, and orthonormal planes through three points.

A direction is a flat tensor of shape ``(D,)`` on the Objective's layout (D = ``objective.dim``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from ..objective import Objective
from ..quant.qmap import QuantMap
from .curvature import Block, block_slice, hessian_eigs

__all__ = [
    "BIAS_BN_MODES",
    "Plane",
    "eigenvector_directions",
    "orthonormalize",
    "plane_coordinates",
    "plane_through",
    "quantization_direction",
    "random_direction",
]

BIAS_BN_MODES = ("zero", "keep")
_FILTER_EPS = 1e-10  # Li et al.'s guard in ||theta_f|| / (||d_f|| + eps)


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        return torch.Generator().manual_seed(int(seed))
    return generator


def random_direction(
    objective: Objective,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    filter_normalize: bool = True,
    bias_bn: str = "zero",
    mask: Union[Tensor, QuantMap, None] = None,
    theta: Tensor | None = None,
) -> Tensor:
    """A Gaussian direction, filter-normalised as in Li et al. 2018 (arXiv 1712.09913).

    Draws ``d ~ N(0, I)`` with the shape of ``theta`` and, for every parameter tensor with two or
    more dimensions, rescales each slice along its first axis (an output filter of a Conv, a row
    of a Linear or Embedding weight) to the norm of the same slice of ``theta``::

        d_f <- d_f * ||theta_f|| / (||d_f|| + 1e-10)

    Parameters
    ----------
    objective : Objective
        Supplies the layout (shapes) of ``theta``.
    generator : torch.Generator, optional
        Source of randomness (CPU generator; the global RNG is used only if neither
        ``generator`` nor ``seed`` is given, and it is never reseeded; a data-parallel
        Objective then takes process 0's draw).
    seed : int, optional
        Shortcut for ``generator=torch.Generator().manual_seed(seed)``.
    filter_normalize : bool
        Rescale per filter (default). ``False`` keeps the raw isotropic Gaussian on tensors
        with two or more dimensions.
    bias_bn : {"zero", "keep"}
        One-dimensional parameters (biases, normalisation weights): ``"zero"`` sets the
        direction to 0 there (Li et al.'s ``ignore='biasbn'``), ``"keep"`` copies ``theta``
        (Li et al.'s default otherwise).
    mask : bool Tensor of shape (D,) or QuantMap, optional
        Zero the direction outside the mask (e.g. ``qmap`` keeps only quantized weights).
    theta : Tensor, shape (D,), optional
        The point whose filter norms are matched (default ``objective.theta0``).

    Returns
    -------
    Tensor, shape (D,)
        In the Objective's dtype and device.
    """
    if bias_bn not in BIAS_BN_MODES:
        raise ValueError(f"bias_bn must be one of {BIAS_BN_MODES}, got {bias_bn!r}")
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    gen = _generator(generator, seed)
    raw = torch.randn(objective.dim, generator=gen, dtype=torch.float64)
    if gen is None:  # the global RNG differs between processes: a data-parallel run uses process 0's draw
        raw = objective.shared(raw)
    direction = raw.to(device=objective.device, dtype=objective.dtype)
    for spec in objective.layout:
        piece = direction[spec.slice]
        if len(spec.shape) <= 1:
            if bias_bn == "zero":
                piece.zero_()
            else:
                piece.copy_(theta[spec.slice])
        elif filter_normalize:
            rows = piece.view(spec.shape[0], -1)
            target = theta[spec.slice].view(spec.shape[0], -1).norm(dim=1, keepdim=True)
            rows.mul_(target / (rows.norm(dim=1, keepdim=True) + _FILTER_EPS))
    if mask is not None:
        keep = mask.mask if isinstance(mask, QuantMap) else mask
        if keep.shape != (objective.dim,) or keep.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape ({objective.dim},) or a QuantMap")
        direction = torch.where(keep.to(direction.device), direction, torch.zeros_like(direction))
    return direction


def eigenvector_directions(
    objective: Objective,
    theta: Tensor | None = None,
    k: int = 2,
    *,
    which: str = "LA",
    block: Block = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Top Hessian eigenvectors as directions (a thin wrapper over :func:`hessian_eigs`).

    Parameters
    ----------
    objective : Objective
    theta : Tensor, shape (D,), optional
        Where the Hessian is taken (default ``objective.theta0``).
    k : int
        Number of directions.
    which, block, seed
        As in :func:`~riverscape.landscape.hessian_eigs`. With a ``block`` the eigenvectors of
        ``H_ll`` are embedded into full-length directions (zero outside the block).

    Returns
    -------
    values : Tensor, shape (k,), float64, descending
    directions : Tensor, shape (D, k)
        Unit-norm columns; column ``i`` belongs to ``values[i]``.
    """
    values, vectors = hessian_eigs(objective, theta, k, which=which, block=block, seed=seed)
    if vectors.shape[0] == objective.dim:
        return values, vectors
    full = torch.zeros(objective.dim, k, dtype=vectors.dtype, device=vectors.device)
    full[block_slice(objective, block)] = vectors
    return values, full


def quantization_direction(theta: Tensor, theta_q: Tensor) -> Tensor:
    """The rounding perturbation ``delta = Q(theta) - theta`` (docs/theory.md §2.6), shape (D,).

    Along it, ``theta + 1 * delta`` is the quantized point.
    """
    if theta.shape != theta_q.shape or theta.ndim != 1:
        raise ValueError(f"theta and theta_q must be vectors of one shape, got {tuple(theta.shape)} and {tuple(theta_q.shape)}")
    return theta_q.to(theta.dtype) - theta


def orthonormalize(d1: Tensor, d2: Tensor) -> tuple[Tensor, Tensor]:
    """Gram-Schmidt: ``u = d1 / |d1|``, ``v`` = unit part of ``d2`` orthogonal to ``u``.

    The projection is applied twice ("twice is enough", Parlett), so ``u . v`` is at rounding level.

    Raises
    ------
    ValueError
        If ``d1`` is zero or ``d2`` is (numerically) parallel to ``d1``.
    """
    n1 = d1.norm()
    if not bool(n1 > 0):
        raise ValueError("d1 is the zero vector")
    u = d1 / n1
    v = d2 - (u @ d2) * u
    v = v - (u @ v) * u
    n2 = v.norm()
    if not bool(n2 > 1e-12 * d2.norm()):
        raise ValueError("d2 is parallel to d1: the two directions span no plane")
    return u, v / n2


def plane_coordinates(point: Tensor, origin: Tensor, d1: Tensor, d2: Tensor) -> tuple[float, float, float]:
    """Least-squares coordinates of ``point`` in the basis ``(d1, d2)`` around ``origin``.

    Solves ``min_{x, y} |point - origin - x d1 - y d2|`` (QR, float64) for any two independent
    directions (not necessarily orthonormal).

    Returns
    -------
    x, y : float
    residual : float
        Distance of ``point`` from the plane.
    """
    basis = torch.stack([d1, d2], dim=1).double()
    offset = (point.to(origin.dtype) - origin).double()
    q, r = torch.linalg.qr(basis)
    coeffs = torch.linalg.solve_triangular(r, (q.T @ offset)[:, None], upper=True)[:, 0]
    residual = (offset - basis @ coeffs).norm()
    return float(coeffs[0]), float(coeffs[1]), float(residual)


@dataclass(frozen=True)
class Plane:
    """An affine plane ``origin + x d1 + y d2`` with an orthonormal basis.

    Attributes
    ----------
    origin, d1, d2 : Tensor, shape (D,)
    """

    origin: Tensor
    d1: Tensor
    d2: Tensor

    def point(self, x: float, y: float) -> Tensor:
        """The point with coordinates ``(x, y)``, shape (D,)."""
        return self.origin + x * self.d1 + y * self.d2

    def coordinates(self, point: Tensor) -> tuple[float, float]:
        """Coordinates ``(x, y)`` of the orthogonal projection of ``point`` onto the plane."""
        x, y, _ = plane_coordinates(point, self.origin, self.d1, self.d2)
        return x, y

    def distance(self, point: Tensor) -> float:
        """Distance of ``point`` from the plane."""
        return plane_coordinates(point, self.origin, self.d1, self.d2)[2]


def plane_through(a: Tensor, b: Tensor, c: Tensor) -> Plane:
    """The plane through three points (Garipov et al. 2018, arXiv 1802.10026, Fig. 1 style).

    ``origin = a``, ``d1 = (b - a) / |b - a|``, ``d2`` = Gram-Schmidt of ``c - a`` against ``d1``.
    So ``a`` sits at ``(0, 0)``, ``b`` at ``(|b - a|, 0)`` and ``c`` at ``(u . (c - a), v . (c - a))``.

    Parameters
    ----------
    a, b, c : Tensor, shape (D,)

    Raises
    ------
    ValueError
        If the points are collinear (or two coincide).
    """
    if not (a.shape == b.shape == c.shape) or a.ndim != 1:
        raise ValueError("a, b and c must be vectors of one shape")
    d1, d2 = orthonormalize(b - a, c - a)
    return Plane(a.clone(), d1, d2)
