"""Atomic output: a directory or a file appears complete, or not at all.

Work happens in a hidden temporary sibling (same file system, so the final rename is
atomic); on success it is renamed into place, on any exception (``KeyboardInterrupt``
included) it is deleted. A failed or interrupted run therefore never leaves a partial
report or checkpoint behind.

Every directory riverscape writes carries a marker file, :data:`MARKER_NAME`, listing what
riverscape put there. ``force=True`` replaces an existing directory only when it is empty
or carries that marker and holds nothing else, and never when it is the working
directory, the home directory, the file-system root, an ancestor of any of them, or a
folder that holds one of the run's input files (see :func:`check_output_dir`). The swap
of an old directory for the new one runs with SIGINT and SIGTERM deferred, so an
interrupt leaves the old report or the new one in place, never neither, and no hidden
``.NAME.*.old`` / ``.partial`` folders behind.

A run that caches its finished stages (:mod:`riverscape.stage_cache`) writes them into a work
folder inside the output directory, each file listed in the marker before it is written
(:func:`claim_files`; the marker's kind is ``"work"`` when the output directory held nothing
else). An output directory holding only such a work folder is used without ``force`` (it is
what an interrupted run leaves), and the finished report replaces it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from .errors import InputError
from .io.atomic import atomic_path, make_parents, remove_empty, umask_mode

__all__ = [
    "MARKER_NAME",
    "check_output_dir",
    "check_output_file",
    "atomic_output_dir",
    "atomic_output_file",
    "signals_deferred",
    "claim_files",
    "release_work",
]

PathLike = Union[str, os.PathLike]
MARKER_NAME = ".riverscape-output.json"
_MARKER_WRITER = "riverscape"
_WORK_KIND = "work"


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _is_within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies below it (both already resolved)."""
    return inner == outer or outer in inner.parents


def _written_files(directory: Path) -> list[str]:
    """Relative paths of every file and folder below ``directory`` (sorted, marker excluded)."""
    names = []
    for root, dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        names += [str(rel / n) if str(rel) != "." else n for n in dirs + files]
    return sorted(n for n in names if n != MARKER_NAME)


def _write_marker(directory: Path, kind: str, files: Optional[list[str]] = None, *, created: bool = False) -> None:
    """The marker of ``directory`` listing ``files`` (default: everything in it now).

    With ``files`` (a folder in use, :func:`claim_files`) it is written to a temporary name and
    renamed, so a reader never sees half a marker. ``created`` records that riverscape made
    ``directory`` for work files (:func:`release_work` may then remove it).
    """
    from . import __version__

    listed = _written_files(directory) if files is None else sorted(files)
    record = {"writer": _MARKER_WRITER, "version": __version__, "kind": kind, "files": listed, **({"created": True} if created else {})}
    text = json.dumps(record, indent=1) + "\n"
    if files is None:  # a private temporary folder, renamed into place afterwards
        (directory / MARKER_NAME).write_text(text)
        return
    temporary = directory / (MARKER_NAME + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, directory / MARKER_NAME)


def _marker(directory: Path) -> Optional[dict]:
    """A valid riverscape marker record of ``directory`` (``files`` as a set); ``None`` without one."""
    marker = directory / MARKER_NAME
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("writer") != _MARKER_WRITER or not isinstance(record.get("files"), list):
        return None
    return {**record, "files": {str(f) for f in record["files"]}}


def _marker_files(directory: Path) -> Optional[set[str]]:
    """The files a valid riverscape marker in ``directory`` lists; ``None`` without one."""
    record = _marker(directory)
    return None if record is None else record["files"]


def _foreign_files(directory: Path, listed: set[str]) -> list[str]:
    """Files below ``directory`` its marker does not list (the marker's own temporary file excepted)."""
    return sorted(set(_written_files(directory)) - listed - {MARKER_NAME + ".tmp"})


