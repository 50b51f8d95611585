"""Gradient estimators for quantization-aware training (docs/theory.md §3).

Every estimator is a function ``fn(w, qparams, *, binary=False, **options) -> w_hat`` whose
forward value is exactly the quantizer's grid point ``Q(w)`` (bit-identical to
:meth:`UniformQuantizer.quantize_with`) and whose backward is the estimator's surrogate for
``dQ/dw`` (zero almost everywhere). They are written in "detach form"
(``value.detach() + surrogate - surrogate.detach()``) or, for EWGS whose backward depends
on the sign of the upstream gradient, as a :class:`torch.autograd.Function` with
``setup_context`` and ``generate_vmap_rule=True``, so they work under ``torch.func.grad``,
``torch.func.vmap`` and plain autograd alike.

Notation: ``x = w / s + z`` is the input of the rounding map in units of the step ``s``,
``q = clamp(round(w / s) + z, q_min, q_max)`` its integer code, ``w_hat = s (q - z)``.
At 1 bit (``binary=True``) the grid is ``{-s, +s}``, ``q = sgn(w)`` with ``sgn(0) = +1``
and ``[q_min, q_max] = [-1, 1]``.

Clipping convention (used by ``clipped_ste``, ``lsq`` and ``ewgs``): the gradient to ``w``
passes where ``q_min <= w / s + z <= q_max`` (LSQ's convention; the boundary itself has
measure zero), *not* on the extended range ``[q_min - 1/2, q_max + 1/2]`` where the output is
still not saturated. At 1 bit this is the hardtanh derivative ``1[|w / s| <= 1]``
(BinaryConnect / BNN with the scale as the clip level).

============  =========================================================================
name          backward ``dL/dw`` given ``g = dL/dw_hat``
============  =========================================================================
ste           ``g`` (Bengio et al. 2013, arXiv 1308.3432)
clipped_ste   ``g * 1[q_min <= x <= q_max]``
lsq           to ``w``: clipped STE; to ``s``: ``g * grad_scale * dw_hat/ds`` with
              ``dw_hat/ds = round(w/s) - w/s`` inside, ``-Q_N`` / ``Q_P`` below / above
              (Esser et al. 2020, arXiv 1902.08153)
ewgs          ``g * (1 + delta * sign(g) * (x_n - x_q)) * 1[inside]``, ``x_n = clamp(x)``,
              ``x_q = q`` (Lee, Kim, Ham 2021, arXiv 2104.00903)
pege          ``g`` (STE on the replaced part, identity on the rest); forward
              ``m * Q(w) + (1 - m) * w`` -- a placeholder for arXiv 2509.00097 [P]
============  =========================================================================

Control arms of the QAT-dynamics experiment (:data:`GRADIENT_POINT_ARMS`). Their forward value
is *not* ``Q(w)``: they move the point where the gradient is taken while the update still goes
to the latent ``w`` with the identity backward, and ``qat`` still deploys and records ``Q(w_t)``.

=====================  ================================================================
name                   forward point (backward: identity to ``w``)
=====================  ================================================================
matched_noise          ``w + |Q(w) - w| * eps``, ``eps`` random signs (fresh every step)
stochastic_rounding    ``SR(w)``: the grid point below or above ``w / s + z``, up with
                       probability equal to the fractional part (on the same grid)
latent                 ``w`` itself: plain full-precision training of the latent weights
=====================  ================================================================

Their options inside :func:`riverscape.quant.qat.qat` (LSQ's initial step, EWGS's ``delta``
schedule, PEGE's curriculum and penalty) are frozen configs in
:mod:`riverscape.quant.estimator_configs` (``LSQ(init=...)``, ``EWGS(...)``, ``PEGE(...)``).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Union

import torch
from torch import Tensor

from .quantizers import QParams, _sign

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "ste",
    "clipped_ste",
    "lsq",
    "ewgs",
    "pege",
    "get_estimator",
    "make_estimator",
    "clip_mask",
    "lsq_grad_scale",
    "lsq_initial_scale",
    "pege_rho",
    "pege_mask",
    "GRADIENT_POINT_ARMS",
    "matched_noise",
    "stochastic_rounding",
    "stochastic_codes",
    "latent",
    "random_signs",
]

ESTIMATORS = ("ste", "clipped_ste", "lsq", "ewgs", "pege")
#: QAT control arms whose forward point is not ``Q(w)`` (registered as estimators, not in :data:`ESTIMATORS`)
GRADIENT_POINT_ARMS = ("matched_noise", "stochastic_rounding", "latent")

Estimator = Callable[[Tensor, QParams], Tensor]
ScalarOrTensor = Union[float, Tensor]


# ---------------------------------------------------------------------- building blocks
def _with_gradient(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass.

    ``surrogate - surrogate.detach()`` is exactly zero, so the forward value is bit-exact.
    """
    return value.detach() + (surrogate - surrogate.detach())


