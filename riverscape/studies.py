"""Shared building blocks of the PTQ-vs-QAT experiment scripts (``experiments/ptq_vs_qat.py``,
``experiments/river.py``, ``experiments/estimators.py``).

A *study* is one trained full-precision reference model with the three objectives every
measurement needs, all restricted to the quantized tensors (THEORY.md 7: ``d = dim theta_Q``;
biases and norms stay at their FP values):

* ``analysis`` -- the training split capped at ``spec.analysis_samples``: curvature, damage,
  alignment, slices and paths (one fixed analysis set per comparison, THEORY.md 10);
* ``training`` -- the training split capped at ``spec.qat_samples``: what QAT minimises;
* ``evaluation`` -- the test split: accuracy, loss and perplexity of every reported point.

Reference models are trained once per ``(model, data, seed, training settings)`` and cached as
riverscape checkpoints (with their ~40-checkpoint trajectory, the raw material of the river)
inside the experiment's output directory, so resumed runs reuse them bit-for-bit.

Measurement functions return plain JSON-friendly dicts (one sweep cell each):
:func:`fp_cell`, :func:`ptq_cell`, :func:`qat_cell`; :func:`plane_landscape` computes the
side-by-side FP / quantized slices on the plane through three points.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .analysis import _trajectory_in_layout
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Dataset, load_dataset
from .gradients import alignment, damage
from .gradients.damage import basin_widths
from .landscape import hessian_eigs, hessian_trace, loss_barrier, plane_through, slice_2d
from .models import build_model
from .objective import Objective
from .quant import LayerSelection, QuantMap, UniformQuantizer, ptq
from .quant.qat import QATResult, qat
from .training import train

__all__ = [
    "StudyModel",
    "STUDY_MODELS",
    "study_model",
    "Study",
    "load_study",
    "PTQ_RANGES",
    "QAT_ESTIMATORS",
    "fp_cell",
    "ptq_cell",
    "qat_cell",
    "run_qat",
    "plane_landscape",
    "within_box",
    "landscape_figures",
    "series_figures",
    "open_sweep",
    "finish_sweep",
]

#: PTQ range calibrations compared by the scripts (method names ``ptq_<range>``)
PTQ_RANGES = ("minmax", "mse")
#: QAT estimators compared by ``ptq_vs_qat`` (method names ``qat_<estimator>``)
QAT_ESTIMATORS = ("ste", "lsq")
#: size of the hill subspace (top-k Hessian eigenvectors at theta_fp)
HILL_K = 10
#: loss tolerance of basin widths and hitting times (nats)
TAU = 0.05


@dataclass(frozen=True)
class StudyModel:
    """A reference model, its data and the budgets used to analyse it.

    Attributes
    ----------
    key : str
        Short name used in results (``"digits_mlp"``).
    model, data : str
        Built-in model and dataset names (:func:`riverscape.build_model`, :func:`riverscape.load_dataset`).
    train_steps, train_lr, train_batch : int, float, int
        Full-precision Adam training.
    qat_steps, qat_lr : int, float
        QAT (Adam on the latent weights).
    qat_batch : int or None
        QAT mini-batch size (``None``: full ``training`` set every step).
    analysis_samples, qat_samples : int or None
        Caps of the analysis set and of the QAT training set (``None``: whole training split).
    trace_matvecs : int
        Hutch++ budget of ``tr H`` (and of the RTN damage estimate).
    floor : bool
        Re-optimise the PTQ point inside the hill subspace (and a random one) in :func:`damage`.
    qat_bits : tuple of int or None
        Bit-widths at which ``ptq_vs_qat`` runs QAT (``None``: all).
    qat_record_every : int
        QAT steps between recorded iterates (each costs a full-set loss evaluation).
    dtype : str
        ``"float64"`` or ``"float32"`` for every objective.
    perplexity : bool
        Report ``exp(test loss)`` (language models).
    """

    key: str
    model: str
    data: str
    train_steps: int
    train_lr: float
    train_batch: int
    qat_steps: int
    qat_lr: float
    qat_batch: Optional[int]
    analysis_samples: Optional[int]
    qat_samples: Optional[int]
    trace_matvecs: int
    floor: bool = True
    qat_bits: Optional[tuple] = None
    qat_record_every: int = 10
    dtype: str = "float32"
    perplexity: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


STUDY_MODELS: dict[str, StudyModel] = {
    "digits_mlp": StudyModel(
        "digits_mlp", "mlp", "digits", train_steps=1500, train_lr=1e-2, train_batch=128, qat_steps=300, qat_lr=1e-2,
        qat_batch=None, analysis_samples=None, qat_samples=None, trace_matvecs=99, dtype="float64",
    ),
    "mnist1d_cnn": StudyModel(
        "mnist1d_cnn", "cnn1d", "mnist1d", train_steps=1200, train_lr=3e-3, train_batch=128, qat_steps=250, qat_lr=3e-3,
        qat_batch=128, analysis_samples=512, qat_samples=1024, trace_matvecs=30, qat_bits=(4, 3, 2, 1), qat_record_every=25,
    ),
    "text_transformer": StudyModel(
        "text_transformer", "transformer", "text", train_steps=300, train_lr=3e-3, train_batch=128, qat_steps=150, qat_lr=1e-3,
        qat_batch=64, analysis_samples=64, qat_samples=1024, trace_matvecs=24, floor=False, qat_bits=(4, 3, 2, 1), qat_record_every=30,
        perplexity=True,
    ),
}


def study_model(key: str, **overrides: Any) -> StudyModel:
    """A registered :class:`StudyModel` with some fields replaced (e.g. shorter training in quick mode)."""
    if key not in STUDY_MODELS:
        raise ValueError(f"unknown study model {key!r}; choose one of {tuple(STUDY_MODELS)}")
    return replace(STUDY_MODELS[key], **overrides)


# ---------------------------------------------------------------------- the reference model
def _train_signature(spec: StudyModel, seed: int, checkpoints: int) -> str:
    settings = {"model": spec.model, "data": spec.data, "steps": spec.train_steps, "lr": spec.train_lr,
                "batch": spec.train_batch, "seed": seed, "checkpoints": checkpoints}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{spec.model}-{spec.data}-seed{seed}-{digest}"


def _reference_checkpoint(spec: StudyModel, dataset: Dataset, seed: int, cache_dir: Path, checkpoints: int, progress: bool):
    """Load the cached FP reference model of ``(spec, seed)``, training and saving it first if missing."""
    path = Path(cache_dir) / f"{_train_signature(spec, seed, checkpoints)}.pt"
    if not path.exists():
        torch.manual_seed(seed)  # the built-in models initialise from the global RNG; scripts own their process
        model = build_model(spec.model, **dataset.model_kwargs(spec.model))
        record = np.unique(np.linspace(0, spec.train_steps, checkpoints).round().astype(int)).tolist()
        result = train(model, dataset, steps=spec.train_steps, lr=spec.train_lr, batch_size=spec.train_batch,
                       record_steps=record, seed=seed, progress=progress)
        save_checkpoint(path, result.model, model_spec={"name": spec.model, "kwargs": dataset.model_kwargs(spec.model)},
                        data_spec=spec.data, loss=dataset.loss, train_result=result,
                        train_config={"steps": spec.train_steps, "lr": spec.train_lr, "batch_size": spec.train_batch, "seed": seed})
    return load_checkpoint(path)


def _capped(data: tuple[Tensor, Tensor], samples: Optional[int]) -> tuple[Tensor, Tensor]:
    x, y = data
    return (x, y) if samples is None else (x[:samples], y[:samples])


@dataclass
class Study:
    """One FP reference model and its weights-only objectives (see the module docstring).

    Attributes
    ----------
    spec : StudyModel
    seed : int
    dataset : Dataset
    model : nn.Module
        The trained FP model (owned by the study; objectives deep-copy it anyway).
    names : list of str
        The quantized tensors (the parameters every objective selects).
    analysis, training, evaluation : Objective
    theta_fp : Tensor, shape (D,)
    trajectory : Tensor, shape (n, D)
        FP training checkpoints on the weights-only layout.
    trajectory_steps : list of int
    """

    spec: StudyModel
    seed: int
    dataset: Dataset
    model: torch.nn.Module
    names: list
    analysis: Objective
    training: Objective
    evaluation: Objective
    theta_fp: Tensor
    trajectory: Tensor
    trajectory_steps: list
    _cache: dict = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------- quantizers
    @property
    def selection(self) -> LayerSelection:
        """Exactly the study's quantized tensors (``names``): every map of the study uses it."""
        return LayerSelection.exactly(self.names)

    def quant_map(self, bits: int, range_method: str = "minmax", objective: Optional[Objective] = None) -> QuantMap:
        """Per-channel symmetric quantizer of the study's tensors at ``bits`` (``range_method`` calibration).

        ``objective`` defaults to ``analysis`` (``training`` and ``evaluation`` share its layout).
        """
        target = self.analysis if objective is None else objective
        return QuantMap(target, UniformQuantizer(bits, range=range_method), selection=self.selection)

    # -------------------------------------------------------------- FP curvature (cached)
    def fp_operator(self):
        """``analysis.hessian(theta_fp)``, built once (it keeps the gradient graph for cheap HVPs)."""
        if "operator" not in self._cache:
            self._cache["operator"] = self.analysis.hessian(self.theta_fp)
        return self._cache["operator"]

    def hill(self) -> tuple[Tensor, Tensor]:
        """Top-``HILL_K`` Hessian eigenpairs at ``theta_fp`` on the analysis set (cached)."""
        if "hill" not in self._cache:
            k = min(HILL_K, self.analysis.dim - 1)
            self._cache["hill"] = hessian_eigs(self.analysis, self.theta_fp, k, operator=self.fp_operator(), seed=self.seed)
        return self._cache["hill"]

    def widths(self) -> tuple[list, list]:
        """Basin widths along ``+-v_i`` at ``theta_fp`` for tolerance ``TAU`` (cached; reused by every damage call)."""
        if "widths" not in self._cache:
            values, vectors = self.hill()
            self._cache["widths"] = basin_widths(self.analysis, self.theta_fp, values, vectors, TAU)
        return self._cache["widths"]

    # -------------------------------------------------------------- measurements of one point
    def evaluate(self, theta: Tensor) -> dict:
        """Test ``loss``, ``accuracy`` (next-token accuracy for text), ``perplexity`` (text) and ``train_loss`` (analysis set)."""
        loss, metric = self.evaluation.loss_and_metric(theta)
        out = {"loss": loss, "accuracy": metric, "train_loss": self.analysis.loss(theta)}
        if self.spec.perplexity:
            out["perplexity"] = math.exp(loss) if loss < 700 else None
        return out

    def curvature(self, theta: Tensor) -> dict:
        """Top Hessian eigenvalue (ARPACK, k=1) and Hutch++ trace of ``L(theta)`` at ``theta`` (analysis set)."""
        op = self.fp_operator() if theta is self.theta_fp else self.analysis.hessian(theta)
        try:
            values, _ = hessian_eigs(self.analysis, theta, 1, operator=op, seed=self.seed)
            trace = hessian_trace(self.analysis, theta, matvecs=self.spec.trace_matvecs, operator=op, seed=self.seed)
        finally:
            if op is not self._cache.get("operator"):
                op.release()
        return {"top_eigenvalue": float(values[0]), "trace": trace.value, "trace_stderr": trace.stderr}


