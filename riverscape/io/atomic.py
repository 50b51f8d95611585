"""Write one file atomically: a temporary file beside the target, then ``os.replace``.

Readers see the old file or the new one, never a half-written one; a failure (any exception,
``KeyboardInterrupt`` included) deletes the temporary file and leaves the old file as it was.
The temporary file lives in the target's folder (same file system, so the rename is atomic on
POSIX and Windows) and is hidden (``.NAME.*.tmp``).

Result files (JSON, HTML, PNG) use it directly; checkpoints and report directories, which must
not overwrite what riverscape did not write, go through :mod:`riverscape.outdir`, whose file
writer is :func:`atomic_path` plus the ``--force`` checks.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional, Union

__all__ = ["atomic_path", "write_text_atomic", "write_bytes_atomic", "make_parents", "remove_empty", "umask_mode"]

PathLike = Union[str, os.PathLike]


def umask_mode(mode: int) -> int:
    """``mode`` restricted by the process umask (what a plain ``open``/``mkdir`` would give)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing ancestors; return the ones created, deepest first."""
    created: list[Path] = []
    current = directory
    while not current.exists():
        created.append(current)
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty(directories: list[Path]) -> None:
    """Remove folders made by :func:`make_parents` again, deepest first, stopping at the first non-empty one."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            break


@contextmanager
def atomic_path(
    path: PathLike,
    *,
    suffix: str = ".tmp",
    before_replace: Optional[Callable[[Path], None]] = None,
    cleanup_guard: Callable[[], ContextManager] = nullcontext,
) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` when the block succeeds.

    The one atomic file writer of riverscape: result files use it directly, checkpoints through
    :func:`riverscape.outdir.atomic_output_file`, which adds the ``--force`` rules.

    Parameters
    ----------
    path : str or PathLike
        The target. Missing parent folders are created, and removed again if the write fails.
    suffix : str
        Suffix of the temporary file (e.g. ``".png"`` for writers that look at it).
    before_replace : callable, optional
        ``before_replace(final_path)`` runs after the block and before the rename; raising
        there aborts the write (used to re-check that an existing target may be replaced).
    cleanup_guard : callable, optional
        Context manager factory wrapped around the clean-up after a failure (e.g.
        :func:`riverscape.outdir.signals_deferred`, so an interrupt cannot cut it short).

    Yields
    ------
    Path
        An empty file beside ``path`` with the usual permissions; write it completely.

    Examples
    --------
    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "out.txt")
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> open(target).read()
    'done'
    """
    final = Path(path).absolute()
    created = make_parents(final.parent)
    try:
        handle, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
        os.close(handle)
    except BaseException:
        remove_empty(created)
        raise
    temporary = Path(name)
    try:
        os.chmod(temporary, umask_mode(0o666))  # mkstemp creates 0600
        yield temporary
        if before_replace is not None:
            before_replace(final)
        os.replace(temporary, final)
    except BaseException:
        with cleanup_guard():
            temporary.unlink(missing_ok=True)
            remove_empty(created)
        raise


def write_text_atomic(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``Path(path)``."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding=encoding)
    return Path(path)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``Path(path)``."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)
