"""The 1-bit teacher-student perceptron trained with the STE (docs/theory.md §8.5, arXiv 2505.18113)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .teacher_student import _Record

__all__ = ["BinarySTEConfig", "BinarySTEResult", "train_binary_ste", "sign_generalization_error", "BINARY_STUDENTS", "BINARY_LOSSES"]

BINARY_STUDENTS = ("binary", "full_precision")
BINARY_LOSSES = ("squared", "hinge")


@dataclass(frozen=True)
class BinarySTEConfig(_Record):
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
class BinarySTEResult(_Record):
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
