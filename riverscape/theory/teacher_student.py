"""Teacher-student models of STE training: simulations and their large-d theory (docs/theory.md §8).

Two settings from the seed papers, implemented from their abstracts (their equations were not
available; everything below labelled "derivation" is riverscape's own):

**Linear STE model** (docs/theory.md §8.1, arXiv 2510.10693). Teacher ``y = w*.x / sqrt(d) + sigma xi``,
``x ~ N(0, I_d)``, ``w*`` with i.i.d. entries (+-1 or N(0, 1)). Student latent weights ``w``,
deployed weights ``Q(w)`` (b-bit uniform grid of range R). Online SGD with a fresh sample per step
and the straight-through estimator (gradient evaluated at ``Q(w)``, applied to ``w``)::

    w <- w + eta * (y - Q(w).x / sqrt(d)) * x / sqrt(d) * g(w),   g = 1 (identity STE) or 1[|w| <= R] (clipped)

Time ``tau = t / d``; generalisation error ``eps = 1/2 E(y - Q(w).x/sqrt d)^2 = |w* - Q(w)|^2/(2d) + sigma^2/2``.

**Mean-field limit (derivation).** Write ``e = w* - Q(w)``. One step changes coordinate i by
``Dw_i = eta/d (e.x) x_i g_i + eta sigma/sqrt(d) xi x_i g_i``. Over the fresh sample,
``E[Dw_i] = eta e_i g_i / d`` and ``Var[Dw_i] = eta^2 g_i (|e|^2 + 2 e_i^2 + d sigma^2) / d^2
= eta^2 g_i (2 eps + O(1/d)) / d``; covariances between coordinates are ``O(1/d^2)`` per step.
Over one unit of ``tau`` (d steps) the increments add up to drift ``eta e_i g_i`` and variance
``2 eta^2 eps g_i``, so as ``d -> infinity`` (with ``eps`` self-averaging, fluctuations ``O(1/sqrt d)``)
each coordinate follows the McKean-Vlasov diffusion

    dw = eta (w* - Q(w)) g(w) dtau + eta sqrt(2 eps(tau) g(w)) dB,
    eps(tau) = 1/2 E_{w*} E_{w ~ mu_tau(.|w*)} (w* - Q(w))^2 + sigma^2 / 2,

i.e. the density ``mu_tau(w | w*)`` of the latent weights solves the nonlinear Fokker-Planck equation

    d_tau mu = - d_w [eta (w* - Q(w)) g(w) mu] + d_w^2 [eta^2 eps(tau) g(w) mu].

This is consistent with the abstract of arXiv 2510.10693 (a deterministic limit for the
per-coordinate density ``mu_tau(w | w*)``, time ``tau = t/d``) but it is NOT the paper's equation,
which we do not have. :func:`ste_mean_field` integrates it by finite volumes (method of lines,
scipy ``solve_ivp``, implicit BDF).

**Consequences (derivation, docs/theory.md §8.3-§8.4).** Plateau: from a small initialisation all coordinates sit
in the zero bin (``Q = 0``) where ``eps`` is constant and each coordinate is a Brownian motion with
drift ``eta w*``; nothing changes until coordinates reach the first threshold ``s/2``: escape time
``tau_esc = s / (2 eta |w*|) = R / (2 eta |w*| (2^(b-1) - 1))`` (mid-tread). Because the diffusion
spreads the coordinates, a fraction ``f`` of them crosses at the earlier time solving
``eta tau + z_f eta sqrt(2 eps_0 tau) = s/2`` with ``z_f = Phi^{-1}(1 - f)``
(:func:`plateau_prediction`). Fixed point: where ``w*`` lies between two levels
``l_k < w* < l_{k+1}`` the drift points towards the threshold from both sides, ``Q`` dithers between
the two levels with time average ``w*``, and the per-coordinate error is
``(w* - l_k)(l_{k+1} - w*)`` instead of the rounding error (:func:`dithering_error`).

**Binary perceptron** (docs/theory.md §8.5, arXiv 2505.18113): :mod:`riverscape.theory.binary_perceptron`.
The grid ``Q``: :class:`riverscape.theory.grid.GridQuantizer`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy import sparse
from scipy.integrate import solve_ivp
from scipy.special import ndtr, ndtri
from torch import Tensor
from tqdm.auto import tqdm

from ..io.jsonable import Record
from .grid import QUANTIZER_KINDS, GridQuantizer

__all__ = [
    "GridQuantizer",
    "STEConfig",
    "STESimulation",
    "STEMeanField",
    "simulate_ste",
    "ste_mean_field",
    "plateau_length",
    "escape_time",
    "plateau_prediction",
    "dithering_error",
    "rounding_error",
    "QUANTIZER_KINDS",
    "STE_ESTIMATORS",
    "TEACHERS",
]

#: straight-through estimators of the linear model (not :data:`riverscape.quant.ESTIMATORS`)
STE_ESTIMATORS = ("identity", "clipped")
TEACHERS = ("binary", "gaussian")


# ---------------------------------------------------------------------- config
@dataclass(frozen=True)
class STEConfig(Record):
    """The linear STE teacher-student model of docs/theory.md §8.1.

    Parameters
    ----------
    dim : int
        Input dimension d.
    bits, range, quantizer : int, float, str
        The :class:`GridQuantizer` of the deployed weights.
    estimator : {"identity", "clipped"}
        Identity STE, or clipped STE (gradient times ``1[|w| <= R]``).
    lr : float
        Learning rate eta (update ``eta (y - Q(w).x/sqrt d) x / sqrt d``).
    teacher : {"binary", "gaussian"}
        Teacher entries +-1 or N(0, 1).
    noise : float
        Label noise standard deviation sigma.
    init_std : float
        Latent weights start i.i.d. N(0, init_std^2).
    """

    dim: int = 1000
    bits: int = 2
    range: float = 1.0
    quantizer: str = "mid_tread"
    estimator: str = "identity"
    lr: float = 0.05
    teacher: str = "binary"
    noise: float = 0.0
    init_std: float = 0.01

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.estimator not in STE_ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of {STE_ESTIMATORS}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {self.teacher!r}; choose one of {TEACHERS}")
        if not self.lr > 0 or self.noise < 0 or self.init_std < 0:
            raise ValueError("lr must be positive, noise and init_std non-negative")
        self.grid  # validates bits/range/quantizer

    @property
    def grid(self) -> GridQuantizer:
        return GridQuantizer(self.bits, self.range, self.quantizer)


@dataclass(frozen=True)
class STESimulation(Record):
    """Result of :func:`simulate_ste`.

    Attributes
    ----------
    taus : list of float, length T
    eps : list of list of float, shape (replicas, T)
        Generalisation error of each independent run at each tau.
    overlap, self_overlap : list of float, length replicas
        Final ``m = w*.Q(w)/d`` and ``q = |Q(w)|^2/d``.
    latent_mean, latent_std : float
        Final mean and std of the latent coordinates, sign-folded (``w_i sign(w*_i)``), over all replicas.
    """

    config: STEConfig
    taus: list
    eps: list
    overlap: list
    self_overlap: list
    latent_mean: float
    latent_std: float
    seed: int

    @property
    def eps_mean(self) -> np.ndarray:
        return np.asarray(self.eps).mean(axis=0)

    @property
    def eps_std(self) -> np.ndarray:
        """Spread over replicas (ddof=1; zeros for a single replica)."""
        e = np.asarray(self.eps)
        return e.std(axis=0, ddof=1) if len(e) > 1 else np.zeros(e.shape[1])



def _teacher(config: STEConfig, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    if config.teacher == "binary":
        return torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1
    return torch.randn(shape, generator=generator, dtype=dtype)


@contextlib.contextmanager
def _single_thread():
    """Run with one intra-op thread, then restore the caller's setting.

    The simulator's per-step tensors are tiny (replicas x d); with several intra-op threads every
    op pays a thread barrier, which costs 10-40x on a loaded machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def simulate_ste(
    config: STEConfig,
    taus: Sequence[float],
    *,
    replicas: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    chunk_steps: int = 256,
    progress: bool = True,
) -> STESimulation:
    """Simulate online STE-SGD of the linear teacher-student model exactly (one sample per step).

    ``replicas`` independent runs (own teacher, initialisation and samples) advance together as a
    ``(replicas, d)`` batch. Inputs are drawn in float32 (three times cheaper than float64 on CPU)
    and promoted to ``dtype`` for all arithmetic. Runs with one intra-op thread (restored on exit):
    the per-step tensors are too small for threads to pay off. Cost: ``replicas * d^2 * max(taus)`` normals;
    about 4 s for ``d = 1000, tau = 40, replicas = 4`` on one core.

    Parameters
    ----------
    config : STEConfig
    taus : sequence of float
        Times ``t/d`` at which ``eps`` is recorded (sorted ascending; 0 allowed).
    replicas : int
        Independent runs.
    seed : int
        Seed of the private generator (the global RNG is untouched).

    Returns
    -------
    STESimulation
    """
    taus = [float(t) for t in taus]
    if not taus or any(b < a for a, b in zip(taus, taus[1:])) or taus[0] < 0:
        raise ValueError("taus must be a non-empty ascending sequence of non-negative times")
    if replicas < 1:
        raise ValueError("replicas must be positive")
    with _single_thread():
        return _simulate(config, taus, replicas, seed, dtype, chunk_steps, progress)


