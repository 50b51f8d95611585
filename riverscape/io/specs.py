"""Model and data specs, and the user code a spec may import.

A spec is ``{"name": str, "kwargs": dict}`` (a built-in model or dataset) or
``{"factory": "pkg.module:fn" | "path/to/file.py:fn", "kwargs": dict}``: a ``package.module``
is imported, a ``.py`` file is loaded from its path. Importing a module runs its code, so
:func:`resolve_factory` is only called for targets the user chose; a factory named *inside* a
checkpoint is imported only with ``trust_checkpoint=True`` or when the caller names it again
(:mod:`riverscape.io.reading`, :mod:`riverscape.io.data_specs`). ``sys.path`` is never left
extended.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from ..errors import InputError
from ..limits import DEFAULT_MEMORY_LIMIT, check_allocation, logical_bytes

__all__ = [
    "make_spec",
    "spec_label",
    "resolve_factory",
    "call_factory",
    "build_model_from_spec",
    "check_model_size",
]

PathLike = Union[str, os.PathLike]
Spec = dict  # {"name": str, "kwargs": dict} or {"factory": str, "kwargs": dict}


# ---------------------------------------------------------------------------- specs


def make_spec(spec: Union[str, Mapping], kwargs: Optional[Mapping] = None, *, kind: str = "model") -> Spec:
    """Normalise a spec string or dict to ``{"name"|"factory": str, "kwargs": dict}``.

    Parameters
    ----------
    spec : str or mapping
        ``"mlp"`` (built-in name), ``"pkg.module:fn"``, ``"path/to/file.py:fn"``, or a dict
        with one of the keys ``name``/``factory`` and optional ``kwargs``.
    kwargs : mapping, optional
        Keyword arguments; they update the spec's own ``kwargs``.
    kind : str
        ``"model"`` or ``"data"`` (for messages).

    >>> make_spec("mlp", {"in_dim": 64})
    {'name': 'mlp', 'kwargs': {'in_dim': 64}}
    >>> make_spec("models.py:make")["factory"]
    'models.py:make'
    """
    if isinstance(spec, str):
        if not spec.strip():
            raise InputError(f"empty {kind} spec; give a built-in name, package.module:factory or path/to/file.py:factory")
        out: Spec = {"factory": spec} if ":" in spec else {"name": spec}
        base: Mapping = {}
    elif isinstance(spec, Mapping):
        keys = [k for k in ("name", "factory") if isinstance(spec.get(k), str)]
        if len(keys) != 1 or set(spec) - {"name", "factory", "kwargs"}:
            raise InputError(f"invalid {kind} spec {dict(spec)!r}; expected {{'name' or 'factory': str, 'kwargs': dict}}")
        out = {keys[0]: spec[keys[0]]}
        base = spec.get("kwargs") or {}
    else:
        raise InputError(f"invalid {kind} spec {spec!r}; expected a string or a dict")
    for extra in (base, kwargs or {}):
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
            raise InputError(f"{kind} kwargs must be a JSON object with string keys, got {extra!r}")
    out["kwargs"] = {**base, **(kwargs or {})}
    return out


def spec_label(spec: Optional[Mapping]) -> str:
    """Short human-readable form of a spec: ``'mlp'`` or ``'models.py:make'``."""
    if spec is None:
        return "<none>"
    return str(spec.get("name") or spec.get("factory"))


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), else its type name."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _user_code_error(what: str, exc: BaseException) -> InputError:
    """One line for an exception raised by code the user named (a factory file, module or call)."""
    if isinstance(exc, SystemExit):
        return InputError(f"{what} called sys.exit({exc.code!r}); a factory must return, not exit")
    if isinstance(exc, SyntaxError):
        where = f"{Path(exc.filename).name}, line {exc.lineno}" if exc.filename else f"line {exc.lineno}"
        return InputError(f"{what}: SyntaxError ({where}): {exc.msg}")
    return InputError(f"{what} raised {type(exc).__name__}: {_first_line(exc)}")


@contextlib.contextmanager
def _searchable(folder: Path) -> Iterator[None]:
    """``folder`` at the END of ``sys.path`` for the block only (installed packages win)."""
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.append(entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _import_file(file: Path) -> Any:
    """Import a Python file the user named as a module.

    While the file runs, its folder is searched after the installed packages, so it can
    import modules beside it; afterwards ``sys.path`` is as before.
    """
    resolved = file.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"riverscape_user_{re.sub(r'[^0-9a-zA-Z_]', '_', resolved.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"cannot import {str(file)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # lets classes defined in the file pickle and dataclass normally
    try:
        with _searchable(resolved.parent):
            module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        del sys.modules[name]
        raise
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise _user_code_error(f"importing {str(file)!r}", exc) from exc
    return module


def _import_module(module_part: str, target: str, kind: str) -> Any:
    """Import ``module_part`` from the installed packages, else from the working directory.

    The working directory is searched (after the installed packages) only for the module
    the user named and only while it is imported: ``sys.path`` is never left extended.
    """
    top = module_part.split(".")[0]
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:
            raise _user_code_error(f"importing module {module_part!r} of the {kind} factory {target!r}", exc) from exc
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:
        raise _user_code_error(f"importing module {module_part!r} of the {kind} factory {target!r}", exc) from exc
    cwd = Path.cwd()
    if not ((cwd / f"{top}.py").is_file() or (cwd / top / "__init__.py").is_file()):
        raise InputError(
            f"cannot import module {module_part!r} of the {kind} factory {target!r}: it is neither installed nor in "
            f"the working directory; name the file instead ({kind} path/to/{top}.py:function) or add its folder to PYTHONPATH"
        )
    try:
        with _searchable(cwd):
            return importlib.import_module(module_part)
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:
        raise _user_code_error(f"importing module {module_part!r} of the {kind} factory {target!r}", exc) from exc


def resolve_factory(target: str, *, kind: str = "model") -> Callable:
    """Import the callable named by ``"pkg.module:fn"`` or ``"path/to/file.py:fn"``.

    ``fn`` may be dotted (``"pkg.mod:Class.build"``). Importing runs the module's code:
    only resolve targets the user chose. A file is loaded from its path; a module from the
    installed packages or, failing that, from the working directory. ``sys.path`` is
    never left extended.

    Raises
    ------
    InputError
        Malformed target, missing file or module, an error raised while importing it,
        missing or non-callable attribute.
    """
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise InputError(f"{kind} factory {target!r} must look like 'package.module:function' or 'path/to/file.py:function'")
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        file = Path(module_part)
        if not file.is_file():
            raise InputError(f"{kind} factory file not found: {module_part!r} (from {target!r})")
        module = _import_file(file)
    else:
        module = _import_module(module_part, target, kind)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))[:8]
            raise InputError(f"{kind} factory {target!r}: {module_part!r} has no attribute {attr!r} (callables there: {public})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{kind} factory {target!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_factory(factory: Callable, kwargs: Mapping, *, what: str) -> Any:
    """Call a user's (or built-in) factory; any failure becomes one :class:`InputError` line.

    ``what`` names the factory in the message (e.g. ``"model 'mlp'"``).
    """
    try:
        return factory(**kwargs)
    except KeyboardInterrupt:
        raise
    except TypeError as exc:
        raise InputError(f"cannot build {what} with kwargs {dict(kwargs)}: {_first_line(exc)}; check --model-kwargs/--data-kwargs") from exc
    except (Exception, SystemExit) as exc:
        if isinstance(exc, InputError):
            raise
        raise _user_code_error(f"{what} with kwargs {dict(kwargs)}", exc) from exc


def _model_factory(spec: Spec) -> Callable:
    from ..models import MODEL_NAMES, build_model

    if "name" in spec:
        if spec["name"] not in MODEL_NAMES:
            raise InputError(
                f"unknown model {spec['name']!r}; built-in models are {list(MODEL_NAMES)}, "
                "or pass package.module:factory or path/to/file.py:factory"
            )
        return partial(build_model, spec["name"])
    return resolve_factory(spec["factory"], kind="model")


def build_model_from_spec(spec: Spec, *, device: Union[str, torch.device, None] = None) -> nn.Module:
    """Build the ``nn.Module`` a (normalised) model spec describes.

    The global RNG state is restored afterwards (the random initialisation is about to be
    overwritten by a state dict and must not shift the caller's random stream).

    Parameters
    ----------
    spec : dict
        ``{"name"|"factory": str, "kwargs": dict}``.
    device : str or torch.device, optional
        Default device while the factory runs; ``"meta"`` builds the module without
        allocating its tensors (to count parameters before committing memory).
    """
    factory = _model_factory(spec)
    kwargs = dict(spec.get("kwargs") or {})
    with torch.random.fork_rng(devices=[]), (torch.device(device) if device is not None else contextlib.nullcontext()):
        model = call_factory(factory, kwargs, what=f"model {spec_label(spec)!r}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model factory {spec_label(spec)!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _meta_model(spec: Spec) -> Optional[nn.Module]:
    """The model built on the meta device, or ``None`` if its factory cannot build there."""
    try:
        model = build_model_from_spec(spec, device="meta")
    except InputError as exc:
        if isinstance(exc.__cause__, (TypeError, SyntaxError, ImportError)) or exc.__cause__ is None:
            raise  # wrong kwargs, broken file: the real build would fail the same way
        return None
    tensors = list(model.state_dict().values())
    return model if all(t.is_meta for t in tensors) else None


def check_model_size(spec: Spec, memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT) -> Optional[nn.Module]:
    """Build the model on the meta device and check its size against ``memory_limit``.

    Returns
    -------
    nn.Module or None
        The meta-device module (shapes only, no memory), or ``None`` when the factory
        cannot build on the meta device (then nothing could be checked in advance).

    Raises
    ------
    InputError
        The parameters and buffers would need more than ``memory_limit`` bytes, or the
        factory fails the way the real build would.
    """
    meta = _meta_model(spec)
    if meta is not None:
        tensors = list(meta.state_dict().values())
        count = sum(t.numel() for t in tensors)
        check_allocation(f"the model {spec_label(spec)!r} ({count:,} parameters and buffers)", logical_bytes(tensors), memory_limit)
    return meta
