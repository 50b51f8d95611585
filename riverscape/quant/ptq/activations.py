"""Activation fake-quantization: per-tensor, calibrated quantizers of every quantized layer's input (``W4A8``).

The weights-only loss ``L(Q(theta))`` is what the rest of riverscape measures. A deployed integer
network also quantizes the *inputs* of its Linear/Conv layers; the loss it runs is
``L_A(Q(theta))``, the network whose every quantized layer ``l`` sees ``Q_a(x_l)`` instead of
``x_l`` (docs/ptq_methods.md §7):

    Q_a(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z),    one (s, z) per layer (per tensor),

an asymmetric (affine) grid whose range ``[alpha, beta]`` (``alpha <= 0 <= beta``) is calibrated
on calibration data at the quantized point: the min-max of the observed inputs, or a percentile
or MSE-searched range (:class:`~riverscape.quant.UniformQuantizer`'s ``"percentile"``/``"mse"``
rules applied to a seeded sample of the inputs).

Evaluation: :func:`with_activation_quantization` returns a new Objective whose forward context
installs forward pre-hooks on *its own private module* for the duration of each forward and
removes them on exit (also when the forward raises); no module of the caller ever carries a hook.

Derivatives: ``Q_a`` is piecewise constant, so the exact gradient and Hessian of ``L_A`` with
respect to every weight upstream of a quantized activation are zero almost everywhere. The
Objective's gradients and HVPs are those of the clipped straight-through surrogate

    Q_a(x) ~ clamp(x, lo, hi) + stopgrad(Q_a(x) - clamp(x, lo, hi)),   lo = s (0 - z), hi = s (2^b - 1 - z),

i.e. the rounding residual is held at its value at the current point and the clip keeps its
(0/1) derivative, as in the fake-quantize operators of QAT frameworks (Jacob et al. 2018; PyTorch's
``FakeQuantize``). The loss values are exact; curvature is that of the surrogate.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor, nn

from ...objective import Objective
from ..bn_reestimate import objective_on_module
from ..qmap import QuantMap
from ..quantizers import RANGE_METHODS, QParams, UniformQuantizer, fake_quantize
from .calibration import run_calibration
from .options import check_calibration_options, check_integer

__all__ = [
    "ActivationQuantization",
    "ActivationCalibration",
    "ACTIVATION_LAYERS",
    "activation_layers",
    "calibrate_activations",
    "quantize_activation",
    "activation_hooks",
    "with_activation_quantization",
    "setting_name",
]

ACTIVATION_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
"""Layer types whose input is quantized (Linear and every Conv/ConvTranspose)."""


@dataclass(frozen=True)
class ActivationQuantization:
    """Options of the per-tensor activation quantizers (``A{bits}``).

    Parameters
    ----------
    bits : int
        Bit-width of every quantized layer input, 2 to 16 (``A8``: the standard W4A8/W8A8 setting).
    range : {"minmax", "percentile", "mse"}
        The calibrated range: min and max of the observed inputs (exact over every calibration
        input), or the ``percentile`` quantiles / the MSE-optimal shrink of the min-max range
        (on a seeded sample of at most ``max_values`` inputs per layer).
    percentile : float
        Quantile in percent for ``range="percentile"`` (of ``x`` at both ends).
    calibration_samples : int or None
        Calibration samples drawn without replacement with ``seed`` from the calibrating
        Objective's data (``None``: all of them).
    seed : int
    max_values : int
        Inputs per layer kept for the percentile and MSE ranges (a uniform seeded sample).
    """

    bits: int = 8
    range: str = "minmax"
    percentile: float = 99.99
    calibration_samples: Optional[int] = 128
    seed: int = 0
    max_values: int = 2**20

    def __post_init__(self) -> None:
        check_integer(self.bits, "ActivationQuantization bits", 2)
        if self.bits > 16:
            raise ValueError(f"ActivationQuantization bits must be from 2 to 16, got {self.bits}")
        if self.range not in RANGE_METHODS:
            raise ValueError(f"unknown activation range {self.range!r}; choose one of {RANGE_METHODS}")
        check_calibration_options(self, allow_none=True)
        check_integer(self.max_values, "ActivationQuantization max_values", 2)
        _ = self.quantizer  # UniformQuantizer validates the percentile

    @property
    def quantizer(self) -> UniformQuantizer:
        """The per-tensor asymmetric :class:`UniformQuantizer` whose range rule calibrates each layer."""
        return UniformQuantizer(self.bits, grid="asymmetric", per_channel=False, range=self.range, percentile=self.percentile)

    @property
    def suffix(self) -> str:
        """``"A8"``: appended to the weights' short name (``W4A8``, ``W4g128A8``)."""
        return f"A{self.bits}"

    def describe(self) -> str:
        """``"8-bit per-tensor asym minmax activations"``."""
        return f"{self.bits}-bit per-tensor asym {self.range} activations"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "range": self.range, "percentile": self.percentile,
                "calibration_samples": self.calibration_samples, "seed": self.seed}


