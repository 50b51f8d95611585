"""Normalise what the figures receive: arrays, dicts, or result objects (duck typing).

The Plotly figures (:mod:`.figures`) and their matplotlib twins (:mod:`.static`) draw the same
things from the same inputs; every check and every presentation transform (log colour values,
nearest-node heights, column aliases) lives here once. Nothing here modifies its inputs: arrays
are read with ``np.asarray`` and every transform returns a new array.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "FIGURE_NAMES",
    "SLICE_KINDS",
    "QAT_HISTORY_KEYS",
    "check_kind",
    "SlicePanel",
    "slice_panel",
    "slice_pair",
    "qat_history",
    "alignment_layout",
    "slice_arrays",
    "check_slice",
    "ColorValues",
    "color_values",
    "log_ticks",
    "marker_points",
    "path_lines",
    "profile_rows",
    "spectrum_rows",
    "density_rows",
    "AlignmentEntry",
    "alignment_entries",
    "history_columns",
    "bits_series",
    "wants_log",
    "log_fallback",
    "choose_log_axis",
]


#: the figure functions: same names and arguments in :mod:`.figures` (Plotly) and :mod:`.static` (matplotlib)
FIGURE_NAMES = (
    "slice_figure",
    "side_by_side_slices",
    "path_figure",
    "spectrum_figure",
    "density_figure",
    "alignment_figure",
    "accuracy_vs_bits_figure",
    "qat_curve_figure",
)
SLICE_KINDS = ("contour", "surface", "both")
ALPHA_LABEL = "α (coefficient along direction 1)"
BETA_LABEL = "β (coefficient along direction 2)"
T_LABEL = "path parameter t (0 = start, 1 = end)"
FP_NAME, QUANT_NAME = "L(θ)", "L(Q(θ))"
ALIGNMENT_NAMES = {"back": "A(u_back): toward θ_fp", "hill": "A(u_hill): top-k part", "river": "A(u_river): bulk part"}
#: accepted names of the columns of a QAT history (first found wins)
QAT_HISTORY_KEYS: dict[str, tuple[str, ...]] = {
    "step": ("step", "steps", "t"),
    "quantized_loss": ("quantized_loss", "loss_q", "L_q"),
    "latent_loss": ("latent_loss", "loss"),
    "accuracy": ("quantized_accuracy", "accuracy", "metric", "acc"),
    "flips": ("flips", "grid_flips", "n_flips"),
}


def _array(values: Any, name: str, ndim: int) -> np.ndarray:
    """``values`` as a float64 array of ``ndim`` dimensions (torch tensors and lists accepted)."""
    if hasattr(values, "detach"):  # torch.Tensor without importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {array.shape}")
    return array


# ------------------------------------------------------------------------------------- slices
def slice_arrays(result: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(alphas (nx,), betas (ny,), loss (nx, ny))`` of any object with those attributes."""
    missing = [a for a in ("alphas", "betas", "loss") if not hasattr(result, a)]
    if missing:
        raise ValueError(f"a slice result needs attributes alphas, betas, loss; {type(result).__name__} lacks {missing}")
    return check_slice(result.alphas, result.betas, result.loss)


