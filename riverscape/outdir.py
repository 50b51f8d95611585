"""Atomic output: a directory or a file appears complete, or not at all.

Work happens in a hidden temporary sibling (same file system, so the final rename is
atomic); on success it is renamed into place, on any exception (``KeyboardInterrupt``
included) it is deleted. A failed or interrupted run therefore never leaves a partial
report or checkpoint behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from .errors import InputError

__all__ = ["check_output_dir", "check_output_file", "atomic_output_dir", "atomic_output_file"]

PathLike = Union[str, os.PathLike]


def _umask_mode(mode: int) -> int:
    """``mode`` restricted by the process umask (what a plain ``mkdir``/``open`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def check_output_dir(path: PathLike, force: bool = False) -> Path:
    """Fail early if ``path`` cannot become a fresh output directory.

    Call it before any expensive work so that a run that would end in "directory exists"
    stops at once.

    Raises
    ------
    InputError
        ``path`` exists and ``force`` is false, or ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise InputError(f"output path {str(path)!r} exists and is not a directory; choose another --out")
        if not force:
            raise InputError(f"output directory {str(path)!r} already exists; pass --force to replace it or choose another --out")
    return path


def check_output_file(path: PathLike, force: bool = False) -> Path:
    """Fail early if ``path`` cannot be written as a new file (see :func:`check_output_dir`)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output path {str(path)!r} is a directory; give a file name such as {str(path / 'model.pt')!r}")
    if path.exists() and not force:
        raise InputError(f"output file {str(path)!r} already exists; pass --force to overwrite it")
    return path


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and missing ancestors; return the ones created, deepest first."""
    created: list[Path] = []
    current = directory
    while not current.exists():
        created.append(current)
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            break


@contextmanager
def atomic_output_dir(path: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    Parameters
    ----------
    path : str or PathLike
        Final directory. Missing parent directories are created (and removed again on
        failure if they are still empty).
    force : bool
        Replace an existing directory at ``path``. Without it an existing directory raises
        :class:`~riverscape.errors.InputError` before the block runs.

    Yields
    ------
    Path
        The temporary directory to write into (a hidden sibling of ``path``).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_output_dir(root / "report") as tmp:
    ...     _ = (tmp / "metrics.json").write_text("{}")
    >>> sorted(p.name for p in (root / "report").iterdir())
    ['metrics.json']
    """
    final = check_output_dir(path, force).absolute()
    created = _make_parents(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        tmp.chmod(_umask_mode(0o777))
        yield tmp
        if final.exists():
            check_output_dir(final, force)  # appeared while we worked: only replace it when forced
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, trash / final.name)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(trash / final.name, final)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


@contextmanager
def atomic_output_file(path: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` only if the block succeeds.

    The temporary file lives beside ``path``; on success it is ``os.replace``-d onto it
    (atomic on POSIX and Windows), on any exception it is deleted.

    Raises
    ------
    InputError
        ``path`` exists and ``force`` is false (checked before the block runs).
    """
    final = check_output_file(path, force).absolute()
    created = _make_parents(final.parent)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        os.close(handle)
    except BaseException:
        _remove_empty(created)
        raise
    tmp = Path(name)
    try:
        tmp.chmod(_umask_mode(0o666))
        yield tmp
        if final.exists():
            check_output_file(final, force)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise
