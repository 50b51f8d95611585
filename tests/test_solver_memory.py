"""Memory of the eigensolvers on a float32 model: the Lanczos basis in float32, no float64 copies.

Measure: the extra peak of a call, numpy allocations by ``tracemalloc`` (numpy reports its data
buffers to it; ARPACK's basis and work arrays are numpy arrays) plus torch's CPU tensor
allocations from the profiler's memory events (every allocation and free of the CPU allocator,
replayed in order: the running total's maximum). The two are measured in two runs of the same
deterministic call (the profiler's own bookkeeping is Python memory that tracemalloc would
count), and the sum of the two peaks bounds the joint peak from above, so the bounds asserted
below are conservative. The profiler is driven through ``torch.autograd``'s low-level calls:
``torch.profiler.profile`` would spend seconds turning the events into Python objects.
"""
from __future__ import annotations

import tracemalloc
from typing import Callable

import torch
from torch import nn
from torch._C._profiler import _ExperimentalConfig
from torch.autograd import ProfilerConfig, ProfilerState, _disable_profiler, _enable_profiler, _prepare_profiler
from torch.profiler import ProfilerActivity

import riverscape as rs
from riverscape.landscape.curvature import hessian_eigs, spectral_density

from helpers import assert_close


def extra_peak_bytes(call: Callable[[], object]) -> tuple[int, int]:
    """``(numpy, torch)`` peak bytes allocated by ``call()`` beyond what was held before it (two runs)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        call()
        numpy_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())  # profile_memory
    activities = {ProfilerActivity.CPU}
    _prepare_profiler(config, activities)
    _enable_profiler(config, activities)
    try:
        call()
    finally:
        result = _disable_profiler()
    events = sorted((e for e in result.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    running = torch_peak = 0
    for event in events:
        running += event.nbytes()
        torch_peak = max(torch_peak, running)
    return numpy_peak, torch_peak


def _mlp_objective(dtype: torch.dtype) -> rs.Objective:
    """A 64-420-420-10 tanh MLP (D = 208,330) on 32 random samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 420), nn.Tanh(), nn.Linear(420, 420), nn.Tanh(), nn.Linear(420, 10))
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g))
    return rs.Objective(model.to(dtype), "cross_entropy", data, dtype=dtype)


def test_float32_top5_peak_memory_is_the_float32_basis():
    obj = _mlp_objective(torch.float32)
    d, ncv, k = obj.dim, 20, 5
    op = obj.hessian(obj.theta0)
    op @ torch.ones(d)  # build the gradient graph first: it is "the model", not the solver
    numpy_peak, torch_peak = extra_peak_bytes(lambda: hessian_eigs(obj, k=k, ncv=ncv, operator=op, seed=0))
    basis = (ncv + 2) * d * 4
    # The solver holds ncv basis vectors and the residual, then ncv + k vectors while the k
    # eigenvectors are copied out; one product adds its output and the HVP's temporaries (a few
    # D). 1.5 x (ncv + 2) x D float32 covers that (ncv + k + 6 = 31 <= 33 vectors). ARPACK on the
    # float64 view of the same operator holds (2 ncv + k + 4) x D float64 at the end (392 D bytes
    # against this bound's 132 D bytes), so the bound fails on a float64 basis.
    assert numpy_peak + torch_peak <= 1.5 * basis, (numpy_peak / (4 * d), torch_peak / (4 * d))
    assert numpy_peak < 0.05 * basis  # nothing of the solver leaves torch


def test_slq_holds_one_probe_basis_at_a_time():
    obj = _mlp_objective(torch.float32)
    d, steps = obj.dim, 12
    op = obj.hessian(obj.theta0)
    op @ torch.ones(d)
    numpy_peak, torch_peak = extra_peak_bytes(lambda: spectral_density(obj, operator=op, lanczos_steps=steps, probes=2, seed=0))
    # one probe's basis (steps x D float32), the probe and its int64 draw (3 D), the residual and a
    # product's temporaries (a few D): measured 18 D; 1.5 x (steps + 2) x D = 21 D covers them, while
    # a float64 basis (24 D) or two bases alive at once (24 D) do not fit
    assert numpy_peak + torch_peak <= 1.5 * (steps + 2) * d * 4, (numpy_peak / (4 * d), torch_peak / (4 * d))


def test_float32_eigenvalues_agree_with_float64():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # D = 83 > ncv: the iterative path
    g = torch.Generator().manual_seed(4)
    data = (torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g))
    obj64 = rs.Objective(model.double(), "cross_entropy", data, dtype=torch.float64)
    obj32 = rs.Objective(model.float(), "cross_entropy", (data[0].float(), data[1]), dtype=torch.float32)
    values64, _ = hessian_eigs(obj64, k=4, seed=0)  # ARPACK in float64, tol 1e-8
    values32, vectors32 = hessian_eigs(obj32, k=4, seed=0)  # thick-restart Lanczos in float32, tol 1e-5
    assert vectors32.dtype == torch.float32
    # float32 stops at residual <= 1e-5 |lambda| (eigenvalue error below that), and its HVPs differ
    # from the float64 ones by float32 rounding of the model (~1e-7 relative x the Hessian's
    # conditioning): 2e-5 relative to the top eigenvalue covers both
    assert_close(values32, values64, rtol=0, atol=2e-5 * float(values64[0]), what="float32 vs float64 top-4")