def setting_name(quantizer: UniformQuantizer, activations: Optional[ActivationQuantization]) -> str:
    """``W4`` (weights only) or ``W4A8`` / ``W4g128A8`` (weights and activations)."""
    return quantizer.short_name + ("" if activations is None else activations.suffix)


@dataclass(frozen=True)
class ActivationCalibration:
    """Calibrated input quantizers of the quantized layers.

    Attributes
    ----------
    config : ActivationQuantization
    qparams : dict of str to QParams
        Per-tensor scale and zero point of every quantized layer's input, by module name.
    ranges : dict of str to (float, float)
        The observed min and max of each layer's input on the calibration samples.
    n_samples, seed : int
        The calibration draw.
    """

    config: ActivationQuantization
    qparams: dict
    ranges: dict
    n_samples: int
    seed: int

    @property
    def layers(self) -> list[str]:
        return list(self.qparams)

    def to_dict(self) -> dict:
        """JSON-friendly: the options, the draw and each layer's observed range and step."""
        return {**self.config.to_dict(), "n_samples": self.n_samples, "seed": self.seed,
                "layers": {name: {"min": lo, "max": hi, "scale": float(self.qparams[name].scale),
                                  "zero_point": float(self.qparams[name].zero_point)}
                           for name, (lo, hi) in self.ranges.items()}}


def activation_layers(module: nn.Module, qmap: QuantMap) -> list[str]:
    """Names of the Linear/Conv modules owning a quantized weight of ``qmap`` (map order, each once)."""
    modules = dict(module.named_modules())
    out: list[str] = []
    for target in qmap.targets:
        layer, _, param = target.name.rpartition(".")
        owner = modules.get(layer)
        if param == "weight" and isinstance(owner, ACTIVATION_LAYERS) and layer not in out:
            out.append(layer)
    return out


def calibrate_activations(objective: Objective, qmap: QuantMap, theta: Tensor, config: ActivationQuantization) -> ActivationCalibration:
    """Calibrate the input quantizer of every quantized Linear/Conv layer at ``theta``.

    The inputs are observed with forward pre-hooks on a private copy of the objective's module
    (the objective and the caller's model are untouched), running the network at ``theta``
    *without* activation quantization on ``config.calibration_samples`` samples of the
    objective's data drawn with ``config.seed``.

    Parameters
    ----------
    objective : Objective
        Calibration data and layout (e.g. the BatchNorm-re-estimated objective at ``theta``).
    qmap : QuantMap
        Which layers are quantized.
    theta : Tensor, shape (D,)
        The point (normally the quantized ``theta_q``).
    config : ActivationQuantization

    Returns
    -------
    ActivationCalibration
    """
    if not isinstance(config, ActivationQuantization):
        raise TypeError(f"config must be an ActivationQuantization, got {type(config).__name__}")
    theta = objective.check_theta(theta)
    module = copy.deepcopy(objective.module)
    modules = dict(module.named_modules())
    names = activation_layers(module, qmap)
    if not names:
        raise ValueError("no quantized Linear/Conv layer: activation quantization has no input to quantize")
    generator = torch.Generator().manual_seed(config.seed)
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    samples: dict[str, list[Tensor]] = {name: [] for name in names}
    keep = config.range != "minmax"

    def observe(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1)
            lows[name] = min(lows.get(name, float("inf")), float(x.min()))
            highs[name] = max(highs.get(name, float("-inf")), float(x.max()))
            if keep:
                samples[name].append(_subsample(x.to(torch.float64).cpu(), config.max_values, generator))
        return hook

    for name in names:
        modules[name].register_forward_pre_hook(observe(name))  # on the private copy, dropped with it
    indices = run_calibration(objective, module, theta, config.calibration_samples, config.seed)
    quantizer = config.quantizer
    qparams, ranges = {}, {}
    for name in names:
        if name not in lows:
            raise ValueError(f"layer {name!r} was not called in the forward pass: its input range cannot be calibrated")
        extremes = torch.tensor([[lows[name], highs[name]]], dtype=torch.float64)
        rows = _subsample(torch.cat(samples[name]), config.max_values, generator)[None] if keep else extremes
        eps = 1e-8 * extremes.abs().max() + 1e-12  # the smallest scale of UniformQuantizer (tensor_eps) on all inputs
        rp = quantizer.row_qparams(rows, eps)
        qparams[name] = QParams(rp.scale.reshape(()), rp.zero_point.reshape(()), rp.qmin, rp.qmax)
        ranges[name] = (lows[name], highs[name])
    return ActivationCalibration(config, qparams, ranges, int(indices.numel()), config.seed)


