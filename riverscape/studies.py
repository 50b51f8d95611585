"""Shared building blocks of the PTQ-vs-QAT experiment scripts (``experiments/ptq_vs_qat.py``,
``experiments/river.py``, ``experiments/estimators.py``).

A *study* is one trained full-precision reference model with the three objectives every
measurement needs, all restricted to the quantized tensors (docs/theory.md §1.2: ``d = dim theta_Q``;
biases and norms stay at their FP values):

* ``analysis`` -- the training split capped at ``spec.analysis_samples``: curvature, damage,
  alignment, slices and paths (one fixed analysis set per comparison, docs/theory.md §1.3);
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .checkpoint import load_checkpoint, save_checkpoint
from .data import Dataset, load_dataset
from .landscape import plane_through
from .models import build_model
from .objective import Objective
from .pipeline import (
    HILL_K,
    TAU,
    Reference,
    alignment_at,
    build_reference,
    cap_samples,
    damage_at,
    measure_ptq,
    measure_qat,
    within_box,
)
from .pipeline import plane_landscape as _plane_slices
from .quant import LayerSelection, QuantMap, UniformQuantizer, ptq
from .quant.qat import QATResult, qat
from .training import train

__all__ = [
    "HILL_K",
    "TAU",
    "StudyModel",
    "STUDY_MODELS",
    "study_model",
    "Study",
    "load_study",
    "PTQ_RANGES",
    "QAT_ESTIMATORS",
    "NULL_DRAWS",
    "fp_cell",
    "ptq_cell",
    "qat_cell",
    "run_qat",
    "training_rows",
    "training_permutation",
    "calibration_split",
    "plane_landscape",
    "within_box",
    "open_sweep",
    "finish_sweep",
]

#: PTQ range calibrations compared by the scripts (method names ``ptq_<range>``)
PTQ_RANGES = ("minmax", "mse")
#: QAT estimators compared by ``ptq_vs_qat`` (method names ``qat_<estimator>``)
QAT_ESTIMATORS = ("ste", "lsq")
#: matched sign-flip null draws of the alignment at ``Q(theta_fp)`` (one gradient each; docs/statistics.md §4: at least 50)
NULL_DRAWS = 50
# HILL_K (hill subspace size) and TAU (loss tolerance) are the pipeline's: riverscape.pipeline.reference


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
    train_weight_decay : float
        Weight decay of the FP training (Adam's L2 term; 0 for the registered models).
    model_options : tuple of (str, value) pairs
        Extra keyword arguments of the built-in model (e.g. ``(("width", 8),)``), on top of the
        data's :meth:`~riverscape.data.Dataset.model_kwargs`.
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
    train_weight_decay: float = 0.0
    model_options: tuple = ()

    def to_dict(self) -> dict:
        """The fields as a dict (``train_weight_decay`` and ``model_options`` only when set, so sweeps stored before
        they existed still resume)."""
        out = asdict(self)
        for key in ("train_weight_decay", "model_options"):
            if not out[key]:
                del out[key]
        if "model_options" in out:
            out["model_options"] = [list(pair) for pair in out["model_options"]]
        return out

    def model_kwargs(self, dataset: Dataset) -> dict:
        """Keyword arguments of the built-in model on ``dataset``: the data's defaults and ``model_options``."""
        return {**dataset.model_kwargs(self.model), **dict(self.model_options)}


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
    if spec.train_weight_decay:  # only when used, so the cached models of the registered studies keep their names
        settings["weight_decay"] = spec.train_weight_decay
    if spec.model_options:
        settings["model_options"] = [list(pair) for pair in spec.model_options]
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{spec.model}-{spec.data}-seed{seed}-{digest}"


