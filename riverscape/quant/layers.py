"""Which tensors of a model are quantizable weights, and along which axis their channels run.

The weight rule
---------------
A parameter is a **weight** when it is a *registered parameter of a registered layer type*:
its owning module is an instance (``isinstance``, so subclasses count) of a type in the
registry below and its attribute name matches one of that type's patterns. Biases,
normalisation scales/shifts and every other 1-D tensor are not weights. A parameter with two
or more dimensions that is not a weight (e.g. a custom ``nn.Parameter`` matrix) is an
*unsupported weight*: it stays in full precision unless it is named explicitly
(``include=`` / ``--include``) or its layer type is registered with
:func:`register_quantizable`.

Built-in registry (pattern -> channel axis, i.e. the axis holding output channels):

==============================================  ========================================  ====
layer type                                      tensors                                   axis
==============================================  ========================================  ====
Linear (and subclasses, e.g. MHA's out_proj)    ``weight``                                0
Conv1d, Conv2d, Conv3d                          ``weight`` ``(out, in/groups, *k)``       0
ConvTranspose1d/2d/3d                           ``weight`` ``(in, out/groups, *k)``       1
Embedding, EmbeddingBag                         ``weight`` (one row per token)            0
Bilinear                                        ``weight`` ``(out, in1, in2)``            0
RNN, LSTM, GRU                                  ``weight_ih_l*``, ``weight_hh_l*``,        0
                                                ``weight_hr_l*`` (``_reverse`` included)
RNNCell, LSTMCell, GRUCell                      ``weight_ih``, ``weight_hh``              0
MultiheadAttention                              ``in_proj_weight``, ``q/k/v_proj_weight``  0
transformers ``Conv1D`` (GPT-2)                 ``weight`` ``(in, out)``                  1
==============================================  ========================================  ====

The Hugging Face ``Conv1D`` is matched by its dotted class name
(``transformers.pytorch_utils.Conv1D``), so ``transformers`` is never imported here.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from torch import nn

__all__ = [
    "register_quantizable",
    "registered_layers",
    "layer_patterns",
    "channel_axis_of",
    "param_role",
    "is_bias_name",
    "UnsupportedWeight",
    "unsupported_weights",
    "unsupported_weight_warning",
    "ROLES",
]

LayerKey = Union[type, str]
ROLES = ("weight", "bias", "unsupported", "other")

_REGISTRY: dict[LayerKey, dict[str, int]] = {}


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_patterns(patterns: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(patterns, Mapping) or not patterns:
        raise ValueError("patterns must be a non-empty mapping {parameter-name pattern: channel axis}")
    checked = {}
    for pattern, axis in patterns.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"parameter-name patterns must be non-empty strings, got {pattern!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"the channel axis of {pattern!r} must be an integer, got {axis!r}")
        checked[pattern] = axis
    return checked


def register_quantizable(module_type: LayerKey, patterns: Mapping[str, int]) -> None:
    """Declare a layer type's weights and the axis of their output channels.

    Parameters
    ----------
    module_type : type or str
        An ``nn.Module`` subclass (matched with ``isinstance``, so its subclasses count too) or
        a dotted class name ``"package.module.ClassName"`` (matched without importing it).
        Registering a type again replaces its patterns.
    patterns : dict of str to int
        ``{parameter-name pattern: channel axis}``; patterns are ``fnmatch`` globs on the
        parameter's attribute name inside the module (``"weight"``, ``"weight_ih_l*"``).

    Notes
    -----
    The registry is read when an :class:`~riverscape.Objective` is built: register custom
    layers before building the Objective.

    Examples
    --------
    >>> import torch
    >>> class Scaled(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.kernel = torch.nn.Parameter(torch.randn(3, 4))
    >>> register_quantizable(Scaled, {"kernel": 1})
    >>> channel_axis_of(Scaled(), "kernel")
    1
    """
    if isinstance(module_type, str):
        if "." not in module_type:
            raise ValueError(f"a layer type given by name must be dotted ('package.module.ClassName'), got {module_type!r}")
    elif not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass or a dotted class name, got {module_type!r}")
    _REGISTRY[module_type] = _check_patterns(patterns)


def registered_layers() -> dict[LayerKey, dict[str, int]]:
    """A copy of the registry: layer type (class or dotted name) -> ``{pattern: channel axis}``."""
    return {key: dict(value) for key, value in _REGISTRY.items()}


def layer_patterns(module: nn.Module) -> Optional[dict[str, int]]:
    """The patterns of the most specific registered type of ``module`` (``None`` if unregistered)."""
    for cls in type(module).__mro__:
        for key in (cls, _dotted(cls)):
            if key in _REGISTRY:
                return _REGISTRY[key]
    return None


def channel_axis_of(module: nn.Module, param_name: str) -> Optional[int]:
    """Channel axis of ``module``'s parameter ``param_name`` if it is a weight, else ``None``.

    Parameters
    ----------
    module : nn.Module
        The module that owns the parameter directly.
    param_name : str
        The attribute name inside ``module`` (``"weight"``, ``"weight_hh_l0_reverse"``).
    """
    patterns = layer_patterns(module) or {}
    for pattern, axis in patterns.items():
        if fnmatch.fnmatchcase(param_name, pattern):
            return axis
    return None


def is_bias_name(param_name: str) -> bool:
    """Whether an attribute name names a bias (``bias``, ``bias_ih_l0``, ``in_proj_bias``, ``bias_k``)."""
    return param_name.startswith("bias") or param_name.endswith("_bias")


def param_role(module: nn.Module, param_name: str, ndim: int) -> str:
    """Role of a parameter under the weight rule: one of :data:`ROLES`.

    ``"weight"`` (registered parameter of a registered layer), ``"bias"``, ``"unsupported"``
    (two or more dimensions, not a registered weight, not a bias) or ``"other"`` (norm
    scales/shifts and other 1-D tensors).
    """
    if channel_axis_of(module, param_name) is not None:
        return "weight"
    if is_bias_name(param_name):
        return "bias"
    return "unsupported" if ndim >= 2 else "other"


@dataclass(frozen=True)
class UnsupportedWeight:
    """A weight-bearing tensor of a layer type the registry does not know."""

    name: str
    shape: tuple[int, ...]
    module_type: str

    def warning(self) -> str:
        """The user-facing warning (see :func:`unsupported_weight_warning`)."""
        return unsupported_weight_warning(self.name, self.shape, self.module_type)


def unsupported_weights(model: nn.Module) -> list[UnsupportedWeight]:
    """Parameters of ``model`` with two or more dimensions that are not registered weights (biases aside).

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    list of UnsupportedWeight
        In ``named_parameters`` order; shared parameters are listed once.
    """
    found, seen = [], set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if param_role(mod, p_name, p.ndim) == "unsupported":
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                found.append(UnsupportedWeight(name, tuple(p.shape), type(mod).__name__))
    return found


def unsupported_weight_warning(name: str, shape: tuple[int, ...], module_type: str) -> str:
    """``"<name> (shape, module type) is a weight of an unsupported layer type ..."`` (no prefix).

    Callers prefix it (the CLI prints ``riverscape: warning: ...``).
    """
    dims = "x".join(str(d) for d in shape)
    return (
        f"{name} ({dims}, {module_type or 'unknown module'}) is a weight of an unsupported layer type and stays in full "
        f"precision; quantize it with --include {name} or riverscape.quant.register_quantizable"
    )


def _register_builtins() -> None:
    weight0 = {"weight": 0}
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag, nn.Bilinear):
        register_quantizable(cls, weight0)
    for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register_quantizable(cls, {"weight": 1})
    register_quantizable(nn.RNNBase, {"weight_ih_l*": 0, "weight_hh_l*": 0, "weight_hr_l*": 0})
    register_quantizable(nn.RNNCellBase, {"weight_ih": 0, "weight_hh": 0})
    register_quantizable(
        nn.MultiheadAttention, {"in_proj_weight": 0, "q_proj_weight": 0, "k_proj_weight": 0, "v_proj_weight": 0}
    )
    # Hugging Face GPT-2 style Conv1D: weight (in, out), y = x @ W + b; older releases defined it in modeling_utils.
    for dotted in ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D"):
        register_quantizable(dotted, {"weight": 1})


_register_builtins()
