"""The 1-bit teacher-student perceptron trained with the STE (docs/theory.md §8.5, arXiv 2505.18113)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..io.jsonable import Record
from .uncertainty import bootstrap_estimates, power_law_exponent, replica_summary

__all__ = [
    "BinarySTEConfig",
    "BinarySTEResult",
    "train_binary_ste",
    "sign_generalization_error",
    "crossing",
    "sample_complexity",
    "recurrence_statistics",
    "BINARY_STUDENTS",
    "BINARY_LOSSES",
]

BINARY_STUDENTS = ("binary", "full_precision")
BINARY_LOSSES = ("squared", "hinge")


@dataclass(frozen=True)
class BinarySTEConfig(Record):
    """1-bit teacher-student perceptron trained by the full-batch STE-gradient method (docs/theory.md §8.5).

    Teacher ``y = sign(w*.x / sqrt d)``, ``w*`` in {-1, +1}^d, ``x ~ N(0, I_d)``, ``n = round(alpha d)``
    fixed samples, a fraction ``label_noise`` of training labels flipped. Student latent ``w``;
    deployed weights ``b = sign(w)`` (``student="binary"``) or ``b = sqrt(d) w / |w|`` (full-precision
    student on the same sphere, ``student="full_precision"``); pre-activation ``h = b.x / sqrt d``.

    Losses (the output ``sign`` gets the clipped-identity surrogate ``hardtanh'(h) = 1[|h| <= 1]``,
    as in Yin et al., arXiv 1903.05662):

    * ``"squared"``: ``1/2 (sign(h) - y)^2``, STE gradient in h: ``(sign(h) - y) 1[|h| <= 1]``;
    * ``"hinge"``: ``max(0, 1 - y h)``, gradient ``-y 1[y h < 1]`` (no activation surrogate needed).

    The gradient with respect to ``b`` is passed straight through to the latent ``w`` (identity STE
    for sign and for the normalisation): ``w <- w - lr sqrt(d) X^T dl/dh / (n sqrt d)``, i.e. a step
    of order ``lr`` per coordinate. ``init_std`` is the std of the initial latent weights.
    """

    dim: int = 100
    alpha: float = 2.0
    student: str = "binary"
    loss: str = "squared"
    steps: int = 300
    lr: float = 0.5
    label_noise: float = 0.0
    init_std: float = 0.1

    def __post_init__(self) -> None:
        if self.student not in BINARY_STUDENTS:
            raise ValueError(f"unknown student {self.student!r}; choose one of {BINARY_STUDENTS}")
        if self.loss not in BINARY_LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {BINARY_LOSSES}")
        if self.dim < 1 or self.alpha <= 0 or self.steps < 0 or not self.lr > 0:
            raise ValueError("dim, alpha and lr must be positive, steps non-negative")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")

    @property
    def samples(self) -> int:
        return max(1, int(round(self.alpha * self.dim)))


@dataclass(frozen=True)
class BinarySTEResult(Record):
    """Result of :func:`train_binary_ste`; every list has one entry per replica.

    ``overlap = w*.b / (|w*| |b|)`` of the final deployed weights, ``error = arccos(overlap)/pi``
    (exact generalisation error), ``best_error`` the lowest error along training, ``exact`` whether
    ``sign(w_T) = w*`` (binary student), ``train_error`` the final training error,
    ``hamming`` (replicas, recorded steps) the normalised Hamming distance of ``sign(w_t)`` to ``w*``.
    """

    config: BinarySTEConfig
    overlap: list
    error: list
    best_error: list
    exact: list
    train_error: list
    record_steps: list
    hamming: list
    seed: int


def sign_generalization_error(overlap: Tensor | np.ndarray | float):
    """``arccos(rho) / pi``: P(sign(a.x) != sign(b.x)) for x ~ N(0, I) and cosine rho of a, b.

    >>> float(sign_generalization_error(0.0))
    0.5
    """
    if isinstance(overlap, Tensor):
        return torch.arccos(overlap.clamp(-1.0, 1.0)) / math.pi
    return np.arccos(np.clip(overlap, -1.0, 1.0)) / math.pi


def train_binary_ste(
    config: BinarySTEConfig,
    *,
    replicas: int = 1,
    seed: int = 0,
    record_every: int = 10,
    dtype: torch.dtype = torch.float64,
) -> BinarySTEResult:
    """Full-batch STE-gradient training of a 1-bit (or full-precision) perceptron student.

    ``replicas`` independent problems (teacher, data, initialisation) are trained together as a
    batch. Setting and update rule: :class:`BinarySTEConfig`.

    Returns
    -------
    BinarySTEResult
    """
    if replicas < 1 or record_every < 1:
        raise ValueError("replicas and record_every must be positive")
    d, n = config.dim, config.samples
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randint(0, 2, (replicas, d), generator=gen).to(dtype) * 2 - 1
    x = torch.randn(replicas, n, d, generator=gen, dtype=dtype)
    y = torch.sign(torch.bmm(x, w_star[:, :, None])[..., 0])
    y[y == 0] = 1.0
    flips = torch.rand(replicas, n, generator=gen, dtype=dtype) < config.label_noise
    y_train = torch.where(flips, -y, y)
    w = config.init_std * torch.randn(replicas, d, generator=gen, dtype=dtype)
    sqrt_d = math.sqrt(d)

    def deployed(latent: Tensor) -> Tensor:
        if config.student == "binary":
            return torch.where(latent >= 0, 1.0, -1.0).to(dtype)
        return sqrt_d * latent / latent.norm(dim=1, keepdim=True)

    def cosine(b: Tensor) -> Tensor:
        return (b * w_star).sum(1) / (b.norm(dim=1) * sqrt_d)

    best = torch.full((replicas,), 0.5, dtype=dtype)
    record_steps, hamming = [], []
    for step in range(config.steps + 1):
        b = deployed(w)
        best = torch.minimum(best, sign_generalization_error(cosine(b)))
        if step % record_every == 0 or step == config.steps:
            record_steps.append(step)
            hamming.append(((torch.where(w >= 0, 1.0, -1.0) != w_star).to(dtype).mean(1)).tolist())
        if step == config.steps:
            break
        h = torch.bmm(x, b[:, :, None])[..., 0] / sqrt_d
        if config.loss == "squared":
            out = torch.where(h >= 0, 1.0, -1.0).to(dtype)
            dl_dh = (out - y_train) * (h.abs() <= 1.0)
        else:
            dl_dh = -y_train * (y_train * h < 1.0)
        grad_b = torch.bmm(dl_dh[:, None, :], x)[:, 0] / (n * sqrt_d)
        w = w - config.lr * sqrt_d * grad_b
    b = deployed(w)
    rho = cosine(b)
    h = torch.bmm(x, b[:, :, None])[..., 0]
    train_error = (torch.where(h >= 0, 1.0, -1.0) != y_train).to(dtype).mean(1)
    return BinarySTEResult(
        config=config,
        overlap=rho.tolist(),
        error=sign_generalization_error(rho).tolist(),
        best_error=best.tolist(),
        exact=(torch.where(w >= 0, 1.0, -1.0) == w_star).all(1).tolist() if config.student == "binary" else [False] * replicas,
        train_error=train_error.tolist(),
        record_steps=record_steps,
        hamming=[list(r) for r in zip(*hamming)],
        seed=seed,
    )


# ---------------------------------------------------------------------- sample complexity with intervals
def crossing(alphas, values, level: float, *, decreasing: bool = True) -> float:
    """First ``alpha`` where ``values`` reaches ``level``, interpolated linearly in ``log alpha``.

    ``decreasing=True``: first ``values <= level`` (an error target); ``False``: first
    ``values >= level`` (a recovery probability). The smallest alpha if the first point already
    qualifies (left-censored), NaN if no point does.

    >>> round(crossing([1, 4], [0.3, 0.1], 0.2), 12)
    2.0
    """
    a, v = np.asarray(alphas, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.shape != v.shape or a.size == 0 or np.any(a <= 0):
        raise ValueError(f"alphas must be positive and 1-D with one value each, got shapes {a.shape} and {v.shape}")
    ok = v <= level if decreasing else v >= level
    if not ok.any():
        return math.nan
    i = int(np.argmax(ok))
    if i == 0:
        return float(a[0])
    a0, a1, v0, v1 = math.log(a[i - 1]), math.log(a[i]), v[i - 1], v[i]
    return float(math.exp(a0 + (level - v0) / (v1 - v0) * (a1 - a0)))


#: the columns of a replica row in :func:`sample_complexity`
REPLICA_COLUMNS = ("error_binary", "error_full_precision", "exact_binary")


def sample_complexity(
    dims: Sequence[int],
    alphas: Sequence[float],
    replicas: Sequence[Sequence],
    *,
    target_error: float,
    exact_level: float = 0.5,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Samples needed per d and their power-law exponents, with bootstrap intervals over replicas.

    For every d the mean curves over the replicas are crossed (:func:`crossing`) at three targets:
    binary error ``<= target_error``, full-precision error ``<= target_error``, and
    P(exact recovery of ``w*``) ``>= exact_level`` for the binary student; ``n* = alpha* d``. The
    exponent ``p`` of ``n* ~ c d^p`` is fitted (:func:`~riverscape.theory.uncertainty.power_law_exponent`)
    over the d where the target is reached on the data, and the paired difference
    ``p_binary - p_full_precision`` (error target) is formed on every resample.

    Intervals: the replicas of each ``(d, alpha)`` cell are resampled within the cell (cells are
    independent runs), keeping each replica's binary and full-precision values together (the two
    students share teacher, data and initialisation), then everything is recomputed
    (percentile interval, :func:`~riverscape.theory.uncertainty.bootstrap_estimates`). A resample
    on which a target is missed at a d used by the fit leaves that exponent undefined (counted in
    ``valid``).

    Parameters
    ----------
    dims, alphas : sequences
        The grid; ``replicas[i][j]`` belongs to ``(dims[i], alphas[j])``.
    replicas : nested sequence
        ``replicas[i][j]`` has shape ``(r_ij, 3)``, columns :data:`REPLICA_COLUMNS`
        (``exact_binary`` 0 or 1), one row per replica.
    target_error, exact_level : float
        The two levels.
    level, n_boot, seed
        Interval coverage, resamples, generator seed.

    Returns
    -------
    dict
        ``samples``: list of rows ``{"target", "dim", "alpha_star", "n_star"}`` (``n_star`` a
        :class:`~riverscape.theory.uncertainty.BootstrapEstimate` whose ``n`` counts the replicas of
        that d); ``exponents`` (``n`` counts all replicas): ``{"target", "dims_used", "exponent"}`` rows for
        the three targets and ``"binary - FP (error)"``; ``replicas``: the ``r_ij``.
    """
    dims_arr = np.asarray(dims, dtype=np.float64)
    a = np.asarray(alphas, dtype=np.float64)
    if len(replicas) != dims_arr.size or any(len(row) != a.size for row in replicas):
        raise ValueError("replicas must hold one array per (d, alpha) cell: len(dims) rows of len(alphas)")
    groups = [np.asarray(cell, dtype=np.float64) for row in replicas for cell in row]
    if any(g.ndim != 2 or g.shape[1] != len(REPLICA_COLUMNS) for g in groups):
        raise ValueError(f"every cell needs shape (replicas, {len(REPLICA_COLUMNS)}) with columns {REPLICA_COLUMNS}")
    targets = ((0, target_error, True, f"binary: error <= {target_error:g}"),
               (1, target_error, True, f"FP: error <= {target_error:g}"),
               (2, exact_level, False, f"binary: P(exact) >= {exact_level:g}"))

    def needs(cells: list[np.ndarray]) -> np.ndarray:
        """(targets, dims) array of n* on these cells."""
        means = np.array([c.mean(axis=0) for c in cells]).reshape(dims_arr.size, a.size, -1)
        return np.array([[crossing(a, means[i, :, col], lvl, decreasing=dec) * dims_arr[i] for i in range(dims_arr.size)]
                         for col, lvl, dec, _ in targets])

    used = np.isfinite(needs(groups))  # the d each fit uses, fixed by the data

    def statistic(cells: list[np.ndarray]) -> np.ndarray:
        n_star = needs(cells)
        exps = [power_law_exponent(dims_arr[u], n[u]) if u.sum() >= 2 and np.all(np.isfinite(n[u])) else math.nan
                for n, u in zip(n_star, used)]
        return np.concatenate([n_star.reshape(-1), exps, [exps[0] - exps[1]]])

    est = bootstrap_estimates(groups, statistic, level=level, n_boot=n_boot, seed=seed)
    n_cells = len(targets) * dims_arr.size
    per_d = [int(sum(g.shape[0] for g in groups[i * a.size:(i + 1) * a.size])) for i in range(dims_arr.size)]
    samples = [{"target": targets[k][3], "dim": int(dims_arr[i]), "alpha_star": float(est[k * dims_arr.size + i].estimate / dims_arr[i]),
                "n_star": replace(est[k * dims_arr.size + i], n=per_d[i])}  # n* at d rests on that d's replicas only
               for k in range(len(targets)) for i in range(dims_arr.size)]
    names = [t[3] for t in targets] + [f"binary - FP (error <= {target_error:g})"]
    dims_used = [int(u.sum()) for u in used] + [int((used[0] & used[1]).sum())]
    exponents = [{"target": name, "dims_used": k, "exponent": e} for name, k, e in zip(names, dims_used, est[n_cells:])]
    return {"samples": samples, "exponents": exponents, "replicas": [[int(c.shape[0]) for c in groups[i * a.size:(i + 1) * a.size]] for i in range(dims_arr.size)]}