def _codes(x_over_s: Tensor, qparams: QParams, binary: bool) -> Tensor:
    """Exact integer codes from ``w / s`` (the same arithmetic as ``fake_quantize``)."""
    if binary:
        return _sign(x_over_s)
    return torch.clamp(torch.round(x_over_s) + qparams.zero_point, qparams.qmin, qparams.qmax)


def _hard(w: Tensor, qparams: QParams, binary: bool) -> Tensor:
    """``Q(w)`` without any gradient."""
    scale = qparams.scale.detach()
    return (scale * (_codes(w.detach() / scale, qparams, binary) - qparams.zero_point)).detach()


def clip_mask(w: Tensor, qparams: QParams) -> Tensor:
    """Boolean ``q_min <= w / s + z <= q_max``: where the clipped estimators pass gradient.

    At 1 bit (``qparams.qmin, qparams.qmax = -1, 1``, ``z = 0``) this is ``|w / s| <= 1``.
    """
    x = w.detach() / qparams.scale.detach() + qparams.zero_point
    return (x >= qparams.qmin) & (x <= qparams.qmax)


# ---------------------------------------------------------------------- estimators
def ste(w: Tensor, qparams: QParams, *, binary: bool = False) -> Tensor:
    """Straight-through estimator: forward ``Q(w)``, backward identity.

    Parameters
    ----------
    w : Tensor, any shape
    qparams : QParams
        Scale and zero point broadcastable against ``w`` (no gradient reaches them).
    binary : bool
        1-bit grid ``s * sgn(w)``.

    Examples
    --------
    >>> from riverscape.quant import QParams
    >>> qp = QParams(torch.tensor(0.5), torch.tensor(0.0), -1, 1)
    >>> w = torch.tensor([-0.9, 0.2, 0.7], requires_grad=True)
    >>> out = ste(w, qp); out.sum().backward(); out.detach(), w.grad
    (tensor([-0.5000,  0.0000,  0.5000]), tensor([1., 1., 1.]))
    """
    return _with_gradient(_hard(w, qparams, binary), w)


def clipped_ste(w: Tensor, qparams: QParams, *, binary: bool = False) -> Tensor:
    """Clipped STE: backward ``1[q_min <= w/s + z <= q_max]`` (hardtanh' at 1 bit).

    Parameters and returns as :func:`ste`.
    """
    return _with_gradient(_hard(w, qparams, binary), w * clip_mask(w, qparams).to(w.dtype))


def lsq(w: Tensor, qparams: QParams, *, grad_scale: ScalarOrTensor = 1.0, binary: bool = False) -> Tensor:
    """Learned step size quantization (Esser et al. 2020, arXiv 1902.08153).

    ``w_hat = s * (clamp(round(w/s) + z, q_min, q_max) - z)`` with a straight-through round
    and a learnable ``s = qparams.scale`` (pass a tensor with ``requires_grad``). Gradients:

    * to ``w``: clipped STE, ``1[q_min <= w/s + z <= q_max]``;
    * to ``s``: ``grad_scale * (round(w/s) - w/s)`` inside the range and
      ``grad_scale * (q_min - z)`` / ``grad_scale * (q_max - z)`` below / above it. With the
      symmetric restricted grid of :class:`UniformQuantizer` (``z = 0``) these are
      ``-Q_N`` / ``Q_P`` with ``Q_N = Q_P = 2^(b-1) - 1`` (LSQ's signed grid has
      ``Q_N = 2^(b-1)``; ours drops the extra negative level). At 1 bit the rounding is
      ``sgn`` and ``dw_hat/ds = sgn(w) - w/s`` inside, ``-1`` / ``+1`` outside.

    The step gradient is multiplied by ``grad_scale`` (``g = 1/sqrt(N_W Q_P)``, see
    :func:`lsq_grad_scale`) with LSQ's ``grad_scale`` trick, written so that the forward
    value of ``s`` is unchanged bit for bit.

    Parameters
    ----------
    w : Tensor, any shape
    qparams : QParams
        ``scale`` broadcastable against ``w`` (may require grad); per-channel scales receive
        the sum over their channel.
    grad_scale : float or Tensor
        Multiplier of the step-size gradient.
    binary : bool
        1-bit grid ``s * sgn(w)``.
    """
    scale = _with_gradient(qparams.scale, qparams.scale * grad_scale)
    x = w / scale
    inside = torch.clamp(x + qparams.zero_point, qparams.qmin, qparams.qmax)
    code = _with_gradient(_codes(x, qparams, binary), inside)
    return scale * (code - qparams.zero_point)


