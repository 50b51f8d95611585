"""Adapters to the peer libraries, each counting the Hessian-vector products it triggers.

APIs were read from the installed sources (see ``benchmarks/run.py --help`` for versions):

- **PyHessian** 0.1 (``pyhessian.hessian(model, criterion, data=(x, y), cuda=False)``): builds the
  gradient graph once (``loss.backward(create_graph=True)``, filling ``.grad`` on the model it is
  given: we hand it a copy) and reuses it for every HVP; ``eigenvalues(maxIter, tol, top_n)`` is
  power iteration with deflation (largest |lambda|), ``trace(maxIter, tol)`` is Hutchinson,
  ``density(iter, n_v)`` is SLQ and calls ``torch.eig``, removed from PyTorch: we run it under
  :func:`torch_eig_shim`. It draws probes from the global RNG: we seed it inside
  ``torch.random.fork_rng`` so the caller's RNG state is untouched.
- **curvlinops** 3.x (``HessianLinearOperator(model_func, loss_func, params, data,
  check_deterministic=...)``): forward-over-reverse HVPs (``jvp`` of ``jacrev``), vmapped over
  matrix columns; ``.to_scipy()`` gives a scipy ``LinearOperator`` for ``eigsh``; ``hutchpp_trace``.
  The loss must be an ``nn.Module`` with ``.reduction``.
- **hessian-eigenthings** 1.0.0a5 (``HessianOperator(model, dataloader, loss_fn)``): rebuilds the
  gradient graph for every HVP (double backward); ``lanczos(op, k, max_iter, which)``,
  ``trace(op, num_matvecs, method="hutch++")`` and ``spectral_density`` (SLQ). The old
  ``compute_hessian_eigenthings`` entry point no longer exists in this version.
- **loss-landscapes** 3.0.6: ``random_plane(model, metric, distance, steps, normalization)``
  (uniform [0, 1) directions, per-element scaling of 1-D parameters, grid offset by half a step
  so the centre is never evaluated) and ``planar_interpolation(start, end1, end2, metric, steps)``
  (used with riverscape's directions for a point-by-point comparison). Both move the
  parameters in place: we pass copies.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import math
import warnings
from typing import Iterator

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from .workloads import Workload

PEER_DISTRIBUTIONS = {
    "pyhessian": "PyHessian",
    "curvlinops": "curvlinops-for-pytorch",
    "hessian_eigenthings": "hessian-eigenthings",
    "loss_landscapes": "loss-landscapes",
}


def available(module: str) -> bool:
    """Whether a peer's module imports."""
    try:
        importlib.import_module(module)
        return True
    except Exception:  # a broken peer install counts as missing
        return False