def _simulate(config: STEConfig, taus: list[float], replicas: int, seed: int, dtype: torch.dtype, chunk_steps: int, progress: bool) -> STESimulation:
    d = config.dim
    gen = torch.Generator().manual_seed(seed)
    quantize = config.grid
    w_star = _teacher(config, (replicas, d), gen, dtype)
    w = config.init_std * torch.randn(replicas, d, generator=gen, dtype=dtype)
    lr_over_d = config.lr / d
    noise_scale = config.noise * math.sqrt(d)  # y - Q.x/sqrt d = (e.x + sigma sqrt(d) xi) / sqrt d
    record_steps = [int(round(t * d)) for t in taus]
    eps = torch.empty(replicas, len(taus), dtype=torch.float64)
    x32 = torch.empty(chunk_steps, replicas, d, dtype=torch.float32)
    xs = torch.empty(chunk_steps, replicas, d, dtype=dtype)
    xi = torch.empty(chunk_steps, replicas, dtype=dtype)
    err, prod = torch.empty_like(w), torch.empty_like(w)
    step, n_rec = 0, 0
    bar = tqdm(total=record_steps[-1], desc=f"STE d={d}", leave=False, disable=not progress, mininterval=0.5)
    while True:
        while n_rec < len(taus) and record_steps[n_rec] == step:
            err = w_star - quantize(w)
            eps[:, n_rec] = 0.5 * (err * err).sum(1) / d + 0.5 * config.noise**2
            n_rec += 1
        if n_rec == len(taus):
            break
        n = min(chunk_steps, record_steps[n_rec] - step)
        x32[:n].normal_(generator=gen)
        xs[:n].copy_(x32[:n])
        if config.noise > 0:
            xi[:n].normal_(generator=gen)
        for j in range(n):
            x = xs[j]
            torch.sub(w_star, quantize.quantize_(w, err), out=err)  # e = w* - Q(w)
            residual = torch.mul(err, x, out=prod).sum(1)  # e.x per replica
            if config.noise > 0:
                residual.add_(xi[j], alpha=noise_scale)
            residual.mul_(lr_over_d)
            if config.estimator == "clipped":
                torch.mul(x, w.abs() <= config.range, out=prod)
                w.addcmul_(residual[:, None], prod)
            else:
                w.addcmul_(residual[:, None], x)
        step += n
        bar.update(n)
    bar.close()
    q = quantize(w)
    folded = w * torch.sign(w_star)
    return STESimulation(
        config=config,
        taus=taus,
        eps=eps.tolist(),
        overlap=((w_star * q).sum(1) / d).tolist(),
        self_overlap=((q * q).sum(1) / d).tolist(),
        latent_mean=float(folded.mean()),
        latent_std=float(folded.std()),
        seed=seed,
    )


