"""Finished stages of an analysis, kept on disk so an interrupted run resumes where it stopped.

``riverscape analyze`` runs for minutes to hours on a large model. Every finished stage
(curvature at ``theta_fp``, per-layer curvature, basin widths, and per bit-width PTQ, curvature
at ``Q(theta)``, damage, QAT, alignment, slices, paths) is written to a *work folder* inside the
output folder; a re-run of the same command loads those stages instead of computing them again,
and its stage line says ``cached``.

Key
    A SHA-256 of the run's inputs: the bytes of every input file (checkpoint file or Hugging
    Face folder, ``--quantized-weights``, a data file), the model, data and loss specs, the
    resolved :class:`~riverscape.analysis_options.AnalyzeOptions` (seed included) and the
    riverscape version. A different key empties the work folder first: nothing computed with
    other inputs is ever loaded. (The source code of a user's ``--model``/``--data`` factory is
    not part of the key: after editing it, pass ``--no-resume`` once.)
Format
    One JSON file per stage plus one safetensors file of its tensors; dataclasses are stored
    as their fields and rebuilt field by field (no ``__init__`` runs), and only dataclasses
    defined inside ``riverscape`` are rebuilt. Nothing is pickled, so loading a stage never
    executes code stored in a file. Floats go through JSON's shortest round-trip repr and
    tensors keep their dtype, so a loaded stage is bit-identical to the computed one.
Ownership
    The work folder (:data:`WORK_DIR` inside the output folder) is created by riverscape and
    every file in it is listed in the output folder's marker (:mod:`riverscape.outdir`) *before*
    it is written, so ``--force`` and the next run recognise it as riverscape's own. An output
    folder that holds only a work folder is used without ``--force``; when the report is
    complete it replaces the whole output folder, work folder included. A run that fails with an
    error (not an interrupt) deletes its work folder (:meth:`StageCache.discard`): a failed run
    leaves nothing behind, an interrupted one its finished stages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from .outdir import claim_files, release_work, signals_deferred

__all__ = ["WORK_DIR", "StageCache", "file_digest", "encode", "decode"]

WORK_DIR = ".riverscape-work"
"""Name of the work folder inside the output folder."""
_KEY_FILE = "key.json"
_FORMAT = 1
_TAGS = ("$tuple", "$dict", "$tensor", "$ndarray", "$npscalar", "$dataclass", "$dtype", "$device", "$float")


def file_digest(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ encoding
def encode(value: Any, tensors: dict[str, torch.Tensor], where: str = "value") -> Any:
    """``value`` as JSON data, its tensors and arrays moved into ``tensors`` (see the module docstring).

    Raises
    ------
    TypeError
        A value of a kind that cannot be stored exactly (named by ``where``, its path).
    """
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return {"$npscalar": value.dtype.str, "value": encode(value.item(), tensors, where)}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": name, "device": str(value.device)}
    if isinstance(value, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"$ndarray": name}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"$dict": [[encode(k, tensors, where), encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("riverscape."):
            raise TypeError(f"{where}: only riverscape's own dataclasses are cached, got {cls.__module__}.{cls.__qualname__}")
        fields = {f.name: encode(getattr(value, f.name), tensors, f"{where}.{f.name}") for f in dataclasses.fields(value)}
        return {"$dataclass": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise TypeError(f"{where}: a {type(value).__module__}.{type(value).__qualname__} cannot be stored in the stage cache")


def _dataclass_type(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith("riverscape.") or not qualname:
        raise ValueError(f"the stage cache names {name!r}, which is not a riverscape dataclass")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"the stage cache names {name!r}, which is not a riverscape dataclass")
    return cls


def decode(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "$float" in data:
        return float(data["$float"])
    if "$tensor" in data:
        # a fresh (aligned) copy: BLAS kernels may round differently on the file's unaligned buffer
        return tensors[data["$tensor"]].to(data["device"], copy=True)
    if "$ndarray" in data:
        return tensors[data["$ndarray"]].clone().numpy()
    if "$npscalar" in data:
        return np.dtype(data["$npscalar"]).type(decode(data["value"], tensors))
    if "$dtype" in data:
        return getattr(torch, data["$dtype"])
    if "$device" in data:
        return torch.device(data["$device"])
    if "$tuple" in data:
        return tuple(decode(v, tensors) for v in data["$tuple"])
    if "$dict" in data:
        return {decode(k, tensors): decode(v, tensors) for k, v in data["$dict"]}
    if "$dataclass" in data:
        cls = _dataclass_type(data["$dataclass"])
        obj = object.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(obj, f.name, decode(data["fields"][f.name], tensors))
        return obj
    return {k: decode(v, tensors) for k, v in data.items()}


# ------------------------------------------------------------------------------ the cache
def _run_key(inputs: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    from . import __version__

    record = {"format": _FORMAT, "riverscape_version": __version__, "inputs": inputs, "options": options}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    """The finished stages of one run in ``output / WORK_DIR`` (see the module docstring).

    Parameters
    ----------
    output : path
        The output (report) folder; it and the work folder are created on the first
        :meth:`save`.
    inputs : mapping
        JSON-friendly description of everything the run reads besides its options (file
        digests from :func:`file_digest`, model/data/loss specs).

    Attributes
    ----------
    loaded, saved : list of str
        Stages loaded and stored so far by this run.
    """

    def __init__(self, output: Union[str, os.PathLike], inputs: Mapping[str, Any]) -> None:
        self.output = Path(output)
        self.folder = self.output / WORK_DIR
        self.inputs = dict(inputs)
        self.key: Optional[str] = None
        self.loaded: list[str] = []
        self.saved: list[str] = []

    def start(self, options: Mapping[str, Any]) -> "StageCache":
        """Fix the key from the resolved options; a work folder left by other inputs is emptied."""
        self.key = _run_key(self.inputs, options)
        if self.folder.is_dir() and self._stored_key() != self.key:
            self._clear()
        return self

    def _stored_key(self) -> Optional[str]:
        try:
            record = json.loads((self.folder / _KEY_FILE).read_text())
        except (OSError, ValueError):
            return None
        return record.get("key") if isinstance(record, dict) else None

    def _clear(self) -> None:
        """Delete the entries of another run (only files named as this module names them)."""
        with signals_deferred():
            for item in self.folder.iterdir():
                if item.is_file() and not item.is_symlink() and item.name.endswith((".json", ".safetensors", ".tmp")):
                    item.unlink()

    def discard(self) -> None:
        """Delete the work folder (a run that failed keeps nothing), and the output folder if it was made for it alone."""
        if not self.folder.is_dir():
            return
        with signals_deferred():
            self._clear()
            try:
                self.folder.rmdir()
            except OSError:
                return  # not empty: something riverscape did not write
            release_work(self.output)

    def _paths(self, stage: str) -> tuple[Path, Path]:
        if not stage or not all(c.isalnum() or c in "-_" for c in stage):
            raise ValueError(f"stage names are letters, digits, '-' and '_', got {stage!r}")
        return self.folder / f"{stage}.json", self.folder / f"{stage}.safetensors"

    def load(self, stage: str) -> Optional[dict]:
        """The values ``stage`` stored under this run's key, or ``None`` (never stored, or unreadable)."""
        if self.key is None:
            raise RuntimeError("StageCache.start(options) fixes the key before stages are loaded")
        record_path, tensor_path = self._paths(stage)
        if not record_path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            record = json.loads(record_path.read_text())
            if record.get("key") != self.key:
                return None
            tensors = load_file(str(tensor_path)) if record.get("tensors") else {}
            values = decode(record["values"], tensors)
        except (OSError, ValueError, KeyError, AttributeError, TypeError, SafetensorError):
            return None  # a damaged or foreign entry is recomputed
        self.loaded.append(stage)
        return values

    def save(self, stage: str, values: Mapping[str, Any]) -> None:
        """Store the values of a finished ``stage`` (tensors into safetensors, the rest as JSON).

        Every file is listed in the output folder's marker before it is written, and each is
        written to a temporary name and renamed, so an interrupt leaves either the old entry or
        the new one; the JSON record, written last, is what makes an entry count.
        """
        if self.key is None:
            raise RuntimeError("StageCache.start(options) fixes the key before stages are saved")
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        payload = encode(dict(values), tensors, stage)
        record_path, tensor_path = self._paths(stage)
        key_path = self.folder / _KEY_FILE
        names = [key_path, record_path, tensor_path]
        claim_files(self.output, [self.folder, *names, *(_tmp(p) for p in names)])
        self.folder.mkdir(exist_ok=True)
        if self._stored_key() != self.key:
            _write_text(key_path, json.dumps({"key": self.key, "inputs": self.inputs}, indent=1, sort_keys=True, default=str))
        if tensors:
            save_file(tensors, str(_tmp(tensor_path)))
            os.replace(_tmp(tensor_path), tensor_path)
        record = {"key": self.key, "stage": stage, "tensors": bool(tensors), "values": payload}
        _write_text(record_path, json.dumps(record, allow_nan=False))
        self.saved.append(stage)

    def stages(self) -> list[str]:
        """Names of the stages stored under this run's key."""
        if self.key is None or not self.folder.is_dir():
            return []
        out = []
        for path in sorted(self.folder.glob("*.json")):
            if path.name == _KEY_FILE:
                continue
            try:
                if json.loads(path.read_text()).get("key") == self.key:
                    out.append(path.stem)
            except (OSError, ValueError, AttributeError):
                continue
        return out


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _write_text(path: Path, text: str) -> None:
    _tmp(path).write_text(text + "\n")
    os.replace(_tmp(path), path)

