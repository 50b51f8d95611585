"""Interactive Plotly figures of riverscape results. They draw; they compute nothing.

Every function takes plain arrays, lists and dicts (or any object with the documented attributes,
see :mod:`.inputs`), never modifies them, and returns a ``plotly.graph_objects.Figure``. The
matplotlib twins with the same names and signatures live in :mod:`.static`.

Conventions: a 2D slice ``loss[i, j]`` is the loss at ``theta + alphas[i] d1 + betas[j] d2``;
``L(θ)`` is the full-precision loss and ``L(Q(θ))`` the loss of the quantized weights as a
function of the latent weights (docs/theory.md §1.4, "name which loss is differentiated").
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .inputs import (
    ALIGNMENT_NAMES,
    ALPHA_LABEL,
    BETA_LABEL,
    FIGURE_NAMES,
    FP_NAME,
    QAT_HISTORY_KEYS,
    QUANT_NAME,
    SLICE_KINDS,
    T_LABEL,
    ColorValues,
    alignment_layout,
    bits_series,
    choose_log_axis,
    density_rows,
    log_ticks,
    marker_points,
    path_lines,
    profile_rows,
    qat_history,
    slice_pair,
    slice_panel,
    spectrum_rows,
    wants_log,
)
from .theme import COLORSCALE, PALETTE, base_layout, color_for, symbol_for

__all__ = [*FIGURE_NAMES, "SLICE_KINDS", "QAT_HISTORY_KEYS"]


def _hover_text(loss: np.ndarray) -> np.ndarray:
    """Raw loss values as hover strings (the colour may be a log or an excess), transposed to (ny, nx)."""
    return np.vectorize(lambda v: f"{v:.5g}", otypes=[str])(loss.T)


def _title(title: str | None, note: str | None) -> str | None:
    """The figure title with ``note`` (e.g. why an axis is linear) as a small second line."""
    if not note:
        return title
    return f"{title}<br><sup>{note}</sup>" if title else f"<sup>{note}</sup>"


def _log_axis(*arrays: np.ndarray) -> dict[str, Any]:
    """A log axis labelled at 1-2-5 steps in data units (Plotly's default labels every minor tick)."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return dict(type="log")
    tickvals, ticktext = log_ticks(float(np.log10(values.min())), float(np.log10(values.max())))
    return dict(type="log", tickvals=[10**v for v in tickvals], ticktext=ticktext)


def _coloraxis(colors: ColorValues) -> dict[str, Any]:
    colorbar: dict[str, Any] = dict(title=dict(text=colors.title, side="right"), thickness=14, len=0.9)
    if colors.log:
        tickvals, ticktext = log_ticks(colors.zmin, colors.zmax)
        colorbar.update(tickvals=tickvals, ticktext=ticktext)
    return dict(colorscale=COLORSCALE, cmin=colors.zmin, cmax=colors.zmax, colorbar=colorbar)


def _contour(alphas, betas, values, loss, colors: ColorValues, ncontours: int, label: str) -> go.Contour:
    # Fixed levels (not autocontour) so panels sharing a colour axis also share their contour lines.
    size = (colors.zmax - colors.zmin) / ncontours
    return go.Contour(
        x=alphas,
        y=betas,
        z=values.T,
        coloraxis="coloraxis",
        autocontour=False,
        contours=dict(start=colors.zmin, end=colors.zmax, size=size, coloring="heatmap"),
        line=dict(width=0.5, color="rgba(255,255,255,0.45)"),
        text=_hover_text(loss),
        hovertemplate=f"α=%{{x:.4g}}<br>β=%{{y:.4g}}<br>{label}=%{{text}}<extra></extra>",
        name=label,
        showscale=False,
    )


def _surface(alphas, betas, values, loss, label: str) -> go.Surface:
    return go.Surface(
        x=alphas,
        y=betas,
        z=values.T,
        coloraxis="coloraxis",
        text=_hover_text(loss),
        hovertemplate=f"α=%{{x:.4g}}<br>β=%{{y:.4g}}<br>{label}=%{{text}}<extra></extra>",
        name=label,
        showscale=False,
    )


def _overlay_common(label: str, first_panel: bool, mode: str) -> dict[str, Any]:
    """Trace options shared by a marker or path in every panel: one legend entry per label."""
    hover = f"{label}<br>α=%{{x:.4g}}<br>β=%{{y:.4g}}<extra></extra>"
    return dict(name=label, legendgroup=label, showlegend=first_panel, mode=mode, hovertemplate=hover)


def _overlay_traces(markers, paths, *, three_d: bool, first_panel: bool) -> list[go.BaseTraceType]:
    """Paths (lines) then markers (on top), same colour/symbol per label in every panel."""
    traces: list[go.BaseTraceType] = []
    for index, (label, xs, ys, heights) in enumerate(paths):
        color = color_for(label, index + len(markers))
        common = _overlay_common(label, first_panel, "lines+markers")
        if three_d:
            traces.append(go.Scatter3d(x=xs, y=ys, z=heights, line=dict(color=color, width=5), marker=dict(size=2, color=color), **common))
        else:
            traces.append(go.Scatter(x=xs, y=ys, line=dict(color=color, width=2.5), marker=dict(size=4, color=color), **common))
    for index, (label, x, y, height) in enumerate(markers):
        color, symbol = color_for(label, index), symbol_for(label, index)
        common = _overlay_common(label, first_panel, "markers")
        if three_d:
            symbol3d = symbol if symbol in ("circle", "square", "diamond", "cross", "x") else "circle"
            traces.append(go.Scatter3d(x=[x], y=[y], z=[height], marker=dict(size=6, color=color, symbol=symbol3d, line=dict(color="white", width=1)), **common))
        else:
            size, outline = (19, 1.0) if symbol == "star" else (15, 1.5)  # a thin star needs more area than its outline
            traces.append(go.Scatter(x=[x], y=[y], marker=dict(size=size, color=color, symbol=symbol, line=dict(color="white", width=outline)), **common))
    return traces


def _scene(colors: ColorValues, xlabel: str, ylabel: str) -> dict[str, Any]:
    zaxis: dict[str, Any] = dict(title=dict(text=colors.title))
    if colors.log:
        tickvals, ticktext = log_ticks(colors.zmin, colors.zmax, max_ticks=5)
        zaxis.update(tickvals=tickvals, ticktext=ticktext, title=dict(text=colors.title + " (log)"))
    return dict(
        xaxis=dict(title=dict(text=xlabel.split(" (")[0])),
        yaxis=dict(title=dict(text=ylabel.split(" (")[0])),
        zaxis=zaxis,
        aspectmode="manual",
        aspectratio=dict(x=1, y=1, z=0.6),
        camera=dict(eye=dict(x=1.15, y=-1.15, z=0.8)),
    )


def slice_figure(
    alphas: Any,
    betas: Any,
    loss: Any,
    *,
    markers: Mapping[str, Sequence[float]] | None = None,
    paths: Mapping[str, Sequence[Any]] | None = None,
    title: str | None = None,
    log: bool = True,
    subtract_min: bool = False,
    kind: Literal["contour", "surface", "both"] = "contour",
    xlabel: str = ALPHA_LABEL,
    ylabel: str = BETA_LABEL,
    label: str = "loss",
    ncontours: int = 24,
) -> go.Figure:
    """Contour and/or 3-D surface of a 2D loss slice with points and paths drawn on it.

    Parameters
    ----------
    alphas : (nx,) coefficients along direction 1.
    betas : (ny,) coefficients along direction 2.
    loss : (nx, ny) ``loss[i, j]`` at ``(alphas[i], betas[j])``; non-finite values are left blank.
    markers : ``{label: (x, y)}`` or ``{label: (x, y, height)}`` (e.g. θ_fp, Q(θ_fp), QAT points).
        On a surface a marker without height sits on the nearest grid node.
    paths : ``{label: (xs, ys)}`` or ``(xs, ys, heights)`` (e.g. the QAT trajectory projected on the plane).
    log : colour (and surface height) = log10 of the loss; quantized slices span decades. A loss
        that reaches 0 or is negative is drawn on a linear scale instead, and the figure says so.
    subtract_min : use ``loss - min`` (with ``log``: log10 of the excess loss, see :func:`.inputs.color_values`).
    kind : ``"contour"``, ``"surface"`` or ``"both"`` (side by side).
    label : name of the loss in hover texts and on the colour bar (e.g. ``"cross-entropy"``).

    Returns
    -------
    plotly.graph_objects.Figure with one contour/surface trace per panel on the colour axis
    ``coloraxis``, then one trace per path and per marker (named by its label).
    """
    panel = slice_panel(alphas, betas, loss, markers=markers, paths=paths, log=log, subtract_min=subtract_min, label=label, kind=kind)
    alphas, betas, loss, colors, values = panel.alphas, panel.betas, panel.loss, panel.colors, panel.values
    if kind == "both":
        fig = make_subplots(rows=1, cols=2, specs=[[{"type": "xy"}, {"type": "scene"}]], horizontal_spacing=0.1)
        panels = [(1, False), (2, True)]
    else:
        fig = go.Figure()
        panels = [(None, kind == "surface")]
    for col, three_d in panels:
        base = _surface(alphas, betas, values, loss, label) if three_d else _contour(alphas, betas, values, loss, colors, ncontours, label)
        overlays = _overlay_traces(panel.points, panel.lines, three_d=three_d, first_panel=col in (None, 1))
        for trace in [base, *overlays]:
            fig.add_trace(trace, row=1 if col else None, col=col)
    fig.update_layout(**base_layout(_title(title, colors.note), height=560 if kind == "both" else 500), coloraxis=_coloraxis(colors))
    if kind != "surface":
        fig.update_xaxes(title_text=xlabel, showgrid=False, zeroline=False)
        fig.update_yaxes(title_text=ylabel, showgrid=False, zeroline=False)
    if kind != "contour":
        fig.update_scenes(**_scene(colors, xlabel, ylabel))
    return fig


def side_by_side_slices(
    alphas: Any,
    betas: Any,
    fp_loss: Any,
    quantized_loss: Any,
    *,
    markers: Mapping[str, Sequence[float]] | None = None,
    paths: Mapping[str, Sequence[Any]] | None = None,
    titles: tuple[str, str] = ("L(θ): full precision", "L(Q(θ)): quantized"),
    title: str | None = None,
    log: bool = True,
    subtract_min: bool = False,
    xlabel: str = ALPHA_LABEL,
    ylabel: str = BETA_LABEL,
    label: str = "loss",
    ncontours: int = 24,
) -> go.Figure:
    """The full-precision and the quantized slice side by side on ONE colour scale.

    Both contours use the colour axis ``coloraxis`` whose ``cmin``/``cmax`` are the global min/max of
    both (transformed) grids, and the same contour levels, so equal colours mean equal losses.
    Arguments as in :func:`slice_figure`; ``fp_loss`` and ``quantized_loss`` are (nx, ny) on the
    same ``alphas`` x ``betas`` grid. With ``subtract_min`` the common minimum of both grids is subtracted.
    """
    alphas, betas, fp_loss, quantized_loss, colors = slice_pair(alphas, betas, fp_loss, quantized_loss, log=log, subtract_min=subtract_min, label=label)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=list(titles), horizontal_spacing=0.05)
    for col, (values, raw) in enumerate(zip(colors.grids, (fp_loss, quantized_loss)), start=1):
        points = marker_points(markers, alphas, betas, values)
        lines = path_lines(paths, alphas, betas, values)
        fig.add_trace(_contour(alphas, betas, values, raw, colors, ncontours, label), row=1, col=col)
        for trace in _overlay_traces(points, lines, three_d=False, first_panel=col == 1):
            fig.add_trace(trace, row=1, col=col)
    fig.update_layout(**base_layout(_title(title, colors.note), height=500, subplot_titles=True), coloraxis=_coloraxis(colors))
    fig.update_xaxes(title_text=xlabel, showgrid=False, zeroline=False)
    fig.update_yaxes(title_text=ylabel, showgrid=False, zeroline=False, row=1, col=1)
    fig.update_yaxes(showgrid=False, zeroline=False, row=1, col=2)
    return fig