# ---------------------------------------------------------------------- mean field
@dataclass(frozen=True)
class STEMeanField(Record):
    """Result of :func:`ste_mean_field` (the d -> infinity limit).

    Attributes
    ----------
    taus, eps : list of float, length T
    mass : list of float, length T
        Total probability (1 up to the solver's tolerance: the scheme conserves mass exactly).
    edge_mass : float
        Largest probability found in the two outermost 5 % of the grid (domain check; ~0).
    grid : list of float, length N
        Cell centres.
    teacher_values, teacher_weights : list of float, length K
        The teacher classes ``w*`` integrated (by symmetry only ``w* > 0``) and their weights.
    densities : dict str(tau) -> list (K, N)
        Densities ``mu_tau(w | w*)`` at the requested ``density_taus``.
    """

    config: STEConfig
    taus: list
    eps: list
    mass: list
    edge_mass: float
    grid: list
    teacher_values: list
    teacher_weights: list
    densities: dict = field(default_factory=dict)
    solver_steps: int = 0



def _teacher_classes(config: STEConfig, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive teacher values and probabilities; ``w* -> -w*`` mirrors the dynamics (Q odd)."""
    if config.teacher == "binary":
        return np.array([1.0]), np.array([1.0])
    # |w*| ~ half-normal cut at 5 into `classes` equal bins; node = sqrt(E[w*^2 | bin]) so that the
    # plateau error E w*^2 / 2 is exact; the mass above 5 (6e-7) joins the last bin.
    edges = np.linspace(0.0, 5.0, classes + 1)
    edges[-1] = np.inf
    mass = 2.0 * (ndtr(edges[1:]) - ndtr(edges[:-1]))
    finite = np.where(np.isfinite(edges), edges, 0.0)  # a phi(a) -> 0 at infinity
    x_pdf = finite * np.exp(-0.5 * finite**2) / math.sqrt(2 * math.pi)
    second = mass + 2.0 * (x_pdf[:-1] - x_pdf[1:])  # int a^2 phi over the bin, both signs
    return np.sqrt(second / mass), mass / mass.sum()


def _fv_operators(centres: np.ndarray, h: float, velocity: np.ndarray, diffusivity: np.ndarray) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """Finite-volume matrices ``A_adv``, ``A_diff`` with ``dp/dt = A_adv p + eps A_diff p``.

    Face flux between cells j and j+1 (donor cell with cell-centred velocities, exact for the
    piecewise-constant STE drift when thresholds sit on faces): ``v_j^+ p_j - v_{j+1}^- p_{j+1}``,
    diffusive flux ``-(D_{j+1} p_{j+1} - D_j p_j) / h`` (Ito form ``d_w^2 (D mu)``); zero flux at the
    domain ends, so every column sums to zero and probability is conserved exactly.
    """
    n = len(centres)
    vp, vm = np.maximum(velocity, 0.0), np.maximum(-velocity, 0.0)
    # advective flux F_{j+1/2} = vp[j] p[j] - vm[j+1] p[j+1]; dp_j/dt = -(F_{j+1/2} - F_{j-1/2}) / h
    main = -(vp + vm) / h
    main[0] += vm[0] / h  # no face on the left of cell 0
    main[-1] += vp[-1] / h  # no face on the right of the last cell
    upper = vm[1:] / h  # coefficient of p[j+1] in dp_j/dt
    lower = vp[:-1] / h  # coefficient of p[j-1] in dp_j/dt
    adv = sparse.diags([lower, main, upper], [-1, 0, 1], shape=(n, n), format="csr")
    dd = diffusivity / h**2
    dmain = -2.0 * dd
    dmain[0] += dd[0]
    dmain[-1] += dd[-1]
    diff = sparse.diags([dd[:-1], dmain, dd[1:]], [-1, 0, 1], shape=(n, n), format="csr")
    return adv, diff


def ste_mean_field(
    config: STEConfig,
    taus: Sequence[float],
    *,
    grid_step: float = 0.005,
    teacher_classes: int = 16,
    density_taus: Sequence[float] = (),
    rtol: float = 1e-6,
    atol: float = 1e-9,
) -> STEMeanField:
    """Integrate the mean-field Fokker-Planck equation of STE-SGD (riverscape's derivation).

    Solves, for each teacher class ``a = w*`` (one class ``a = 1`` for +-1 teachers by symmetry;
    ``teacher_classes`` bins of ``|w*|`` for Gaussian teachers)::

        d_tau mu_a = - d_w [eta (a - Q(w)) g(w) mu_a] + d_w^2 [eta^2 eps(tau) g(w) mu_a]
        eps(tau)   = 1/2 sum_a P(a) int (a - Q(w))^2 mu_a(w) dw + sigma^2 / 2

    (derivation in the module docstring) by finite volumes on a uniform grid whose step divides the
    quantizer step so that every threshold and clipping point is a cell face (the drift is then
    constant in each cell), with a mass-conserving donor-cell scheme, integrated by ``solve_ivp``
    (BDF, sparse Jacobian ``A_adv + eps A_diff``; the rank-one dependence of eps on mu is left out of
    the Jacobian, which only slows Newton's convergence). The initial density is the cell average
    of N(0, init_std^2). ``config.dim`` is ignored (d = infinity).

    Parameters
    ----------
    config : STEConfig
    taus : sequence of float
        Output times.
    grid_step : float
        Target cell width (the actual one is the largest divisor ``s / (2m)`` of the quantizer
        step below it).
    teacher_classes : int
        Bins of ``|w*|`` for the Gaussian teacher.
    density_taus : sequence of float
        Times at which the densities are returned.

    Returns
    -------
    STEMeanField
    """
    taus = np.asarray(taus, dtype=np.float64)
    if taus.ndim != 1 or taus.size == 0 or np.any(np.diff(taus) < 0) or taus[0] < 0:
        raise ValueError("taus must be a non-empty ascending sequence of non-negative times")
    grid = config.grid
    values, weights = _teacher_classes(config, teacher_classes)
    eta, tau_max = config.lr, float(taus[-1])
    top = max(grid.levels)
    s = grid.step
    m = max(1, math.ceil(s / (2.0 * grid_step)))
    h = s / (2 * m)  # faces at multiples of h contain every threshold and level
    # domain: initial spread, teacher values, outward drift of unbounded coordinates, diffusion
    eps_bound = 0.5 * float(np.sum(weights * (values + top) ** 2)) + 0.5 * config.noise**2
    spread = 6.0 * eta * math.sqrt(2.0 * eps_bound * tau_max) + 6.0 * config.init_std + s
    drift_out = eta * max(0.0, float(values.max()) - top) * tau_max if config.estimator == "identity" else 0.0
    hi = max(float(values.max()), top) + drift_out + spread
    lo = -(top + spread)
    n_lo, n_hi = math.floor(lo / h), math.ceil(hi / h)
    faces = np.arange(n_lo, n_hi + 1) * h
    centres = 0.5 * (faces[:-1] + faces[1:])
    q_centres = grid.numpy(centres)
    clip = (np.abs(centres) <= grid.range).astype(np.float64) if config.estimator == "clipped" else np.ones_like(centres)
    blocks_adv, blocks_diff = [], []
    for a in values:
        adv, diff = _fv_operators(centres, h, eta * (a - q_centres) * clip, eta**2 * clip)
        blocks_adv.append(adv)
        blocks_diff.append(diff)
    a_adv = sparse.block_diag(blocks_adv, format="csr")
    a_diff = sparse.block_diag(blocks_diff, format="csr")
    k, n = len(values), len(centres)
    # error weights: eps = 1/2 sum_a P(a) sum_j (a - Q_j)^2 p_{a,j} h
    err_w = (0.5 * weights[:, None] * (values[:, None] - q_centres[None, :]) ** 2 * h).reshape(-1)
    if config.init_std > 0:
        cdf = ndtr(faces / config.init_std)
        p0 = np.diff(cdf) / h
    else:
        p0 = np.zeros(n)
        p0[np.searchsorted(faces, 0.0, side="right") - 1] = 1.0 / h
    y0 = np.tile(p0, k)
    noise_term = 0.5 * config.noise**2

    def eps_of(p: np.ndarray) -> float:
        return float(err_w @ p) + noise_term

    def rhs(_t: float, p: np.ndarray) -> np.ndarray:
        return a_adv @ p + eps_of(p) * (a_diff @ p)

    def jac(_t: float, p: np.ndarray) -> sparse.csc_matrix:
        return (a_adv + eps_of(p) * a_diff).tocsc()

    t_eval = np.union1d(taus, np.asarray(density_taus, dtype=np.float64))
    sol = solve_ivp(rhs, (0.0, max(tau_max, float(t_eval[-1]))), y0, method="BDF", t_eval=t_eval, jac=jac, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"mean-field integration failed: {sol.message}")
    dens = sol.y.reshape(k, n, -1)
    index = {float(t): i for i, t in enumerate(sol.t)}
    cols = [index[float(t)] for t in taus]
    mass_per_class = dens.sum(axis=1) * h  # (K, T)
    edge = max(1, n // 20)
    edge_mass = float(((dens[:, :edge, :].sum(axis=1) + dens[:, -edge:, :].sum(axis=1)) * h).max())
    return STEMeanField(
        config=config,
        taus=taus.tolist(),
        eps=[eps_of(sol.y[:, c]) for c in cols],
        mass=(weights @ mass_per_class[:, cols]).tolist(),
        edge_mass=edge_mass,
        grid=centres.tolist(),
        teacher_values=values.tolist(),
        teacher_weights=weights.tolist(),
        densities={f"{float(t):g}": dens[:, :, index[float(t)]].tolist() for t in density_taus},
        solver_steps=int(sol.nfev),
    )


# ---------------------------------------------------------------------- plateau and fixed point
def plateau_length(taus: Sequence[float], eps: Sequence[float], fraction: float = 0.1) -> float:
    """First time the curve has covered ``fraction`` of its total change ``eps[-1] - eps[0]``.

    Linear interpolation between samples; ``nan`` when the curve ends where it started
    (``|change| < 1e-3 * max(|eps[0]|, 1e-12)``) or never gets there.

    >>> plateau_length([0, 1, 2, 3], [0.5, 0.5, 0.3, 0.0])
    1.25
    """
    t, e = np.asarray(taus, dtype=np.float64), np.asarray(eps, dtype=np.float64)
    change = e[-1] - e[0]
    if abs(change) < 1e-3 * max(abs(e[0]), 1e-12):
        return float("nan")
    progress = (e - e[0]) / change
    hit = np.nonzero(progress >= fraction)[0]
    if hit.size == 0:
        return float("nan")
    i = int(hit[0])
    if i == 0:
        return float(t[0])
    f0, f1 = progress[i - 1], progress[i]
    return float(t[i - 1] + (fraction - f0) / (f1 - f0) * (t[i] - t[i - 1]))


def _teacher_expectation(config: STEConfig, fn) -> float:
    """``E_{w*}[fn(w*)]`` (exact for +-1 teachers; fine trapezoid rule for N(0, 1))."""
    if config.teacher == "binary":
        return float(fn(np.array([1.0]))[0])  # fn is even under the grid's symmetry
    a = np.linspace(-8.0, 8.0, 160001)
    density = np.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
    return float(np.trapezoid(fn(a) * density, a))


def _bracketing_levels(grid: GridQuantizer, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    levels = np.asarray(grid.levels)
    upper_i = np.clip(np.searchsorted(levels, a, side="left"), 1, len(levels) - 1)
    return levels[upper_i - 1], levels[upper_i]


def dithering_error(config: STEConfig) -> float:
    """Predicted fixed-point error of identity-STE (riverscape's derivation, docs/theory.md §8.3-§8.4).

    Per coordinate ``(w* - l_k)(l_{k+1} - w*)`` when ``l_k <= w* <= l_{k+1}`` (dithering between the
    two levels), ``(w* - l_edge)^2`` when ``w*`` lies outside the grid (Q stuck at the end level);
    ``eps = E[.]/2 + sigma^2/2``. First order in eta: SGD noise corrections are not included.

    >>> dithering_error(STEConfig(bits=2, range=1.5))
    0.25
    """
    grid = config.grid
    lo_level, hi_level = min(grid.levels), max(grid.levels)

    def per_coordinate(a: np.ndarray) -> np.ndarray:
        lower, upper = _bracketing_levels(grid, a)
        inside = (a - lower) * (upper - a)
        outside = np.where(a > hi_level, (a - hi_level) ** 2, (lo_level - a) ** 2)
        return np.where((a >= lo_level) & (a <= hi_level), inside, outside)

    return 0.5 * _teacher_expectation(config, per_coordinate) + 0.5 * config.noise**2


def rounding_error(config: STEConfig) -> float:
    """Error of the best grid point ``Q(w*)`` (round to nearest): ``E(w* - Q(w*))^2 / 2 + sigma^2/2``.

    >>> rounding_error(STEConfig(bits=2, range=1.5))
    0.125
    """
    grid = config.grid
    return 0.5 * _teacher_expectation(config, lambda a: (a - grid.numpy(a)) ** 2) + 0.5 * config.noise**2


def escape_time(config: STEConfig) -> float:
    """Drift-only escape time from the zero bin, ``s / (2 eta |w*|)`` (+-1 teacher, mid-tread).

    ``= R / (2 eta (2^(b-1) - 1))``; 0 for mid-rise grids (small initialisations start on the
    zero threshold: no plateau). Gaussian teachers: the time for coordinates with ``|w*| = 1``.

    >>> escape_time(STEConfig(bits=2, range=1.5, lr=0.05))
    15.0
    """
    if config.quantizer == "mid_rise":
        return 0.0
    return config.grid.step / (2.0 * config.lr)


def plateau_prediction(config: STEConfig, fraction: float = 0.1) -> float:
    """Noisy-escape prediction of :func:`plateau_length` (+-1 teacher, mid-tread; derivation).

    During the plateau every coordinate is in the zero bin, ``eps = eps_0 = (1 + sigma^2)/2``
    is constant and ``w`` (sign-folded) is a Brownian motion with drift ``eta`` and variance
    ``2 eta^2 eps_0 tau``. A coordinate past the first threshold ``s/2`` contributes
    ``((1 - s)^2 - 1)/2`` to the change of ``eps``; the curve has covered ``fraction`` of its total
    change ``dithering_error - eps_0`` when a share
    ``f = fraction (eps_final - eps_0) / (((1 - s)^2 - 1) / 2)`` of the coordinates is past the
    threshold, i.e. at the root of ``eta tau + z eta sqrt(2 eps_0 tau) = s/2``, ``z = Phi^{-1}(1 - f)``
    (the back-reaction of the crossed coordinates on eps is neglected). ``nan`` when the curve does
    not move or ``f`` is not in (0, 1).

    >>> round(plateau_prediction(STEConfig(bits=2, range=1.5, lr=0.05)), 2)
    10.2
    """
    if config.teacher != "binary" or config.quantizer != "mid_tread":
        return float("nan")
    s, eta = config.grid.step, config.lr
    eps0 = 0.5 + 0.5 * config.noise**2
    total = dithering_error(config) - eps0
    per_coordinate = 0.5 * ((1.0 - s) ** 2 - 1.0)
    if abs(total) < 1e-12 or per_coordinate == 0.0:
        return float("nan")
    share = fraction * total / per_coordinate
    if not 0.0 < share < 1.0:
        return float("nan")
    z = float(ndtri(1.0 - share))
    c = z * math.sqrt(2.0 * eps0)  # eta tau + eta c sqrt(tau) - s/2 = 0, quadratic in sqrt(tau)
    root = (-c + math.sqrt(c * c + 2.0 * s / eta)) / 2.0
    return root * root