def _reference_checkpoint(spec: StudyModel, dataset: Dataset, seed: int, cache_dir: Path, checkpoints: int, progress: bool):
    """Load the cached FP reference model of ``(spec, seed)``, training and saving it first if missing."""
    path = Path(cache_dir) / f"{_train_signature(spec, seed, checkpoints)}.pt"
    if not path.exists():
        torch.manual_seed(seed)  # the built-in models initialise from the global RNG; scripts own their process
        model = build_model(spec.model, **spec.model_kwargs(dataset))
        record = np.unique(np.linspace(0, spec.train_steps, checkpoints).round().astype(int)).tolist()
        result = train(model, dataset, steps=spec.train_steps, lr=spec.train_lr, batch_size=spec.train_batch,
                       weight_decay=spec.train_weight_decay, record_steps=record, seed=seed, progress=progress)
        save_checkpoint(path, result.model, model_spec={"name": spec.model, "kwargs": spec.model_kwargs(dataset)},
                        data_spec=spec.data, loss=dataset.loss, train_result=result,
                        train_config={"steps": spec.train_steps, "lr": spec.train_lr, "batch_size": spec.train_batch, "seed": seed,
                                      "weight_decay": spec.train_weight_decay})
    return load_checkpoint(path)


@dataclass
class Study:
    """One FP reference model of an experiment: its :class:`~riverscape.pipeline.Reference` plus the study's budgets.

    Attributes
    ----------
    spec : StudyModel
    seed : int
    dataset : Dataset
    reference : Reference
        Objectives (``analysis``, ``training``, ``evaluation``), the quantized tensors,
        ``theta_fp``, the FP trajectory and the cached hill basis, widths and operator.
    """

    spec: StudyModel
    seed: int
    dataset: Dataset
    reference: Reference

    # the reference's facts, under the names the experiment scripts use
    model = property(lambda self: self.reference.model)
    names = property(lambda self: list(self.reference.names))
    analysis = property(lambda self: self.reference.analysis)
    training = property(lambda self: self.reference.training)
    evaluation = property(lambda self: self.reference.evaluation)
    theta_fp = property(lambda self: self.reference.theta_fp)
    trajectory = property(lambda self: self.reference.trajectory)
    trajectory_steps = property(lambda self: list(self.reference.trajectory_steps))

    @property
    def selection(self) -> LayerSelection:
        """Exactly the study's quantized tensors (``names``): every map of the study uses it."""
        return self.reference.selection

    def quant_map(self, bits: int, range_method: str = "minmax", objective: Optional[Objective] = None, *,
                  group_size: Optional[int] = None) -> QuantMap:
        """Symmetric quantizer of the study's tensors at ``bits`` (``range_method`` calibration), per channel
        or, with ``group_size``, per group of that many input columns (docs/ptq_methods.md §1).

        ``objective`` defaults to ``analysis`` (``training`` and ``evaluation`` share its layout).
        """
        return self.reference.quant_map(UniformQuantizer(bits, range=range_method, group_size=group_size), objective)

    def fp_operator(self):
        """The Hessian operator at ``theta_fp`` on the analysis set (built once)."""
        return self.reference.fp_operator()

    def hill(self) -> tuple[Tensor, Tensor]:
        """Top-``HILL_K`` Hessian eigenpairs at ``theta_fp`` on the analysis set (cached)."""
        return self.reference.hill(HILL_K)

    def basis(self):
        """The hill subspace at ``theta_fp`` (:class:`~riverscape.gradients.HillBasis`, top ``HILL_K``)."""
        return self.reference.basis(HILL_K)

    def widths(self) -> tuple[list, list]:
        """Basin widths along ``+-v_i`` at ``theta_fp`` for tolerance ``TAU`` (cached)."""
        return self.reference.widths(HILL_K, TAU)

    def evaluate(self, theta: Tensor) -> dict:
        """Test ``loss``, ``accuracy`` (next-token accuracy for text), ``perplexity`` (text) and ``train_loss`` (analysis set)."""
        return self.reference.evaluate(theta, perplexity=self.spec.perplexity)

    def curvature(self, theta: Tensor) -> dict:
        """Top Hessian eigenvalue (ARPACK, k=1) and Hutch++ trace of ``L(theta)`` at ``theta`` (analysis set)."""
        return self.reference.curvature(theta, trace_matvecs=self.spec.trace_matvecs)


