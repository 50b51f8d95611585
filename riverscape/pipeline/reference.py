"""The reference every measurement of one model starts from, built once.

A :class:`Reference` holds what the command line's analysis and every experiment used to
build each for itself: the objectives restricted to the quantized tensors (analysis set,
QAT training set, evaluation set), the quantized tensors' names and their
:class:`~riverscape.quant.LayerSelection`, ``theta_fp``, and, computed on first use and
cached, the Hessian operator at ``theta_fp``, its top eigenpairs (the hill basis) and the
basin widths along them. Measurements (:mod:`riverscape.pipeline.measure`) take a
reference and return typed results.

Conventions (docs/theory.md §2): landscape quantities are taken with respect to the
quantized tensors only (``d = dim theta_Q``), biases and normalisation parameters stay at
their FP values; the analysis set is the training data (capped), accuracy and loss are
reported on the evaluation set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..batching import sample_count, take_samples
from ..landscape.curvature import hessian_eigs, hessian_trace
from ..limits import DEFAULT_MEMORY_LIMIT
from ..objective import Objective
from ..quant import LayerSelection, QuantMap, UniformQuantizer

__all__ = ["HILL_K", "TAU", "Reference", "build_reference", "cap_samples", "trajectory_in_layout"]

HILL_K = 10
"""Size of the hill subspace: the top-k Hessian eigenvectors at ``theta_fp``."""
TAU = 0.05
"""Loss tolerance (nats) of basin widths and QAT hitting times."""


def cap_samples(data: Any, max_samples: Optional[int]) -> Any:
    """At most ``max_samples`` samples of ``(inputs, targets)`` tensors or an iterable of batches.

    Batches may be tuples ``(inputs, targets, ...)``, tensors or dicts (Hugging Face style,
    ``input_ids``/``attention_mask``/``labels``); each keeps its kind, every tensor in it cut to
    the same samples (see :mod:`riverscape.batching`). ``None`` keeps everything. Batches are
    cut, not dropped, so the cap is exact.
    """
    if max_samples is None:
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0][:max_samples], data[1][:max_samples]
    batches, seen = [], 0
    for batch in data:
        if seen >= max_samples:
            break
        take = min(sample_count(batch), max_samples - seen)
        batches.append(take_samples(batch, take))
        seen += take
    return batches


def trajectory_in_layout(full: Objective, restricted: Objective, trajectory: Optional[Tensor]) -> Optional[Tensor]:
    """Rows of a trajectory over all trainable parameters, restricted to ``restricted``'s layout.

    Returns ``None`` when there is no trajectory or it does not fit ``full`` (fewer than two
    rows, wrong width).
    """
    if trajectory is None or trajectory.ndim != 2 or trajectory.shape[1] != full.dim or trajectory.shape[0] < 2:
        return None
    spans = {s.name: s.slice for s in full.layout}
    index = torch.cat([torch.arange(spans[s.name].start, spans[s.name].stop) for s in restricted.layout])
    return trajectory[:, index].to(dtype=restricted.dtype, device=restricted.device)


@dataclass(frozen=True)
class Reference:
    """One full-precision model and everything measurements of it share (see the module docstring).

    Attributes
    ----------
    model : nn.Module
        The FP model (objectives evaluate private copies; it is never modified).
    full : Objective
        All trainable parameters, analysis set (the layout of recorded trajectories).
    names : tuple of str
        The quantized tensors: every objective below selects exactly these.
    analysis, training, evaluation : Objective
        Analysis set (curvature, damage, alignment, slices, paths), QAT training set (the
        same object as ``analysis`` unless a different set was given), evaluation set.
    theta_fp : Tensor, shape (D,)
    trajectory : Tensor, shape (n, D), or None
        The FP training trajectory on the quantized tensors' layout (the river's raw material).
    trajectory_steps : tuple of int
    seed : int
        Seed of every random choice of the shared computations (ARPACK start vector, probes).
    """

    model: torch.nn.Module
    full: Objective
    names: tuple[str, ...]
    analysis: Objective
    training: Objective
    evaluation: Objective
    theta_fp: Tensor
    trajectory: Optional[Tensor]
    trajectory_steps: tuple[int, ...]
    seed: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        """Number of quantized parameters ``D``."""
        return self.analysis.dim

    @property
    def selection(self) -> LayerSelection:
        """Exactly the quantized tensors: every map built from this reference uses it."""
        return LayerSelection.exactly(self.names)

    def quant_map(self, quantizer: UniformQuantizer, objective: Optional[Objective] = None) -> QuantMap:
        """``theta -> Q(theta)`` on the reference's tensors (``objective`` defaults to ``analysis``)."""
        return QuantMap(self.analysis if objective is None else objective, quantizer, selection=self.selection)

    # ------------------------------------------------------------ shared FP curvature (cached)
    def fp_operator(self):
        """The Hessian operator at ``theta_fp`` on the analysis set, built once."""
        if "operator" not in self._cache:
            self._cache["operator"] = self.analysis.hessian(self.theta_fp)
        return self._cache["operator"]

    def hill(self, k: int = HILL_K) -> tuple[Tensor, Tensor]:
        """Top-``k`` Hessian eigenpairs at ``theta_fp`` (``k`` clamped to ``D - 1``), cached per ``k``.

        Returns
        -------
        values : Tensor, shape (k,), descending
        vectors : Tensor, shape (D, k)
        """
        k = max(1, min(k, self.dim - 1))
        key = ("hill", k)
        if key not in self._cache:
            self._cache[key] = hessian_eigs(self.analysis, self.theta_fp, k, operator=self.fp_operator(), seed=self.seed)
        return self._cache[key]

    def restore_hill(self, k: int, values: Tensor, vectors: Tensor) -> None:
        """Use ``(values, vectors)``, the :meth:`hill` pairs of an earlier run of the same inputs (a resumed run's cached stage)."""
        self._cache[("hill", max(1, min(k, self.dim - 1)))] = (values, vectors)

    def restore_widths(self, k: int, tau: float, widths: tuple[list, list]) -> None:
        """Use ``widths``, the :meth:`widths` of an earlier run of the same inputs (a resumed run's cached stage)."""
        self._cache[("widths", k, tau)] = widths

    def basis(self, k: int = HILL_K):
        """The hill subspace at ``theta_fp`` as a :class:`~riverscape.gradients.HillBasis` (cached eigenpairs, shared operator)."""
        from ..gradients import HillBasis

        values, vectors = self.hill(k)
        return HillBasis(values, vectors, self.fp_operator())

    def widths(self, k: int = HILL_K, tau: float = TAU) -> tuple[list, list]:
        """Basin widths along ``+-v_i`` of the top-``k`` eigenvectors for tolerance ``tau`` (cached)."""
        from ..gradients.damage import basin_widths

        key = ("widths", k, tau)
        if key not in self._cache:
            values, vectors = self.hill(k)
            self._cache[key] = basin_widths(self.analysis, self.theta_fp, values, vectors, tau)
        return self._cache[key]

    def release(self) -> None:
        """Free the cached operator's gradient graph (the eigenpairs and widths stay)."""
        operator = self._cache.pop("operator", None)
        if operator is not None:
            operator.release()

    # ------------------------------------------------------------ one point
    def evaluate(self, theta: Tensor, *, perplexity: bool = False) -> dict:
        """Evaluation-set ``loss`` and ``accuracy`` (``None`` without a metric), analysis-set ``train_loss``.

        ``perplexity`` adds ``exp(loss)`` (language models; ``None`` when it overflows); it is
        always added, and ``accuracy`` is ``None``, when the evaluation objective's metric is
        the perplexity (token-level losses such as ``"causal_lm"``).
        """
        loss, metric = self.evaluation.loss_and_metric(theta)
        language_model = self.evaluation.metric_name == "perplexity"
        out = {"loss": loss, "accuracy": None if language_model else metric, "train_loss": self.analysis.loss(theta)}
        if perplexity or language_model:
            out["perplexity"] = math.exp(loss) if loss < 700 else None
        return out

    def curvature(self, theta: Tensor, *, trace_matvecs: int = 99) -> dict:
        """Top Hessian eigenvalue (ARPACK, k=1) and Hutch++ trace of ``L`` at ``theta`` (analysis set)."""
        shared = theta is self.theta_fp
        op = self.fp_operator() if shared else self.analysis.hessian(theta)
        try:
            values, _ = hessian_eigs(self.analysis, theta, 1, operator=op, seed=self.seed)
            trace = hessian_trace(self.analysis, theta, matvecs=trace_matvecs, operator=op, seed=self.seed)
        finally:
            if not shared:
                op.release()
        return {"top_eigenvalue": float(values[0]), "trace": trace.value, "trace_stderr": trace.stderr}


