"""Matplotlib twins of :mod:`.figures` for papers and PNG files (no kaleido, no display).

Same names, arguments and inputs as the Plotly functions; each returns a
``matplotlib.figure.Figure`` created without pyplot (no global state, no GUI backend; PNGs are
rendered by Agg). Write one with ``fig.savefig("x.png")`` or :func:`.html.save_figure`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg", force=False)  # only takes effect if no backend was chosen yet

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import figures, inputs
from .theme import MPL_COLORMAP, PALETTE, color_for, mpl_style, symbol_for

__all__ = list(inputs.FIGURE_NAMES)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=150, layout="constrained")


def _twin_of(interactive: Callable[..., Any]) -> Callable[[Callable[..., Figure]], Callable[..., Figure]]:
    """Make a drawing function the static twin of the Plotly function ``interactive``.

    The twin takes exactly ``interactive``'s signature (names, defaults, annotations), so the
    two backends cannot drift apart: calls are bound against that signature, defaults filled in,
    and the drawing function runs with every argument inside the riverscape rc style (fonts,
    grid, colormap).
    """
    signature = inspect.signature(interactive)

    def decorate(draw: Callable[..., Figure]) -> Callable[..., Figure]:
        @functools.wraps(draw)
        def twin(*args: Any, **kwargs: Any) -> Figure:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with matplotlib.rc_context(mpl_style()):
                return draw(*bound.args, **bound.kwargs)

        twin.__signature__ = signature.replace(return_annotation=Figure)  # type: ignore[attr-defined]
        twin.__doc__ = draw.__doc__ or f"Static twin of :func:`riverscape.report.figures.{interactive.__name__}`."
        return twin

    return decorate


def _legend_below(fig: Figure, ax_or_axes: Any, ncols: int = 4) -> None:
    handles, labels = [], []
    for ax in np.atleast_1d(ax_or_axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(labels)))


def _colorbar(fig: Figure, mappable: Any, axes: Any, colors: inputs.ColorValues) -> None:
    bar = fig.colorbar(mappable, ax=axes, shrink=0.95, pad=0.02)
    bar.set_label(colors.title + (" (log scale)" if colors.log else ""))
    if colors.log:
        ticks, labels = inputs.log_ticks(colors.zmin, colors.zmax)
        bar.set_ticks(ticks, labels=labels)


def _suptitle(fig: Figure, title: str | None, note: str | None) -> None:
    """Figure title with ``note`` (why an axis is linear) as a second line; the note alone if no title."""
    if title and note:
        fig.suptitle(f"{title}\n{note}")
    elif title:
        fig.suptitle(title)
    elif note:
        fig.suptitle(note, fontsize="small")


def _plane_axes(ax: Any) -> None:
    """No grid over a colour mesh; at most 5 ticks per axis (the default crowds panel edges)."""
    ax.grid(False)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))


def _draw_contour(ax, alphas, betas, values, colors: inputs.ColorValues, ncontours: int):
    mesh = ax.pcolormesh(alphas, betas, values.T, shading="nearest", cmap=MPL_COLORMAP, vmin=colors.zmin, vmax=colors.zmax, rasterized=True)
    levels = np.linspace(colors.zmin, colors.zmax, ncontours + 1)
    if np.isfinite(values).sum() > 3 and np.nanmax(values) > np.nanmin(values):
        ax.contour(alphas, betas, values.T, levels=levels, colors="white", linewidths=0.4, alpha=0.5, linestyles="solid")
    return mesh


def _draw_overlays(ax, points, lines, *, three_d: bool) -> None:
    for index, (label, xs, ys, heights) in enumerate(lines):
        color = color_for(label, index + len(points))
        coords = (xs, ys, heights) if three_d else (xs, ys)
        ax.plot(*coords, color=color, lw=2, marker="o", ms=2.5, label=label, zorder=3)
    for index, (label, x, y, height) in enumerate(points):
        coords = ([x], [y], [height]) if three_d else ([x], [y])
        extra = {"depthshade": False} if three_d else {}
        marker = symbol_for(label, index, matplotlib=True)
        ax.scatter(
            *coords, s=260 if marker == "*" else 140, marker=marker, color=color_for(label, index),
            edgecolors="white", linewidths=0.9, label=label, zorder=4, **extra,
        )


@_twin_of(figures.slice_figure)
def slice_figure(alphas, betas, loss, *, markers, paths, title, log, subtract_min, kind, xlabel, ylabel, label, ncontours) -> Figure:
    """Static twin of :func:`riverscape.report.figures.slice_figure` (colour mesh + contour lines)."""
    panel = inputs.slice_panel(alphas, betas, loss, markers=markers, paths=paths, log=log, subtract_min=subtract_min, label=label, kind=kind)
    alphas, betas, colors, values, points, lines = panel.alphas, panel.betas, panel.colors, panel.values, panel.points, panel.lines
    fig = _figure(11.0 if kind == "both" else 6.4, 5.4)
    axes = []
    if kind in ("contour", "both"):
        ax = fig.add_subplot(1, 2 if kind == "both" else 1, 1)
        mesh = _draw_contour(ax, alphas, betas, values, colors, ncontours)
        _draw_overlays(ax, points, lines, three_d=False)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        _plane_axes(ax)
        axes.append(ax)
    if kind in ("surface", "both"):
        ax3 = fig.add_subplot(1, 2 if kind == "both" else 1, 2 if kind == "both" else 1, projection="3d")
        grid_x, grid_y = np.meshgrid(alphas, betas)
        mesh = ax3.plot_surface(grid_x, grid_y, values.T, cmap=MPL_COLORMAP, vmin=colors.zmin, vmax=colors.zmax, linewidth=0, antialiased=True, alpha=0.9)
        _draw_overlays(ax3, points, lines, three_d=True)
        # no z label: the colour bar names the quantity, and a z label collides with it
        ax3.set(xlabel=xlabel.split(" (")[0], ylabel=ylabel.split(" (")[0])
        if colors.log:
            ticks, labels = inputs.log_ticks(colors.zmin, colors.zmax, max_ticks=5)
            ax3.set_zticks(ticks, labels=labels)
        for axis in (ax3.xaxis, ax3.yaxis):
            axis.set_major_locator(MaxNLocator(5))
        ax3.view_init(elev=28, azim=-55)
        axes.append(ax3)
    _colorbar(fig, mesh, axes, colors)
    _suptitle(fig, title, colors.note)
    _legend_below(fig, axes)
    return fig


@_twin_of(figures.side_by_side_slices)
def side_by_side_slices(alphas, betas, fp_loss, quantized_loss, *, markers, paths, titles, title, log, subtract_min, xlabel, ylabel, label, ncontours) -> Figure:
    """Static twin of :func:`riverscape.report.figures.side_by_side_slices`: one shared colour bar."""
    alphas, betas, _, _, colors = inputs.slice_pair(alphas, betas, fp_loss, quantized_loss, log=log, subtract_min=subtract_min, label=label)
    fig = _figure(11.5, 5.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, values, panel_title in zip(axes, colors.grids, titles):
        mesh = _draw_contour(ax, alphas, betas, values, colors, ncontours)
        _draw_overlays(ax, inputs.marker_points(markers, alphas, betas, values), inputs.path_lines(paths, alphas, betas, values), three_d=False)
        ax.set(title=panel_title, xlabel=xlabel)
        _plane_axes(ax)
    axes[0].set_ylabel(ylabel)
    _colorbar(fig, mesh, axes, colors)
    _suptitle(fig, title, colors.note)
    _legend_below(fig, axes)
    return fig


@_twin_of(figures.path_figure)
def path_figure(profiles, *, title, log_y, xlabel, ylabel) -> Figure:
    """Static twin of :func:`riverscape.report.figures.path_figure`."""
    rows = inputs.profile_rows(profiles)
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    all_losses = []
    for index, (label, t, loss, quantized) in enumerate(rows):
        color = color_for(label, index)
        for values, name, style in ((loss, inputs.FP_NAME, "-"), (quantized, inputs.QUANT_NAME, "--")):
            if values is not None:
                all_losses.append(values)
                ax.plot(t, values, style, color=color, lw=2, label=f"{label}: {name}")
    log_y, note = inputs.choose_log_axis(log_y, inputs.wants_log(*all_losses), *all_losses)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel + (" (log scale)" if log_y else ""), title=title)
    _suptitle(fig, None, note)
    _legend_below(fig, ax, ncols=2)
    return fig


@_twin_of(figures.spectrum_figure)
def spectrum_figure(eigs, *, title, log_y, ylabel) -> Figure:
    """Static twin of :func:`riverscape.report.figures.spectrum_figure`."""
    rows = inputs.spectrum_rows(eigs)
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for index, (label, values) in enumerate(rows):
        ax.plot(np.arange(1, values.size + 1), values, "-", lw=1, color=color_for(label, index), marker=symbol_for(label, index, matplotlib=True), ms=7, label=label)
    all_values = np.concatenate([v for _, v in rows]) if rows else np.ones(1)
    log_y, note = inputs.choose_log_axis(log_y, bool(np.all(all_values > 0)), all_values, what="an eigenvalue")
    if log_y:
        ax.set_yscale("log")
    else:
        ax.axhline(0.0, color="#444", lw=0.8)
    _suptitle(fig, None, note)
    if max((v.size for _, v in rows), default=0) <= 20:
        ax.set_xticks(np.arange(1, max(v.size for _, v in rows) + 1))
    ax.set(xlabel="rank i (1 = largest)", ylabel=ylabel + (" (log scale)" if log_y else ""), title=title)
    _legend_below(fig, ax)
    return fig


@_twin_of(figures.density_figure)
def density_figure(densities, *, title, floor, xlabel) -> Figure:
    """Static twin of :func:`riverscape.report.figures.density_figure`."""
    rows = inputs.density_rows(densities)
    peak = max((float(np.nanmax(d)) for _, _, d in rows), default=1.0)
    bottom = floor * peak
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for index, (label, grid, density) in enumerate(rows):
        ax.plot(grid, np.maximum(density, bottom), color=color_for(label, index), lw=1.6, label=label)
    ax.set_yscale("log")
    ax.set_ylim(bottom, peak * 2)
    ax.set(xlabel=xlabel, ylabel="spectral density (log scale)", title=title)
    _legend_below(fig, ax)
    return fig


@_twin_of(figures.alignment_figure)
def alignment_figure(metrics, *, dim, title) -> Figure:
    """Static twin of :func:`riverscape.report.figures.alignment_figure`."""
    entries, names, width, nulls = inputs.alignment_layout(metrics, dim)
    fig = _figure(max(5.5, 1.6 * len(entries) + 2.5), 4.6)
    ax = fig.add_subplot()
    band_label = "isotropic null, 95 % band ±1.96/√d"
    for i, entry in enumerate(entries):
        if entry.band is not None:
            ax.fill_between([i - 0.45, i + 0.45], -entry.band, entry.band, color="#777", alpha=0.22, lw=0, label=band_label if i == 0 or band_label not in ax.get_legend_handles_labels()[1] else None)
    for k, name in enumerate(names):
        xs = [i + (k - len(names) / 2) * width for i, e in enumerate(entries) if name in e.cosines]
        ax.bar(xs, [e.cosines[name] for e in entries if name in e.cosines], width=width * 0.95, color=PALETTE[k], label=inputs.ALIGNMENT_NAMES[name], align="edge")
    if nulls:
        ax.errorbar(
            [i + len(names) / 2 * width + width / 2 for i, _ in nulls], [e.null_mean for _, e in nulls], yerr=[e.null_sd or 0.0 for _, e in nulls],
            fmt="D", color="black", ms=6, capsize=4, label="matched null of A(u_back): mean ± sd",
        )
    ax.axhline(0.0, color="#444", lw=0.8)
    ax.set_xticks(range(len(entries)), labels=[e.label for e in entries])
    ax.set_xlim(-0.55, len(entries) - 0.45)
    ax.grid(axis="x", visible=False)
    ax.set(ylabel="cosine A(u) = cos(−∇L(q), u)", title=title)
    _legend_below(fig, ax, ncols=2)
    return fig


@_twin_of(figures.accuracy_vs_bits_figure)
def accuracy_vs_bits_figure(rows, *, y, reference, reference_label, chance, title, ylabel) -> Figure:
    """Static twin of :func:`riverscape.report.figures.accuracy_vs_bits_figure`."""
    series = inputs.bits_series(rows, y)
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for index, (method, (bits, values)) in enumerate(series.items()):
        ax.plot(bits, values, "-", lw=2, color=color_for(method, index), marker=symbol_for(method, index, matplotlib=True), ms=8, label=method)
    for value, name, style in ((reference, reference_label, "--"), (chance, "chance", ":")):
        if value is not None:
            ax.axhline(value, color="#555", ls=style, lw=1.3, label=f"{name} ({value:.3g})")
    all_bits = sorted({b for bits, _ in series.values() for b in bits}, reverse=True)
    ax.set_xticks(all_bits, labels=[f"{b:g}" for b in all_bits])
    ax.invert_xaxis()
    ax.set(xlabel="bit-width (weights)", ylabel=ylabel or f"test {y}", title=title)
    _legend_below(fig, ax)
    return fig


@_twin_of(figures.qat_curve_figure)
def qat_curve_figure(history, *, fp_loss, fp_accuracy, title, log_y) -> Figure:
    """Static twin of :func:`riverscape.report.figures.qat_curve_figure`."""
    columns, steps = inputs.qat_history(history)
    has_flips = "flips" in columns
    fig = _figure(7.0, 5.6 if has_flips else 4.4)
    if has_flips:
        ax, ax_flips = fig.subplots(2, 1, sharex=True, height_ratios=[0.7, 0.3])
    else:
        ax, ax_flips = fig.add_subplot(), None
    ax.plot(steps, columns["quantized_loss"], color=PALETTE[1], lw=2, label="L(Q(θ_t)) (deployed)")
    if "latent_loss" in columns:
        ax.plot(steps, columns["latent_loss"], ":", color=PALETTE[0], lw=1.6, label="L(θ_t) (latent)")
    if fp_loss is not None:
        ax.axhline(fp_loss, color="#555", ls="--", lw=1.2, label="L(θ_fp)")
    loss_values = [columns[c] for c in ("quantized_loss", "latent_loss") if c in columns]
    log_y, note = inputs.choose_log_axis(log_y, inputs.wants_log(*loss_values), *loss_values)
    if log_y:
        ax.set_yscale("log")
    ax.set(ylabel="loss" + (" (log scale)" if log_y else ""), title=title)
    _suptitle(fig, None, note)
    if "accuracy" in columns:
        twin = ax.twinx()
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        twin.plot(steps, columns["accuracy"], color=PALETTE[2], lw=2, label="accuracy of Q(θ_t)")
        if fp_accuracy is not None:
            twin.axhline(fp_accuracy, color=PALETTE[2], ls="--", lw=1.2, label="accuracy of θ_fp")
        twin.set_ylabel("accuracy")
        axes = [ax, twin]
    else:
        axes = [ax]
    if ax_flips is not None:
        ax_flips.fill_between(steps, columns["flips"], color="black", alpha=0.12, lw=0)
        ax_flips.plot(steps, columns["flips"], color=PALETTE[6], lw=1.2, label="grid flips per step")
        ax_flips.set(xlabel="QAT step", ylabel="grid flips")
        axes.append(ax_flips)
    else:
        ax.set_xlabel("QAT step")
    _legend_below(fig, axes, ncols=3)
    return fig