def claim_files(directory: PathLike, paths: Iterable[PathLike]) -> None:
    """List ``paths`` (inside ``directory``) in ``directory``'s marker before they are written.

    ``directory`` and its missing parents are created. A new or empty directory gets a marker
    of kind ``"work"``; an existing marker keeps its kind and gains the new names.

    Raises
    ------
    InputError
        ``directory`` is not empty and riverscape did not write it (no valid marker).
    """
    directory = Path(directory)
    created = bool(make_parents(directory))
    record = _marker(directory)
    if record is None:
        if any(directory.iterdir()):
            raise InputError(f"{str(directory)!r} is not empty and riverscape did not write it (no {MARKER_NAME})")
        record = {"kind": _WORK_KIND, "files": set(), "created": created}
    names = set(record["files"])
    for path in paths:
        relative = Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(directory)))
        names |= {str(Path(*relative.parts[: i + 1])) for i in range(len(relative.parts))}  # the file and its folders
    if names != record["files"]:
        _write_marker(directory, str(record.get("kind", _WORK_KIND)), sorted(names), created=record.get("created") is True)


def release_work(directory: PathLike) -> None:
    """Undo :func:`claim_files` once its work files are gone: a ``"work"`` marker holding nothing is removed,
    and so is ``directory`` if riverscape created it (a folder the user made stays, empty as it was)."""
    directory = Path(directory)
    record = _marker(directory)
    if record is None or record.get("kind") != _WORK_KIND or set(_written_files(directory)) - {MARKER_NAME + ".tmp"}:
        return
    for name in (MARKER_NAME, MARKER_NAME + ".tmp"):
        (directory / name).unlink(missing_ok=True)
    if record.get("created") is True:
        directory.rmdir()


def _only_work(directory: Path) -> bool:
    """Whether ``directory`` holds nothing but riverscape's work files (an interrupted run's, see :func:`claim_files`)."""
    record = _marker(directory)
    return record is not None and record.get("kind") == _WORK_KIND and not _foreign_files(directory, record["files"])


def _protected_reason(target: Path, inputs: Iterable[PathLike]) -> Optional[str]:
    """Why ``target`` (resolved) must never be replaced, or ``None``."""
    if target == Path(target.anchor):
        return "it is the file-system root"
    cwd = _real(os.getcwd())
    if _is_within(cwd, target):
        return "it is the working directory" if cwd == target else "it contains the working directory"
    home = os.path.expanduser("~")
    if home and home != "~" and _is_within(_real(home), target):
        return "it is the home directory" if _real(home) == target else "it contains the home directory"
    for item in inputs:
        if _is_within(_real(item), target):
            return f"it contains the input {str(item)!r}"
    return None


def check_output_dir(path: PathLike, force: bool = False, *, inputs: Iterable[PathLike] = ()) -> Path:
    """Fail early if ``path`` cannot become a fresh output directory.

    Call it before any expensive work so that a run that would end in "directory exists"
    stops at once.

    Parameters
    ----------
    path : str or PathLike
        The output directory.
    force : bool
        Allow replacing an existing non-empty directory, which must be one riverscape
        wrote (it carries :data:`MARKER_NAME` and holds only the files listed there). An
        existing empty directory is used without ``force``.
    inputs : iterable of paths
        Files the run reads (the checkpoint): a directory that holds any of them is never
        replaced.

    Raises
    ------
    InputError
        ``path`` exists and ``force`` is false, ``path`` is not a directory, or it may not be
        replaced (the working or home directory, ``/``, an ancestor of one of them, a folder
        holding an input, a non-empty folder riverscape did not write).
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return path
    if not path.is_dir():
        raise InputError(f"output path {str(path)!r} exists and is not a directory; choose another --out")
    if path.is_symlink():
        raise InputError(f"output directory {str(path)!r} is a symbolic link; riverscape does not replace links: choose another --out")
    reason = _protected_reason(_real(path), inputs)
    if reason is not None:
        raise InputError(f"riverscape never replaces {str(path)!r}: {reason}; choose another --out")
    if not any(path.iterdir()) or _only_work(path):
        return path  # an empty folder, or the work folder of an interrupted run, is as good as none
    if not force:
        raise InputError(f"output directory {str(path)!r} already exists; pass --force to replace it or choose another --out")
    listed = _marker_files(path)
    if listed is None:
        raise InputError(
            f"--force does not replace {str(path)!r}: it is not empty and riverscape did not write it "
            f"(no {MARKER_NAME}); choose another --out or remove it yourself"
        )
    foreign = _foreign_files(path, listed)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(
            f"--force does not replace {str(path)!r}: it holds files riverscape did not write ({shown}); "
            "move them or choose another --out"
        )
    return path


_CHECKPOINT_MAGIC = b"PK\x03\x04"  # torch.save's zip container


def check_output_file(path: PathLike, force: bool = False) -> Path:
    """Fail early if ``path`` cannot be written as a new checkpoint file.

    ``force`` overwrites an existing file only if it is empty or a PyTorch checkpoint (a
    zip container, as ``torch.save`` writes): ``--out notes.txt --force`` is refused.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output path {str(path)!r} is a directory; give a file name such as {str(path / 'model.pt')!r}")
    if path.exists() and not force:
        raise InputError(f"output file {str(path)!r} already exists; pass --force to overwrite it")
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as handle:
            if handle.read(4) != _CHECKPOINT_MAGIC:
                raise InputError(f"--force does not overwrite {str(path)!r}: it is not a PyTorch checkpoint; choose another --out")
    return path