def path_figure(
    profiles: Mapping[str, Any],
    *,
    title: str | None = None,
    log_y: bool | None = None,
    xlabel: str = T_LABEL,
    ylabel: str = "loss",
) -> go.Figure:
    """Loss along paths: ``L(θ)`` solid, ``L(Q(θ))`` dashed, one colour per path.

    Parameters
    ----------
    profiles : ``{label: (t (n,), loss (n,)[, quantized_loss (n,)])}`` or objects with attributes
        ``t``, ``loss`` and optionally ``quantized_loss``.
    log_y : log loss axis; ``None`` chooses it when all losses are positive and span > 30x. A
        requested log axis falls back to a linear one, noted on the figure, if a loss is <= 0.
    """
    rows = profile_rows(profiles)
    fig = go.Figure()
    all_losses = []
    for index, (label, t, loss, quantized) in enumerate(rows):
        color = color_for(label, index)
        for values, name, dash in ((loss, FP_NAME, "solid"), (quantized, QUANT_NAME, "dash")):
            if values is None:
                continue
            all_losses.append(values)
            fig.add_trace(
                go.Scatter(
                    x=t,
                    y=values,
                    mode="lines",
                    name=f"{label}: {name}",
                    legendgroup=label,
                    line=dict(color=color, width=2.4, dash=dash),
                    hovertemplate=f"{label}, {name}<br>t=%{{x:.3g}}<br>{ylabel}=%{{y:.5g}}<extra></extra>",
                )
            )
    log_y, note = choose_log_axis(log_y, wants_log(*all_losses), *all_losses)
    fig.update_layout(**base_layout(_title(title, note), height=440), hovermode="x unified")
    fig.update_xaxes(title_text=xlabel)
    fig.update_yaxes(title_text=ylabel + (" (log scale)" if log_y else ""), **(_log_axis(*all_losses) if log_y else {}))
    return fig