_STUDIES: dict[tuple, Study] = {}


def load_study(spec: StudyModel, seed: int, cache_dir: Path, *, checkpoints: int = 40, progress: bool = False) -> Study:
    """The :class:`Study` of ``(spec, seed)``: the FP model (trained and cached in ``cache_dir`` if needed) and its reference.

    Studies are memoised in-process, so sweep cells of one model share the FP eigenpairs and widths.
    """
    key = (spec, seed, str(Path(cache_dir).resolve()), checkpoints)
    if key in _STUDIES:
        return _STUDIES[key]
    dataset = load_dataset(spec.data)
    loaded = _reference_checkpoint(spec, dataset, seed, Path(cache_dir), checkpoints, progress)
    analysis_data = cap_samples(dataset.train, spec.analysis_samples)
    training_data = None if spec.qat_samples == spec.analysis_samples else cap_samples(dataset.train, spec.qat_samples)
    reference, _ = build_reference(
        loaded.model, dataset.loss, analysis_data, dataset.test, quantizer=UniformQuantizer(8), training_data=training_data,
        trajectory=loaded.trajectory, trajectory_steps=loaded.trajectory_steps, dtype=getattr(torch, spec.dtype), seed=seed,
    )
    study = Study(spec=spec, seed=seed, dataset=dataset, reference=reference)
    _STUDIES[key] = study
    return study


# ---------------------------------------------------------------------- rows of the training split
def training_rows(study: Study, index: Tensor) -> Objective:
    """An Objective on rows ``index`` of the study's training split: same model, loss, quantized tensors and dtype as ``analysis``."""
    x, y = study.dataset.train
    return Objective(study.model, study.dataset.loss, (x[index], y[index]), params=study.names, dtype=study.analysis.dtype,
                     compute_dtype=study.analysis.compute_dtype, device=study.analysis.device)


def training_permutation(study: Study, seed: int) -> Tensor:
    """The seeded permutation of the training rows that :func:`calibration_split` (and
    :func:`riverscape.ptq_study.training_splits`) draw from."""
    return torch.randperm(len(study.dataset.train[0]), generator=torch.Generator().manual_seed(seed))


def calibration_split(study: Study, samples: int, seed: int) -> tuple[Objective, Tensor]:
    """``samples`` rows of the training split drawn without replacement with ``seed`` (never the test split).

    The rows are the first ``samples`` of :func:`training_permutation`, so they are the calibration
    split of :func:`riverscape.ptq_study.training_splits` with the same seed and size.

    Returns
    -------
    objective : Objective
        On those rows (:func:`training_rows`).
    index : Tensor
        Their sorted row indices into ``study.dataset.train``.
    """
    n = len(study.dataset.train[0])
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= n - 1:
        raise ValueError(f"calibration samples must be an integer in [1, {n - 1}] (training split of {n} rows), got {samples!r}")
    index = training_permutation(study, seed)[:samples].sort().values
    return training_rows(study, index), index


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


def _evaluated(metrics: dict) -> dict:
    """The :meth:`Study.evaluate` part of a measurement's metrics (without the displacement norms and the PTQ
    method's name, which would overwrite a cell's ``method`` parameter when scripts merge params and results)."""
    return {k: v for k, v in metrics.items() if k not in ("delta_norm", "relative_delta_norm", "method")}


def _alignment_at_ptq(study: Study, qmap: QuantMap, theta_q: Tensor, theta_qat: Optional[Tensor] = None) -> dict:
    result = alignment_at(study.reference, qmap, theta_q, theta_qat=theta_qat, floor=False, per_layer=False, n_null=NULL_DRAWS)
    return {**_alignment_fields(result), "null_draws": NULL_DRAWS}