class _ScaledStraightThrough(torch.autograd.Function):
    """Forward: the code ``x_q``; backward: ``g * (1 + delta * sign(g) * (x_n - x_q))`` to ``x_n``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x_n: Tensor, x_q: Tensor, delta: Tensor) -> Tensor:
        return x_q.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x_n, x_q, delta = inputs
        ctx.save_for_backward(x_n - x_q, delta)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        diff, delta = ctx.saved_tensors
        return grad_out * (1 + delta * torch.sign(grad_out) * diff), None, None


def ewgs(w: Tensor, qparams: QParams, *, delta: ScalarOrTensor = 0.0, binary: bool = False) -> Tensor:
    """Element-wise gradient scaling (Lee, Kim, Ham 2021, arXiv 2104.00903).

    Backward to ``w``: ``g * (1 + delta * sign(g) * (x_n - x_q)) * 1[q_min <= x <= q_max]``
    with ``x = w/s + z``, ``x_n = clamp(x, q_min, q_max)`` and ``x_q`` the integer code, i.e.
    **in units of the step**. The EWGS code (cvlab-yonsei/EWGS ``EWGS_discretizer``) uses
    the same expression on inputs normalised to ``[0, 1]`` (units of ``(levels - 1)``
    steps) with a ``delta`` estimated in those same units; the factor is invariant to a
    common rescaling of ``x`` when ``delta`` is estimated consistently (``delta`` scales
    inversely), so ``delta`` here must be expressed per step unit:
    ``delta_step = s * delta_weight`` (see :func:`riverscape.quant.qat.qat`).

    Parameters
    ----------
    w : Tensor, any shape
    qparams : QParams
        Scale and zero point (no gradient to the scale).
    delta : float or Tensor
        Scaling factor ``>= 0`` in step units, broadcastable against ``w`` (per channel
        when the scale is). ``delta = 0`` is the clipped STE.
    binary : bool
        1-bit grid ``s * sgn(w)``.
    """
    scale = qparams.scale.detach()
    x = w / scale
    x_n = torch.clamp(x + qparams.zero_point, qparams.qmin, qparams.qmax)
    x_q = _codes(x.detach(), qparams, binary)
    delta_t = torch.as_tensor(delta, dtype=w.dtype, device=w.device)
    code = _ScaledStraightThrough.apply(x_n, x_q, delta_t)
    return scale * (code - qparams.zero_point)


def pege(w: Tensor, qparams: QParams, *, mask: Tensor | None = None, binary: bool = False) -> Tensor:
    """PEGE placeholder [P]: mixed forward ``m * Q(w) + (1 - m) * w``, STE on the quantized part.

    arXiv 2509.00097 (Zhao 2025) is known from its abstract only; this implements the
    mechanism it describes (progressive element-wise replacement of full-precision weights
    by quantized ones), not the paper's exact method. The replacement schedule is
    :func:`pege_rho`, the mask :func:`pege_mask`; the discretisation penalty
    ``lambda ||w - Q(w)||^2`` is added by :func:`riverscape.quant.qat.qat`.

    Parameters
    ----------
    w : Tensor, any shape
    qparams : QParams
    mask : bool Tensor, shape of ``w``, optional
        ``True`` where the weight is replaced by its grid point; default all (plain STE).
    binary : bool
        1-bit grid ``s * sgn(w)``.
    """
    quantized = ste(w, qparams, binary=binary)
    if mask is None:
        return quantized
    return torch.where(mask, quantized, w)


# ---------------------------------------------------------------------- control arms (forward point != Q(w))
def random_signs(shape: torch.Size | tuple, generator: torch.Generator, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Tensor:
    """Independent fair ``+-1`` entries drawn from ``generator`` (a CPU generator), as ``dtype`` on ``device``."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator)
    return (2 * bits - 1).to(dtype=dtype, device=device)


