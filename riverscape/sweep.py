"""Shared experiment infrastructure: resumable sweeps, result tables, figures, a common CLI.

Every script in ``experiments/`` is a thin composition of library calls with the same shape::

    parser = experiment_parser("what this experiment shows", name="ste_dynamics")
    opts = parser.parse_args()
    sweep = Sweep(opts.out, "ste_dynamics", config, fresh=opts.fresh)
    records = sweep.run(cells, compute_one_cell)        # skips cells finished earlier
    print_table(rows, columns, title="...")             # aligned text; returns markdown
    write_figure(plotly_fig, opts.out / "curves", static=matplotlib_fig)

``results.json`` (written atomically after every finished cell, so an interrupted run loses at
most the cell in progress) holds ``name``, ``config``, ``cells`` (list of ``{"key", "params",
"result", "seconds"}``), ``runtime_seconds`` (wall time summed over all sessions that worked on
the sweep), ``cpu_seconds`` (process CPU time, likewise), ``summary`` (optional derived results, recomputed by the script), ``versions`` (riverscape, torch, numpy, python) and ``timestamp`` (UTC, ISO 8601).
A cell is identified by a stable key: the canonical JSON of its parameters (sorted keys), so the
same parameters always map to the same stored result, whatever the iteration order.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from tqdm.auto import tqdm

from .io.atomic import write_text_atomic
from .io.figure_files import save_figure
from .io.jsonable import to_jsonable

__all__ = [
    "Sweep",
    "ConfigMismatchError",
    "cell_key",
    "to_jsonable",
    "write_text_atomic",
    "jsonable",
    "atomic_write_text",
    "print_table",
    "format_table",
    "write_figure",
    "experiment_parser",
    "versions",
]

RESULTS_FILE = "results.json"


#: former names, kept for scripts written against them
jsonable = to_jsonable
atomic_write_text = write_text_atomic


class ConfigMismatchError(ValueError):
    """An existing ``results.json`` was produced with a different experiment configuration."""


def cell_key(params: Mapping[str, Any]) -> str:
    """Stable string identifying a cell: canonical JSON of its parameters (sorted keys).

    >>> cell_key({"bits": 2, "R": 1.5}) == cell_key({"R": 1.5, "bits": 2})
    True
    """
    return json.dumps(to_jsonable(params), sort_keys=True, separators=(",", ":"))


def versions() -> dict[str, str]:
    """Versions of riverscape, torch, numpy and Python (recorded in every results.json)."""
    import numpy
    import torch

    from . import __version__

    return {"riverscape": __version__, "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


class Sweep:
    """A resumable grid of experiment cells stored in ``out_dir/results.json``.

    Parameters
    ----------
    out_dir : path
        Output directory (created if missing).
    name : str
        Experiment name, stored in the results.
    config : dict
        Everything that determines the results besides the cell parameters (seed, sizes,
        quick mode ...). Must be JSON-friendly. If ``results.json`` exists with a different
        config, construction raises :class:`ConfigMismatchError` unless ``fresh=True``.
    fresh : bool
        Discard any stored cells and start over.
    axes : sequence of str
        Config keys that only choose *which* cells run, never what a cell computes (e.g.
        ``"seeds"``, the number of seeds, when every cell carries its ``seed`` parameter). They are
        left out of the comparison with a stored config, so ``--seeds 10`` on a 5-seed directory
        computes only the 5 new seeds; the stored config records the latest value.

    Examples
    --------
    >>> import tempfile
    >>> sweep = Sweep(tempfile.mkdtemp(), "demo", {"seed": 0}, progress=False)
    >>> [r["result"]["square"] for r in sweep.run([{"x": 2}, {"x": 3}], lambda c: {"square": c["x"] ** 2})]
    [4, 9]
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, config: Mapping[str, Any], *, fresh: bool = False, progress: bool = True,
                 axes: Sequence[str] = ()) -> None:
        self.out_dir = Path(out_dir)
        self.name = str(name)
        self.config = to_jsonable(config)
        self.progress = progress
        self.axes = tuple(axes)
        self.path = self.out_dir / RESULTS_FILE
        self._cells: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}  # derived results (e.g. statistics over cells), saved under "summary"
        self._previous_runtime = 0.0
        self._previous_cpu = 0.0
        self._started = time.perf_counter()
        self._cpu_started = time.process_time()
        if self.path.exists() and not fresh:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            if self._compared(stored.get("config")) != self._compared(self.config):
                raise ConfigMismatchError(self._mismatch_message(stored.get("config")))
            self._cells = {cell["key"]: cell for cell in stored.get("cells", [])}
            self._previous_runtime = float(stored.get("runtime_seconds") or 0.0)
            self._previous_cpu = float(stored.get("cpu_seconds") or 0.0)

    def _compared(self, config: Any) -> Any:
        """``config`` without the :attr:`axes` keys (what must match a stored config)."""
        return {k: v for k, v in config.items() if k not in self.axes} if isinstance(config, dict) else config

    def _mismatch_message(self, stored: Any) -> str:
        stored = stored if isinstance(stored, dict) else {}
        keys = sorted((set(stored) | set(self.config)) - set(self.axes))
        diffs = [f"{k}: stored {stored.get(k)!r} != requested {self.config.get(k)!r}" for k in keys if stored.get(k) != self.config.get(k)]
        return (
            f"{self.path} was produced with a different configuration ({'; '.join(diffs)}). "
            "Pass --fresh (Sweep(..., fresh=True)) to discard it, or choose another --out directory."
        )

    # ------------------------------------------------------------------ cells
    def __contains__(self, params: Mapping[str, Any]) -> bool:
        return cell_key(params) in self._cells

    def __len__(self) -> int:
        return len(self._cells)

    def result(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Stored result of the cell with these parameters (``KeyError`` if not finished)."""
        return self._cells[cell_key(params)]["result"]

    @property
    def records(self) -> list[dict[str, Any]]:
        """All stored cells, ``{"key", "params", "result", "seconds"}``, in insertion order."""
        return list(self._cells.values())

    def run(
        self,
        cells: Iterable[Mapping[str, Any]],
        fn: Callable[[dict[str, Any]], Mapping[str, Any]],
        *,
        progress: bool | None = None,
        desc: str | None = None,
    ) -> list[dict[str, Any]]:
        """Compute every cell not finished yet; return the records of ``cells`` in order.

        Parameters
        ----------
        cells : iterable of dict
            Cell parameters (JSON-friendly). Duplicates are computed once.
        fn : callable
            ``fn(params) -> dict`` of JSON-friendly results (numpy arrays and tensors are
            converted). Called only for cells missing from ``results.json``; the file is
            rewritten atomically after each call, so a crash or Ctrl-C keeps finished cells.
        progress : bool, optional
            tqdm bar over the cells (defaults to the sweep's ``progress``).

        Returns
        -------
        list of dict
            ``{"key", "params", "result", "seconds"}`` for each requested cell.
        """
        cells = [to_jsonable(dict(c)) for c in cells]
        show = self.progress if progress is None else progress
        out = []
        todo = sum(cell_key(c) not in self._cells for c in {cell_key(c): c for c in cells}.values())
        bar = tqdm(total=todo, desc=desc or self.name, leave=False, disable=not show or todo == 0)
        try:
            for params in cells:
                key = cell_key(params)
                if key not in self._cells:
                    bar.set_postfix_str(_short(params), refresh=False)
                    start = time.perf_counter()
                    result = to_jsonable(dict(fn(dict(params))))
                    self._cells[key] = {"key": key, "params": params, "result": result, "seconds": time.perf_counter() - start}
                    self.save()
                    bar.update(1)
                out.append(self._cells[key])
        finally:
            bar.close()
        return out

    # ------------------------------------------------------------------ storage
    @property
    def runtime_seconds(self) -> float:
        """Wall time of all sessions that worked on this sweep (previous ones + this one)."""
        return self._previous_runtime + (time.perf_counter() - self._started)

    @property
    def cpu_seconds(self) -> float:
        """Process CPU time (all threads) of all sessions: comparable across loaded machines."""
        return self._previous_cpu + (time.process_time() - self._cpu_started)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "cells": list(self._cells.values()),
            **({"summary": to_jsonable(self.summary)} if self.summary else {}),
            "runtime_seconds": self.runtime_seconds,
            "cpu_seconds": self.cpu_seconds,
            "versions": versions(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def save(self) -> Path:
        """Write ``results.json`` atomically; returns its path."""
        write_text_atomic(self.path, json.dumps(self.to_dict(), indent=1))
        return self.path


def _short(params: Mapping[str, Any], width: int = 60) -> str:
    text = ", ".join(f"{k}={v}" for k, v in params.items())
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------- tables
def _cell_text(value: Any, floatfmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else floatfmt.format(value)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | Mapping[str, str],
    *,
    title: str | None = None,
    floatfmt: str = "{:.4g}",
) -> tuple[str, str]:
    """``(aligned text, markdown)`` of ``rows`` restricted to ``columns``.

    ``columns`` is a list of row keys or a mapping ``key -> header``. Floats are formatted with
    ``floatfmt``, ``None`` shows as an en dash.

    >>> text, md = format_table([{"R": 0.5, "tau": 3.04}], {"R": "range", "tau": "plateau"})
    >>> print(md)
    | range | plateau |
    | ---: | ---: |
    | 0.5 | 3.04 |
    """
    header_of = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    keys = list(header_of)
    body = [[_cell_text(row.get(k), floatfmt) for k in keys] for row in rows]
    headers = [header_of[k] for k in keys]
    numeric = [all(_is_number(row.get(k)) for row in rows) for k in keys]
    widths = [max([len(h)] + [len(line[i]) for line in body]) for i, h in enumerate(headers)]

    def align(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    text_lines = ([title] if title else []) + [align(headers), "  ".join("-" * w for w in widths)] + [align(line) for line in body]
    md_lines = ([f"**{title}**", ""] if title else []) + [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" if num else "---" for num in numeric) + " |",
    ] + ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(text_lines), "\n".join(md_lines)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | Mapping[str, str],
    title: str | None = None,
    *,
    floatfmt: str = "{:.4g}",
) -> str:
    """Print ``rows`` as an aligned text table and return the same table as markdown."""
    text, markdown = format_table(rows, columns, title=title, floatfmt=floatfmt)
    print(text + "\n", flush=True)
    return markdown


# ---------------------------------------------------------------------- figures
def write_figure(fig: Any, path: str | os.PathLike, *, static: Any = None) -> list[Path]:
    """Write a Plotly figure as self-contained HTML and its matplotlib twin as PNG.

    Parameters
    ----------
    fig : plotly.graph_objects.Figure
        Written to ``path.html`` with plotly.js embedded (``include_plotlyjs=True``), so the
        file opens offline.
    path : path
        File stem (any suffix is replaced).
    static : matplotlib.figure.Figure or callable, optional
        The PNG twin (Plotly's own PNG export needs kaleido and a browser): a figure, or a
        zero-argument callable returning one. Written to ``path.png`` and closed.

    Returns
    -------
    list of Path
        The files written.
    """
    stem = Path(path).with_suffix("")
    figure = static() if callable(static) else static
    written = save_figure(fig, stem, static=figure)
    if figure is not None:
        _close_matplotlib(figure)
    return [written["html"]] + ([written["png"]] if "png" in written else [])


def _close_matplotlib(figure: Any) -> None:
    """Release a pyplot-managed figure (figures built with ``Figure()`` need nothing)."""
    import matplotlib.pyplot as plt

    if plt.fignum_exists(getattr(figure, "number", -1)):
        plt.close(figure)


# ---------------------------------------------------------------------- CLI
def experiment_parser(description: str, *, name: str) -> argparse.ArgumentParser:
    """Argument parser shared by the experiment scripts.

    Options: ``--out DIR`` (default ``runs/<name>``), ``--quick`` (tiny settings for CI, seconds),
    ``--seed INT`` (default 0), ``--fresh`` (discard stored cells), ``--no-progress``.
    ``--out`` is parsed to a :class:`pathlib.Path`.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path("runs") / name, help=f"output directory (default runs/{name})")
    parser.add_argument("--quick", action="store_true", help="tiny settings that finish in seconds (CI smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.add_argument("--fresh", action="store_true", help="discard finished cells stored in OUT/results.json")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser
