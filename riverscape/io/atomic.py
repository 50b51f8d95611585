"""Write one file atomically: a temporary file beside the target, then ``os.replace``.

Readers see the old file or the new one, never a half-written one; a failure (any exception,
``KeyboardInterrupt`` included) deletes the temporary file and leaves the old file as it was.
The temporary file lives in the target's folder (same file system, so the rename is atomic on
POSIX and Windows) and is hidden (``.NAME.*.tmp``).

This is for result files (JSON, HTML, PNG). Checkpoints and report directories, which must
not overwrite what riverscape did not write, go through :mod:`riverscape.outdir`.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_path", "write_text_atomic", "write_bytes_atomic"]

PathLike = Union[str, os.PathLike]


def _default_mode() -> int:
    """``0o666`` restricted by the process umask: what a plain ``open(path, "w")`` would create."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` when the block succeeds.

    Parameters
    ----------
    path : str or PathLike
        The target; its parent folders are created if missing.
    suffix : str
        Suffix of the temporary file (e.g. ``".png"`` for writers that look at it).

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
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
    temporary = Path(name)
    try:
        os.close(handle)
        os.chmod(temporary, _default_mode())  # mkstemp creates 0600
        yield temporary
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
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
