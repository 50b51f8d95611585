"""Post-training quantization: configs, the method registry and the entry points :func:`ptq` / :func:`ptq_result`.

A PTQ method is a frozen :class:`PTQConfig` subclass (its options, validated in
``__post_init__``) plus a handler ``handler(config, objective, qmap, theta) -> (theta_q, qparams)``
(optionally ``(theta_q, qparams, diagnostics)`` with a :class:`PTQDiagnostics`) registered under a
name with :func:`register_ptq_method` (the config -> handler pattern of torchao's
``quantize_(model, config)``). Adding a method is one new module defining its config and handler
plus one :func:`register_ptq_method` line in :mod:`riverscape.quant.ptq` (GPTQ and AdaRound are
built that way, see docs/ptq_methods.md §4 and §5).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Optional, Sequence, Union

from torch import Tensor

from ...objective import Objective
from ..registry import check_registration, resolve_config
from ..qmap import QuantizerLike, QuantMap, resolve_quant_map
from ..quantizers import QParams
from .activations import ActivationCalibration, ActivationQuantization, calibrate_activations

__all__ = [
    "PTQConfig",
    "PTQHandler",
    "PTQResult",
    "PTQDiagnostics",
    "PTQ_METHODS",
    "PTQ_CONFIGS",
    "register_ptq_method",
    "ptq_config",
    "ptq",
    "ptq_result",
]


@dataclass(frozen=True)
class PTQConfig:
    """Base class of the options of one PTQ method (a frozen dataclass).

    Subclasses set the class attribute ``method`` (the registry name) and validate their
    fields in ``__post_init__``, raising :class:`ValueError` with the allowed values.
    """

    method: ClassVar[str] = ""
    selectable_by_name: ClassVar[bool] = True
    """False for methods that need arguments without defaults (e.g. the weights of :class:`External`)."""

    def to_dict(self) -> dict:
        """``{"method": name, **fields}`` (JSON-friendly when the fields are)."""
        return {"method": self.method, **asdict(self)}


@dataclass(frozen=True)
class PTQDiagnostics:
    """What a data-aware PTQ handler reports besides the point (third element of its return value).

    Attributes
    ----------
    reconstruction_error : dict of str to float
        Relative layer-wise reconstruction error ``||X W^T - X Q^T||_F^2 / ||X W^T||_F^2``
        (``tr(D H D^T) / tr(W H W^T)``, docs/ptq_methods.md §3) of every tensor that had
        calibration inputs, by parameter name.
    fallback : dict of str to str
        Tensors quantized by round-to-nearest instead of the method, and why.
    calibration : dict
        ``n_samples`` and ``seed`` of the calibration set (plus rows per layer).
    """

    reconstruction_error: dict[str, float] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    calibration: Optional[dict] = None


PTQHandler = Callable[[PTQConfig, Objective, QuantMap, Tensor], "tuple[Tensor, Sequence[QParams]]"]
"""``handler(config, objective, qmap, theta) -> (theta_q, qparams[, diagnostics])``.