def ptq_cell(study: Study, bits: int, range_method: str) -> dict:
    """PTQ by round-to-nearest with ``range_method`` calibration: metrics, curvature, damage and alignment at ``Q(theta_fp)``."""
    qmap = study.quant_map(bits, range_method)
    measured = measure_ptq(study.reference, qmap, perplexity=study.spec.perplexity)
    q = measured.point
    dmg = damage_at(study.reference, qmap, q, floor=study.spec.floor, random_control=study.spec.floor,
                    rtn_matvecs=study.spec.trace_matvecs if bits > 1 else 0)
    return {**_evaluated(measured.metrics), **study.curvature(q), **_damage_fields(dmg), **_alignment_at_ptq(study, qmap, q),
            "distance_to_fp": measured.metrics["delta_norm"]}


def _qat_settings(study: Study, estimator: str, *, seed: int, record_every: Optional[int], progress: bool, options: dict) -> dict:
    settings = dict(estimator=estimator, steps=study.spec.qat_steps, lr=study.spec.qat_lr, batch_size=study.spec.qat_batch,
                    theta0=study.theta_fp, tau=TAU, record_every=record_every or study.spec.qat_record_every,
                    eval_objective=study.evaluation, seed=seed, progress=progress)
    settings.update(options)
    return settings


def run_qat(study: Study, bits: int, estimator: str, *, seed: int, record_every: Optional[int] = None, progress: bool = False,
            range_method: str = "minmax", group_size: Optional[int] = None, **options: Any) -> QATResult:
    """QAT from ``theta_fp`` with the study's budget (``options`` override :func:`riverscape.quant.qat` keywords);
    ``group_size`` quantizes per group instead of per channel."""
    settings = _qat_settings(study, estimator, seed=seed, record_every=record_every, progress=progress, options=options)
    return qat(study.training, study.quant_map(bits, range_method, study.training, group_size=group_size), **settings)


def qat_cell(study: Study, bits: int, estimator: str, *, seed: int, landscape: bool = False, progress: bool = False) -> dict:
    """QAT from ``theta_fp`` (calibrated min-max scales): metrics and curvature at the deployed point ``Q(theta_T)``,
    damage analysis of its displacement from ``theta_fp``, alignment at ``Q(theta_fp)`` (with ``cosine_qat``),
    the linear loss barrier ``theta_fp -> Q(theta_T)`` and, with ``landscape``, the plane slices."""
    settings = _qat_settings(study, estimator, seed=seed, record_every=None, progress=progress, options={})
    run = measure_qat(study.reference, study.quant_map(bits, "minmax", study.training), perplexity=study.spec.perplexity, **settings)
    res, point = run.result, run.point
    qmap = study.quant_map(bits)
    q_ptq = ptq(study.analysis, qmap)  # the point only: its metrics are ptq_cell's
    dmg = damage_at(study.reference, qmap, point, floor=False, random_control=False, rtn_matvecs=0)
    out = {
        **_evaluated(run.metrics), **study.curvature(point), **_damage_fields(dmg), **_alignment_at_ptq(study, qmap, q_ptq, point),
        "distance_to_fp": float((point - study.theta_fp).norm()), "ptq_distance_to_fp": float((q_ptq - study.theta_fp).norm()),
        "barrier_from_fp": run.barrier.height, "qat_train_loss_best": res.best_loss, "hit_step": res.hit_step,
        "total_grid_flips": int(sum(res.grid_flips)), "qat_steps": study.spec.qat_steps, "qat_seconds": res.wall_time,
        "history": {k: res.history[k] for k in ("step", "loss", "eval_metric", "discretization_error") if k in res.history},
    }
    if landscape:
        out["landscape"] = plane_landscape(study, qmap, study.theta_fp, q_ptq, point, quantized_path=res.quantized_trajectory)
    return out