def spectrum_figure(
    eigs: Mapping[str, Any],
    *,
    title: str | None = None,
    log_y: bool | None = None,
    ylabel: str = "Hessian eigenvalue λᵢ",
) -> go.Figure:
    """Top-k Hessian eigenvalues by rank, one marker series per point (e.g. θ_fp vs Q(θ_fp)).

    Parameters
    ----------
    eigs : ``{label: eigenvalues (k,)}`` (any order; drawn in descending order, rank 1 = largest),
        or objects with an ``eigenvalues``/``values`` attribute.
    log_y : log axis; ``None`` uses it when every eigenvalue is positive (a requested log axis
        falls back to a linear one, noted on the figure, otherwise).
    """
    rows = spectrum_rows(eigs)
    fig = go.Figure()
    for index, (label, values) in enumerate(rows):
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, values.size + 1),
                y=values,
                mode="lines+markers",
                name=label,
                line=dict(color=color_for(label, index), width=1.2),
                marker=dict(color=color_for(label, index), symbol=symbol_for(label, index), size=9),
                hovertemplate=f"{label}<br>rank %{{x}}<br>λ=%{{y:.5g}}<extra></extra>",
            )
        )
    all_values = np.concatenate([v for _, v in rows]) if rows else np.ones(1)
    log_y, note = choose_log_axis(log_y, bool(np.all(all_values > 0)), all_values, what="an eigenvalue")
    fig.update_layout(**base_layout(_title(title, note), height=420))
    longest = max((v.size for _, v in rows), default=0)
    fig.update_xaxes(title_text="rank i (1 = largest)", dtick=1 if longest <= 20 else None, range=[0.5, longest + 0.5])
    fig.update_yaxes(title_text=ylabel + (" (log scale)" if log_y else ""), zeroline=not log_y, **(_log_axis(all_values) if log_y else {}))
    return fig