def check_slice(alphas: Any, betas: Any, loss: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a 2D slice: ``loss[i, j]`` is the loss at ``(alphas[i], betas[j])``.

    Returns
    -------
    alphas : (nx,), betas : (ny,), loss : (nx, ny) float64 arrays.
    """
    a, b, z = _array(alphas, "alphas", 1), _array(betas, "betas", 1), _array(loss, "loss", 2)
    if z.shape != (a.size, b.size):
        raise ValueError(f"loss must have shape (len(alphas), len(betas)) = {(a.size, b.size)}, got {z.shape}")
    if a.size < 2 or b.size < 2:
        raise ValueError("a slice needs at least 2 values of alpha and beta")
    return a, b, z


@dataclass(frozen=True)
class ColorValues:
    """Loss grids mapped to colour values on one common scale.

    Attributes
    ----------
    grids : the transformed grids, same shapes as the inputs (non-finite entries are NaN).
    zmin, zmax : common colour range (global min/max of all transformed grids).
    title : colour bar title (says what the colour encodes).
    log : whether values are log10 of the loss (or of the excess loss).
    note : why a requested log scale was replaced by a linear one (``None`` if it was not);
        figures show it on the figure.
    """

    grids: tuple[np.ndarray, ...]
    zmin: float
    zmax: float
    title: str
    log: bool
    note: str | None = None


def log_fallback(*arrays: Any, what: str = "the loss") -> str | None:
    """Why a log axis cannot show these values (``None`` if it can): the text a figure displays.

    ``"linear axis: the loss reaches 0"`` when the smallest finite value is exactly 0,
    ``"linear axis: the loss is negative"`` when it is below 0.
    """
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays]) if arrays else np.empty(0)
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() > 0:
        return None
    return f"linear axis: {what} {'reaches 0' if values.min() == 0 else 'is negative'}"


def choose_log_axis(requested: bool | None, auto: bool, *arrays: Any, what: str = "the loss") -> tuple[bool, str | None]:
    """``(log axis?, note)`` for a 1-D figure's value axis.

    ``requested=None`` takes the figure's automatic choice ``auto`` (which never picks a log axis
    for non-positive values). A requested log axis falls back to a linear one, with the
    :func:`log_fallback` note, when a value is zero or negative.
    """
    if requested is None:
        return bool(auto), None
    if requested:
        note = log_fallback(*arrays, what=what)
        return note is None, note
    return False, None


def color_values(
    losses: Sequence[np.ndarray], *, log: bool, subtract_min: bool, label: str = "loss", fallback: bool = False
) -> ColorValues:
    """Colour values of one or more loss grids on a common scale.

    ``log``: colour = log10(L). ``subtract_min``: colour = L - min (the minimum over *all* grids, so
    side-by-side panels stay comparable); with both, log10(L - min) where zero excesses (the minimum
    itself, or a flat quantized plateau at the minimum) are drawn at half the smallest positive
    excess, the bottom of the colour scale. Quantized landscapes span orders of magnitude, so the log
    scale is the default everywhere.

    A loss that reaches 0 or goes negative has no log10: with ``log`` (and not ``subtract_min``)
    that raises ``ValueError``, unless ``fallback`` is set, in which case the colour is the loss
    itself on a linear scale and ``note`` says why (the figures always set ``fallback``).
    """
    grids = [np.where(np.isfinite(g), g, np.nan) for g in losses]
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    if finite.size == 0:
        raise ValueError("the loss grid has no finite value to draw")
    reference = float(finite.min()) if subtract_min else 0.0
    shifted = [g - reference for g in grids]
    name = f"{label} − min" if subtract_min else label
    if log:
        positive = finite - reference
        positive = positive[positive > 0]
        if subtract_min:
            floor = 0.5 * float(positive.min()) if positive.size else 1e-12
            shifted = [np.where(s > 0, s, np.where(np.isnan(s), np.nan, floor)) for s in shifted]
        elif positive.size < (finite - reference).size:
            note = log_fallback(finite, what=label)
            if not fallback:
                raise ValueError("log=True needs a positive loss; use subtract_min=True (log of L - min) or log=False")
            return _color_range(shifted, name, log=False, note=note)
        transformed = [np.log10(s) for s in shifted]
    else:
        transformed = shifted
    return _color_range(transformed, name, log=log)


def _color_range(transformed: Sequence[np.ndarray], title: str, *, log: bool, note: str | None = None) -> ColorValues:
    values = np.concatenate([t[np.isfinite(t)] for t in transformed])
    zmin, zmax = float(values.min()), float(values.max())
    if zmax == zmin:  # a constant grid still needs a non-empty colour range
        zmin, zmax = zmin - 0.5, zmax + 0.5
    return ColorValues(tuple(transformed), zmin, zmax, title, log, note)


def log_ticks(zmin: float, zmax: float, max_ticks: int = 8) -> tuple[list[float], list[str]]:
    """Tick positions (in log10 units) and labels (in loss units) for a log colour bar.

    Uses 1-2-5 steps per decade when the range spans few decades, whole decades otherwise.
    """
    lo, hi = math.floor(zmin), math.ceil(zmax)
    for mantissas in ((1, 2, 5), (1, 3), (1,)):
        values = [math.log10(m) + e for e in range(lo, hi + 1) for m in mantissas]
        ticks = [v for v in values if zmin - 1e-9 <= v <= zmax + 1e-9]
        if len(ticks) <= max_ticks:
            break
    step = max(1, math.ceil(len(ticks) / max_ticks))
    ticks = ticks[::step]
    return ticks, [f"{10 ** v:.3g}" for v in ticks]


def _nearest_height(x: float, y: float, alphas: np.ndarray, betas: np.ndarray, z: np.ndarray) -> float:
    i, j = int(np.abs(alphas - x).argmin()), int(np.abs(betas - y).argmin())
    return float(z[i, j])


def marker_points(
    markers: Mapping[str, Sequence[float]] | None, alphas: np.ndarray, betas: np.ndarray, z: np.ndarray
) -> list[tuple[str, float, float, float]]:
    """``[(label, x, y, height)]``: markers given as ``(x, y)`` or ``(x, y, height)``.

    ``height`` (for 3-D surfaces) is the given third value, else the colour value ``z`` at the
    nearest grid node.
    """
    rows = []
    for label, point in (markers or {}).items():
        p = _array(point, f"marker {label!r}", 1)
        if p.size not in (2, 3):
            raise ValueError(f"marker {label!r} must be (x, y) or (x, y, height), got {p.size} values")
        height = p[2] if p.size == 3 else _nearest_height(p[0], p[1], alphas, betas, z)
        rows.append((str(label), float(p[0]), float(p[1]), float(height)))
    return rows


def path_lines(
    paths: Mapping[str, Sequence[Any]] | None, alphas: np.ndarray, betas: np.ndarray, z: np.ndarray
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``[(label, xs, ys, heights)]``: paths given as ``(xs, ys)`` or ``(xs, ys, heights)``."""
    rows = []
    for label, path in (paths or {}).items():
        if len(path) not in (2, 3):
            raise ValueError(f"path {label!r} must be (xs, ys) or (xs, ys, heights)")
        xs, ys = _array(path[0], f"path {label!r} xs", 1), _array(path[1], f"path {label!r} ys", 1)
        if xs.shape != ys.shape:
            raise ValueError(f"path {label!r}: xs and ys differ in length ({xs.size} vs {ys.size})")
        if len(path) == 3:
            heights = _array(path[2], f"path {label!r} heights", 1)
        else:
            heights = np.array([_nearest_height(x, y, alphas, betas, z) for x, y in zip(xs, ys)])
        rows.append((str(label), xs, ys, heights))
    return rows


