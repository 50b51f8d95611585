"""Does the gradient at a quantized point point back into the basin? (docs/theory.md §7)

At ``q = Q(w)`` the identity-STE gradient is ``g_Q = grad L(q)``: the full-precision loss
``L(theta)`` differentiated at the quantized point (not ``L(Q(theta))`` as a function of
the latent weights, which is piecewise constant). Its alignment with a basin direction
``u`` is ``A(u) = cos(-g_Q, u)``. Basin directions: ``u_back = w_ref - q``, its hill part
``u_hill = V_k V_k^T u_back``, its river part ``u_river = u_back - u_hill``, the valley
floor ``u_floor = Pi_floor(q) - q`` and, if given, a QAT solution ``u_qat = theta_qat - q``.

Two null models (always both): the isotropic ``1/sqrt(d)`` (beaten by *any* perturbation
of a minimum, since ``cos(-grad L(w + delta), -delta) ~ delta^T H delta / (|H delta||delta|) > 0``)
and the matched perturbation ``delta' = delta * eps`` (random signs, same magnitudes). The matched
null covers every direction: each draw ``q' = w_ref + delta'`` gets its own ``u_back``, hill part,
valley floor ``Pi_floor(q') - q'`` and ``theta_qat - q'``; along QAT the rounded point is the latent
``w_t`` and the draws are ``w_t + delta_t * eps`` (docs/theory.md §7.4, §7.7).

Coordinates: see :mod:`riverscape.gradients._common` (build the Objective with ``params``
selecting the quantized tensors for ``d = dim theta_Q`` (docs/theory.md §1.2)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..objective import Objective
from ..quant import QParams
from ._common import (
    HillBasis,
    NullComparison,
    Quantizer,
    cosine,
    dot,
    finite_or_none,
    prepare,
    quantized_point,
    rademacher,
    safe_ratio,
    split,
    sq_norm,
)
from .floor import valley_floor

__all__ = ["AlignmentResult", "alignment", "matched_null", "NullSample", "QATAlignment", "alignment_along_qat"]


def _direction_metrics(g_q: Tensor, u_back: Tensor, vectors: Tensor) -> dict:
    """Alignment of ``-g_Q`` with ``u_back`` and its hill/river parts; inward component; gradient subspace energy.

    ``inward`` is the normalised inward component ``I / |g_Q| = cos(-g_Q, u_hill)`` (the same number as
    ``cosine_hill``); ``inward_raw`` is ``I = -g_Q^T u_hill / |u_hill|`` in loss per unit length.
    """
    _, u_hill, u_river = split(u_back, vectors)
    g_coords, g_hill, g_river = split(g_q, vectors)
    hill_norm = math.sqrt(sq_norm(u_hill))
    grad_sq = sq_norm(g_q)
    cosine_hill = cosine(-g_q, u_hill)
    return {
        "cosine_to_fp": cosine(-g_q, u_back),
        "cosine_hill": cosine_hill,
        "cosine_river": cosine(-g_q, u_river),
        "inward": cosine_hill,
        "inward_raw": None if hill_norm == 0.0 else -dot(g_q, u_hill) / hill_norm,
        "chi_k": safe_ratio(sq_norm(g_coords), grad_sq),
        "grad_hill_norm": math.sqrt(sq_norm(g_hill)),
        "grad_river_norm": math.sqrt(sq_norm(g_river)),
    }


@dataclass(frozen=True)
class NullSample:
    """Matched-perturbation null draws (one entry per sign pattern).

    With ``q' = w_ref + delta'`` (``delta' = delta * eps``), ``g' = grad L(q')`` and the target ``t``
    (default ``w_ref``):

    Attributes
    ----------
    cosines : list of float
        ``A' = cos(-g', t - q')`` (``= cos(-g', -delta')`` for the default target).
    inward : list of float
        Normalised inward component ``cos(-g', u_hill')`` with ``u_hill' = V_k V_k^T (t - q')``
        (empty when no vectors were given).
    loss_increases : list of float
        ``L(w_ref + delta') - L(w_ref)``.
    inward_raw : list of float
        ``-g'^T u_hill' / |u_hill'|`` (loss per unit length; empty without vectors).
    directions : dict of str to list of float
        ``cos(-g', u(q'))`` for every extra direction builder ``u`` passed to :func:`matched_null`.
    """

    cosines: list[float]
    inward: list[float]
    loss_increases: list[float]
    inward_raw: list[float] = field(default_factory=list)
    directions: dict = field(default_factory=dict)


def matched_null(
    objective: Objective,
    reference: Tensor,
    delta: Tensor,
    signs: Tensor,
    *,
    vectors: Tensor | None = None,
    target: Tensor | None = None,
    directions: Mapping[str, Callable[[Tensor], Tensor | None]] | None = None,
    progress: bool = False,
) -> NullSample:
    """Evaluate the matched-perturbation null for given sign patterns.

    Parameters
    ----------
    objective : Objective
    reference : Tensor, shape (D,)
        The point that was rounded: ``w_ref`` (or a latent QAT iterate ``w_t``).
    delta : Tensor, shape (D,)
        Its rounding perturbation ``q - w_ref``.
    signs : Tensor, shape (n, D)
        Sign patterns ``eps`` (entries +-1): ``delta' = delta * eps``.
    vectors : Tensor, shape (D, k), optional
        Hill frame for the inward component of each draw.
    target : Tensor, shape (D,), optional
        The point the basin direction ``t - q'`` aims at (default ``reference``; ``theta_fp``
        along a QAT run).
    directions : mapping of str to callable, optional
        Extra directions: ``u(q')`` is built at every draw and ``cos(-g', u(q'))`` stored under its
        name (``None`` or a zero vector gives ``None``), e.g. the valley floor below ``q'``.
    progress : bool
        Show a progress bar over the draws.

    Returns
    -------
    NullSample
        One gradient per draw (plus what the direction builders cost). A point-parallel
        Objective (:func:`riverscape.distributed.point_parallel`) computes draws
        ``rank, rank + W, ...`` in each process and gathers them in order: the same numbers as
        one process, as every process holds all of ``signs``.
    """
    reference = objective.check_theta(reference)
    delta = objective.check_theta(delta)
    target = reference if target is None else objective.check_theta(target)
    if signs.ndim != 2 or signs.shape[1] != objective.dim:
        raise ValueError(f"signs must have shape (n, {objective.dim}), got {tuple(signs.shape)}")
    builders = dict(directions or {})
    base = objective.loss(reference)
    n = signs.shape[0]
    share = objective.point_share(n)  # this process's draws (all of them, unless the Objective is point-parallel)
    draws = []
    with objective.points_here():  # a draw's own evaluations run whole in the process that computes it
        for i in tqdm(share, desc="matched null", leave=False, disable=not progress):
            point = reference + delta * signs[i].to(delta)
            value, g = objective.value_and_grad(point)
            hill = None if vectors is None else _direction_metrics(g, target - point, vectors)
            extra = {}
            for name, build in builders.items():
                u = build(point)
                extra[name] = None if u is None else cosine(-g, u)
            inward = (None, None) if hill is None else (hill["inward"], hill["inward_raw"])
            draws.append((cosine(-g, target - point), value - base, *inward, extra))
    draws = objective.gather_points(draws, n)  # (cosine, loss increase, inward, inward_raw, extra) of every draw
    hill_frame = vectors is not None
    return NullSample(
        cosines=[d[0] for d in draws],
        inward=[d[2] for d in draws] if hill_frame else [],
        loss_increases=[d[1] for d in draws],
        inward_raw=[d[3] for d in draws] if hill_frame else [],
        directions={name: [d[4][name] for d in draws] for name in builders},
    )


@dataclass(frozen=True)
class AlignmentResult:
    """Alignment of the identity-STE gradient at a quantized point with the basin (docs/theory.md §7).

    All cosines are ``A(u) = cos(-g_Q, u)``, ``g_Q = grad L(q)``; ``None`` where a direction is
    zero or was not requested. ``to_dict()`` gives the flat JSON-friendly form.

    Attributes
    ----------
    cosine_to_fp, cosine_hill, cosine_river, cosine_floor, cosine_qat : float or None
        ``A(u_back)``, ``A(u_hill)``, ``A(u_river)``, ``A(u_floor)``, ``A(theta_qat - q)``.
    random_baseline : float
        ``1/sqrt(dim)``, the rms of ``A`` for an isotropic random direction.
    z_iso, z_iso_floor, z_iso_qat : float or None
        ``A * sqrt(dim)`` of ``u_back``, ``u_floor`` and ``theta_qat - q`` (isotropic null).
    inward : float or None
        Normalised inward component ``I / |g_Q| = cos(-g_Q, u_hill)`` (the same number as
        ``cosine_hill``; > 0 points back toward the floor). Its nulls are ``null_inward_*``.
    inward_raw : float or None
        ``I = -g_Q^T u_hill / |u_hill|`` (loss per unit length). It grows with ``|g_Q|``, i.e. with
        how damaging ``delta`` is, so it has no null z.
    chi_k, chi_k_baseline : float
        ``|V_k^T g_Q|^2 / |g_Q|^2`` and its random baseline ``k / dim``.
    null_mean, null_sd, null_z, null_p : float or None
        Matched-perturbation null of ``A(u_back)``: mean, sd, ``(A - mean) / sd`` and the empirical
        one-sided ``p = (1 + #{A' >= A}) / (1 + n)``; likewise ``null_inward_*`` for ``inward``,
        ``null_floor_*`` for ``cosine_floor`` (a floor solve per draw) and ``null_qat_*`` for
        ``cosine_qat``; ``null_loss_increase_*`` for ``L(w_ref + delta') - L(w_ref)``.
    second_order_cosine, second_order_relerr : float or None
        ``cos(g_Q - g_fp, H delta)`` and ``|g_Q - g_fp - H delta| / |g_Q - g_fp|`` with ``H`` at ``w_ref``.
    hessian_direction_cosine : float or None
        ``cos(g_Q, H delta)``.
    hill_restoring_ratio : list of float or None
        ``v_i^T (g_Q - g_fp) / (lambda_i c_i)``, ``c = V_k^T delta`` (1 inside the quadratic basin).
    per_layer : list of dict
        Per quantized tensor: ``cosine_to_fp``, ``random_baseline``, ``z_iso``,
        ``grad_energy_share`` (share of ``|g_Q|^2``), ``delta_energy_share``.
    """

    k: int
    dim: int
    n_quantized: int
    quantizer: str
    gradient: str
    loss_fp: float
    loss_q: float
    metric_fp: float | None
    metric_q: float | None
    delta_norm: float
    relative_delta_norm: float
    grad_norm_q: float
    grad_norm_fp: float
    grad_hill_norm: float
    grad_river_norm: float
    cosine_to_fp: float | None
    cosine_hill: float | None
    cosine_river: float | None
    cosine_floor: float | None
    cosine_qat: float | None
    random_baseline: float
    z_iso: float | None
    inward: float | None
    chi_k: float | None
    chi_k_baseline: float
    n_null: int
    null_mean: float | None
    null_sd: float | None
    null_z: float | None
    null_inward_mean: float | None
    null_inward_sd: float | None
    null_inward_z: float | None
    loss_increase: float
    null_loss_increase_mean: float | None
    null_loss_increase_sd: float | None
    second_order_cosine: float | None
    second_order_relerr: float | None
    hessian_direction_cosine: float | None
    hill_restoring_ratio: list
    eigenvalues: list
    floor_loss: float | None
    per_layer: list = field(default_factory=list)
    inward_raw: float | None = None
    null_p: float | None = None
    null_inward_p: float | None = None
    z_iso_floor: float | None = None
    z_iso_qat: float | None = None
    null_floor_mean: float | None = None
    null_floor_sd: float | None = None
    null_floor_z: float | None = None
    null_floor_p: float | None = None
    null_qat_mean: float | None = None
    null_qat_sd: float | None = None
    null_qat_z: float | None = None
    null_qat_p: float | None = None

    def to_dict(self) -> dict:
        """Flat dict of floats, ints, strings and lists (non-finite numbers become ``None``)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = finite_or_none(value)
        return out


def _per_layer(layers: Sequence[tuple[str, slice]], g_q: Tensor, u_back: Tensor) -> list[dict]:
    grad_sq, delta_sq = sq_norm(g_q), sq_norm(u_back)
    rows = []
    for name, sl in layers:
        numel = sl.stop - sl.start
        a = cosine(-g_q[sl], u_back[sl])
        rows.append(
            {
                "name": name,
                "numel": numel,
                "cosine_to_fp": a,
                "random_baseline": 1.0 / math.sqrt(numel),
                "z_iso": None if a is None else a * math.sqrt(numel),
                "grad_energy_share": safe_ratio(sq_norm(g_q[sl]), grad_sq),
                "delta_energy_share": safe_ratio(sq_norm(u_back[sl]), delta_sq),
            }
        )
    return rows


def _iso(value: float | None, dim: int) -> float | None:
    """Isotropic-null z ``A sqrt(dim)``."""
    return None if value is None else value * math.sqrt(dim)


def alignment(
    objective: Objective,
    theta_fp: Tensor | None,
    quantizer: Quantizer,
    *,
    theta_q: Tensor | None = None,
    basis: HillBasis | None = None,
    theta_qat: Tensor | None = None,
    n_null: int = 50,
    floor: bool = True,
    floor_steps: int = 100,
    floor_null: bool = True,
    per_layer: bool = True,
    seed: int = 0,
    progress: bool = True,
    **map_options,
) -> AlignmentResult:
    """Alignment metrics of the gradient at a quantized point (docs/theory.md §7).

    Parameters
    ----------
    objective, theta_fp, quantizer, basis
        As in :func:`riverscape.gradients.damage`: the restricted objective, the reference point
        ``w_ref`` (default ``objective.theta0``), the quantizer or map, and the hill subspace at
        ``w_ref`` (computed with k = 10 when ``None``).
    theta_q : Tensor, shape (D,), optional
        The quantized point ``q`` (default ``Q(theta_fp)``, round to nearest).
    theta_qat : Tensor, shape (D,), optional
        A QAT solution (latent or deployed); gives ``cosine_qat = A(theta_qat - q)`` and its null.
    n_null : int
        Draws of the matched sign-flip null (0 to skip; one gradient each). The empirical p-values
        cannot go below ``1 / (n_null + 1)``.
    floor : bool
        Compute the valley floor below ``q`` for ``cosine_floor`` (a k-dim L-BFGS solve).
    floor_steps : int
        Iterations of that solve (and of each null draw's).
    floor_null : bool
        With ``floor``: the matched null of ``cosine_floor``, one floor solve below every draw
        ``q'`` (``n_null`` solves of at most ``floor_steps`` iterations).
    per_layer : bool
        Per-quantized-tensor alignment and gradient energy shares.
    seed : int
        Seeds Lanczos (when the basis is computed) and the null's sign patterns.
    progress : bool
        Progress bar over the null draws.

    Returns
    -------
    AlignmentResult
    """
    if n_null < 0:
        raise ValueError("n_null must be non-negative")
    theta_fp, qmap, op, lam, V = prepare(
        objective, theta_fp, quantizer, basis=basis, seed=seed, map_options=map_options
    )
    q = quantized_point(objective, qmap, theta_fp, theta_q)
    k = V.shape[1]
    dim = objective.dim

    loss_fp, g_fp = objective.value_and_grad(theta_fp)
    loss_q, g_q = objective.value_and_grad(q)
    delta = q - theta_fp
    u_back = -delta
    metrics = _direction_metrics(g_q, u_back, V)

    def floor_direction(point: Tensor) -> Tensor:
        return valley_floor(objective, point, V, reference=theta_fp, steps=floor_steps).point - point

    cosine_floor = floor_loss = None
    builders: dict[str, Callable[[Tensor], Tensor]] = {}
    if floor:
        res = valley_floor(objective, q, V, reference=theta_fp, steps=floor_steps)
        cosine_floor, floor_loss = cosine(-g_q, res.point - q), res.loss_floor
        if floor_null:
            builders["floor"] = floor_direction
    cosine_qat = None
    if theta_qat is not None:
        theta_qat = objective.check_theta(theta_qat)
        cosine_qat = cosine(-g_q, theta_qat - q)
        builders["qat"] = lambda point: theta_qat - point

    gen = torch.Generator().manual_seed(seed)
    null = matched_null(objective, theta_fp, delta, rademacher((n_null, dim), gen, delta), vectors=V, directions=builders,
                        progress=progress)
    a = metrics["cosine_to_fp"]
    back = NullComparison.of(a, null.cosines)
    inward = NullComparison.of(metrics["inward"], null.inward)
    increase = NullComparison.of(loss_q - loss_fp, null.loss_increases)
    nulls = {}
    if "floor" in builders:
        nulls.update(NullComparison.of(cosine_floor, null.directions["floor"]).summary("null_floor"))
    if "qat" in builders:
        nulls.update(NullComparison.of(cosine_qat, null.directions["qat"]).summary("null_qat"))

    h_delta = op.torch_matvec(delta)
    bias = g_q - g_fp
    coords = V.T @ delta
    restoring = (V.T @ bias).double() / (lam.to(coords.device) * coords.double())
    metric_fp = objective.metric(theta_fp)
    return AlignmentResult(
        k=k,
        dim=dim,
        n_quantized=qmap.n_quantized,
        quantizer=qmap.quantizer.describe(),
        gradient="grad L(theta) at theta_q (identity STE)",
        loss_fp=loss_fp,
        loss_q=loss_q,
        metric_fp=metric_fp,
        metric_q=objective.metric(q),
        delta_norm=math.sqrt(sq_norm(delta)),
        relative_delta_norm=math.sqrt(sq_norm(delta) / max(sq_norm(theta_fp), 1e-300)),
        grad_norm_q=math.sqrt(sq_norm(g_q)),
        grad_norm_fp=math.sqrt(sq_norm(g_fp)),
        grad_hill_norm=metrics["grad_hill_norm"],
        grad_river_norm=metrics["grad_river_norm"],
        cosine_to_fp=a,
        cosine_hill=metrics["cosine_hill"],
        cosine_river=metrics["cosine_river"],
        cosine_floor=cosine_floor,
        cosine_qat=cosine_qat,
        random_baseline=1.0 / math.sqrt(dim),
        z_iso=_iso(a, dim),
        inward=metrics["inward"],
        chi_k=metrics["chi_k"],
        chi_k_baseline=k / dim,
        n_null=n_null,
        **back.summary("null"),
        **inward.summary("null_inward"),
        loss_increase=loss_q - loss_fp,
        null_loss_increase_mean=increase.null_mean,
        null_loss_increase_sd=increase.null_sd,
        second_order_cosine=cosine(bias, h_delta),
        second_order_relerr=safe_ratio(math.sqrt(sq_norm(bias - h_delta)), math.sqrt(sq_norm(bias))),
        hessian_direction_cosine=cosine(g_q, h_delta),
        hill_restoring_ratio=[finite_or_none(float(r)) for r in restoring],
        eigenvalues=lam.tolist(),
        floor_loss=floor_loss,
        per_layer=_per_layer(qmap.per_layer(), g_q, u_back) if per_layer else [],
        inward_raw=metrics["inward_raw"],
        z_iso_floor=_iso(cosine_floor, dim),
        z_iso_qat=_iso(cosine_qat, dim),
        **nulls,
    )


#: per-row series of :class:`QATAlignment` that hold a measurement (not a label or a null)
_QAT_SERIES = ("loss_q", "metric_q", "delta_norm", "hill_fraction", "curvature_share", "distance_to_fp", "hill_distance_to_fp",
               "river_distance_to_fp", "cosine_to_fp", "cosine_hill", "cosine_river", "cosine_latent", "inward", "chi_k", "grad_norm_q",
               "inward_raw")
#: the statistics along QAT with a matched null: (series, prefix of its null fields)
_QAT_NULLS = (("cosine_to_fp", "null"), ("inward", "null_inward"), ("cosine_latent", "null_latent"))


@dataclass(frozen=True)
class QATAlignment:
    """Alignment and hill/river metrics along a QAT trajectory (one entry per logged step).

    The hill frame ``V_k`` and the Hessian are those at ``theta_fp`` for every step (the
    reference basin), so the series are comparable across steps.

    Attributes
    ----------
    steps : list of int
    loss_q, metric_q : list of float
        ``L(q_t)`` with ``q_t = Q(w_t)``, and the metric (accuracy) there (``None`` without a metric).
    delta_norm : list of float
        ``|q_t - w_t|`` (rounding perturbation of the latent point).
    hill_fraction, curvature_share : list of float
        ``E_H`` and ``C_H`` of ``delta_t = q_t - w_t`` (``H`` at ``theta_fp``).
    distance_to_fp, hill_distance_to_fp, river_distance_to_fp : list of float
        ``|q_t - w_ref|`` and its hill / river parts.
    cosine_to_fp, cosine_hill, cosine_river, cosine_latent : list of float
        ``A(u_back)``, ``A(u_hill)``, ``A(u_river)``, ``A(w_t - q_t)``.
    inward, inward_raw : list of float
        Normalised inward component ``cos(-g_Q, u_hill)`` (= ``cosine_hill``) and the raw ``I``.
    chi_k, grad_norm_q : list of float
    n_null : int
        Matched-null draws per row (0: no null).
    null_z, null_p : list of float
        Matched null of ``cosine_to_fp`` at every row: the draws ``q' = w_t + delta_t * eps`` (the
        latent point's rounding magnitudes with random signs), the statistic ``cos(-grad L(q'), w_ref - q')``;
        z and empirical one-sided p. Likewise ``null_inward_*`` (``u_hill' = V_k V_k^T (w_ref - q')``)
        and ``null_latent_*`` (``cos(-grad L(q'), w_t - q')``) with their means ``null_*_mean``.
    """

    steps: list
    loss_q: list
    metric_q: list
    delta_norm: list
    hill_fraction: list
    curvature_share: list
    distance_to_fp: list
    hill_distance_to_fp: list
    river_distance_to_fp: list
    cosine_to_fp: list
    cosine_hill: list
    cosine_river: list
    cosine_latent: list
    inward: list
    chi_k: list
    grad_norm_q: list
    k: int
    dim: int
    random_baseline: float
    chi_k_baseline: float
    inward_raw: list = field(default_factory=list)
    n_null: int = 0
    null_mean: list = field(default_factory=list)
    null_z: list = field(default_factory=list)
    null_p: list = field(default_factory=list)
    null_inward_mean: list = field(default_factory=list)
    null_inward_z: list = field(default_factory=list)
    null_inward_p: list = field(default_factory=list)
    null_latent_mean: list = field(default_factory=list)
    null_latent_z: list = field(default_factory=list)
    null_latent_p: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Flat dict of lists (JSON-friendly)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, list):
                out[key] = [finite_or_none(v) if isinstance(v, float) else v for v in value]
        return out


def alignment_along_qat(
    objective: Objective,
    theta_fp: Tensor | None,
    quantizer: Quantizer,
    latent_trajectory: Tensor,
    *,
    steps: Sequence[int] | None = None,
    basis: HillBasis | None = None,
    qparams: Sequence[QParams] | None = None,
    n_null: int = 50,
    seed: int = 0,
    progress: bool = True,
    **map_options,
) -> QATAlignment:
    """Track alignment and hill/river geometry along a QAT run, with a matched null per row (docs/theory.md §7.7).

    Parameters
    ----------
    objective : Objective
    theta_fp : Tensor, shape (D,), or None
        Reference FP point (default ``objective.theta0``); ``V_k`` and ``H`` are taken there.
    quantizer : UniformQuantizer or QuantMap
    latent_trajectory : Tensor, shape (n, D)
        Latent weights ``w_t`` (e.g. ``QATResult.latent_trajectory``).
    steps : sequence of int, optional
        Labels of the rows (e.g. ``QATResult.trajectory_steps``); default ``0..n-1``.
    basis : HillBasis, optional
        See :func:`alignment`.
    qparams : list of QParams, optional
        Frozen quantization parameters (e.g. ``qmap.qparams(theta_fp)``); default: recomputed
        from each ``w_t``.
    n_null : int
        Matched-null draws per row (0 skips the null; one gradient each): ``w_t + delta_t * eps``.
    seed : int
        Seeds Lanczos (when the basis is computed) and the sign patterns (one stream over the rows).
    progress : bool

    Returns
    -------
    QATAlignment
        One gradient, one loss and one HVP per row, plus ``n_null`` gradients.
    """
    if n_null < 0:
        raise ValueError("n_null must be non-negative")
    theta_fp, qmap, op, lam, V = prepare(
        objective, theta_fp, quantizer, basis=basis, seed=seed, map_options=map_options
    )
    trajectory = latent_trajectory.to(device=objective.device, dtype=objective.dtype)
    if trajectory.ndim != 2 or trajectory.shape[1] != objective.dim:
        raise ValueError(f"latent_trajectory must have shape (n, {objective.dim}), got {tuple(trajectory.shape)}")
    labels = list(range(trajectory.shape[0])) if steps is None else [int(s) for s in steps]
    if len(labels) != trajectory.shape[0]:
        raise ValueError(f"{len(labels)} step labels for {trajectory.shape[0]} trajectory rows")
    series: dict[str, list] = {name: [] for name in _QAT_SERIES}
    nulls: dict[str, list] = {f"{prefix}_{part}": [] for _, prefix in _QAT_NULLS for part in ("mean", "z", "p")} if n_null else {}
    gen = torch.Generator().manual_seed(seed)
    for w in tqdm(trajectory, desc="QAT alignment", leave=False, disable=not progress):
        q = qmap(w, qparams)
        loss_q, g_q = objective.value_and_grad(q)
        delta = q - w
        metrics = _direction_metrics(g_q, theta_fp - q, V)
        coords, _, _ = split(delta, V)
        _, disp_hill, disp_river = split(q - theta_fp, V)
        quad = dot(delta, op.torch_matvec(delta))
        row = {
            "loss_q": loss_q,
            "metric_q": objective.metric(q),
            "delta_norm": math.sqrt(sq_norm(delta)),
            "hill_fraction": safe_ratio(sq_norm(coords), sq_norm(delta)),
            "curvature_share": safe_ratio(float((lam * coords.double() ** 2).sum()), quad),
            "distance_to_fp": math.sqrt(sq_norm(q - theta_fp)),
            "hill_distance_to_fp": math.sqrt(sq_norm(disp_hill)),
            "river_distance_to_fp": math.sqrt(sq_norm(disp_river)),
            "cosine_latent": cosine(-g_q, w - q),
            "grad_norm_q": math.sqrt(sq_norm(g_q)),
            **{key: metrics[key] for key in ("cosine_to_fp", "cosine_hill", "cosine_river", "inward", "inward_raw", "chi_k")},
        }
        for key, value in row.items():
            series[key].append(value)
        if n_null:
            null = matched_null(objective, w, delta, rademacher((n_null, objective.dim), gen, delta), vectors=V, target=theta_fp,
                                directions={"latent": lambda point, w=w: w - point})
            draws = {"cosine_to_fp": null.cosines, "inward": null.inward, "cosine_latent": null.directions["latent"]}
            for key, prefix in _QAT_NULLS:
                for name, value in NullComparison.of(row[key], draws[key]).summary(prefix).items():
                    if not name.endswith("_sd"):
                        nulls[name].append(value)
    return QATAlignment(
        steps=labels,
        k=V.shape[1],
        dim=objective.dim,
        random_baseline=1.0 / math.sqrt(objective.dim),
        chi_k_baseline=V.shape[1] / objective.dim,
        n_null=n_null,
        **series,
        **nulls,
    )
