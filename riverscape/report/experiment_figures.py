"""Figures of the experiment scripts: side-by-side plane slices and panels of series (Plotly + matplotlib twins).

They draw stored results (plain dicts and lists) and compute nothing.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["landscape_figures", "series_figures"]


def landscape_figures(landscape: Mapping[str, Any], title: str):
    """``(plotly, matplotlib)`` side-by-side FP / quantized slices of a :func:`plane_landscape` result."""
    from . import side_by_side_slices, static

    args = (landscape["alphas"], landscape["betas"], np.asarray(landscape["fp_loss"]), np.asarray(landscape["quantized_loss"]))
    kwargs = dict(markers=landscape["markers"], paths=landscape["paths"] or None, title=title,
                  xlabel="direction θ_fp → PTQ point", ylabel="orthogonal, toward the QAT point")
    return side_by_side_slices(*args, **kwargs), static.side_by_side_slices(*args, **kwargs)


def series_figures(panels: Mapping[str, Mapping[str, tuple]], title: str, *, xlabel: str = "QAT step", log_y: Sequence[bool] = (),
                   markers: bool = False):
    """``(plotly, matplotlib)`` line panels: ``{panel title: {label: (x, y[, y_spread])}}``, one colour per label.

    A third entry draws a shaded band ``y +- y_spread``. ``log_y[i]`` puts panel ``i`` on a log axis.
    ``markers`` marks every point (a series of one point is then visible).
    """
    import matplotlib
    import plotly.graph_objects as go
    from matplotlib.figure import Figure
    from plotly.subplots import make_subplots

    from .theme import PALETTE, base_layout, mpl_style

    names = list(panels)
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    color = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    shared = all(set(series) == set(labels) for series in panels.values())  # one legend for all panels, else one per panel
    shown: set[str] = set()
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names)
    mfig = Figure(figsize=(5.2 * len(names), 4.4))
    with matplotlib.rc_context(mpl_style()):
        axes = np.atleast_1d(mfig.subplots(1, len(names)))
        for col, name in enumerate(names):
            for label, series in panels[name].items():
                x, y = np.asarray(series[0], float), np.asarray(series[1], float)
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers" if markers else "lines", name=label, legendgroup=label,
                                         showlegend=label not in shown, line=dict(color=color[label], width=2)), row=1, col=col + 1)
                axes[col].plot(x, y, color=color[label], lw=1.6, marker="o" if markers else None, ms=5,
                               label=label if (col == 0 or not shared) else None)
                shown.add(label)
                if len(series) > 2 and series[2] is not None:
                    s = np.asarray(series[2], float)
                    fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([y + s, (y - s)[::-1]]), fill="toself",
                                             line=dict(width=0), fillcolor=color[label], opacity=0.18, showlegend=False,
                                             legendgroup=label, hoverinfo="skip"), row=1, col=col + 1)
                    axes[col].fill_between(x, y - s, y + s, color=color[label], alpha=0.18, lw=0)
            log = col < len(log_y) and log_y[col]
            axes[col].set(xlabel=xlabel, title=name, yscale="log" if log else "linear")
            fig.update_xaxes(title_text=xlabel, row=1, col=col + 1)
            if log:
                fig.update_yaxes(type="log", row=1, col=col + 1)
        if shared:
            ncol = min(6, len(labels), 3 * len(names))  # a single narrow panel wraps its legend instead of cutting it
            mfig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8)
            mfig.subplots_adjust(bottom=0.19 + 0.06 * math.ceil(len(labels) / ncol))
        else:
            for ax in axes:
                ax.legend(fontsize=7)
    fig.update_layout(**base_layout(title, height=460))
    return fig, mfig
