"""PTQ damage: second-order prediction, its breakdown, and the hill/river decomposition.

docs/theory.md §6.2 (hill/river split), §6.5 (basin widths, rho_i) and §6.3-§6.4 (damage predictions, the
profile ``p(t) = L(w_ref + t delta) - L(w_ref)`` and the breakdown scale ``t_b``). The loss
is the full-precision ``L(theta)`` evaluated at perturbed points; ``g`` and ``H`` are taken at
``w_ref`` (the FP point). Coordinates: see :mod:`riverscape.gradients._common`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..landscape.curvature import hessian_trace
from ..linalg import ScaledOperator
from ..objective import HessianOperator, Objective
from ._common import (
    HillBasis,
    Quantizer,
    dot,
    finite_or_none,
    per_coordinate_scale,
    prepare,
    quantized_point,
    random_orthonormal,
    safe_ratio,
    split,
    sq_norm,
)
from .floor import valley_floor

__all__ = ["DamageResult", "damage", "basin_widths", "breakdown_scale"]


def breakdown_scale(t: Sequence[float], measured: Sequence[float], quadratic: Sequence[float], *, atol: float = 1e-6) -> float:
    """First ``t`` where the measured profile leaves the quadratic one (docs/theory.md §6.4).

    ``t_b = min{t : |p(t) - p_2(t)| > 0.5 |p_2(t)| + atol}``, linearly interpolated between
    the last grid point inside and the first one outside; ``inf`` if the profile never breaks.

    >>> breakdown_scale([0, 1, 2], [0, 1, 4], [0, 1, 4])
    inf
    >>> breakdown_scale([0, 1, 2], [0, 1, 8], [0, 1, 4], atol=0.0)
    1.2
    """
    excess = [abs(p - p2) - 0.5 * abs(p2) - atol for p, p2 in zip(measured, quadratic)]
    for j, e in enumerate(excess):
        if e > 0:
            if j == 0:
                return float(t[0])
            e0 = excess[j - 1]
            return float(t[j - 1] + (t[j] - t[j - 1]) * (-e0) / (e - e0))
    return math.inf


POINTS_BYTES = 2**28
"""Memory for the points of one batched evaluation along directions (256 MiB): a scan of 2k x 29 points
of an 11M-parameter model would otherwise ask for 26 GB at once. An Objective's ``chunk_size`` bounds it further."""