_STUDIES: dict[tuple, Study] = {}


def load_study(spec: StudyModel, seed: int, cache_dir: Path, *, checkpoints: int = 40, progress: bool = False) -> Study:
    """The :class:`Study` of ``(spec, seed)``: the FP model (trained and cached in ``cache_dir`` if needed) and its objectives.

    Studies are memoised in-process, so sweep cells of one model share the FP eigenpairs and widths.
    """
    key = (spec, seed, str(Path(cache_dir).resolve()), checkpoints)
    if key in _STUDIES:
        return _STUDIES[key]
    dataset = load_dataset(spec.data)
    loaded = _reference_checkpoint(spec, dataset, seed, Path(cache_dir), checkpoints, progress)
    dtype = getattr(torch, spec.dtype)
    full = Objective(loaded.model, dataset.loss, _capped(dataset.train, spec.analysis_samples), dtype=dtype)
    names = [t.name for t in QuantMap(full, UniformQuantizer(8)).targets]

    def objective(data):
        return Objective(loaded.model, dataset.loss, data, params=names, batch_size=512, dtype=dtype)

    analysis = objective(_capped(dataset.train, spec.analysis_samples))
    training = analysis if spec.qat_samples == spec.analysis_samples else objective(_capped(dataset.train, spec.qat_samples))
    study = Study(
        spec=spec, seed=seed, dataset=dataset, model=loaded.model, names=names, analysis=analysis, training=training,
        evaluation=objective(dataset.test), theta_fp=analysis.theta0,
        trajectory=_trajectory_in_layout(full, analysis, loaded.trajectory), trajectory_steps=list(loaded.trajectory_steps),
    )
    _STUDIES[key] = study
    return study