def versions() -> dict[str, str | None]:
    """Installed version of every peer (``None`` when missing)."""
    out: dict[str, str | None] = {}
    for module, dist in PEER_DISTRIBUTIONS.items():
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed the global RNG for a peer that uses it, restoring the caller's state afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- PyHessian
def _eig_shim(matrix: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.eig`` (removed in PyTorch 2.0) for the symmetric matrices PyHessian passes.

    Returns the old format: eigenvalues as ``(n, 2)`` (real, imaginary = 0) and the
    eigenvectors as columns (an empty tensor unless requested).
    """
    values, vectors = torch.linalg.eigh(matrix)
    pairs = torch.stack([values, torch.zeros_like(values)], dim=1)
    return pairs, (vectors if eigenvectors else torch.empty(0, dtype=matrix.dtype))


@contextlib.contextmanager
def torch_eig_shim() -> Iterator[None]:
    """Temporarily provide ``torch.eig`` (built on ``torch.linalg.eigh``) for PyHessian's density."""
    had = hasattr(torch, "eig")
    old = getattr(torch, "eig", None)
    torch.eig = _eig_shim
    try:
        yield
    finally:
        if had:
            torch.eig = old
        else:
            del torch.eig


class PyHessianSession:
    """A ``pyhessian.hessian`` on a copy of the workload's model, counting HVPs."""

    def __init__(self, workload: Workload, dtype: torch.dtype | None = None) -> None:
        ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)

        self._module = ph
        self.hvps = 0
        self._orig = ph.hessian_vector_product
        with self.counting(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            self.hessian = ph.hessian(workload.fresh_model(dtype), workload.criterion, data=workload.data(dtype), cuda=False)

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        def counted(grads, params, v):
            self.hvps += 1
            return self._orig(grads, params, v)

        self._module.hessian_vector_product = counted
        try:
            yield
        finally:
            self._module.hessian_vector_product = self._orig

    def hvp(self, v: list[Tensor]) -> list[Tensor]:
        with self.counting():
            return list(self._module.hessian_vector_product(self.hessian.gradsH, self.hessian.params, v))

    def eigenvalues(self, k: int, seed: int, max_iter: int = 100, tol: float = 1e-3) -> list[float]:
        with self.counting(), seeded_global_rng(seed):
            values, _ = self.hessian.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        return [float(v) for v in values]

    def trace(self, matvecs: int, seed: int) -> float:
        with self.counting(), seeded_global_rng(seed):
            # tol=-inf spends the whole budget: its test |mean - prev| / (prev + 1e-6) < tol is
            # negative (so "converged" after 2 probes) whenever the running mean is negative
            samples = self.hessian.trace(maxIter=matvecs, tol=-math.inf)
        return float(np.mean(samples))

    def density(self, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        with self.counting(), seeded_global_rng(seed), torch_eig_shim():
            nodes, weights = self.hessian.density(iter=steps, n_v=1)
        return np.asarray(nodes[0], dtype=np.float64), np.asarray(weights[0], dtype=np.float64)


def split_like(params: list[Tensor], flat: Tensor) -> list[Tensor]:
    """A flat ``(D,)`` vector as a list of tensors shaped like ``params``."""
    out, offset = [], 0
    for p in params:
        out.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


# --------------------------------------------------------------------------- scipy counting
class CountingOperator(LinearOperator):
    """Wraps a scipy ``LinearOperator`` and counts matrix-vector products (columns)."""

    def __init__(self, inner: LinearOperator) -> None:
        super().__init__(dtype=inner.dtype, shape=inner.shape)
        self.inner = inner
        self.matvecs = 0

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        self.matvecs += 1
        return self.inner.matvec(x)

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        self.matvecs += x.shape[1]
        return self.inner.matmat(x)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)


# --------------------------------------------------------------------------- curvlinops
def curvlinops_hessian(workload: Workload, dtype: torch.dtype | None = None):
    """curvlinops' ``HessianLinearOperator`` on a copy of the model (no determinism probe)."""
    from curvlinops import HessianLinearOperator

    model = workload.fresh_model(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    return HessianLinearOperator(model, workload.criterion, params, [workload.data(dtype)], check_deterministic=False)


def curvlinops_scipy(workload: Workload, dtype: torch.dtype | None = None) -> CountingOperator:
    """``HessianLinearOperator(...).to_scipy()`` wrapped to count matvecs (float64 numpy side)."""
    return CountingOperator(curvlinops_hessian(workload, dtype).to_scipy(np.float64))


def curvlinops_hutchpp(workload: Workload, matvecs: int, seed: int) -> tuple[float, int]:
    """curvlinops' ``hutchpp_trace`` (budget rounded down to a multiple of 3)."""
    from curvlinops import hutchpp_trace

    op = curvlinops_hessian(workload)
    budget = matvecs - matvecs % 3
    counted = _CountingTorchOperator(op)
    with seeded_global_rng(seed):
        value = hutchpp_trace(counted, budget)
    return float(value), counted.matvecs


class _CountingTorchOperator:
    """Duck-typed stand-in for a curvlinops operator in ``hutchpp_trace`` that counts columns."""

    def __init__(self, op) -> None:
        self.op = op
        self.shape = op.shape
        self.device = op.device
        self.dtype = op.dtype
        self.matvecs = 0

    def __matmul__(self, x: Tensor) -> Tensor:
        self.matvecs += 1 if x.ndim == 1 else x.shape[1]
        return self.op @ x


# --------------------------------------------------------------------------- hessian-eigenthings
def eigenthings_operator(workload: Workload, dtype: torch.dtype | None = None):
    """hessian-eigenthings' ``HessianOperator`` (autograd double backward) with a matvec counter."""
    from hessian_eigenthings import HessianOperator, supervised_loss

    class Counting(HessianOperator):
        matvecs = 0

        def matvec(self, v: Tensor) -> Tensor:
            self.matvecs += 1
            return super().matvec(v)

    return Counting(workload.fresh_model(dtype), [workload.data(dtype)], supervised_loss(workload.criterion))


# --------------------------------------------------------------------------- loss-landscapes
def _model_at(workload: Workload, theta: Tensor):
    model = workload.fresh_model()
    torch.nn.utils.vector_to_parameters(theta.detach().clone(), list(model.parameters()))
    return model


def loss_landscapes_plane(workload: Workload, theta: Tensor, d1: Tensor, d2: Tensor, span: float, steps: int) -> np.ndarray:
    """``planar_interpolation`` laid out on riverscape's grid ``theta + a d1 + b d2``.

    ``a, b`` run over ``linspace(-span, span, steps)``; the result is indexed ``[i_a, i_b]``.
    planar_interpolation evaluates ``start + i h d1 + (j + 1) h d2`` for ``i, j < steps``, so the
    start is shifted by one extra step along ``d2``.
    """
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    h = 2 * span / (steps - 1)
    start = theta - span * d1 - (span + h) * d2
    models = [_model_at(workload, t) for t in (start, start + steps * h * d1, start + steps * h * d2)]
    metric = Loss(workload.criterion, workload.x, workload.y)
    with torch.no_grad():
        return np.asarray(loss_landscapes.planar_interpolation(*models, metric, steps=steps, deepcopy_model=False), dtype=np.float64)


def loss_landscapes_random_plane(workload: Workload, steps: int, seed: int, distance: float = 1.0) -> np.ndarray:
    """loss-landscapes' own ``random_plane`` with filter normalisation (its directions, its grid)."""
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    metric = Loss(workload.criterion, workload.x, workload.y)
    with seeded_global_rng(seed), torch.no_grad():
        grid = loss_landscapes.random_plane(workload.fresh_model(), metric, distance=distance, steps=steps, normalization="filter", deepcopy_model=False)
    return np.asarray(grid, dtype=np.float64)
