"""The one mechanism behind the PTQ-method and QAT-estimator registries: a name maps to a frozen config class.

:mod:`riverscape.quant.ptq` and :mod:`riverscape.quant.estimator_configs` keep their own tables
(name -> config class and handler); registering and resolving a config go through these two
functions, so both registries check and answer in the same way.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["check_registration", "resolve_config"]


def check_registration(what: str, base: type, name_attr: str, name: str, config_cls: Any, handler: Any) -> None:
    """Validate one registration: a non-empty ``name``, a ``base`` subclass declaring that name, a callable handler.

    Parameters
    ----------
    what : str
        What is registered, for messages (``"PTQ method"``, ``"estimator"``).
    base : type
        The config base class.
    name_attr : str
        The class attribute that carries the registry name (``"method"``, ``"name"``).
    name, config_cls, handler
        The registration.

    Raises
    ------
    ValueError
        Empty name, or a name that differs from ``config_cls.<name_attr>``.
    TypeError
        ``config_cls`` not a ``base`` subclass, or ``handler`` not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{'an' if what[0] in 'aeiou' else 'a'} {what} needs a non-empty name, got {name!r}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, base)):
        raise TypeError(f"config_cls must be a subclass of {base.__name__}, got {config_cls!r}")
    declared = getattr(config_cls, name_attr)
    if declared != name:
        raise ValueError(f"config class {config_cls.__name__} declares {name_attr} {declared!r}, registered as {name!r}")
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {type(handler).__name__}")


def resolve_config(what: str, base: type, name_attr: str, configs: Mapping[str, type], value: Any) -> Any:
    """The config ``value`` names: a registered name gives its default config; a registered config is returned as is.

    Raises
    ------
    ValueError
        An unregistered name or config class (the message lists the registered names).
    TypeError
        Neither a string nor a ``base`` instance.
    """
    if isinstance(value, base):
        if configs.get(getattr(value, name_attr)) is not type(value):
            raise ValueError(f"{what} config {type(value).__name__} is not registered; choose one of {tuple(configs)}")
        return value
    if isinstance(value, str):
        if value not in configs:
            raise ValueError(f"unknown {what} {value!r}; choose one of {tuple(configs)}")
        return configs[value]()
    raise TypeError(f"{what} must be a registered name or a {base.__name__}, got {type(value).__name__}")