# ---------------------------------------------------------------------- cells
def fp_cell(study: Study) -> dict:
    """Accuracy, loss (perplexity) and curvature at ``theta_fp``."""
    return {**study.evaluate(study.theta_fp), **study.curvature(study.theta_fp), "dim": study.analysis.dim,
            "analysis_samples": study.analysis.n_samples, "eval_samples": study.evaluation.n_samples}


def _damage_fields(result) -> dict:
    d = result.to_dict()
    keys = ("hill_fraction", "hill_energy_baseline", "curvature_share", "predicted_loss_increase", "measured_loss_increase",
            "predicted_first_order", "ratio", "breakdown_scale", "inside_basin", "rho_max", "delta_norm", "floor_recovery",
            "random_subspace_recovery", "random_direction_loss_increase", "expected_rtn_damage")
    return {k: d.get(k) for k in keys}


def _alignment_fields(result) -> dict:
    d = result.to_dict()
    keys = ("cosine_to_fp", "cosine_hill", "cosine_river", "cosine_qat", "random_baseline", "z_iso", "null_mean", "null_sd",
            "null_z", "inward", "chi_k", "chi_k_baseline")
    return {k: d.get(k) for k in keys}


def _alignment_at_ptq(study: Study, qmap: QuantMap, theta_q: Tensor, theta_qat: Optional[Tensor] = None) -> dict:
    values, vectors = study.hill()
    res = alignment(study.analysis, study.theta_fp, qmap, theta_q=theta_q, k=vectors.shape[1], values=values, vectors=vectors,
                    theta_qat=theta_qat, floor=False, per_layer=False, operator=study.fp_operator(), seed=study.seed, progress=False)
    return _alignment_fields(res)