def matched_noise(w: Tensor, qparams: QParams, *, signs: Tensor, binary: bool = False) -> Tensor:
    """Forward ``w + |Q(w) - w| * signs``, backward identity to ``w``.

    The rounding perturbation's magnitudes with random signs: the matched-noise control of the
    QAT-dynamics experiment (the gradient is taken at a point exactly as far from ``w``, coordinate
    by coordinate, as ``Q(w)``, but in a random orthant).

    Parameters
    ----------
    w : Tensor, any shape
    qparams : QParams
    signs : Tensor, shape of ``w``
        Entries ``+-1`` (draw fresh ones every step, e.g. with :func:`random_signs`).
    binary : bool
        1-bit grid ``s * sgn(w)``.
    """
    if signs.shape != w.shape:
        raise ValueError(f"signs must have the shape of w {tuple(w.shape)}, got {tuple(signs.shape)}")
    base = w.detach()
    magnitude = (_hard(w, qparams, binary) - base).abs()
    return _with_gradient(base + magnitude * signs.to(dtype=w.dtype, device=w.device), w)


def stochastic_codes(w: Tensor, qparams: QParams, uniforms: Tensor, *, binary: bool = False) -> Tensor:
    """Integer codes of stochastic rounding onto the grid of ``qparams`` (no gradient).

    ``x = clamp(w / s + z, q_min, q_max)``; the code is ``floor(x) + 1[u < x - floor(x)]``, so
    ``E[code] = x``: unbiased inside the range, the nearest end code outside it. At 1 bit the
    codes are ``-1, +1`` and ``P(+1) = (clamp(w / s, -1, 1) + 1) / 2``.

    Parameters
    ----------
    w : Tensor, any shape
    qparams : QParams
    uniforms : Tensor, shape of ``w``
        Independent draws from ``U[0, 1)``.
    binary : bool
    """
    if uniforms.shape != w.shape:
        raise ValueError(f"uniforms must have the shape of w {tuple(w.shape)}, got {tuple(uniforms.shape)}")
    u = uniforms.to(dtype=w.dtype, device=w.device)
    x = w.detach() / qparams.scale.detach()
    if binary:
        up = u < (torch.clamp(x, -1.0, 1.0) + 1.0) / 2.0
        return torch.where(up, torch.ones_like(x), -torch.ones_like(x))
    x = torch.clamp(x + qparams.zero_point, qparams.qmin, qparams.qmax)
    low = torch.floor(x)
    return torch.clamp(low + (u < x - low).to(x.dtype), qparams.qmin, qparams.qmax)


def stochastic_rounding(w: Tensor, qparams: QParams, *, uniforms: Tensor, binary: bool = False) -> Tensor:
    """Forward ``SR(w) = s * (code - z)`` (:func:`stochastic_codes`), backward identity to ``w``.

    On the same grid as ``Q(w)``, unbiased inside the range (``E[SR(w)] = w``); the
    stochastic-rounding control of the QAT-dynamics experiment (Gupta et al. 2015, arXiv 1502.02551).

    Parameters
    ----------
    w : Tensor, any shape
    qparams : QParams
    uniforms : Tensor, shape of ``w``
        Independent ``U[0, 1)`` draws (fresh ones every step).
    binary : bool
    """
    scale = qparams.scale.detach()
    value = scale * (stochastic_codes(w, qparams, uniforms, binary=binary) - qparams.zero_point)
    return _with_gradient(value, w)


