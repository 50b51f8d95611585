"""Which precision an analysis runs in: the ``--dtype`` of ``riverscape analyze``.

Three dtypes describe a run (see the Notes of :class:`~riverscape.objective.Objective`):

* ``model``: the model's own dtype, as stored in the checkpoint (``bfloat16`` for a bf16 folder);
* ``compute``: the dtype the forward, backward and HVPs run in;
* ``accumulate``: the dtype of the flat vectors (``theta``, gradients, HVPs, probes, Lanczos
  bases) and of the sums over batches; never half precision.

The modes (:data:`PRECISIONS`):

* ``"auto"`` (default): the stored dtype, but float16/bfloat16 weights run in float32 (exact:
  every half-precision value is a float32 value). The numbers describe the stored weights with
  float32 rounding (about 1e-7 relative);
* ``"native"``: the stored dtype, half precision included, with float32 accumulation: the
  numbers describe the model as it runs in half precision (gradients and HVPs to about
  ``2^-8`` relative in bfloat16, ``2^-11`` in float16; finite-difference HVPs only to a few
  percent in bfloat16);
* ``"float32"``, ``"float64"``: everything in that dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .io.reading import HALF_DTYPES

__all__ = ["HALF_DTYPES", "PRECISIONS", "Precision", "resolve_precision"]

PRECISIONS = ("auto", "native", "float32", "float64")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Precision:
    """The dtypes of one analysis (see the module docstring).

    Attributes
    ----------
    mode : str
        One of :data:`PRECISIONS`.
    model, compute, accumulate : torch.dtype
        The model's own dtype, the dtype it is evaluated in, and the dtype of vectors and sums.
    loaded : torch.dtype
        The dtype of the in-memory module the analysis receives (a half-precision checkpoint is
        loaded in float32).
    """

    mode: str
    model: torch.dtype
    compute: torch.dtype
    accumulate: torch.dtype
    loaded: torch.dtype

    def objective_kwargs(self) -> dict:
        """``dtype``/``compute_dtype`` for :class:`~riverscape.objective.Objective` (empty when nothing is cast)."""
        if self.compute == self.accumulate == self.loaded:
            return {}
        return {"dtype": self.accumulate, "compute_dtype": self.compute}

    def to_dict(self) -> dict:
        """``{"mode", "model", "compute", "accumulate"}`` with dtype names (metrics.json's ``run.precision``)."""
        return {"mode": self.mode, "model": _name(self.model), "compute": _name(self.compute), "accumulate": _name(self.accumulate)}

    def describe(self) -> str:
        """``"bfloat16 (native) with float32 accumulation"``, or just ``"float32"`` when all agree."""
        if self.compute == self.accumulate:
            return _name(self.compute)
        return f"{_name(self.compute)} ({'native' if self.compute == self.model else 'cast'}) with {_name(self.accumulate)} accumulation"


def _stored(stored: Optional[str]) -> Optional[torch.dtype]:
    """The one floating dtype named by a checkpoint's dtype string (``"bfloat16"``), ``None`` for a mix."""
    if not stored or "+" in stored:
        return None
    dtype = getattr(torch, stored, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def resolve_precision(model: nn.Module, mode: str = "auto", stored: Optional[str] = None) -> Precision:
    """The :class:`Precision` of analysing ``model`` in ``mode``.

    Parameters
    ----------
    model : nn.Module
        The module as loaded (its first floating parameter gives ``loaded``).
    mode : {"auto", "native", "float32", "float64"}
    stored : str, optional
        The checkpoint's dtype string (:attr:`~riverscape.io.reading.LoadedCheckpoint.checkpoint_dtype`,
        e.g. ``"bfloat16"``); default: the module's own. A mix (``"bfloat16+float32"``) counts as
        the module's dtype.

    Raises
    ------
    ValueError
        Unknown ``mode``, or a model without floating parameters.
    """
    if mode not in PRECISIONS:
        raise ValueError(f"unknown precision {mode!r}; choose one of {', '.join(PRECISIONS)}")
    loaded = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if loaded is None:
        raise ValueError("the model has no floating-point parameters")
    own = _stored(stored) or loaded
    if mode in ("float32", "float64"):
        compute = getattr(torch, mode)
    elif mode == "native":
        compute = own
    else:
        compute = torch.float32 if own in HALF_DTYPES else own
    accumulate = torch.float32 if compute in HALF_DTYPES else compute
    return Precision(mode, own, compute, accumulate, loaded)