# ---------------------------------------------------------------------- landscapes on a plane
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

    Returns a JSON-friendly dict (:meth:`riverscape.pipeline.PlaneLandscape.to_dict`): ``alphas``,
    ``betas`` (plane coordinates, orthonormal basis, origin ``theta_fp``), ``fp_loss`` and
    ``quantized_loss`` (``[i][j]`` at ``(alphas[i], betas[j])``), ``markers`` ``{label: [x, y]}``,
    ``paths`` ``{label: [xs, ys]}`` (QAT iterates ``Q(theta_t)`` and river checkpoints projected
    onto the plane, clipped to the window) and ``off_plane`` distances of the path points.
    """
    plane = plane_through(theta_fp, theta_ptq, theta_qat)
    markers = {"θ_fp": (0.0, 0.0), "PTQ Q(θ_fp)": tuple(plane.coordinates(theta_ptq)), "QAT Q(θ_T)": tuple(plane.coordinates(theta_qat))}
    span = margin * max(max(abs(x), abs(y)) for x, y in markers.values())
    paths = {"QAT iterates Q(θ_t)": quantized_path, "river (FP training)": river_points}
    return _plane_slices(study.reference, qmap, plane, markers, paths=paths, span=span, steps=steps, progress=progress).to_dict()


# ---------------------------------------------------------------------- script scaffolding
def open_sweep(name: str, description: str, settings: Callable[[bool], dict], argv: Optional[Sequence[str]] = None, *,
               models: Optional[Callable[[dict], Mapping[str, StudyModel]]] = None,
               arguments: Optional[Callable[[Any], None]] = None, overrides: Optional[Callable[[Any], dict]] = None,
               seeds_help: Optional[str] = None):
    """Parse the common experiment options, pin one intra-op thread and open the resumable sweep.

    Returns ``(opts, cfg, sweep)`` with ``cfg = settings(quick) + overrides(opts) + quick + seed`` (plus
    the full ``study_models`` settings when ``models(cfg)`` is given, so changing a budget invalidates
    stored cells). ``arguments(parser)`` adds script-specific options; ``overrides(opts)`` maps them to
    settings. ``seeds_help`` adds the multi-seed option ``--seeds N`` (``{"seeds": N}`` in ``cfg``
    when given) with that help text; the scripts put each cell's ``seed`` in its parameters, so
    ``seeds`` is a sweep axis (:class:`~riverscape.sweep.Sweep` ``axes``): more seeds on a finished
    directory compute only the new ones.
    """
    from .sweep import Sweep, experiment_parser

    parser = experiment_parser(description, name=name)
    if seeds_help is not None:
        parser.add_argument("--seeds", type=int, default=None, help=seeds_help)
    if arguments is not None:
        arguments(parser)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)  # small models: a second intra-op thread costs far more than it saves on a shared CPU
    seeds = {"seeds": opts.seeds} if seeds_help is not None and opts.seeds is not None else {}
    cfg = {**settings(opts.quick), **seeds, **(overrides(opts) if overrides is not None else {}), "quick": opts.quick, "seed": opts.seed}
    if models is not None:
        cfg["study_models"] = {k: s.to_dict() for k, s in models(cfg).items()}
    axes = ("seeds",) if seeds_help is not None else ()
    return opts, cfg, Sweep(opts.out, name, cfg, fresh=opts.fresh, progress=opts.progress, axes=axes)


def finish_sweep(sweep, out_dir: Path, tables: Sequence[str]) -> None:
    """Write ``tables.md`` (the markdown tables), print the runtime and save ``results.json`` a last time."""
    from .sweep import atomic_write_text

    atomic_write_text(Path(out_dir) / "tables.md", "\n\n".join(tables) + "\n")
    print(f"runtime {sweep.runtime_seconds:.1f} s wall, {sweep.cpu_seconds:.1f} s CPU; wrote {out_dir}/results.json, tables.md, *.html, *.png", flush=True)
    sweep.save()