def _subsample(x: Tensor, limit: int, generator: torch.Generator) -> Tensor:
    """``x`` itself, or a uniform sample of ``limit`` of its entries without replacement."""
    if x.numel() <= limit:
        return x
    return x[torch.randperm(x.numel(), generator=generator)[:limit]]


def quantize_activation(x: Tensor, qp: QParams) -> Tensor:
    """``Q_a(x)`` in value; derivative that of the clipped straight-through surrogate (module docstring)."""
    scale = qp.scale.to(dtype=x.dtype, device=x.device)
    zero = qp.zero_point.to(dtype=x.dtype, device=x.device)
    lo, hi = scale * (qp.qmin - zero), scale * (qp.qmax - zero)
    clipped = torch.minimum(torch.maximum(x, lo), hi)
    return clipped + (fake_quantize(x, scale, zero, qp.qmin, qp.qmax) - clipped).detach()


@contextlib.contextmanager
def activation_hooks(module: nn.Module, calibration: ActivationCalibration):
    """Quantize the inputs of ``calibration``'s layers of ``module`` while the context is open.

    Forward pre-hooks are registered on entry and removed on exit, also when the body raises.
    """
    modules = dict(module.named_modules())
    missing = [name for name in calibration.qparams if name not in modules]
    if missing:
        raise ValueError(f"the module has no layer {missing[0]!r} of the activation calibration")
    handles = []
    try:
        for name, qp in calibration.qparams.items():
            handles.append(modules[name].register_forward_pre_hook(
                lambda mod, args, qp=qp: (quantize_activation(args[0], qp), *args[1:])))
        yield module
    finally:
        for handle in handles:
            handle.remove()


def with_activation_quantization(objective: Objective, calibration: ActivationCalibration) -> Objective:
    """A new Objective that evaluates ``L_A``: the inputs of the calibrated layers fake-quantized.

    Same loss, data, parameter selection, metric and HVP mode as ``objective``; its forward
    context is ``objective``'s plus :func:`activation_hooks` on its own private module, so hooks
    exist only during its forwards. Losses and metrics are exact; gradients and HVPs are those of
    the clipped straight-through surrogate (module docstring). ``objective`` is not modified.
    """
    if not isinstance(calibration, ActivationCalibration):
        raise TypeError(f"calibration must be an ActivationCalibration, got {type(calibration).__name__}")
    out = objective_on_module(objective, objective.module)
    out.theta0 = objective.theta0.clone()  # the private module's parameters are scratch space, not theta0
    outer: Callable[[], ContextManager] = objective._forward_context
    private = out.module

    @contextlib.contextmanager
    def context():
        with outer(), activation_hooks(private, calibration):
            yield

    out.set_forward_context(context)
    return out