_DEFERRED = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first one that came.

    The handlers are swapped for one that only remembers the signal (Python runs signal
    handlers in the main thread, whichever thread the OS picked), so a few renames run to
    completion together. Outside the main thread, where handlers cannot be set, it does
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in _DEFERRED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(received[0])


def _swap_in(tmp: Path, final: Path, *, force: bool, inputs: Iterable[PathLike]) -> None:
    """Put ``tmp`` at ``final``; an existing ``final`` (checked again) is replaced and deleted."""
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        return
    check_output_dir(final, force, inputs=inputs)  # appeared or changed while we worked
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    with signals_deferred():
        try:
            os.replace(final, trash / final.name)
        except OSError as exc:
            trash.rmdir()
            raise InputError(f"cannot replace {str(final)!r} ({exc.strerror or exc}); choose another --out") from None
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(trash / final.name, final)
            trash.rmdir()
            raise
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_output_dir(path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = (), kind: str = "report") -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    Parameters
    ----------
    path : str or PathLike
        Final directory. Missing parent directories are created (and removed again on
        failure if they are still empty).
    force : bool
        Replace an existing directory at ``path`` under the rules of
        :func:`check_output_dir`. Without it an existing directory raises
        :class:`~riverscape.errors.InputError` before the block runs.
    inputs : iterable of paths
        Files the run reads; a directory holding one of them is never replaced.
    kind : str
        Recorded in the marker file (``"report"``, ``"experiment"``, ...).

    Yields
    ------
    Path
        The temporary directory to write into (a hidden sibling of ``path``). On success
        the marker :data:`MARKER_NAME` listing its files is added before the rename.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_output_dir(root / "report") as tmp:
    ...     _ = (tmp / "metrics.json").write_text("{}")
    >>> sorted(p.name for p in (root / "report").iterdir())
    ['.riverscape-output.json', 'metrics.json']
    """
    inputs = tuple(inputs)
    final = check_output_dir(path, force, inputs=inputs).absolute()
    created = make_parents(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except BaseException:
        remove_empty(created)
        raise
    try:
        tmp.chmod(umask_mode(0o777))
        yield tmp
        _write_marker(tmp, kind)
        _swap_in(tmp, final, force=force, inputs=inputs)
    except BaseException:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            remove_empty(created)
        raise


@contextmanager
def atomic_output_file(path: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` only if the block succeeds.

    :func:`riverscape.io.atomic.atomic_path` with the ``--force`` rules: the target is checked
    before the block and again just before the rename, and the clean-up after a failure runs
    with SIGINT/SIGTERM deferred.

    Raises
    ------
    InputError
        ``path`` exists and ``force`` is false (checked before the block runs).
    """
    final = check_output_file(path, force).absolute()

    def still_replaceable(target: Path) -> None:
        if target.exists():
            check_output_file(target, force)

    with atomic_path(final, suffix=".partial", before_replace=still_replaceable, cleanup_guard=signals_deferred) as tmp:
        yield tmp
