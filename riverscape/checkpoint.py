"""Safe checkpoints: save, load, and resolve the model and data a checkpoint needs.

This module is the stable import path of the checkpoint API; the code lives in
:mod:`riverscape.io`, one job per module:

* :mod:`riverscape.io.specs`: model/data specs and the user code they import
  (:func:`make_spec`, :func:`spec_label`, :func:`resolve_factory`, :func:`call_factory`,
  :func:`build_model_from_spec`, :func:`check_model_size`);
* :mod:`riverscape.io.reading`: the checkpoint format and safe reading
  (:func:`read_checkpoint`, :func:`load_checkpoint`, :class:`RawCheckpoint`,
  :class:`LoadedCheckpoint`, :func:`checkpoint_dtype`);
* :mod:`riverscape.io.saving`: :func:`save_checkpoint` (atomic, plain values only);
* :mod:`riverscape.io.data_specs`: :class:`ResolvedData`, :func:`resolve_data`,
  :func:`check_model_data`.

``from riverscape.checkpoint import load_checkpoint`` keeps working whatever moves inside
:mod:`riverscape.io`.
"""
from __future__ import annotations

from .io import data_specs, reading, saving, specs
from .io.data_specs import *  # noqa: F401,F403  (the names in __all__)
from .io.reading import *  # noqa: F401,F403
from .io.saving import *  # noqa: F401,F403
from .io.specs import *  # noqa: F401,F403

__all__ = [*reading.__all__, *saving.__all__, *specs.__all__, *data_specs.__all__]