def density_figure(
    densities: Mapping[str, Any],
    *,
    title: str | None = None,
    floor: float = 1e-8,
    xlabel: str = "eigenvalue λ",
) -> go.Figure:
    """Spectral densities (SLQ) on a log density axis, as in Ghorbani et al. 2019 / PyHessian.

    Parameters
    ----------
    densities : ``{label: (grid (n,), density (n,))}`` or objects with ``grid`` and ``density``.
    floor : densities below ``floor * max density`` are drawn at that floor (a log axis cannot show 0).
    """
    rows = density_rows(densities)
    peak = max((float(np.nanmax(d)) for _, _, d in rows), default=1.0)
    bottom = floor * peak
    fig = go.Figure()
    for index, (label, grid, density) in enumerate(rows):
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=np.maximum(density, bottom),
                mode="lines",
                name=label,
                line=dict(color=color_for(label, index), width=2),
                hovertemplate=f"{label}<br>λ=%{{x:.4g}}<br>density=%{{y:.3g}}<extra></extra>",
            )
        )
    fig.update_layout(**base_layout(title, height=420))
    fig.update_xaxes(title_text=xlabel)
    fig.update_yaxes(title_text="spectral density (log scale)", type="log", range=[np.log10(bottom), np.log10(peak) + 0.3], exponentformat="power")
    return fig