def _losses_along(objective: Objective, theta: Tensor, dirs: Tensor, t: Tensor) -> Tensor:
    """``L(theta + t[r, j] * dirs[r])`` as a float64 CPU tensor of ``t``'s shape, built and evaluated in bounded chunks."""
    rows, cols = t.shape
    flat_t = t.reshape(-1)
    chunk = max(1, min(rows * cols, POINTS_BYTES // max(1, theta.numel() * theta.element_size()), objective.chunk_size or rows * cols))
    out = torch.empty(rows * cols, dtype=torch.float64)
    for start in range(0, rows * cols, chunk):
        index = torch.arange(start, min(start + chunk, rows * cols))
        points = theta + flat_t[index, None] * dirs[index // cols]
        out[index] = objective.losses(points).cpu().double()
    return out.reshape(rows, cols)


def basin_widths(
    objective: Objective,
    theta: Tensor,
    values: Tensor,
    vectors: Tensor,
    tau: float,
    *,
    rtol: float = 1e-9,
    max_iter: int = 80,
) -> tuple[list[float], list[float]]:
    """Measured basin widths along ``+-v_i`` by a scan and bisection (docs/theory.md §6.5).

    ``beta_i^+-(tau) = min{t > 0 : L(theta +- t v_i) - L(theta) >= tau}``. The search scans
    ``t = b_i 2^(j/2)``, ``j = -8..20`` around the quadratic guess ``b_i = sqrt(2 tau / lambda_i)``
    (all directions and signs in one batched evaluation), then bisects the first bracket
    (all directions at once). Cost: about ``2k (29 + log2(0.4 / rtol))`` loss evaluations.

    Parameters
    ----------
    objective : Objective
    theta : Tensor, shape (D,)
    values : Tensor, shape (k,)
        Eigenvalues (only used for the starting guess).
    vectors : Tensor, shape (D, k)
    tau : float
        Loss tolerance (> 0).
    rtol : float
        Relative bracket width at which bisection stops.
    max_iter : int

    Returns
    -------
    plus, minus : list of float, length k
        Widths along ``+v_i`` and ``-v_i``; ``inf`` if the loss stays below ``tau`` up to ``1024 b_i``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    theta = objective.check_theta(theta)
    k = vectors.shape[1]
    lam = torch.as_tensor(values, dtype=torch.float64)
    fallback = float(lam.abs().max()) if float(lam.abs().max()) > 0 else 1.0
    guess = torch.sqrt(2.0 * tau / torch.where(lam > 0, lam, torch.full_like(lam, fallback)))
    dirs = torch.cat([vectors, -vectors], dim=1).T  # (2k, D): +v_1..+v_k, -v_1..-v_k
    base = torch.cat([guess, guess]).to(theta)
    factors = 2.0 ** (torch.arange(-8, 21, dtype=torch.float64) / 2.0)
    scan_t = base[:, None] * factors.to(theta)[None, :]  # (2k, n)
    loss0 = objective.loss(theta)
    above = (_losses_along(objective, theta, dirs, scan_t) - loss0) >= tau
    lo = torch.zeros(2 * k, dtype=torch.float64)
    hi = torch.full((2 * k,), math.inf, dtype=torch.float64)
    for r in range(2 * k):
        hits = torch.nonzero(above[r]).flatten()
        if hits.numel():
            j = int(hits[0])
            hi[r] = float(scan_t[r, j])
            lo[r] = float(scan_t[r, j - 1]) if j > 0 else 0.0
    active = torch.isfinite(hi)
    for _ in range(max_iter):
        if not bool(active.any()) or bool(((hi - lo)[active] <= rtol * hi[active]).all()):
            break
        mid = torch.where(active, 0.5 * (lo + hi), torch.zeros_like(lo))
        crossed = (_losses_along(objective, theta, dirs, mid.to(theta)[:, None])[:, 0] - loss0) >= tau
        hi = torch.where(active & crossed, mid, hi)
        lo = torch.where(active & ~crossed, mid, lo)
    width = torch.where(active, 0.5 * (lo + hi), hi)
    return width[:k].tolist(), width[k:].tolist()


@dataclass(frozen=True)
class DamageResult:
    """Measured vs predicted PTQ damage and its hill/river decomposition (docs/theory.md §6).

    ``delta = q - w_ref``; ``g``, ``H`` at ``w_ref``; ``c = V_k^T delta``, ``delta_H = V_k c``,
    ``delta_R = delta - delta_H``. ``to_dict()`` gives the flat JSON-friendly form
    (infinities become ``None``).

    Attributes
    ----------
    measured_loss_increase : float
        ``L(q) - L(w_ref)``.
    predicted_first_order, predicted_loss_increase, predicted_hill_only, predicted_block_diagonal : float
        ``g^T delta``; the second-order prediction ``g^T delta + 1/2 delta^T H delta``;
        ``1/2 sum_i lambda_i c_i^2``; ``g^T delta + 1/2 sum_l delta_l^T H_ll delta_l`` (quantized
        tensors as blocks).
    ratio : float or None
        ``r = measured / predicted_loss_increase``.
    breakdown_scale : float
        ``t_b`` (``inf`` if the profile never leaves the quadratic within ``profile_max``).
    inside_basin : bool
        ``t_b > 1``.
    hill_fraction, hill_energy_baseline : float
        ``E_H = |delta_H|^2 / |delta|^2`` and the random baseline ``k / dim``.
    curvature_share : float or None
        ``C_H = sum_i lambda_i c_i^2 / delta^T H delta``.
    dL_hill, dL_river : float
        ``L(w_ref + delta_H) - L(w_ref)`` and ``L(w_ref + delta_R) - L(w_ref)``; ``ratio_hill``,
        ``ratio_river`` compare them with their own quadratic predictions.
    profile_t, profile_loss, profile_quadratic : list of float
        ``t``, ``p(t)`` and ``p_2(t) = t g^T delta + t^2/2 delta^T H delta``.
    quadratic_widths, widths_plus, widths_minus : list of float
        ``beta_i = sqrt(2 tau / lambda_i)`` and the measured widths along ``+-v_i``.
    rho, rho_max : list of float, float
        ``rho_i = |c_i| / beta_i^{sign(c_i)}`` (realised grid-to-basin ratio; > 1: outside).
    rho_expected : list of float
        ``sqrt(sum_j v_ij^2 s_j^2 / 12) / beta_i`` (expected under the RTN noise model).
    floor_recovery, random_subspace_recovery : float or None
        Loss increase left after re-optimising ``q`` inside the hill subspace
        (``L(Pi_floor(q)) - L(w_ref)``) and inside a random k-dim subspace (control).
    random_direction_loss_increase : float or None
        Mean ``L(w_ref + |delta| r) - L(w_ref)`` over random unit ``r`` on the quantized coordinates.
    expected_rtn_damage : float or None
        ``(1/24) sum_j H_jj s_j^2`` by Hutch++ (uniform rounding noise; bits >= 2).
    per_layer : list of dict
        Per quantized tensor: ``linear``, ``quadratic_block``, ``predicted``, ``measured``
        (``L(w_ref + delta_l) - L(w_ref)``), ``delta_norm``.
    """

    k: int
    dim: int
    n_quantized: int
    quantizer: str
    tau: float
    loss_fp: float
    loss_q: float
    metric_fp: float | None
    metric_q: float | None
    delta_norm: float
    measured_loss_increase: float
    predicted_first_order: float
    predicted_loss_increase: float
    predicted_hill_only: float
    predicted_block_diagonal: float
    ratio: float | None
    breakdown_scale: float
    inside_basin: bool
    hill_fraction: float | None
    hill_energy_baseline: float
    curvature_share: float | None
    dL_hill: float
    dL_river: float
    ratio_hill: float | None
    ratio_river: float | None
    eigenvalues: list
    profile_t: list
    profile_loss: list
    profile_quadratic: list
    quadratic_widths: list
    widths_plus: list
    widths_minus: list
    rho: list
    rho_max: float | None
    rho_expected: list
    floor_recovery: float | None
    random_subspace_recovery: float | None
    random_direction_loss_increase: float | None
    expected_rtn_damage: float | None
    per_layer: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Flat dict of floats, ints, strings and lists (non-finite numbers become ``None``)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = finite_or_none(value)
            elif isinstance(value, list):
                out[key] = [finite_or_none(v) if isinstance(v, float) else v for v in value]
        return out


def _layer_deltas(layers: Sequence[tuple[str, slice]], delta: Tensor) -> Tensor:
    """``delta`` restricted to each layer (zeros elsewhere), as columns of a ``(D, n_layers)`` matrix."""
    embedded = torch.zeros(delta.shape[0], len(layers), dtype=delta.dtype, device=delta.device)
    for j, (_, sl) in enumerate(layers):
        embedded[sl, j] = delta[sl]
    return embedded


def _layer_blocks(op: HessianOperator, layers: Sequence[tuple[str, slice]], embedded: Tensor, delta: Tensor, grad: Tensor) -> list[dict]:
    """Linear and block-quadratic terms ``g_l^T delta_l``, ``1/2 delta_l^T H_ll delta_l`` per layer."""
    products = op.torch_matmat(embedded)
    rows = []
    for j, (name, sl) in enumerate(layers):
        linear = dot(grad[sl], delta[sl])
        quadratic = 0.5 * dot(delta[sl], products[sl, j])
        rows.append(
            {
                "name": name,
                "numel": sl.stop - sl.start,
                "delta_norm": math.sqrt(sq_norm(delta[sl])),
                "linear": linear,
                "quadratic_block": quadratic,
                "predicted": linear + quadratic,
            }
        )
    return rows


def damage(
    objective: Objective,
    theta_fp: Tensor | None,
    quantizer: Quantizer,
    *,
    theta_q: Tensor | None = None,
    basis: HillBasis | None = None,
    tau: float = 0.05,
    profile_points: int = 16,
    profile_max: float = 1.5,
    breakdown_atol: float = 1e-6,
    widths: bool | tuple[Sequence[float], Sequence[float]] = True,
    floor: bool = True,
    floor_steps: int = 100,
    random_control: bool = True,
    rtn_matvecs: int = 60,
    seed: int = 0,
    progress: bool = True,
    **map_options,
) -> DamageResult:
    """Second-order analysis of the PTQ perturbation ``delta = q - w_ref`` (docs/theory.md §6).

    Parameters
    ----------
    objective : Objective
        Build it with ``params`` selecting the quantized tensors for ``d = dim theta_Q`` (docs/theory.md §1.2).
    theta_fp : Tensor, shape (D,), or None
        Reference FP point ``w_ref`` (default ``objective.theta0``).
    quantizer : UniformQuantizer or QuantMap
        A quantizer (wrapped in a ``QuantMap`` with ``map_options``) or a ready map.
    theta_q : Tensor, shape (D,), optional
        The quantized point (default ``Q(theta_fp)``); any perturbed point works.
    basis : HillBasis, optional
        The hill subspace at ``theta_fp`` (top-k eigenpairs and the Hessian operator there,
        :class:`~riverscape.gradients.HillBasis`); computed with k = 10 when ``None``.
    tau : float
        Loss tolerance of the basin widths (nats for cross-entropy).
    profile_points, profile_max : int, float
        Grid ``t = linspace(0, profile_max, profile_points)`` of the profile ``p(t)``.
    breakdown_atol : float
        Absolute slack ``epsilon`` of the breakdown criterion.
    widths : bool or (plus, minus)
        Measure basin widths (scan + bisection along ``+-v_i``, batched) and ``rho``; or pass
        the ``(plus, minus)`` pair from :func:`basin_widths` (same ``theta_fp``, ``tau`` and
        eigenvectors) to reuse it across bit-widths.
    floor, floor_steps : bool, int
        Re-optimise ``q`` inside the hill subspace (k-dim L-BFGS) for ``floor_recovery``.
    random_control : bool
        The same correction in a random orthonormal k-dim subspace (QR of a Gaussian drawn
        from ``torch.Generator().manual_seed(seed)``), and the damage of a random
        perturbation with ``|delta|`` on the quantized coordinates (4 draws, generator ``seed + 1``).
    rtn_matvecs : int
        Hutch++ budget for ``expected_rtn_damage`` (0 skips it; skipped at 1 bit).
    seed : int
        Seeds Lanczos (when the basis is computed) and the random controls.
    progress : bool
        Progress bar over the stages.

    Returns
    -------
    DamageResult
    """
    if profile_points < 2 or profile_max <= 0:
        raise ValueError("profile_points must be >= 2 and profile_max > 0")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    bar = tqdm(total=5, desc="damage", leave=False, disable=not progress)
    theta_fp, qmap, op, lam, V = prepare(
        objective, theta_fp, quantizer, basis=basis, seed=seed, map_options=map_options
    )
    q = quantized_point(objective, qmap, theta_fp, theta_q)
    k, dim = V.shape[1], objective.dim
    bar.update()

    loss_fp, g = objective.value_and_grad(theta_fp)
    delta = q - theta_fp
    coords, d_hill, d_river = split(delta, V)
    h_delta, h_hill = op.torch_matmat(torch.stack([delta, d_hill], dim=1)).T
    linear = dot(g, delta)
    curvature = dot(delta, h_delta)
    quadratic = linear + 0.5 * curvature
    hill_only = 0.5 * float((lam * coords.cpu().double() ** 2).sum())
    layer_deltas = _layer_deltas(qmap.per_layer(), delta)
    layers = _layer_blocks(op, qmap.per_layer(), layer_deltas, delta, g)
    block_diagonal = linear + sum(row["quadratic_block"] for row in layers)
    hill_quad = dot(g, d_hill) + 0.5 * dot(d_hill, h_hill)
    river_quad = dot(g, d_river) + 0.5 * dot(d_river, h_delta - h_hill)
    bar.update()

    gen = torch.Generator().manual_seed(seed + 1)
    t = torch.linspace(0.0, profile_max, profile_points, dtype=torch.float64)
    points = [q, theta_fp + d_hill, theta_fp + d_river]
    points += list(theta_fp[None, :] + layer_deltas.T)
    n_random = 4 if random_control else 0
    mask = qmap.mask.to(device=delta.device, dtype=delta.dtype)
    for _ in range(n_random):
        r = torch.randn(dim, generator=gen, dtype=torch.float64).to(delta) * mask
        points.append(theta_fp + r * (math.sqrt(sq_norm(delta)) / math.sqrt(sq_norm(r))))
    profile_pts = theta_fp[None, :] + t.to(delta)[:, None] * delta[None, :]
    losses = objective.losses(torch.cat([torch.stack(points), profile_pts])).cpu().double() - loss_fp
    measured, dl_hill, dl_river = (float(x) for x in losses[:3])
    layer_measured = losses[3 : 3 + len(layers)]
    random_losses = losses[3 + len(layers) : 3 + len(layers) + n_random]
    profile = losses[3 + len(layers) + n_random :].tolist()
    profile_quad = (t * linear + 0.5 * t**2 * curvature).tolist()
    for row, value in zip(layers, layer_measured):
        row["measured"] = float(value)
    bar.update()

    quad_widths = [math.sqrt(2.0 * tau / float(v)) if float(v) > 0 else math.inf for v in lam]
    plus: list[float] = []
    minus: list[float] = []
    rho: list[float] = []
    rho_max = None
    if isinstance(widths, (tuple, list)):
        plus, minus = (list(map(float, w)) for w in widths)
        if len(plus) != k or len(minus) != k:
            raise ValueError(f"precomputed widths must hold {k} values per sign")
    elif widths:
        plus, minus = basin_widths(objective, theta_fp, lam, V, tau)
    if plus:
        rho = [abs(float(c)) / (p if float(c) >= 0 else m) for c, p, m in zip(coords, plus, minus)]
        rho_max = max(rho)
    scales = per_coordinate_scale(qmap, theta_fp)
    noise_sd = torch.sqrt(((V.double() ** 2) * (scales.double() ** 2 / 12.0)[:, None]).sum(0)).cpu()
    rho_expected = [float(s) / b for s, b in zip(noise_sd, quad_widths)]
    expected_rtn = None
    if rtn_matvecs > 0 and qmap.quantizer.bits >= 2:
        trace = hessian_trace(objective, theta_fp, matvecs=rtn_matvecs, operator=ScaledOperator(op, scales), seed=seed)
        expected_rtn = trace.value / 24.0
    bar.update()

    floor_recovery = random_recovery = None
    if floor:
        floor_recovery = valley_floor(objective, q, V, reference=theta_fp, steps=floor_steps).loss_floor - loss_fp
        if random_control:
            frame = random_orthonormal(dim, k, torch.Generator().manual_seed(seed), delta)
            random_recovery = valley_floor(objective, q, frame, reference=theta_fp, steps=floor_steps).loss_floor - loss_fp
    bar.update()
    bar.close()

    t_b = breakdown_scale(t.tolist(), profile, profile_quad, atol=breakdown_atol)
    hill_share = safe_ratio(sq_norm(coords), sq_norm(delta))
    return DamageResult(
        k=k,
        dim=dim,
        n_quantized=qmap.n_quantized,
        quantizer=qmap.quantizer.describe(),
        tau=tau,
        loss_fp=loss_fp,
        loss_q=loss_fp + measured,
        metric_fp=objective.metric(theta_fp),
        metric_q=objective.metric(q),
        delta_norm=math.sqrt(sq_norm(delta)),
        measured_loss_increase=measured,
        predicted_first_order=linear,
        predicted_loss_increase=quadratic,
        predicted_hill_only=hill_only,
        predicted_block_diagonal=block_diagonal,
        ratio=safe_ratio(measured, quadratic),
        breakdown_scale=t_b,
        inside_basin=t_b > 1.0,
        hill_fraction=hill_share,
        hill_energy_baseline=k / dim,
        curvature_share=safe_ratio(2.0 * hill_only, curvature),
        dL_hill=dl_hill,
        dL_river=dl_river,
        ratio_hill=safe_ratio(dl_hill, hill_quad),
        ratio_river=safe_ratio(dl_river, river_quad),
        eigenvalues=lam.tolist(),
        profile_t=t.tolist(),
        profile_loss=profile,
        profile_quadratic=profile_quad,
        quadratic_widths=quad_widths,
        widths_plus=list(plus),
        widths_minus=list(minus),
        rho=rho,
        rho_max=rho_max,
        rho_expected=rho_expected,
        floor_recovery=floor_recovery,
        random_subspace_recovery=random_recovery,
        random_direction_loss_increase=float(random_losses.mean()) if n_random else None,
        expected_rtn_damage=expected_rtn,
        per_layer=layers,
    )

