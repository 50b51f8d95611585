"""Reference answers the tools are checked against (cached on disk, keyed by the workload's bytes).

- ``digits_mlp`` (``exact``): the dense float64 Hessian, ``torch.linalg.eigh``, its trace.
- other workloads: ARPACK ``eigsh`` with ``tol=0`` on float64 HVPs (top-5 and the smallest
  eigenvalue), and a large-budget Hutch++ trace (float32 HVPs, vectorised in blocks) whose own
  standard error is reported next to it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import Tensor

from .workloads import CACHE_DIR, Workload


@dataclass(frozen=True)
class SpectrumReference:
    top: np.ndarray  # (5,) descending
    smallest: float
    method: str


@dataclass(frozen=True)
class TraceReference:
    value: float
    stderr: float
    method: str


def _key(workload: Workload, kind: str) -> str:
    h = hashlib.sha1()
    h.update(f"{workload.name}|{kind}|{torch.__version__}".encode())
    for t in [p.detach() for p in workload.model.parameters()] + [workload.x, workload.y]:
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _encode(value):
    """A cached reference as plain tensors, floats and strings (loadable with ``weights_only=True``)."""
    if isinstance(value, np.ndarray):
        return {"type": "ndarray", "value": torch.from_numpy(value.copy())}
    fields = {k: (torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v) for k, v in vars(value).items()}
    return {"type": type(value).__name__, "fields": fields}


def _decode(stored):
    if stored["type"] == "ndarray":
        return stored["value"].numpy()
    cls = {"SpectrumReference": SpectrumReference, "TraceReference": TraceReference}[stored["type"]]
    return cls(**{k: (v.numpy() if isinstance(v, Tensor) else v) for k, v in stored["fields"].items()})


def _cached(workload: Workload, kind: str, compute, use_cache: bool):
    path = CACHE_DIR / f"{workload.name}-{kind}-{_key(workload, kind)}.pt"
    if use_cache and path.exists():
        try:
            return _decode(torch.load(path, weights_only=True))
        except Exception:  # an older or foreign cache file: recompute
            pass
    value = compute()
    if use_cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        torch.save(_encode(value), path)
    return value


def reference_hvp(workload: Workload, v: Tensor) -> Tensor:
    """``H v`` in float64 (forward-over-reverse on a float64 copy of model and data)."""
    obj = workload.objective(torch.float64, hvp_mode="forward")
    return obj.hvp(obj.theta0, v.double())


def spectrum_reference(workload: Workload, *, top: int = 5, smallest: bool = True, use_cache: bool = True) -> SpectrumReference:
    """Top-``top`` (and, if asked, the smallest) Hessian eigenvalues: exact dense ``eigh`` for
    ``exact`` workloads, else converged float64 ``eigsh``. ``smallest`` is NaN when not asked for
    (it costs a second eigsh run, which only the density task needs)."""

    def compute() -> SpectrumReference:
        obj = workload.objective(torch.float64)
        if workload.exact:
            values = torch.linalg.eigvalsh(obj.dense_hessian(obj.theta0)).numpy()
            return SpectrumReference(values[::-1][:top].copy(), float(values[0]), "dense float64 eigh")
        op = obj.hessian(obj.theta0, mode="reuse")
        v0 = np.random.default_rng(12345).standard_normal(obj.dim)
        values = eigsh(op, k=top, which="LA", tol=0, v0=v0, return_eigenvectors=False)
        low = float(eigsh(op, k=1, which="SA", tol=0, v0=v0, return_eigenvectors=False)[0]) if smallest else float("nan")
        return SpectrumReference(np.sort(values)[::-1].copy(), low, f"float64 eigsh tol=0 ({op.matvecs} HVPs)")

    kind = "spectrum" if (top, smallest) == (5, True) else f"spectrum-top{top}{'-smallest' if smallest else ''}"
    return _cached(workload, kind, compute, use_cache)


def converged_float32_top(workload: Workload, *, top: int = 5, use_cache: bool = True) -> np.ndarray:
    """Top-``top`` eigenvalues of the float32 operator itself, converged by eigsh with ``tol=0``.

    Float32 HVPs differ from float64 ones by ~1e-6..1e-5 (relative), a floor no float32 tool can
    beat against the float64 truth; the solver's own convergence is judged against this.
    """

    def compute() -> np.ndarray:
        obj = workload.objective()
        op = obj.hessian(obj.theta0, mode="reuse")
        v0 = np.random.default_rng(54321).standard_normal(obj.dim)
        return np.sort(eigsh(op, k=top, which="LA", tol=0, v0=v0, return_eigenvectors=False))[::-1].copy()

    return _cached(workload, f"top{top}-float32", compute, use_cache)


def trace_reference(workload: Workload, *, matvecs: int = 1500, use_cache: bool = True) -> TraceReference:
    """``tr H``: exact dense trace, or Hutch++ with ``matvecs`` products and its standard error."""

    def compute() -> TraceReference:
        if workload.exact:
            obj = workload.objective(torch.float64)
            return TraceReference(float(torch.trace(obj.dense_hessian(obj.theta0))), 0.0, "dense float64 trace")
        obj = workload.objective(hvp_mode="forward")
        gen = torch.Generator().manual_seed(987654)
        m = matvecs // 3

        def rademacher(cols: int) -> Tensor:
            return (torch.randint(0, 2, (obj.dim, cols), generator=gen) * 2 - 1).to(obj.dtype)

        def apply(block: Tensor, width: int = 32) -> Tensor:
            return torch.cat([obj.hvps(obj.theta0, block[:, i : i + width]) for i in range(0, block.shape[1], width)], 1)

        q, _ = torch.linalg.qr(apply(rademacher(m)))
        low = float((q * apply(q)).sum())
        g = rademacher(matvecs - 2 * m)
        g = g - q @ (q.T @ g)
        samples = (g * apply(g)).sum(0).double()
        stderr = float(samples.std() / samples.numel() ** 0.5)
        return TraceReference(low + float(samples.mean()), stderr, f"Hutch++ with {matvecs} matvecs (stderr {stderr:.3g})")

    return _cached(workload, f"trace{matvecs}", compute, use_cache)