def ptq_cell(study: Study, bits: int, range_method: str) -> dict:
    """PTQ by round-to-nearest with ``range_method`` calibration: metrics, curvature, damage and alignment at ``Q(theta_fp)``."""
    qmap = study.quant_map(bits, range_method)
    q = ptq(study.analysis, qmap)
    values, vectors = study.hill()
    dmg = damage(study.analysis, study.theta_fp, qmap, theta_q=q, k=vectors.shape[1], values=values, vectors=vectors, tau=TAU,
                 widths=study.widths(), floor=study.spec.floor, random_control=study.spec.floor,
                 rtn_matvecs=study.spec.trace_matvecs if bits > 1 else 0, operator=study.fp_operator(), seed=study.seed, progress=False)
    return {**study.evaluate(q), **study.curvature(q), **_damage_fields(dmg), **_alignment_at_ptq(study, qmap, q),
            "distance_to_fp": float((q - study.theta_fp).norm())}


def run_qat(study: Study, bits: int, estimator: str, *, seed: int, record_every: Optional[int] = None, progress: bool = False,
            range_method: str = "minmax", **options: Any) -> QATResult:
    """QAT from ``theta_fp`` with the study's budget (``options`` override :func:`riverscape.quant.qat` keywords)."""
    settings = dict(estimator=estimator, steps=study.spec.qat_steps, lr=study.spec.qat_lr, batch_size=study.spec.qat_batch,
                    theta0=study.theta_fp, tau=TAU, record_every=record_every or study.spec.qat_record_every, eval_objective=study.evaluation, seed=seed, progress=progress)
    settings.update(options)
    qmap = study.quant_map(bits, range_method, study.training)
    return qat(study.training, qmap, **settings)