def recurrence_statistics(steps: Sequence[int], hamming: Sequence[Sequence[float]], *, burn_in: int = 200, level: float = 0.95) -> dict:
    """Recurrence of ``sign(w_t)`` to ``w*`` after ``burn_in`` steps, per replica and summarised.

    Per replica (rows of ``hamming``, recorded at ``steps``): ``returns``, the number of recorded
    steps at Hamming distance 0 whose predecessor was not at 0; ``time_at_zero``, the share of
    recorded steps at 0; ``max_escape_after_hit``, the largest distance after the first hit (None
    if never hit); ``mean_hamming``. ``returns`` and ``time_at_zero`` also get a mean with Student t
    interval over the replicas (:func:`~riverscape.theory.uncertainty.replica_summary`).

    >>> r = recurrence_statistics([0, 1, 2, 3], [[0.1, 0.0, 0.1, 0.0], [0.2, 0.1, 0.0, 0.0]], burn_in=0)
    >>> r["returns"], r["time_at_zero"]
    ([2, 1], [0.5, 0.5])
    """
    steps_arr, h = np.asarray(steps), np.asarray(hamming, dtype=np.float64)
    if h.ndim != 2 or h.shape[1] != steps_arr.size:
        raise ValueError(f"hamming must have shape (replicas, {steps_arr.size}), got {h.shape}")
    h = h[:, steps_arr >= burn_in]
    if h.shape[1] < 2:
        raise ValueError(f"fewer than two recorded steps after burn_in={burn_in}")
    at_zero = h == 0
    returns = (at_zero[:, 1:] & ~at_zero[:, :-1]).sum(1)
    escapes = [float(row[np.argmax(z):].max()) if z.any() else None for row, z in zip(h, at_zero)]
    share = at_zero.mean(1)
    return {"returns": returns.tolist(), "time_at_zero": share.tolist(), "max_escape_after_hit": escapes,
            "mean_hamming": h.mean(1).tolist(), "returns_summary": replica_summary(returns, level=level),
            "time_at_zero_summary": replica_summary(share, level=level)}
