"""Read checkpoint files safely: sniff, load without running code, validate, build the model.

The riverscape format is a plain dict that loads with ``torch.load(path, weights_only=True)``
(tensors, strings, numbers, lists and dicts only; no pickled code)::

    {"format": "riverscape-checkpoint", "version": 1,
     "state_dict": {name: Tensor},
     "model": {"name": "mlp", "kwargs": {...}}          # built-in (riverscape.build_model)
           or {"factory": "pkg.module:fn" | "path/to/file.py:fn", "kwargs": {...}},
     "data": {"name": "digits", "kwargs": {...}} or {"factory": ..., "kwargs": ...} or None,
     "loss": "cross_entropy",
     "trajectory": Tensor (n, D),  "trajectory_steps": [int] * n,   # optional
     "loss_history": [float],  "train": {hyper-parameters},  "metrics": {...},
     "riverscape_version": "0.1.0"}

:func:`load_checkpoint` also reads foreign files: a bare state dict, a state dict nested
under ``state_dict``/``model_state_dict``/``model`` (e.g. ``{"epoch": 3, "state_dict": ...}``),
DataParallel/``torch.compile`` key prefixes (``module.``, ``_orig_mod.``), and
``.safetensors`` files; those carry no architecture and need ``model=`` (``--model``).
A pickled full ``nn.Module`` is refused unless ``trust_checkpoint=True``, because
unpickling it can execute arbitrary code. A model factory named *inside* a checkpoint is
only imported with ``trust_checkpoint=True`` or when the caller names it again.
"""
from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, InputError
from ..limits import DEFAULT_MEMORY_LIMIT, check_allocation, logical_bytes
from .specs import PathLike, Spec, _first_line, build_model_from_spec, check_model_size, make_spec, spec_label

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LoadedCheckpoint",
    "RawCheckpoint",
    "read_checkpoint",
    "load_checkpoint",
    "checkpoint_dtype",
]

FORMAT_NAME = "riverscape-checkpoint"
FORMAT_VERSION = 1
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_SHOWN = 4  # how many offending keys an error message lists


# ---------------------------------------------------------------------- state dicts


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) for v in obj.values())
    )