def qat_cell(study: Study, bits: int, estimator: str, *, seed: int, landscape: bool = False, progress: bool = False) -> dict:
    """QAT from ``theta_fp`` (calibrated min-max scales): metrics and curvature at the deployed point ``Q(theta_T)``,
    damage analysis of its displacement from ``theta_fp``, alignment at ``Q(theta_fp)`` (with ``cosine_qat``),
    the linear loss barrier ``theta_fp -> Q(theta_T)`` and, with ``landscape``, the plane slices."""
    res = run_qat(study, bits, estimator, seed=seed, progress=progress)
    point = res.theta_q
    qmap = study.quant_map(bits)
    q_ptq = ptq(study.analysis, qmap)
    values, vectors = study.hill()
    dmg = damage(study.analysis, study.theta_fp, qmap, theta_q=point, k=vectors.shape[1], values=values, vectors=vectors, tau=TAU,
                 widths=study.widths(), floor=False, random_control=False, rtn_matvecs=0, operator=study.fp_operator(),
                 seed=study.seed, progress=False)
    barrier = loss_barrier(study.analysis, study.theta_fp, point, n=25, progress=False)
    out = {
        **study.evaluate(point), **study.curvature(point), **_damage_fields(dmg), **_alignment_at_ptq(study, qmap, q_ptq, point),
        "distance_to_fp": float((point - study.theta_fp).norm()), "ptq_distance_to_fp": float((q_ptq - study.theta_fp).norm()),
        "barrier_from_fp": barrier.height, "qat_train_loss_best": res.best_loss, "hit_step": res.hit_step,
        "total_grid_flips": int(sum(res.grid_flips)), "qat_steps": study.spec.qat_steps, "qat_seconds": res.wall_time,
        "history": {k: res.history[k] for k in ("step", "loss", "eval_metric", "discretization_error") if k in res.history},
    }
    if landscape:
        out["landscape"] = plane_landscape(study, qmap, study.theta_fp, q_ptq, point, quantized_path=res.quantized_trajectory)
    return out


# ---------------------------------------------------------------------- landscapes on a plane
def within_box(xs: Sequence[float], ys: Sequence[float], span: float) -> tuple[list, list]:
    """The points of a projected path that fall inside ``[-span, span]^2`` (keeps figures on the sliced window)."""
    keep = [(x, y) for x, y in zip(xs, ys) if abs(x) <= span and abs(y) <= span]
    return [p[0] for p in keep], [p[1] for p in keep]


def plane_landscape(
    study: Study,
    qmap: QuantMap,
    theta_fp: Tensor,
    theta_ptq: Tensor,
    theta_qat: Tensor,
    *,
    quantized_path: Optional[Tensor] = None,
    river_points: Optional[Tensor] = None,
    steps: int = 31,
    margin: float = 1.35,
    progress: bool = False,
) -> dict:
    """``L(theta)`` and ``L(Q(theta))`` on the plane through ``theta_fp``, the PTQ point and the QAT point.

    Returns a JSON-friendly dict: ``alphas``, ``betas`` (plane coordinates, orthonormal basis, origin
    ``theta_fp``), ``fp_loss`` and ``quantized_loss`` (``[i][j]`` at ``(alphas[i], betas[j])``),
    ``markers`` ``{label: [x, y]}``, ``paths`` ``{label: [xs, ys]}`` (QAT iterates ``Q(theta_t)``
    and river checkpoints projected onto the plane, clipped to the window) and
    ``off_plane`` distances of the path points.
    """
    plane = plane_through(theta_fp, theta_ptq, theta_qat)
    markers = {"θ_fp": [0.0, 0.0], "PTQ Q(θ_fp)": list(plane.coordinates(theta_ptq)), "QAT Q(θ_T)": list(plane.coordinates(theta_qat))}
    reach = max(max(abs(x), abs(y)) for x, y in markers.values())
    span = margin * reach
    fp_slice = slice_2d(study.analysis, theta_fp, plane.d1, plane.d2, span=span, steps=steps, progress=progress)
    q_slice = slice_2d(study.analysis, theta_fp, plane.d1, plane.d2, span=span, steps=steps, quantizer=qmap, progress=progress)
    paths, off_plane = {}, {}
    for label, points in (("QAT iterates Q(θ_t)", quantized_path), ("river (FP training)", river_points)):
        if points is None:
            continue
        coords = [plane.coordinates(p) for p in points]
        paths[label] = list(within_box([c[0] for c in coords], [c[1] for c in coords], span))
        off_plane[label] = [plane.distance(p) for p in points]
    return {
        "alphas": fp_slice.alphas.tolist(), "betas": fp_slice.betas.tolist(),
        "fp_loss": fp_slice.loss.tolist(), "quantized_loss": q_slice.loss.tolist(),
        "markers": markers, "paths": paths, "off_plane": off_plane, "span": span,
    }