def build_reference(
    model: torch.nn.Module,
    loss: Any,
    analysis_data: Any,
    evaluation_data: Any,
    *,
    quantizer: UniformQuantizer,
    selection: Union[LayerSelection, None] = None,
    training_data: Any = None,
    trajectory: Optional[Tensor] = None,
    trajectory_steps: Optional[Any] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    compute_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    batch_size: int = 512,
    memory_limit: Optional[int] = DEFAULT_MEMORY_LIMIT,
    chunk_size: Optional[int] = None,
) -> tuple[Reference, QuantMap]:
    """Choose the quantized tensors once, on the whole model, and build the :class:`Reference`.

    Parameters
    ----------
    model : nn.Module
        The FP model (not modified).
    loss : str or callable
    analysis_data, evaluation_data
        ``(inputs, targets)`` or iterables of batches (already capped by the caller).
    quantizer : UniformQuantizer
        Any quantizer of the run (the selection does not depend on its bits).
    selection : LayerSelection, optional
        ``include``/``exclude``/``keep_first_last`` (default: every registered weight).
    training_data : optional
        QAT training set; ``None`` trains QAT on ``analysis_data`` (one objective, shared).
    trajectory, trajectory_steps : optional
        The FP training trajectory over all trainable parameters, and its steps.
    dtype, device, compute_dtype : optional
        Vector precision, device and model precision of every objective (default: the model's;
        see :class:`~riverscape.objective.Objective`).
    seed : int
    batch_size : int
        Batch size of the restricted objectives (bounds memory; the loss is the full-data mean).
    memory_limit : int or None
        Bytes each objective's materialised batches may occupy before a loader is streamed
        instead (:class:`~riverscape.objective.Objective`, ``stream=None``).
    chunk_size : int or None
        Points per batched evaluation of every objective (``None``: automatic).

    Returns
    -------
    reference : Reference
    chosen : QuantMap
        The map on the whole model that chose the tensors; ``chosen.status()`` and
        ``chosen.warnings()`` describe every parameter.
    """
    common = dict(device=device, dtype=dtype, memory_limit=memory_limit, chunk_size=chunk_size, compute_dtype=compute_dtype)
    full = Objective(model, loss, analysis_data, **common)
    chosen = QuantMap(full, quantizer, selection=selection)
    names = tuple(t.name for t in chosen.targets)

    def restricted(data: Any) -> Objective:
        return Objective(model, loss, data, params=list(names), batch_size=batch_size, **common)

    analysis = restricted(analysis_data)
    training = analysis if training_data is None else restricted(training_data)
    evaluation = restricted(evaluation_data)
    points = trajectory_in_layout(full, analysis, trajectory)
    steps = tuple(int(s) for s in trajectory_steps) if (points is not None and trajectory_steps is not None) else ()
    reference = Reference(model, full, names, analysis, training, evaluation, analysis.theta0, points, steps, seed)
    return reference, chosen