def latent(w: Tensor, qparams: QParams, *, binary: bool = False) -> Tensor:
    """Forward and backward identity: the gradient is taken at the latent ``w`` (FP training, deployed quantized).

    ``qparams`` and ``binary`` are accepted for the common signature and ignored.
    """
    return w


_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "ste": ste,
    "clipped_ste": clipped_ste,
    "lsq": lsq,
    "ewgs": ewgs,
    "pege": pege,
    "matched_noise": matched_noise,
    "stochastic_rounding": stochastic_rounding,
    "latent": latent,
}


def get_estimator(name: str) -> Callable[..., Tensor]:
    """The estimator function called ``name`` (one of :data:`ESTIMATORS` or :data:`GRADIENT_POINT_ARMS`)."""
    try:
        return _FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown estimator {name!r}; choose one of {ESTIMATORS + GRADIENT_POINT_ARMS}") from None


def make_estimator(name: str, **options) -> Estimator:
    """Build ``w_hat = estimator(w, qparams)`` by name with its options bound.

    Parameters
    ----------
    name : {"ste", "clipped_ste", "lsq", "ewgs", "pege"}
    **options
        Keyword options of that estimator (``binary``; ``grad_scale`` for lsq; ``delta``
        for ewgs; ``mask`` for pege).

    Examples
    --------
    >>> from riverscape.quant import QParams
    >>> f = make_estimator("ewgs", delta=0.5)
    >>> f(torch.tensor([0.3]), QParams(torch.tensor(1.0), torch.tensor(0.0), -1, 1))
    tensor([0.])
    """
    fn = get_estimator(name)
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("w", "qparams")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"estimator {name!r} takes options {allowed}, got unknown {unknown}")
    return functools.partial(fn, **options)


# ---------------------------------------------------------------------- helpers
def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ step-gradient scale ``g = 1 / sqrt(N_W * Q_P)``.

    ``N_W`` is the number of weights sharing the step: the layer's size for a per-tensor
    scale (as in LSQ), one channel's size for per-channel scales. ``Q_P = q_max`` (1 at 1 bit).
    """
    if numel_per_scale < 1:
        raise ValueError("numel_per_scale must be positive")
    return 1.0 / math.sqrt(numel_per_scale * max(qmax, 1))


def lsq_initial_scale(w: Tensor, qparams: QParams) -> Tensor:
    """LSQ's initial step ``s0 = 2 mean|w| / sqrt(Q_P)``, per channel when ``qparams`` is.

    The mean runs over the elements sharing each scale (shape of ``qparams.scale``).
    """
    shape = qparams.scale.shape
    if len(shape) == w.ndim:
        dims = tuple(d for d in range(w.ndim) if shape[d] == 1)
    else:
        dims = tuple(range(w.ndim))
    mean_abs = w.detach().abs().mean(dim=dims, keepdim=True) if dims else w.detach().abs()
    s0 = 2.0 * mean_abs / math.sqrt(max(qparams.qmax, 1))
    eps = 1e-8 * w.detach().abs().amax() + 1e-12
    return torch.maximum(s0, eps).reshape(qparams.scale.shape)


def pege_rho(step: int, total_steps: int, beta: float = 10.0) -> float:
    """Logarithmic curriculum ``rho(e) = log(1 + (beta - 1) e / E) / log(beta)`` [P].

    ``rho(0) = 0``, ``rho(E) = 1``, concave in ``e`` (fast replacement early); ``beta > 1``.

    >>> pege_rho(0, 100), pege_rho(100, 100), round(pege_rho(50, 100, 10.0), 6)
    (0.0, 1.0, 0.740363)
    """
    if beta <= 1.0:
        raise ValueError(f"pege beta must be > 1, got {beta}")
    if total_steps < 1:
        raise ValueError("total_steps must be at least 1")
    e = min(max(step, 0), total_steps) / total_steps
    return math.log1p((beta - 1.0) * e) / math.log(beta)


def pege_mask(ranks: Tensor, rho: float) -> Tensor:
    """Replacement mask: the ``floor(rho * n + 1/2)`` elements with the lowest ``ranks``.

    ``ranks`` is a permutation of ``0..n-1`` (any shape) drawn once, so masks are nested:
    a replaced weight stays replaced as ``rho`` grows.
    """
    k = math.floor(rho * ranks.numel() + 0.5)
    return ranks < k
