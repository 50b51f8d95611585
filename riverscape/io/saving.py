"""Write riverscape checkpoints: plain values only, atomically (see :mod:`riverscape.io.reading`)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..outdir import atomic_output_file
from .reading import FORMAT_NAME, FORMAT_VERSION
from .specs import PathLike, make_spec

__all__ = ["save_checkpoint"]


_PLAIN = (str, int, float, bool, type(None), Tensor, torch.dtype)


def _check_plain(value: Any, where: str) -> None:
    """Reject anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InputError(f"checkpoint field {where} has a non-string key {k!r}")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise InputError(f"checkpoint field {where} is a {type(value).__name__}; only tensors, dtypes, numbers, strings, lists and dicts are stored")


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    *,
    model_spec: Union[str, Mapping],
    data_spec: Union[str, Mapping, None],
    loss: Optional[str],
    train_result: Any = None,
    train_config: Optional[Mapping] = None,
    metrics: Optional[Mapping] = None,
    extra: Optional[Mapping] = None,
    overwrite: bool = True,
) -> Path:
    """Write a riverscape checkpoint atomically (temporary file + ``os.replace``).

    Parameters
    ----------
    path : str or PathLike
    model : nn.Module
        Its ``state_dict()`` is stored (detached CPU copies); the module is not modified.
    model_spec, data_spec : str or dict
        How to rebuild the model and the data (see :func:`make_spec`); ``data_spec`` may be
        ``None``.
    loss : str or None
        Loss name (``"cross_entropy"``, ``"mse"``).
    train_result : TrainResult, optional
        Stores ``trajectory`` (n, D), ``trajectory_steps`` and ``loss_history``.
    train_config, metrics : dict, optional
        Training hyper-parameters and metrics (plain values).
    extra : dict, optional
        More top-level fields (plain values; must not shadow the fields above).
    overwrite : bool
        Replace an existing file (otherwise :class:`~riverscape.errors.InputError`).

    Returns
    -------
    Path
        ``path``. The file loads with ``torch.load(path, weights_only=True)``.
    """
    from .. import __version__

    if loss is not None and not isinstance(loss, str):
        raise InputError(f"loss must be stored by name (e.g. 'cross_entropy'), got {type(loss).__name__}")
    checkpoint: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "riverscape_version": __version__,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model": make_spec(model_spec, kind="model"),
        "data": None if data_spec is None else make_spec(data_spec, kind="data"),
        "loss": loss,
        "train": dict(train_config or {}),
        "metrics": dict(metrics or {}),
    }
    if train_result is not None:
        checkpoint["trajectory"] = train_result.trajectory.detach().cpu().clone()
        checkpoint["trajectory_steps"] = [int(s) for s in train_result.steps]
        checkpoint["loss_history"] = [float(v) for v in train_result.loss_history]
    for key, value in (extra or {}).items():
        if key in checkpoint:
            raise InputError(f"extra field {key!r} would overwrite a checkpoint field")
        checkpoint[key] = value
    _check_plain(checkpoint, "checkpoint")
    with atomic_output_file(path, force=overwrite) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)
