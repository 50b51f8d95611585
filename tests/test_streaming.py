"""Streaming data: the Objective re-reads a loader per evaluation, with the materialised numbers and bounded memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import riverscape as rs
from riverscape.errors import InputError
from riverscape.landscape.curvature import hessian_eigs

from helpers import assert_close

SIZES = (5, 3, 9, 2, 6)  # unequal batches: a plain mean of batch means would be wrong


class Loader:
    """Re-iterable: every pass creates the same batches on the fly (nothing is stored)."""

    def __init__(self, sizes=SIZES, *, shuffle_after_first: bool = False, drop_last_after_first: bool = False) -> None:
        self.sizes = sizes
        self.passes = 0
        self.shuffle_after_first = shuffle_after_first
        self.drop_last_after_first = drop_last_after_first

    def __iter__(self):
        order = list(range(len(self.sizes)))
        if self.passes and self.shuffle_after_first:
            order = order[::-1]
        if self.passes and self.drop_last_after_first:
            order = order[:-1]
        self.passes += 1
        for i in order:
            g = torch.Generator().manual_seed(100 + i)
            x = torch.randn(self.sizes[i], 6, generator=g, dtype=torch.float64)
            yield x, torch.randint(0, 3, (self.sizes[i],), generator=g)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()  # 83 parameters


def test_streaming_matches_materialised_loss_grad_hvp_and_eigenvalues():
    model = _mlp()
    loader = Loader()
    held = rs.Objective(model, "cross_entropy", list(Loader()), stream=False)
    streamed = rs.Objective(model, "cross_entropy", loader, stream=True)
    assert streamed.streaming and not held.streaming
    assert streamed.batch_sizes == held.batch_sizes == list(SIZES) and streamed.n_batches == 5
    theta = held.theta0 + 0.3 * torch.randn(held.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = torch.randn(held.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # the same float64 operations in the same order: equal to rounding (1e-10 is the bound)
    assert streamed.loss(theta) == pytest.approx(held.loss(theta), rel=1e-12)
    assert_close(streamed.grad(theta), held.grad(theta), rtol=1e-10, atol=1e-14, what="streamed grad")
    assert_close(streamed.hvp(theta, v), held.hvp(theta, v), rtol=1e-10, atol=1e-14, what="streamed hvp")
    V = torch.randn(held.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_close(streamed.hvps(theta, V), held.hvps(theta, V), rtol=1e-10, atol=1e-14, what="streamed hvps")
    thetas = theta + 0.1 * torch.randn(4, held.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for (a, am), (b, bm) in ((streamed.evaluate(thetas), held.evaluate(thetas)), (streamed.evaluate(thetas, chunk_size=1), held.evaluate(thetas))):
        assert_close(a, b, rtol=1e-12, atol=1e-15, what="streamed batched losses")
        assert_close(am, bm, rtol=0, atol=1e-12, what="streamed accuracy")
    # the materialised operator reuses gradient graphs, the streamed one cannot: forward-over-reverse
    op_held, op_streamed = held.hessian(theta), streamed.hessian(theta)
    assert (op_held.mode, op_streamed.mode) == ("reuse", "forward")
    top_held, _ = hessian_eigs(held, theta, 4, operator=op_held)
    top_streamed, _ = hessian_eigs(streamed, theta, 4, operator=op_streamed)
    assert_close(top_streamed, top_held, rtol=1e-10, atol=1e-12, what="top Hessian eigenvalues")
    assert_close(top_held, torch.linalg.eigvalsh(held.dense_hessian(theta)).flip(0)[:4], rtol=1e-9, atol=1e-12, what="vs dense")
    passes = loader.passes
    streamed.loss(theta)
    assert loader.passes == passes + 1  # one evaluation, one pass over the loader
    with pytest.raises(ValueError, match="streaming Objective does not hold"):
        streamed.hessian(theta, mode="reuse")
    with pytest.raises(RuntimeError, match="holds no batches"):
        streamed.batches


@pytest.mark.parametrize("change,message", [("shuffle_after_first", "streamed batch 0 differs"), ("drop_last_after_first", "yielded 4 batches, the first pass 5")])
def test_a_loader_that_changes_between_passes_is_refused(change, message):
    streamed = rs.Objective(_mlp(), "cross_entropy", Loader(**{change: True}), stream=True)
    with pytest.raises(ValueError, match=message):
        streamed.loss(streamed.theta0)


def test_one_shot_iterators_and_the_automatic_choice():
    model = _mlp()
    with pytest.raises(TypeError, match="iterated again"):
        rs.Objective(model, "cross_entropy", iter(Loader()), stream=True)
    batch_bytes = 9 * 6 * 8 + 9 * 8  # the largest batch: float64 inputs and int64 targets
    auto = rs.Objective(model, "cross_entropy", Loader(), memory_limit=2 * batch_bytes)
    assert auto.streaming
    assert not rs.Objective(model, "cross_entropy", Loader()).streaming  # far below the default 8 GiB
    assert not rs.Objective(model, "cross_entropy", Loader(), memory_limit=None).streaming
    with pytest.raises(InputError, match="one-shot iterator cannot be streamed"):
        rs.Objective(model, "cross_entropy", iter(Loader()), memory_limit=2 * batch_bytes)
    with pytest.raises(ValueError, match="hvp_mode='reuse'"):
        rs.Objective(model, "cross_entropy", Loader(), stream=True, hvp_mode="reuse")


def test_dict_batches_stream_with_token_weights():
    from test_batching import TinyLM, _token_batches

    model = TinyLM("dict").double()
    batches = _token_batches()
    held = rs.Objective(model, "model", batches, stream=False)
    streamed = rs.Objective(model, "model", batches, stream=True)  # a list can be re-read: it streams
    assert streamed.batch_counts == held.batch_counts
    theta = held.theta0
    assert streamed.loss(theta) == pytest.approx(held.loss(theta), rel=1e-13)
    assert streamed.metric(theta) == pytest.approx(held.metric(theta), rel=1e-13)
    assert_close(streamed.grad(theta), held.grad(theta), rtol=1e-10, atol=1e-14, what="streamed token grad")


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, torch
    import riverscape as rs

    BATCHES, N, D = 32, 256, 512   # one batch: 256 x 512 float64 = 1 MiB; the data set: 32 MiB

    class Generated:
        def __iter__(self):
            for i in range(BATCHES):
                g = torch.Generator().manual_seed(i)
                yield torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, 4, (N,), generator=g)

    def peak_growth_mib(stream):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
        status = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))
        start = status("VmRSS:")
        obj = rs.Objective(model, "cross_entropy", Generated(), stream=stream)
        obj.hvp(obj.theta0, obj.grad(obj.theta0))
        obj.losses(obj.theta0 + torch.zeros(3, obj.dim, dtype=torch.float64))
        return (status("VmHWM:") - start) / 1024

    torch.manual_seed(0)
    model = torch.nn.Linear(D, 4).double()
    warm = rs.Objective(model, "cross_entropy", [next(iter(Generated()))], stream=False)
    warm.hvp(warm.theta0, warm.grad(warm.theta0))  # first-use costs of autograd/functorch, outside the measurement
    warm.losses(warm.theta0 + torch.zeros(3, warm.dim, dtype=torch.float64))
    print(json.dumps({"streamed": peak_growth_mib(True), "held": peak_growth_mib(False)}))
    """
)


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _clear_refs_works(), reason="needs Linux's resettable peak RSS")
def test_streaming_peak_memory_is_one_batch_not_the_data_set():
    # 32 batches of 1 MiB generated on the fly (32 MiB of data) against a 4 x 513 model, in a fresh
    # process with the peak RSS reset before each run. Streaming holds at most a few batches at
    # once: the generated one (moving it is a no-op: same dtype and device), the tensors of its
    # gradient/HVP and of the 3-point vmapped `losses` (outputs 3 x 256 x 4, inputs shared).
    # Stated margin: 12 MiB = a few live 1 MiB batches + allocator slack (glibc keeps freed
    # blocks) + the first-pass records; the materialised run must grow by about 32 MiB, which
    # shows the measurement is not blind.
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=120, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert growth["streamed"] < 1 + 12, f"streaming grew the peak RSS by {growth['streamed']:.1f} MiB"
    assert growth["held"] > 28, f"materialising 32 MiB grew the peak RSS by only {growth['held']:.1f} MiB: the measurement is blind"