# ---------------------------------------------------------------------------- 1-D quantities
def profile_rows(profiles: Mapping[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """``[(label, t, loss, quantized_loss or None)]`` from tuples or objects with ``t, loss[, quantized_loss]``."""
    rows = []
    for label, profile in profiles.items():
        if hasattr(profile, "t") and hasattr(profile, "loss"):
            t, loss, q = profile.t, profile.loss, getattr(profile, "quantized_loss", None)
        elif isinstance(profile, (tuple, list)) and len(profile) in (2, 3):
            t, loss, q = profile[0], profile[1], profile[2] if len(profile) == 3 else None
        else:
            raise ValueError(f"profile {label!r} must be (t, loss[, quantized_loss]) or have attributes t, loss")
        t, loss = _array(t, f"{label} t", 1), _array(loss, f"{label} loss", 1)
        q = None if q is None else _array(q, f"{label} quantized_loss", 1)
        if loss.shape != t.shape or (q is not None and q.shape != t.shape):
            raise ValueError(f"profile {label!r}: t, loss and quantized_loss must have the same length")
        rows.append((str(label), t, loss, q))
    return rows


def spectrum_rows(eigs: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """``[(label, eigenvalues sorted in descending order)]`` from arrays or objects with ``.values``/``.eigenvalues``."""
    rows = []
    for label, values in eigs.items():
        for attribute in ("eigenvalues", "values"):
            candidate = getattr(values, attribute, None)
            if candidate is not None and not callable(candidate):
                values = candidate
                break
        rows.append((str(label), np.sort(_array(values, f"{label} eigenvalues", 1))[::-1]))
    return rows


def density_rows(densities: Mapping[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(label, grid, density)]`` from ``(grid, density)`` tuples or objects with ``grid, density``."""
    rows = []
    for label, item in densities.items():
        grid, density = (item.grid, item.density) if hasattr(item, "density") else item
        grid, density = _array(grid, f"{label} grid", 1), _array(density, f"{label} density", 1)
        if grid.shape != density.shape:
            raise ValueError(f"density {label!r}: grid and density must have the same length")
        rows.append((str(label), grid, density))
    return rows


def wants_log(*arrays: np.ndarray, span: float = 30.0) -> bool:
    """True when all finite values are positive and max/min exceeds ``span`` (log axis readable, linear not)."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    return bool(values.size and values.min() > 0 and values.max() / values.min() > span)


# -------------------------------------------------------------------------------- alignment
_ALIASES = {
    "back": ("cosine_to_fp", "cosine_back", "A_back"),
    "hill": ("cosine_hill", "A_hill"),
    "river": ("cosine_river", "A_river"),
}


@dataclass(frozen=True)
class AlignmentEntry:
    """Alignment cosines of one quantized point with its two null models (docs/theory.md §7.2-§7.4)."""

    label: str
    cosines: dict[str, float]  # "back"/"hill"/"river" -> A(u), only those present
    band: float | None  # half width of the isotropic 95 % band, 1.96 / sqrt(d)
    null_mean: float | None
    null_sd: float | None


def _first(metrics: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        if metrics.get(key) is not None:
            return float(metrics[key])
    return None


def alignment_entries(metrics: Mapping[str, Any], dim: int | None = None) -> list[AlignmentEntry]:
    """Read alignment metric dicts (keys ``cosine_to_fp``/``A_back``, ``cosine_hill``, ``cosine_river``, nulls)
    or result objects with ``to_dict()``.

    The isotropic band is ``1.96 / sqrt(d)`` with ``d`` from ``dim`` (argument), else the dict's
    ``dim``/``d`` key, else ``1.96 * random_baseline`` where ``random_baseline`` is the rms of the
    isotropic null, ``1/sqrt(d)``.
    """
    entries = []
    for label, m in metrics.items():
        if not isinstance(m, Mapping) and callable(getattr(m, "to_dict", None)):  # e.g. an AlignmentResult
            m = m.to_dict()
        cosines = {name: v for name, keys in _ALIASES.items() if (v := _first(m, keys)) is not None}
        if not cosines:
            raise ValueError(f"alignment {label!r} has none of the keys {sorted(k for ks in _ALIASES.values() for k in ks)}")
        d = dim if dim is not None else _first(m, ("dim", "d"))
        if d is not None:
            band = 1.96 / math.sqrt(d)
        else:
            rms = _first(m, ("random_baseline",))
            band = None if rms is None else 1.96 * rms
        entries.append(AlignmentEntry(str(label), cosines, band, _first(m, ("null_mean",)), _first(m, ("null_sd",))))
    return entries


# ------------------------------------------------------------------------------ tabular rows
def history_columns(history: Any, aliases: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """Columns of a training history: a dict of arrays, a list of row dicts, or an object with attributes.

    ``aliases`` maps each wanted column to accepted names (first found wins); missing columns are left out.
    """
    if isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        if not all(isinstance(row, Mapping) for row in history):
            raise ValueError("a history given as a list must contain dicts (one per recorded step)")

        def lookup(name: str) -> Any:
            if not history or any(row.get(name) is None for row in history):
                return None
            return [row[name] for row in history]
    elif isinstance(history, Mapping):
        lookup = history.get
    else:

        def lookup(name: str) -> Any:
            return getattr(history, name, None)

    columns = {}
    for column, names in aliases.items():
        for name in names:
            values = lookup(name)
            if values is not None:
                columns[column] = _array(values, name, 1)
                break
    lengths = {c: v.size for c, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"history columns differ in length: {lengths}")
    return columns


def bits_series(rows: Sequence[Mapping[str, Any]], y: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{method: (bits descending, y values)}`` from rows with keys ``method``, ``bits`` and ``y``."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        missing = [k for k in ("method", "bits", y) if k not in row]
        if missing:
            raise ValueError(f"each row needs keys 'method', 'bits', {y!r}; missing {missing} in {dict(row)}")
        series.setdefault(str(row["method"]), []).append((float(row["bits"]), float(row[y])))
    out = {}
    for method, points in series.items():
        points.sort(key=lambda p: -p[0])
        out[method] = (np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    return out


# ------------------------------------------------------------------ what both backends draw from
def check_kind(kind: str) -> None:
    """Refuse a slice ``kind`` other than :data:`SLICE_KINDS`."""
    if kind not in SLICE_KINDS:
        raise ValueError(f"kind must be one of {SLICE_KINDS}, got {kind!r}")


@dataclass(frozen=True)
class SlicePanel:
    """One checked 2D slice with its colour values, markers and paths (see :func:`slice_panel`).

    Attributes
    ----------
    alphas, betas, loss : the checked arrays (:func:`check_slice`).
    colors : the :class:`ColorValues` of ``loss``; ``values`` is its single grid.
    points, lines : :func:`marker_points` and :func:`path_lines` on ``values``.
    """

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    colors: ColorValues
    values: np.ndarray
    points: list
    lines: list


def slice_panel(
    alphas: Any,
    betas: Any,
    loss: Any,
    *,
    markers: Mapping[str, Sequence[float]] | None,
    paths: Mapping[str, Sequence[Any]] | None,
    log: bool,
    subtract_min: bool,
    label: str,
    kind: str = "contour",
) -> SlicePanel:
    """Everything ``slice_figure`` draws, checked once for both backends (arguments as there)."""
    check_kind(kind)
    alphas, betas, loss = check_slice(alphas, betas, loss)
    colors = color_values([loss], log=log, subtract_min=subtract_min, label=label, fallback=True)
    values = colors.grids[0]
    return SlicePanel(alphas, betas, loss, colors, values, marker_points(markers, alphas, betas, values), path_lines(paths, alphas, betas, values))


def slice_pair(
    alphas: Any, betas: Any, fp_loss: Any, quantized_loss: Any, *, log: bool, subtract_min: bool, label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, ColorValues]:
    """``(alphas, betas, fp_loss, quantized_loss, colors)`` of ``side_by_side_slices``: one colour scale for both."""
    alphas, betas, fp_loss = check_slice(alphas, betas, fp_loss)
    _, _, quantized_loss = check_slice(alphas, betas, quantized_loss)
    colors = color_values([fp_loss, quantized_loss], log=log, subtract_min=subtract_min, label=label, fallback=True)
    return alphas, betas, fp_loss, quantized_loss, colors


def qat_history(history: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(columns, steps)`` of a QAT history (:data:`QAT_HISTORY_KEYS`); the quantized loss is required."""
    columns = history_columns(history, QAT_HISTORY_KEYS)
    if "quantized_loss" not in columns:
        raise ValueError(f"the QAT history needs a quantized loss column, one of {QAT_HISTORY_KEYS['quantized_loss']}")
    return columns, columns.get("step", np.arange(columns["quantized_loss"].size, dtype=np.float64))


def alignment_layout(
    metrics: Mapping[str, Any], dim: int | None = None
) -> tuple[list[AlignmentEntry], list[str], float, list[tuple[int, AlignmentEntry]]]:
    """``(entries, cosine names shown, bar width, (index, entry) with a matched null)`` of ``alignment_figure``."""
    entries = alignment_entries(metrics, dim)
    names = [name for name in ALIGNMENT_NAMES if any(name in e.cosines for e in entries)]
    nulls = [(i, e) for i, e in enumerate(entries) if e.null_mean is not None]
    return entries, names, 0.8 / (len(names) + 1), nulls