def landscape_figures(landscape: Mapping[str, Any], title: str):
    """``(plotly, matplotlib)`` side-by-side FP / quantized slices of a :func:`plane_landscape` result."""
    from .report import side_by_side_slices, static

    args = (landscape["alphas"], landscape["betas"], np.asarray(landscape["fp_loss"]), np.asarray(landscape["quantized_loss"]))
    kwargs = dict(markers=landscape["markers"], paths=landscape["paths"] or None, title=title,
                  xlabel="direction θ_fp → PTQ point", ylabel="orthogonal, toward the QAT point")
    return side_by_side_slices(*args, **kwargs), static.side_by_side_slices(*args, **kwargs)


def series_figures(panels: Mapping[str, Mapping[str, tuple]], title: str, *, xlabel: str = "QAT step", log_y: Sequence[bool] = ()):
    """``(plotly, matplotlib)`` line panels: ``{panel title: {label: (x, y[, y_spread])}}``, one colour per label.

    A third entry draws a shaded band ``y +- y_spread``. ``log_y[i]`` puts panel ``i`` on a log axis.
    """
    import matplotlib
    import plotly.graph_objects as go
    from matplotlib.figure import Figure
    from plotly.subplots import make_subplots

    from .report.theme import PALETTE, base_layout, mpl_style

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
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=label, legendgroup=label, showlegend=label not in shown,
                                         line=dict(color=color[label], width=2)), row=1, col=col + 1)
                axes[col].plot(x, y, color=color[label], lw=1.6, label=label if (col == 0 or not shared) else None)
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
            mfig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(6, len(labels)), fontsize=8)
            mfig.subplots_adjust(bottom=0.25)
        else:
            for ax in axes:
                ax.legend(fontsize=7)
    fig.update_layout(**base_layout(title, height=460))
    return fig, mfig


# ---------------------------------------------------------------------- script scaffolding
def open_sweep(name: str, description: str, settings: Callable[[bool], dict], argv: Optional[Sequence[str]] = None, *,
               models: Optional[Callable[[dict], Mapping[str, StudyModel]]] = None):
    """Parse the common experiment options, pin one intra-op thread and open the resumable sweep.

    Returns ``(opts, cfg, sweep)`` with ``cfg = settings(quick) + quick + seed`` (plus the full
    ``study_models`` settings when ``models(cfg)`` is given, so changing a budget invalidates stored cells).
    """
    from .sweep import Sweep, experiment_parser

    opts = experiment_parser(description, name=name).parse_args(argv)
    torch.set_num_threads(1)  # small models: a second intra-op thread costs far more than it saves on a shared CPU
    cfg = {**settings(opts.quick), "quick": opts.quick, "seed": opts.seed}
    if models is not None:
        cfg["study_models"] = {k: s.to_dict() for k, s in models(cfg).items()}
    return opts, cfg, Sweep(opts.out, name, cfg, fresh=opts.fresh, progress=opts.progress)


def finish_sweep(sweep, out_dir: Path, tables: Sequence[str]) -> None:
    """Write ``tables.md`` (the markdown tables), print the runtime and save ``results.json`` a last time."""
    from .sweep import atomic_write_text

    atomic_write_text(Path(out_dir) / "tables.md", "\n\n".join(tables) + "\n")
    print(f"runtime {sweep.runtime_seconds:.1f} s wall, {sweep.cpu_seconds:.1f} s CPU; wrote {out_dir}/results.json, tables.md, *.html, *.png", flush=True)
    sweep.save()
