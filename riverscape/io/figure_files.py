"""Figure files: a Plotly figure as one offline HTML page, its matplotlib twin as PNG, atomically.

No report machinery here: experiments (:mod:`riverscape.sweep`) and the report
(:mod:`riverscape.report.html`) both write figures through :func:`save_figure`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .atomic import atomic_path, write_text_atomic

__all__ = ["PLOTLY_CONFIG", "save_figure"]

PLOTLY_CONFIG = {
    "displaylogo": False,
    "responsive": True,
    "toImageButtonOptions": {"format": "png", "scale": 2},  # client-side export, no kaleido
}


def save_figure(fig: Any, path_without_suffix: str | os.PathLike, static: Any | None = None) -> dict[str, Path]:
    """Write ``<name>.html`` (self-contained interactive Plotly page) and, with a matplotlib twin, ``<name>.png``.

    Parameters
    ----------
    fig : plotly Figure.
    path_without_suffix : e.g. ``"out/slice_2bit"``.
    static : matplotlib Figure drawn by :mod:`riverscape.report.static` (Plotly PNG export would need kaleido).

    Returns
    -------
    ``{"html": path, "png": path}`` (``"png"`` only with ``static``).
    """
    base = Path(path_without_suffix)
    written = {"html": write_text_atomic(base.with_name(base.name + ".html"), fig.to_html(full_html=True, include_plotlyjs=True, config=PLOTLY_CONFIG))}
    if static is not None:
        png = base.with_name(base.name + ".png")
        with atomic_path(png, suffix=".png") as temporary:
            static.savefig(temporary, format="png")
        written["png"] = png
    return written