``theta`` is the validated full-precision point, ``qmap`` the resolved map; the handler returns
the quantized point (shape ``(D,)``, unquantized coordinates copied from ``theta``) and the
quantization parameters of every target of ``qmap`` (in ``qmap.targets`` order), optionally
followed by a :class:`PTQDiagnostics`.
"""

PTQ_METHODS: dict[str, PTQHandler] = {}
"""Registered PTQ handlers by method name (see :func:`register_ptq_method`)."""

PTQ_CONFIGS: dict[str, type[PTQConfig]] = {}
"""Config class of every registered PTQ method, by the same names as :data:`PTQ_METHODS`."""


def register_ptq_method(name: str, config_cls: type[PTQConfig], handler: PTQHandler) -> None:
    """Register a PTQ method: ``ptq(..., method=name)`` or ``ptq(..., method=config_cls(...))`` then runs ``handler``.

    Parameters
    ----------
    name : str
        Registry name; must equal ``config_cls.method``. Re-registering a name replaces it.
    config_cls : type
        A frozen dataclass subclass of :class:`PTQConfig` whose fields all have defaults
        (``method=name`` as a string builds ``config_cls()``).
    handler : callable
        ``handler(config, objective, qmap, theta) -> (theta_q, qparams)``, see :data:`PTQHandler`.

    Raises
    ------
    ValueError
        Empty name, or a name that differs from ``config_cls.method``.
    TypeError
        ``config_cls`` not a PTQConfig subclass or ``handler`` not callable.
    """
    check_registration("PTQ method", PTQConfig, "method", name, config_cls, handler)
    PTQ_CONFIGS[name] = config_cls
    PTQ_METHODS[name] = handler


def ptq_config(method: Union[str, PTQConfig]) -> PTQConfig:
    """The config of ``method``: a registered name (its default config) or a config instance (checked).

    Errors are those of :func:`riverscape.quant.registry.resolve_config` (``ValueError`` for an
    unregistered name or config class, ``TypeError`` for anything else).
    """
    if isinstance(method, str) and method in PTQ_CONFIGS and not PTQ_CONFIGS[method].selectable_by_name:
        raise ValueError(f"PTQ method {method!r} needs arguments: pass a {PTQ_CONFIGS[method].__name__}(...) config")
    return resolve_config("PTQ method", PTQConfig, "method", PTQ_CONFIGS, method)


@dataclass(frozen=True)
class PTQResult:
    """Outcome of :func:`ptq_result`.

    Attributes
    ----------
    theta_q : Tensor, shape (D,)
        The quantized point (what :func:`ptq` returns).
    qparams : dict of str to QParams
        Quantization parameters of every quantized tensor, by parameter name (``qmap.targets`` order).
    config : PTQConfig
        The method and its options.
    quantizer : str
        ``quantizer.describe()`` of the map.
    reconstruction_error : dict of str to float or None
        Relative layer-wise reconstruction error per tensor, filled by data-aware methods
        (GPTQ, AdaRound; RTN with ``calibration_samples``), else ``None``.
    fallback : dict of str to str
        Tensors a data-aware method quantized by round-to-nearest, and why.
    calibration : dict or None
        ``n_samples`` and ``seed`` of the calibration set of a data-aware method.
    activations : ActivationCalibration or None
        With ``activations=``: the input quantizers of the quantized layers, calibrated at
        ``theta_q`` (evaluate ``L_A`` with
        :func:`~riverscape.quant.ptq.activations.with_activation_quantization`).
    """

    theta_q: Tensor
    qparams: dict[str, QParams]
    config: PTQConfig
    quantizer: str
    reconstruction_error: Optional[dict[str, float]] = None
    fallback: dict[str, str] = field(default_factory=dict)
    calibration: Optional[dict] = None
    activations: Optional[ActivationCalibration] = None
    method: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", self.config.method)


def ptq_result(
    objective: Objective,
    quantizer: QuantizerLike,
    theta: Tensor | None = None,
    *,
    method: Union[str, PTQConfig] = "rtn",
    activations: Optional[ActivationQuantization] = None,
    **map_options,
) -> PTQResult:
    """Post-training quantization with the point and its per-layer quantization parameters.

    Same arguments as :func:`ptq`, plus ``activations``: an
    :class:`~riverscape.quant.ptq.activations.ActivationQuantization` (e.g. ``ActivationQuantization(8)``
    for ``W4A8``) calibrates per-tensor input quantizers of the quantized Linear/Conv layers at
    ``theta_q`` on ``objective``'s data (docs/ptq_methods.md §7); they are in ``result.activations``.
    The point itself does not depend on them.

    Returns
    -------
    PTQResult
    """
    config = ptq_config(method)
    qmap = resolve_quant_map(objective, quantizer, **map_options)
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    returned = tuple(PTQ_METHODS[config.method](config, objective, qmap, theta))
    if len(returned) not in (2, 3) or (len(returned) == 3 and not isinstance(returned[2], PTQDiagnostics)):
        raise TypeError(f"PTQ method {config.method!r} must return (theta_q, qparams) or (theta_q, qparams, PTQDiagnostics)")
    theta_q, qparams = returned[0], list(returned[1])
    diagnostics = returned[2] if len(returned) == 3 else None
    if theta_q.shape != theta.shape:
        raise ValueError(f"PTQ method {config.method!r} returned shape {tuple(theta_q.shape)}, expected {tuple(theta.shape)}")
    if len(qparams) != len(qmap.targets):
        raise ValueError(f"PTQ method {config.method!r} returned {len(qparams)} qparams for {len(qmap.targets)} quantized tensors")
    named = {t.name: qp for t, qp in zip(qmap.targets, qparams)}
    acts = None if activations is None else calibrate_activations(objective, qmap, theta_q, activations)
    if diagnostics is None:
        return PTQResult(theta_q, named, config, qmap.quantizer.describe(), activations=acts)
    return PTQResult(theta_q, named, config, qmap.quantizer.describe(), diagnostics.reconstruction_error,
                     diagnostics.fallback, diagnostics.calibration, acts)


def ptq(
    objective: Objective,
    quantizer: QuantizerLike,
    theta: Tensor | None = None,
    *,
    method: Union[str, PTQConfig] = "rtn",
    **map_options,
) -> Tensor:
    """Post-training quantization ``theta -> theta_q`` with a registered method (default round-to-nearest).

    Parameters
    ----------
    objective : Objective
        Layout (and, for data-aware methods, calibration data). Never modified.
    quantizer : int, UniformQuantizer or QuantMap
        A bit-width or quantizer (wrapped in a :class:`QuantMap` with ``map_options``) or a ready map.
    theta : Tensor, optional
        Full-precision point; default ``objective.theta0``.
    method : str or PTQConfig
        A name of :data:`PTQ_METHODS` (its default config) or a config such as
        :class:`~riverscape.quant.ptq.RTN`.
    **map_options
        ``selection`` or ``include``, ``exclude``, ``keep_first_last``, ``quantize_bias`` for
        :class:`QuantMap`.

    Returns
    -------
    Tensor, shape (D,)
        The quantized point (weights of registered layer types on their grids,
        biases and normalisation parameters unchanged unless configured).

    Examples
    --------
    >>> import torch
    >>> from riverscape import Objective
    >>> obj = Objective(torch.nn.Linear(4, 3), "cross_entropy", (torch.randn(5, 4), torch.randint(0, 3, (5,))))
    >>> torch.equal(ptq(obj, 2), ptq(obj, 2, method="rtn"))
    True
    """
    return ptq_result(objective, quantizer, theta, method=method, **map_options).theta_q
