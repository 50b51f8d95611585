"""One visual vocabulary for the Plotly figures, the matplotlib twins and the HTML page.

Colours are the Okabe-Ito palette (readable with the common colour-vision deficiencies); the
loss colour scale is viridis (perceptually uniform, prints in grey scale). A label gets the same
colour wherever it appears: the canonical points of the quantization story have fixed colours
(:data:`CANONICAL_COLORS`), any other label takes the palette colour of its position.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "PALETTE",
    "SYMBOLS",
    "MPL_MARKERS",
    "CANONICAL_COLORS",
    "COLORSCALE",
    "MPL_COLORMAP",
    "FONT_FAMILY",
    "color_for",
    "symbol_for",
    "base_layout",
    "mpl_style",
]

#: Okabe-Ito colours, black first; yellow last (low contrast on white backgrounds).
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow
)

#: Plotly marker symbols, one per position (distinguishable without colour).
SYMBOLS: tuple[str, ...] = ("star", "x", "diamond", "circle", "square", "triangle-up", "cross", "pentagon")
#: Matplotlib equivalents of :data:`SYMBOLS`.
MPL_MARKERS: tuple[str, ...] = ("*", "X", "D", "o", "s", "^", "P", "p")

#: The points every riverscape report shows: their labels (lower-case), colour and symbol position.
_CANONICAL_POINTS: tuple[tuple[tuple[str, ...], str, int], ...] = (
    (("theta_fp", "θ_fp", "fp", "full precision"), "#000000", 0),
    (("q(theta_fp)", "q(θ_fp)", "ptq"), "#D55E00", 1),
    (("qat", "q(theta_qat)", "q(θ_qat)"), "#009E73", 2),
    (("theta_qat", "θ_qat"), "#56B4E9", 3),
)
#: Fixed colours/symbols for the points every riverscape report shows (labels compared lower-case).
CANONICAL_COLORS: dict[str, tuple[str, int]] = {
    label: (color, position) for labels, color, position in _CANONICAL_POINTS for label in labels
}

COLORSCALE = "Viridis"
MPL_COLORMAP = "viridis"
FONT_FAMILY = '-apple-system, "Segoe UI", "Helvetica Neue", Arial, "DejaVu Sans", sans-serif'


def _canonical(label: str) -> tuple[str, int] | None:
    return CANONICAL_COLORS.get(label.strip().lower())


def color_for(label: str, index: int) -> str:
    """Colour of ``label`` drawn as the ``index``-th item of a figure."""
    canonical = _canonical(label)
    return canonical[0] if canonical else PALETTE[index % len(PALETTE)]


def symbol_for(label: str, index: int, *, matplotlib: bool = False) -> str:
    """Marker symbol of ``label`` drawn as the ``index``-th item (Plotly or matplotlib name)."""
    canonical = _canonical(label)
    position = canonical[1] if canonical else index
    table = MPL_MARKERS if matplotlib else SYMBOLS
    return table[position % len(table)]


def base_layout(title: str | None, *, height: int = 460, subplot_titles: bool = False) -> dict[str, Any]:
    """Plotly layout shared by every figure: white background, readable fonts, legend below the plot.

    A legend below the plotting area never covers data or colour bars, whatever the figure width;
    the top margin leaves room for the mode bar above titles and subplot titles.
    """
    top = 60 if title else 40
    top += 30 if subplot_titles else 0
    layout: dict[str, Any] = dict(
        template="plotly_white",
        height=height,
        font=dict(family=FONT_FAMILY, size=13, color="#222"),
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=16)) if title else None,
        margin=dict(l=70, r=30, t=top, b=60),
        hoverlabel=dict(font=dict(family=FONT_FAMILY, size=12)),
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0.0),
    )
    return layout


def mpl_style() -> dict[str, Any]:
    """Matplotlib rc parameters matching :func:`base_layout` (use with ``matplotlib.rc_context``)."""
    return {
        "font.family": "DejaVu Sans",
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e5e5e5",
        "grid.linewidth": 0.6,
        "legend.frameon": False,
        "legend.fontsize": 9,
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "image.cmap": MPL_COLORMAP,
    }