def alignment_figure(
    metrics: Mapping[str, Mapping[str, Any]],
    *,
    dim: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Gradient alignment cosines at quantized points against both null models (docs/theory.md §7.2-§7.4).

    For each labelled point, bars show A(u_back), A(u_hill), A(u_river) (cosine between -∇L(q) and the
    basin direction); a grey band shows the isotropic 95 % range ±1.96/√d and a black marker with
    error bar the matched-perturbation null mean ± sd (the comparison for A(u_back)).

    Parameters
    ----------
    metrics : ``{label: dict}`` with keys ``cosine_to_fp`` (or ``A_back``), ``cosine_hill``, ``cosine_river``,
        ``null_mean``, ``null_sd``, and ``dim``/``d`` or ``random_baseline`` (= 1/√d); missing ones are skipped.
    dim : parameter count d, overriding the dicts.
    """
    entries, names, width, nulls = alignment_layout(metrics, dim)
    offsets = {name: (k - len(names) / 2) * width for k, name in enumerate(names)}
    null_offset = len(names) / 2 * width
    fig = go.Figure()
    shown_band = False
    for i, entry in enumerate(entries):
        if entry.band is not None:
            x0, x1 = i - 0.45, i + 0.45
            fig.add_trace(
                go.Scatter(
                    x=[x0, x1, x1, x0, x0],
                    y=[-entry.band, -entry.band, entry.band, entry.band, -entry.band],
                    fill="toself",
                    fillcolor="rgba(120,120,120,0.22)",
                    line=dict(width=0),
                    mode="lines",
                    name="isotropic null, 95 % band ±1.96/√d",
                    legendgroup="band",
                    showlegend=not shown_band,
                    hovertemplate=f"isotropic 95 % band: ±{entry.band:.3g}<extra></extra>",
                )
            )
            shown_band = True
    for k, name in enumerate(names):
        xs = [i + offsets[name] for i, e in enumerate(entries) if name in e.cosines]
        ys = [e.cosines[name] for e in entries if name in e.cosines]
        labels = [e.label for e in entries if name in e.cosines]
        fig.add_trace(
            go.Bar(
                x=xs,
                y=ys,
                width=width * 0.95,
                name=ALIGNMENT_NAMES[name],
                marker=dict(color=PALETTE[k]),
                customdata=labels,
                hovertemplate=f"%{{customdata}}<br>{ALIGNMENT_NAMES[name]}=%{{y:.4f}}<extra></extra>",
            )
        )
    if nulls:
        fig.add_trace(
            go.Scatter(
                x=[i + null_offset for i, _ in nulls],
                y=[e.null_mean for _, e in nulls],
                error_y=dict(type="data", array=[e.null_sd or 0.0 for _, e in nulls], thickness=2, width=6, color="#000"),
                mode="markers",
                marker=dict(color="#000", symbol="diamond", size=10),
                name="matched null of A(u_back): mean ± sd",
                customdata=[e.label for _, e in nulls],
                hovertemplate="%{customdata}<br>matched null mean=%{y:.4f}<extra></extra>",
            )
        )
    fig.update_layout(**base_layout(title, height=460), barmode="overlay", bargap=0)
    fig.update_xaxes(
        tickvals=list(range(len(entries))), ticktext=[e.label for e in entries], range=[-0.55, len(entries) - 0.45], showgrid=False
    )
    fig.update_yaxes(title_text="cosine A(u) = cos(−∇L(q), u)", zeroline=True, zerolinecolor="#444", zerolinewidth=1)
    return fig


def accuracy_vs_bits_figure(
    rows: Sequence[Mapping[str, Any]],
    *,
    y: str = "accuracy",
    reference: float | None = None,
    reference_label: str = "full precision",
    chance: float | None = None,
    title: str | None = None,
    ylabel: str | None = None,
) -> go.Figure:
    """Metric vs bit-width per method ("PTQ cliff vs QAT recovery"); bits decrease to the right.

    Parameters
    ----------
    rows : dicts with keys ``method`` (e.g. "PTQ", "QAT"), ``bits`` and ``y``.
    y : the key to plot (``"accuracy"``, ``"loss"``, ...).
    reference : value of the full-precision model, drawn as a dashed horizontal line.
    chance : chance level (e.g. 0.1 for 10 classes), drawn as a dotted line.
    """
    series = bits_series(rows, y)
    fig = go.Figure()
    for index, (method, (bits, values)) in enumerate(series.items()):
        fig.add_trace(
            go.Scatter(
                x=bits,
                y=values,
                mode="lines+markers",
                name=method,
                line=dict(color=color_for(method, index), width=2.4),
                marker=dict(color=color_for(method, index), symbol=symbol_for(method, index), size=10),
                hovertemplate=f"{method}<br>%{{x:g}} bits<br>{y}=%{{y:.4g}}<extra></extra>",
            )
        )
    all_bits = sorted({b for bits, _ in series.values() for b in bits}, reverse=True)
    for value, name, dash in ((reference, reference_label, "dash"), (chance, "chance", "dot")):
        if value is not None:  # a legend entry, not an annotation: never drawn over the curves
            fig.add_trace(
                go.Scatter(
                    x=[all_bits[0], all_bits[-1]], y=[value, value], mode="lines", name=f"{name} ({value:.3g})",
                    line=dict(color="#555", dash=dash, width=1.5), hovertemplate=f"{name}: {value:.4g}<extra></extra>",
                )
            )
    fig.update_layout(**base_layout(title, height=420))
    fig.update_xaxes(title_text="bit-width (weights)", autorange="reversed", tickvals=all_bits, ticktext=[f"{b:g}" for b in all_bits])
    fig.update_yaxes(title_text=ylabel or f"test {y}")
    return fig


def qat_curve_figure(
    history: Any,
    *,
    fp_loss: float | None = None,
    fp_accuracy: float | None = None,
    title: str | None = None,
    log_y: bool | None = None,
) -> go.Figure:
    """QAT progress: ``L(Q(θ_t))`` and accuracy vs step; rounding-grid flips per step in a lower panel.

    Parameters
    ----------
    history : dict of arrays, list of row dicts or object with attributes; columns (aliases in
        :data:`QAT_HISTORY_KEYS`): ``step``, ``quantized_loss`` (required), ``latent_loss``, ``accuracy``, ``flips``.
    fp_loss, fp_accuracy : full-precision reference values (dashed lines).
    log_y : log loss axis; ``None`` chooses it when the loss spans > 30x (a requested log axis
        falls back to a linear one, noted on the figure, if a loss is <= 0).
    """
    columns, steps = qat_history(history)
    has_flips = "flips" in columns
    fig = make_subplots(
        rows=2 if has_flips else 1,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.7, 0.3] if has_flips else None,
        vertical_spacing=0.06,
        specs=[[{"secondary_y": True}]] + ([[{}]] if has_flips else []),
    )
    loss_color, latent_color, acc_color, flip_color = PALETTE[1], PALETTE[0], PALETTE[2], PALETTE[6]
    fig.add_trace(go.Scatter(x=steps, y=columns["quantized_loss"], name="L(Q(θ_t)) (deployed)", line=dict(color=loss_color, width=2.2)), row=1, col=1)
    if "latent_loss" in columns:
        fig.add_trace(go.Scatter(x=steps, y=columns["latent_loss"], name="L(θ_t) (latent)", line=dict(color=latent_color, width=1.6, dash="dot")), row=1, col=1)
    if fp_loss is not None:
        fig.add_trace(go.Scatter(x=[steps[0], steps[-1]], y=[fp_loss, fp_loss], mode="lines", name="L(θ_fp)", line=dict(color="#555", dash="dash", width=1.3)), row=1, col=1)
    if "accuracy" in columns:
        fig.add_trace(go.Scatter(x=steps, y=columns["accuracy"], name="accuracy of Q(θ_t)", line=dict(color=acc_color, width=2.2)), row=1, col=1, secondary_y=True)
        if fp_accuracy is not None:
            fig.add_trace(
                go.Scatter(x=[steps[0], steps[-1]], y=[fp_accuracy, fp_accuracy], mode="lines", name="accuracy of θ_fp", line=dict(color=acc_color, dash="dash", width=1.3)),
                row=1,
                col=1,
                secondary_y=True,
            )
    if has_flips:
        fig.add_trace(go.Scatter(x=steps, y=columns["flips"], name="grid flips per step", mode="lines", line=dict(color=flip_color, width=1.4), fill="tozeroy", fillcolor="rgba(0,0,0,0.12)"), row=2, col=1)
        fig.update_yaxes(title_text="grid flips", row=2, col=1)
    loss_values = [columns[c] for c in ("quantized_loss", "latent_loss") if c in columns]
    log_y, note = choose_log_axis(log_y, wants_log(*loss_values), *loss_values)
    fig.update_layout(**base_layout(_title(title, note), height=560 if has_flips else 440), hovermode="x unified")
    fig.update_yaxes(title_text="loss" + (" (log scale)" if log_y else ""), row=1, col=1, secondary_y=False, **(_log_axis(*loss_values) if log_y else {}))
    if "accuracy" in columns:  # tickmode "auto": Plotly would otherwise sync these ticks to the log loss grid
        fig.update_yaxes(title_text="accuracy", row=1, col=1, secondary_y=True, showgrid=False, tickmode="auto")
    fig.update_xaxes(title_text="QAT step", row=2 if has_flips else 1, col=1)
    return fig