def _strip_wrapper_prefix(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    out, notes = dict(state_dict), []
    for prefix in WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
            notes.append(f"stripped the {prefix!r} prefix from all {len(out)} state-dict keys")
    return out, notes


def _shown(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_dtype(state_dict: Mapping[str, Tensor]) -> str:
    """The floating dtype(s) of a state dict, e.g. ``"float32"`` or ``"bfloat16+float32"``."""
    names = sorted({_dtype_name(v.dtype) for v in state_dict.values() if v.is_floating_point()})
    return "+".join(names) if names else "none"


def _check_fits(model: nn.Module, state_dict: Mapping[str, Tensor], label: str) -> None:
    """Raise one line naming every missing/unexpected key and shape mismatch (works on meta modules)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} in the checkpoint vs {tuple(expected[k].shape)} in the model"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_shown(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_shown(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({_shown(mismatched)})")
        raise CheckpointError(f"state dict does not fit the model {label!r}: " + "; ".join(parts) + "; check --model and --model-kwargs")


def _load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], label: str) -> list[str]:
    """Strictly load ``state_dict`` into ``model``; explain every mismatch in one line.

    Precision: float64 checkpoints are analysed in float64. float16/bfloat16 weights are
    analysed in float32 (every half-precision value is exact in float32, and the solvers
    need at least float32 arithmetic); the note says so.
    """
    _check_fits(model, state_dict, label)
    notes = []
    float_dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    model_dtypes = {v.dtype for v in model.state_dict().values() if v.is_floating_point()}
    if float_dtypes and float_dtypes <= set(HALF_DTYPES):
        model.float()
        notes.append(f"the checkpoint stores {checkpoint_dtype(state_dict)} weights; they are loaded in float32 (exactly representable; --dtype native evaluates them in their own dtype)")
    elif len(float_dtypes) == 1 and float_dtypes != model_dtypes:
        (dtype,) = float_dtypes
        model.to(dtype)  # our own freshly built module: keep the checkpoint's precision
        notes.append(f"converted the model to the checkpoint's {_dtype_name(dtype)}")
    elif len(float_dtypes) > 1:
        notes.append(f"the checkpoint mixes {checkpoint_dtype(state_dict)} tensors; all are analysed in the model's {_dtype_name(next(iter(model_dtypes)))}")
    model.load_state_dict(state_dict, strict=True)
    return notes


def _check_tensors(tensors: Mapping[str, Tensor], path: Path, limit: Optional[int]) -> None:
    """Refuse tensors riverscape cannot analyse, and sizes over ``limit``, before copying any."""
    for name, t in tensors.items():
        problem = None
        if t.is_meta:
            problem = "is a meta tensor (it holds no values)"
        elif t.layout != torch.strided:
            problem = f"is a sparse tensor ({t.layout}); save dense weights (tensor.to_dense())"
        elif t.is_quantized:
            problem = "is a torch quantized tensor; save the float model (tensor.dequantize()) and let riverscape quantize it"
        elif t.is_complex():
            problem = f"is complex ({_dtype_name(t.dtype)}); riverscape analyses real weights only"
        if problem:
            raise CheckpointError(f"{path}: tensor {name!r} {problem}")
    check_allocation(f"{path}: its {len(tensors)} tensors", logical_bytes(tensors.values()), limit)


# ------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model with its weights loaded, and what the checkpoint says about it.

    Attributes
    ----------
    model : nn.Module
        Weights loaded, in eval mode, on the CPU (riverscape owns this module).
    model_spec, data_spec : dict or None
        ``{"name"|"factory": str, "kwargs": dict}``; ``None`` when unknown.
    loss : str or None
        Loss name stored in the checkpoint.
    trajectory : Tensor, shape (n, D), or None
        Flat trainable parameters along full-precision training (``D`` = trainable
        parameter count in model order).
    trajectory_steps : list of int or None
        Optimiser step of each trajectory row.
    source_format : str
        ``"riverscape"``, ``"state_dict"``, ``"nested:<key>"``, ``"safetensors"`` or
        ``"pickled-module"``.
    path : Path or None
    train, metrics : dict
        Training hyper-parameters and metrics stored by ``riverscape train``.
    loss_history : list of float or None
        Mini-batch training loss per step.
    notes : tuple of str
        What loading adjusted (stripped key prefixes, dtype conversion).
    checkpoint_dtype : str
        Floating dtype(s) of the stored weights (``"float32"``, ``"bfloat16"``, ...); the
        model may evaluate in a wider one (half precision is analysed in float32).
    """

    model: nn.Module
    model_spec: Optional[Spec]
    data_spec: Optional[Spec]
    loss: Optional[str]
    trajectory: Optional[Tensor]
    trajectory_steps: Optional[list[int]]
    source_format: str
    path: Optional[Path] = None
    train: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    loss_history: Optional[list[float]] = None
    notes: tuple[str, ...] = ()
    checkpoint_dtype: str = "float32"

    @classmethod
    def from_train_result(
        cls,
        result: Any,
        *,
        model_spec: Union[str, Mapping],
        data_spec: Union[str, Mapping, None],
        loss: Optional[str],
        train_config: Optional[Mapping] = None,
        metrics: Optional[Mapping] = None,
    ) -> "LoadedCheckpoint":
        """What :func:`load_checkpoint` would return for a just-trained :class:`~riverscape.training.TrainResult`."""
        return cls(
            model=result.model,
            model_spec=make_spec(model_spec, kind="model"),
            data_spec=None if data_spec is None else make_spec(data_spec, kind="data"),
            loss=loss,
            trajectory=result.trajectory,
            trajectory_steps=list(result.steps),
            source_format="riverscape",
            train=dict(train_config or {}),
            metrics=dict(metrics or {}),
            loss_history=list(result.loss_history),
            checkpoint_dtype=checkpoint_dtype(result.model.state_dict()),
        )


@dataclass(frozen=True)
class RawCheckpoint:
    """The contents of a checkpoint file before a model is built (see :func:`read_checkpoint`)."""

    path: Path
    source_format: str
    state_dict: Optional[dict[str, Tensor]] = None
    module: Optional[nn.Module] = None
    model_spec: Optional[Spec] = None
    data_spec: Optional[Spec] = None
    loss: Optional[str] = None
    trajectory: Optional[Tensor] = None
    trajectory_steps: Optional[list[int]] = None
    train: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    loss_history: Optional[list[float]] = None
    notes: tuple[str, ...] = ()

    def instantiate(
        self,
        *,
        model: Union[str, Mapping, None] = None,
        model_kwargs: Optional[Mapping] = None,
        trust_checkpoint: bool = False,
        memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT,
    ) -> LoadedCheckpoint:
        """Build the model (``model`` spec overrides the stored one) and load the weights.

        The model is first built on the meta device: its size is checked against
        ``memory_limit`` (bytes, ``None`` for no limit) and its keys and shapes against the
        state dict before any of its memory is allocated.
        """
        notes = list(self.notes)
        spec: Optional[Spec]
        if model is not None:
            spec = make_spec(model, model_kwargs, kind="model")
        elif self.model_spec is not None:
            spec = make_spec(self.model_spec, model_kwargs, kind="model")
            if "factory" in spec and not trust_checkpoint:
                raise CheckpointError(
                    f"{self.path} names the model factory {spec['factory']!r}; importing it runs code chosen by the file: "
                    f"confirm with --model {spec['factory']} or pass --trust-checkpoint"
                )
        else:
            spec = None
        if spec is None and self.module is not None:
            net = self.module
            weights = dict(net.state_dict())
            _check_tensors(weights, self.path, None)
        elif spec is None:
            raise CheckpointError(
                f"{self.path} ({self.source_format}) holds weights but not the architecture: pass --model NAME, "
                "--model package.module:factory or --model path/to/file.py:factory (with --model-kwargs JSON if needed)"
            )
        else:
            weights = self.state_dict if self.module is None else self.module.state_dict()
            label = spec_label(spec)
            meta = check_model_size(spec, memory_limit)
            if meta is not None:
                _check_fits(meta, weights, label)
            net = build_model_from_spec(spec)
            notes += _load_weights(net, weights, label)
        net.eval()
        self._check_trajectory(net)
        return LoadedCheckpoint(
            model=net,
            model_spec=spec,
            data_spec=self.data_spec,
            loss=self.loss,
            trajectory=self.trajectory,
            trajectory_steps=self.trajectory_steps,
            source_format=self.source_format,
            path=self.path,
            train=dict(self.train),
            metrics=dict(self.metrics),
            loss_history=self.loss_history,
            notes=tuple(notes),
            checkpoint_dtype=checkpoint_dtype(weights),
        )

    def _check_trajectory(self, net: nn.Module) -> None:
        if self.trajectory is None:
            return
        dim = sum(p.numel() for p in net.parameters() if p.requires_grad)
        if self.trajectory.shape[1] != dim:
            raise CheckpointError(
                f"{self.path}: the trajectory has {self.trajectory.shape[1]} coordinates but the model has {dim} trainable parameters"
            )


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the sample
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\n\r\t\f" for c in text)


def _sniff(head: bytes, size: int) -> str:
    """``"zip"``, ``"pickle"``, ``"safetensors"``, ``"text"`` or ``"unknown"`` from the first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    if _looks_like_text(head):
        return "text"
    return "unknown"


_SAFE_LOAD_REFUSAL = "Weights only load failed"


def _torch_load(path: Path, trust: bool) -> Any:
    try:
        with warnings.catch_warnings():  # torch's own advice ("re-run with weights_only=False") is not ours to give
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if found or _SAFE_LOAD_REFUSAL in message:
            needs = f"it needs {found.group(1)}" if found else "it uses pickle instructions the safe loader does not accept"
            raise CheckpointError(
                f"{path} contains pickled Python objects ({needs}), not just tensors: loading it could execute arbitrary "
                "code. If you trust its source, rerun with --trust-checkpoint; better, save model.state_dict() with "
                "torch.save's default settings"
            ) from None
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({_first_line(exc).removesuffix('.')})") from None
    except EOFError:
        raise CheckpointError(f"{path} is truncated (unexpected end of file); save it again") from None
    except RuntimeError as exc:
        message = str(exc)
        if any(phrase in message for phrase in ("central directory", "EOF", "end of file")):
            raise CheckpointError(f"{path} is truncated or corrupt (the file ends too early); save or copy it again") from None
        if trust and not any(phrase in message for phrase in ("PytorchStreamReader", "archive", "magic number", "corrupt")):
            raise
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({_first_line(exc)})") from None
    except OSError as exc:  # the file was readable a moment ago: the zip reader found it malformed
        raise CheckpointError(f"{path} is truncated or corrupt ({exc.strerror or _first_line(exc)}); save or copy it again") from None
    except (ImportError, AttributeError) as exc:  # trusted pickles whose classes are not importable here
        raise CheckpointError(
            f"{path} holds a pickled object whose code is not importable here ({_first_line(exc)}); "
            "pickled models only load where their class is importable: save model.state_dict() instead"
        ) from None
    except Exception as exc:
        if trust:  # may come from code inside a trusted pickle: not ours to reinterpret
            raise
        # weights_only unpickling runs no foreign code: any other failure is a malformed file
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({_first_line(exc)}); it may be truncated") from None
    if not tensors:
        raise CheckpointError(f"{path} is a safetensors file without tensors")
    return tensors


def _riverscape_contents(obj: Mapping, path: Path, memory_limit: Optional[int]) -> dict:
    version = obj.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid riverscape format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses riverscape checkpoint format {version}; this riverscape reads up to {FORMAT_VERSION}: upgrade riverscape")
    if not _is_state_dict(obj.get("state_dict")):
        raise CheckpointError(f"{path} is a riverscape checkpoint without a valid 'state_dict'")
    trajectory = obj.get("trajectory")
    steps = obj.get("trajectory_steps")
    if trajectory is not None:
        if not isinstance(trajectory, Tensor) or trajectory.ndim != 2 or not trajectory.is_floating_point():
            raise CheckpointError(f"{path}: 'trajectory' must be a 2-D floating tensor (n, D)")
        check_allocation(f"{path}: its trajectory {tuple(trajectory.shape)}", logical_bytes([trajectory]), memory_limit)
        if not bool(torch.isfinite(trajectory).all()):
            raise CheckpointError(f"{path}: the training trajectory contains NaN or inf; save it again or drop 'trajectory'")
        if steps is None:
            steps = list(range(trajectory.shape[0]))
        if not isinstance(steps, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in steps):
            raise CheckpointError(f"{path}: 'trajectory_steps' must be a list of integers")
        if len(steps) != trajectory.shape[0]:
            raise CheckpointError(f"{path}: {len(steps)} trajectory steps for {trajectory.shape[0]} trajectory rows")
    for key, kinds, described in (
        ("loss", (str,), "a loss name such as 'cross_entropy'"),
        ("train", (Mapping,), "a dict"),
        ("metrics", (Mapping,), "a dict"),
        ("loss_history", (list, tuple), "a list of numbers"),
    ):
        value = obj.get(key)
        if value is not None and not isinstance(value, kinds):
            raise CheckpointError(f"{path}: field {key!r} must be {described}, not a {type(value).__name__}")
    history = obj.get("loss_history")
    if history is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in history):
        raise CheckpointError(f"{path}: field 'loss_history' must be a list of numbers")
    try:
        model_spec = None if obj.get("model") is None else make_spec(obj["model"], kind="model")
        data_spec = None if obj.get("data") is None else make_spec(obj["data"], kind="data")
    except InputError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return {
        "state_dict": dict(obj["state_dict"]),
        "model_spec": model_spec,
        "data_spec": data_spec,
        "loss": obj.get("loss"),
        "trajectory": trajectory,
        "trajectory_steps": None if steps is None else [int(s) for s in steps],
        "train": dict(obj.get("train") or {}),
        "metrics": dict(obj.get("metrics") or {}),
        "loss_history": obj.get("loss_history"),
    }


def _interpret(obj: Any, path: Path, memory_limit: Optional[int]) -> RawCheckpoint:
    if isinstance(obj, nn.Module):
        return RawCheckpoint(path, "pickled-module", module=obj)
    if isinstance(obj, Tensor):
        raise CheckpointError(f"{path} holds a single tensor of shape {tuple(obj.shape)}, not a state dict or a checkpoint")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    if obj.get("format") == FORMAT_NAME:
        contents = _riverscape_contents(obj, path, memory_limit)
        state_dict, notes = _strip_wrapper_prefix(contents.pop("state_dict"))
        return RawCheckpoint(path, "riverscape", state_dict=state_dict, notes=tuple(notes), **contents)
    if _is_state_dict(obj):
        state_dict, notes = _strip_wrapper_prefix(obj)
        return RawCheckpoint(path, "state_dict", state_dict=state_dict, notes=tuple(notes))
    for key in NESTED_STATE_DICT_KEYS:
        value = obj.get(key)
        if _is_state_dict(value):
            state_dict, notes = _strip_wrapper_prefix(value)
            return RawCheckpoint(path, f"nested:{key}", state_dict=state_dict, notes=tuple(notes))
        if isinstance(value, nn.Module):
            return RawCheckpoint(path, "pickled-module", module=value, notes=(f"used the module under {key!r}",))
    keys = [str(k) for k in list(obj)[:8]]
    raise CheckpointError(
        f"{path} is a dict without a state dict (keys: {keys}); expected tensors by parameter name "
        f"or a state dict under one of {list(NESTED_STATE_DICT_KEYS)}"
    )


def read_checkpoint(path: PathLike, *, trust_checkpoint: bool = False, memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT) -> RawCheckpoint:
    """Read a checkpoint file safely, without building a model.

    Parameters
    ----------
    path : str or PathLike
    trust_checkpoint : bool
        Allow pickled Python objects (``torch.load(weights_only=False)``). Only for files
        from a trusted source: unpickling can execute arbitrary code.
    memory_limit : int or None
        Bytes the file's tensors (state dict, trajectory) may occupy once materialised
        (a tensor made with ``expand`` is tiny on disk); ``None`` for no limit.

    Raises
    ------
    CheckpointError
        Missing, empty, truncated, corrupt or unsafe file, or one that holds no state dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a device, pipe or socket); give a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was not written completely")
    with path.open("rb") as handle:
        head = handle.read(512)
    kind = _sniff(head, size)
    if kind == "safetensors" or path.suffix == ".safetensors":
        if kind != "safetensors":
            raise CheckpointError(f"{path} is not a valid safetensors file (bad header); it may be truncated or corrupt")
        state_dict, notes = _strip_wrapper_prefix(_load_safetensors(path))
        _check_tensors(state_dict, path, memory_limit)
        return RawCheckpoint(path, "safetensors", state_dict=state_dict, notes=tuple(notes))
    if kind == "text":
        snippet = head[:40].decode("utf-8", "replace").splitlines()[0] if head.strip() else ""
        raise CheckpointError(f"{path} is a text file, not a checkpoint (it starts with {snippet!r})")
    if kind == "unknown":
        raise CheckpointError(f"{path} is not a checkpoint: neither a PyTorch file (zip or pickle) nor safetensors")
    raw = _interpret(_torch_load(path, trust_checkpoint), path, memory_limit)
    if raw.state_dict is not None:
        _check_tensors(raw.state_dict, path, memory_limit)
    return raw


def load_checkpoint(
    path: PathLike,
    *,
    model: Union[str, Mapping, None] = None,
    model_kwargs: Optional[Mapping] = None,
    trust_checkpoint: bool = False,
    memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT,
) -> LoadedCheckpoint:
    """Load a checkpoint into a model, safely.

    Parameters
    ----------
    path : str or PathLike
        A riverscape checkpoint, a (nested) state dict saved with ``torch.save``, a
        ``.safetensors`` file, or (only with ``trust_checkpoint``) a pickled ``nn.Module``.
    model : str or dict, optional
        Model spec (``"mlp"``, ``"pkg.module:fn"``, ``"path/to/file.py:fn"``); required for
        files that do not name their architecture, overrides the stored spec otherwise.
    model_kwargs : dict, optional
        Keyword arguments of the model factory (update the stored ones).
    trust_checkpoint : bool
        Allow unpickling arbitrary objects and importing a factory named by the file.
    memory_limit : int or None
        Bound in bytes on what the file may make riverscape allocate (its tensors, the
        model it describes, checked on the meta device first); ``None`` for no limit.

    Returns
    -------
    LoadedCheckpoint
        ``model`` has the weights bit-identically loaded and is in eval mode.

    Raises
    ------
    CheckpointError, InputError
        One-line explanations (missing/empty/corrupt file, unsafe pickle, missing
        ``model``, missing/unexpected keys and shape mismatches, unknown spec).

    Examples
    --------
    >>> import tempfile, os, riverscape as rs
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> net = rs.build_model("mlp", in_dim=4, out_dim=2)
    >>> torch.save(net.state_dict(), path)
    >>> ckpt = load_checkpoint(path, model="mlp", model_kwargs={"in_dim": 4, "out_dim": 2})
    >>> ckpt.source_format, torch.equal(ckpt.model[1].weight, net[1].weight)
    ('state_dict', True)
    """
    raw = read_checkpoint(path, trust_checkpoint=trust_checkpoint, memory_limit=memory_limit)
    return raw.instantiate(model=model, model_kwargs=model_kwargs, trust_checkpoint=trust_checkpoint, memory_limit=memory_limit)
