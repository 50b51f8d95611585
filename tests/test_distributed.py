"""Data-parallel riverscape on torch.distributed: two Gloo processes on CPU against one process.

Oracle: the same computation in this (single) process on all the data. The two worker
processes hold strided shards of unequal size (19 and 18 samples of 37; token counts that
differ per shard for the causal-LM loss) and must reproduce every number, in float64.

Tolerance: the processes add the same per-batch terms as one process, but grouped per shard
(``(a1 + a3 + ...) + (a2 + a4 + ...)`` instead of ``a1 + a2 + ...``), so sums differ by
rounding, about ``n_batches * eps ~ 1e-15`` relative; ARPACK, Hutch++ and the alignment null
amplify that by at most their conditioning. 1e-9 relative (and an absolute floor of 1e-12 for
entries that are ~0) is far above rounding and far below any real error (a wrong weight or a
missing shard changes values at 1e-2).

This file is also the worker: ``python test_distributed.py worker OUT.json`` run with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` computes the numbers on its shard.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close, digits_mlp_checkpoint
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # worker: import this worktree's riverscape
    sys.path.insert(0, str(ROOT))

import riverscape as rs  # noqa: E402
from riverscape import distributed  # noqa: E402

RTOL, ATOL = 1e-9, 1e-12  # see the module docstring
# Point-parallel: every process holds all the data and computes its points exactly as one process
# would (same batches, same order); only the grouping of points into vmapped chunks differs, which
# can move a loss by rounding (1e-16). 1e-12 relative is that with margin; any mix-up of points or
# draws moves values at 1e-3 or more.
POINT_RTOL = 1e-12
# A finite-difference HVP divides the gradients' rounding differences by h = eps^(1/3) ||theta|| / ||v||
# (~1e-5 here): the shard-order rounding of 1e-16 becomes ~1e-11 absolute, the method's own nominal
# accuracy eps^(2/3) ~ 4e-11 (Objective.finite_difference_accuracy). 1e-9 absolute leaves margin.
FD_ATOL = 1e-9
TIMEOUT = 120  # seconds any launched process may take before the test fails (a hang)
HVP_MODES = ("reuse", "forward", "reverse", "finite_difference")


# ---------------------------------------------------------------------------------------- problems
def _classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (37,), generator=g)
    return model, (x, y)


def _language_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(7, 3), nn.Linear(3, 7)).double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (11, 6), generator=g)
    labels = ids.clone()
    labels[torch.rand(11, 6, generator=g) < 0.4] = -100  # ignored tokens: the shards count different numbers of tokens
    return model, (ids, labels)


def _stream(data, batch):
    """A re-iterable list of batches (streamed by the Objective)."""
    x, y = data
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)]


def compute(world: int) -> dict:
    """Every number the test compares, on this process's shard (all data when ``world == 1``)."""
    from riverscape.gradients import HillBasis, alignment
    from riverscape.landscape.curvature import hessian_eigs, hessian_trace
    from riverscape.landscape.directions import random_direction
    from riverscape.landscape.slices import slice_2d
    from riverscape.quant import UniformQuantizer

    out = {}
    model, data = _classifier()
    obj = distributed.data_parallel(rs.Objective(model, "cross_entropy", distributed.shard(data), batch_size=5, dtype=torch.float64))
    theta = obj.theta0
    g = torch.Generator().manual_seed(4)
    v = torch.randn(obj.dim, generator=g, dtype=torch.float64)
    block = torch.randn(obj.dim, 3, generator=g, dtype=torch.float64)
    points = theta + 0.1 * torch.randn(3, obj.dim, generator=g, dtype=torch.float64)
    value, grad = obj.value_and_grad(theta)
    losses, metrics = obj.evaluate(points)
    out.update(n=[obj.n_samples, obj.n_counted], loss=obj.loss(theta), metric=obj.metric(theta), grad=grad.tolist(),
               value=value, grad2=obj.grad(theta).tolist(), hvp=obj.hvp(theta, v).tolist(), hvps=obj.hvps(theta, block).tolist(),
               losses=losses.tolist(), metrics=metrics.tolist(), loss_and_metric=list(obj.loss_and_metric(theta)))
    for mode in HVP_MODES:
        op = obj.hessian(theta, mode=mode)
        out[f"op_{mode}"] = {"block": (op @ block).tolist(), "vector": (op @ v).tolist()}
    values, _ = hessian_eigs(obj, theta, 3, seed=0)
    out["eigenvalues"] = values.tolist()
    out["lanczos"] = split_lanczos_numbers(obj, theta)
    out["trace"] = hessian_trace(obj, theta, matvecs=12, seed=5).value
    d1, d2 = random_direction(obj, seed=6), random_direction(obj, seed=7)
    out["slice"] = slice_2d(obj, theta, d1, d2, span=0.5, steps=3, progress=False).loss.tolist()
    res = alignment(obj, theta, UniformQuantizer(2), basis=HillBasis.compute(obj, theta, k=2), n_null=3, floor_steps=5,
                    seed=0, progress=False).to_dict()
    out["alignment"] = {k: val for k, val in res.items() if isinstance(val, float)}

    streamed = distributed.data_parallel(rs.Objective(model, "cross_entropy", distributed.shard(_stream(data, 4)), stream=True,
                                                      dtype=torch.float64))
    out["stream"] = [streamed.loss(theta), *streamed.grad(theta).tolist(), *streamed.hvp(theta, v).tolist()]

    lm, tokens = _language_model()
    lm_obj = distributed.data_parallel(rs.Objective(lm, "causal_lm", distributed.shard(tokens), batch_size=2, dtype=torch.float64))
    w = torch.randn(lm_obj.dim, generator=g, dtype=torch.float64)
    out["lm"] = {"n": [lm_obj.n_samples, lm_obj.n_counted], "loss": lm_obj.loss(lm_obj.theta0), "metric": lm_obj.metric(lm_obj.theta0),
                 "grad": lm_obj.grad(lm_obj.theta0).tolist(), "hvp": lm_obj.hvp(lm_obj.theta0, w).tolist(),
                 "losses": lm_obj.losses(lm_obj.theta0 + 0.1 * torch.stack([w, -w])).tolist()}
    out["points"] = point_parallel_numbers()
    out["world"] = world
    return out


def split_lanczos_numbers(obj, theta) -> dict:
    """Top-3 eigenpairs by the torch thick-restart Lanczos, whose basis is split by coordinates across processes.

    Records the length of every basis block this process sent to the all-gathers: its own
    coordinates (20 and 19 of 39 in two processes), so the basis really was split.
    """
    from riverscape.linalg import eigenpairs

    op = obj.hessian(theta)
    blocks = []
    if op.coordinate_split is not None:
        gather = op.coordinate_split.gather_coordinates
        op.coordinate_split = SimpleNamespace(coordinates=op.coordinate_split.coordinates, sum=op.coordinate_split.sum,
                                              gather_coordinates=lambda part, n: (blocks.append(part.shape[0]), gather(part, n))[1])
    values, vectors = eigenpairs(op, 3, solver="lanczos", seed=0)
    vectors = vectors * torch.sign(vectors[vectors.abs().argmax(dim=0), range(3)])  # a fixed sign per eigenvector
    return {"values": values.tolist(), "vectors": vectors.tolist(), "blocks": sorted(set(blocks)), "gathers": len(blocks),
            "products": op.matvecs}


def point_parallel_numbers() -> dict:
    """A 5x5 slice, a path profile (plain and quantized), a basin-width scan and the alignment with its nulls, point-parallel.

    Every process holds all 37 samples; the points of every evaluation call and the null draws
    are split strided (7 null draws: 4 and 3).
    """
    from riverscape.gradients import HillBasis, alignment, basin_widths, matched_null
    from riverscape.landscape.directions import random_direction
    from riverscape.landscape.paths import BezierPath, path_losses
    from riverscape.landscape.slices import slice_2d
    from riverscape.quant import UniformQuantizer

    model, data = _classifier()
    obj = distributed.point_parallel(rs.Objective(model, "cross_entropy", data, batch_size=5, dtype=torch.float64))
    theta = obj.theta0
    d1, d2 = random_direction(obj, seed=6), random_direction(obj, seed=7)
    points, gradients = [], []  # the work this process did: evaluated points, null-draw gradients
    obj._evaluate_chunk = lambda chunk: (points.append(chunk.shape[0]), type(obj)._evaluate_chunk(obj, chunk))[1]
    out = {"slice": slice_2d(obj, theta, d1, d2, span=0.5, steps=5, progress=False).loss.tolist()}
    del obj._evaluate_chunk
    obj.value_and_grad = lambda point: (gradients.append(1), type(obj).value_and_grad(obj, point))[1]
    signs = torch.randint(0, 2, (7, obj.dim), generator=torch.Generator().manual_seed(8)).double() * 2 - 1
    out["null"] = matched_null(obj, theta, 0.05 * d1, signs).cosines
    del obj.value_and_grad
    out["work"] = {"slice_points": sum(points), "null_gradients": len(gradients)}
    profile = path_losses(obj, BezierPath(torch.stack([theta, theta + d1, theta + d2])), 9, quantizer=UniformQuantizer(3), progress=False)
    out["path"] = {"loss": profile.loss.tolist(), "metric": profile.metric.tolist(), "quantized": profile.quantized_loss.tolist()}
    basis = HillBasis.compute(obj, theta, k=2)
    out["widths"] = list(basin_widths(obj, theta, basis.values, basis.vectors, 0.05))
    res = alignment(obj, theta, UniformQuantizer(2), basis=basis, n_null=7, floor_steps=5, seed=0, progress=False).to_dict()
    out["alignment"] = {k: val for k, val in res.items() if isinstance(val, float)}
    if distributed.world_size() > 1:  # the two modes exclude each other, in either order
        refused = []
        for first, second in ((distributed.data_parallel, distributed.point_parallel), (distributed.point_parallel, distributed.data_parallel)):
            try:
                second(first(rs.Objective(model, "cross_entropy", distributed.shard(data) if first is distributed.data_parallel else data,
                                          dtype=torch.float64)))
            except ValueError as err:
                refused.append(str(err))
        out["refused"] = refused
    return out


# ---------------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, **extra: str) -> dict:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    return env


def _start(args: list[str], world: int, tmp_path: Path, **extra: str) -> list[subprocess.Popen]:
    """Start ``python this_file args...`` as ``world`` processes of one group."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, __file__, *args, str(tmp_path / f"rank{r}.json")], env=_env(r, world, port, **extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def _finish(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    """Wait for every process (each within TIMEOUT, else the test fails and they are killed)."""
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def _launch(args: list[str], world: int, tmp_path: Path, **extra: str) -> list[subprocess.CompletedProcess]:
    return _finish(_start(args, world, tmp_path, **extra))


def _close(actual, expected, what, rtol=RTOL):
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), what
    a, e = torch.where(torch.isinf(e), 0.0, a), torch.where(torch.isinf(e), 0.0, e)  # an infinite basin width is compared as such
    err = (a - e).abs()
    bound = (FD_ATOL if "finite_difference" in what else ATOL) + rtol * e.abs()
    assert bool((err <= bound).all()), f"{what}: max abs error {err.max().item():.3e} (values {a.flatten()[:4].tolist()} vs {e.flatten()[:4].tolist()})"


def _compare(actual, expected, what="", rtol=RTOL) -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), what
        for key in expected:
            _compare(actual[key], expected[key], f"{what}.{key}", rtol)
    elif expected is None:
        assert actual is None, what
    else:
        _close(actual, expected, what, rtol)


# ---------------------------------------------------------------------------------------- tests
def test_two_gloo_processes_give_the_one_process_numbers(tmp_path):
    procs = _start(["worker"], 2, tmp_path)
    single = compute(1)  # while the workers run
    runs = _finish(procs)
    for r, run in enumerate(runs):
        assert run.returncode == 0, f"rank {r} failed:\n{run.stderr[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r.pop("shard_size") for r in ranks] == [19, 18], "unequal shards, or the test means less"
    assert [r.pop("rank") for r in ranks] == [0, 1]
    # point-parallel: each process computed its strided share of every evaluation call and of the 7 null
    # draws. The slice's 25 points come in three calls: points 0 and 1 alone (the adaptive chunk
    # timing; one point each, so process 0's), then the other 23 together (12 and 11)
    assert single["points"].pop("work") == {"slice_points": 25, "null_gradients": 7}
    assert [r["points"].pop("work") for r in ranks] == [{"slice_points": 14, "null_gradients": 4}, {"slice_points": 11, "null_gradients": 3}]
    # the Lanczos basis split by coordinates: each process held and sent its own block (20 and 19 of 39),
    # one all-gather per product plus one per returned eigenvector; one process gathers nothing
    lanczos = [r["lanczos"] for r in ranks]
    assert [b.pop("blocks") for b in lanczos] == [[20], [19]] and single["lanczos"].pop("blocks") == []
    assert [b.pop("gathers") - b["products"] for b in lanczos] == [3, 3] and single["lanczos"].pop("gathers") == 0
    assert ranks[0] == ranks[1], "the two processes disagree (they must compute bit-identical numbers)"
    assert ranks[0]["n"] == single["n"] == [37, 37] and ranks[0]["world"] == 2
    assert ranks[0]["lm"]["n"] == single["lm"]["n"]
    for key in single:
        if key not in ("world", "points"):
            _compare(ranks[0][key], single[key], key)
    # point-parallel: the one-process numbers, and the mixed mode refused in either order
    refused = ranks[0]["points"].pop("refused")
    _compare(ranks[0]["points"], single["points"], "points", rtol=POINT_RTOL)
    assert len(refused) == 2 and all("data_parallel" in m and "point_parallel" in m and "shard" in m for m in refused), refused


def test_an_exception_on_one_process_ends_both_quickly_with_one_error(tmp_path):
    start = time.perf_counter()
    runs = _launch(["fail"], 2, tmp_path, RIVERSCAPE_DIST_TIMEOUT="100")
    elapsed = time.perf_counter() - start
    # the collective timeout (100 s) is not what ended rank 0: the failed peer's closed connection did
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert runs[1].returncode == 2 and runs[0].returncode == 1, [r.returncode for r in runs]
    errors = [line for run in runs for line in run.stderr.splitlines() if line.startswith("riverscape: error:")]
    assert errors == ["riverscape: error: boom on rank 1"], [r.stderr for r in runs]


def test_a_silent_hang_ends_at_the_collective_timeout(tmp_path):
    start = time.perf_counter()
    runs = _launch(["hang"], 2, tmp_path, RIVERSCAPE_DIST_TIMEOUT="2")
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert runs[0].returncode == 1
    errors = [line for run in runs for line in run.stderr.splitlines() if line.startswith("riverscape: error:")]
    assert len(errors) == 1 and re.match(r"riverscape: error: process 0 of 2: an all-reduce failed because another process", errors[0]), errors


def test_shard_is_strided_and_one_process_is_untouched():
    x, y = torch.arange(7.0)[:, None], torch.arange(7)
    assert distributed.shard((x, y), 1, 3)[1].tolist() == [1, 4]
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 7, 2)]
    assert [b[1].tolist() for b in distributed.shard(batches, 0, 2)] == [[0, 1], [4, 5]]
    assert distributed.shard((x, y)) == (x, y) and distributed.world_size() == 1 and not distributed.launched({})
    obj = rs.Objective(nn.Linear(1, 1).double(), "mse", (x, y.double()[:, None]))
    assert distributed.data_parallel(obj) is obj and obj.reduction is None
    assert distributed.point_parallel(obj) is obj and obj.point_split is None and obj.point_share(5) == range(5)
    assert obj.gather_points(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError, match="computes 2 of the 2 points, got 1"):
        obj.gather_points(["a"], 2)


class _Twice:
    """A reduction over two identical "processes": every share counted twice (a stand-in for two shards).

    Counts its messages: processes must exchange the same number of messages whatever their
    shard, so a value, gradient, product block or batched evaluation must be one message.
    """

    def __init__(self) -> None:
        self.calls = 0

    def sum(self, tensor):
        self.calls += 1
        return tensor.mul_(2)

    def agree(self, value):
        return value


def test_a_reduction_hook_is_applied_once_per_value_and_qat_and_calibration_refuse_it():
    from riverscape.quant import UniformQuantizer
    from riverscape.quant.ptq import GPTQ, ptq
    from riverscape.quant.qat import qat

    model, data = _classifier()
    plain = rs.Objective(model, "cross_entropy", data, batch_size=5, dtype=torch.float64)
    obj = rs.Objective(model, "cross_entropy", data, batch_size=5, dtype=torch.float64)
    obj.reduction = _Twice()  # shares twice the full-data mean: each value is exactly doubled, once
    theta, v = obj.theta0, torch.ones(obj.dim, dtype=torch.float64)
    assert obj.loss(theta) == 2 * plain.loss(theta) and obj.metric(theta) == 2 * plain.metric(theta)
    assert torch.equal(obj.grad(theta), 2 * plain.grad(theta)) and torch.equal(obj.hvp(theta, v), 2 * plain.hvp(theta, v))
    block = torch.stack([v, -v], dim=1)
    for mode in HVP_MODES[:3]:  # one message per product call in every exact mode ("auto" may resolve differently per shard)
        op, plain_op = obj.hessian(theta, mode=mode), plain.hessian(theta, mode=mode)
        before = obj.reduction.calls
        assert torch.equal(op @ block, 2 * (plain_op @ block)) and torch.equal(op @ v, 2 * (plain_op @ v)), mode
        assert obj.reduction.calls - before == 2, mode
    before = obj.reduction.calls
    losses, metrics = obj.evaluate(torch.stack([theta, theta + v, theta - v]), chunk_size=2)  # two chunks, one message
    ref_losses, ref_metrics = plain.evaluate(torch.stack([theta, theta + v, theta - v]), chunk_size=2)
    assert torch.equal(losses, 2 * ref_losses) and torch.equal(metrics, 2 * ref_metrics) and obj.reduction.calls - before == 1
    with pytest.raises(ValueError, match="data-parallel"):
        qat(obj, UniformQuantizer(2), steps=1)
    with pytest.raises(ValueError, match="data-parallel"):
        ptq(obj, UniformQuantizer(2), method=GPTQ())


def test_launch_from_torchrun_and_slurm_environments():
    assert distributed.launch_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == distributed.Launch(1, 4, 1, "torchrun")
    assert distributed.launch_from_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}) == distributed.Launch(3, 8, 0, "slurm")
    assert distributed.launch_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        try:
            distributed.launch_from_env(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was accepted")


def test_torchrun_analyze_writes_the_one_process_report_from_process_0_only(tmp_path):
    digits_mlp_checkpoint(tmp_path / "ckpt.pt", steps=20)
    # 255 samples: shards of 128 and 127; the 11x11 slices exercise process 0's timed chunk choice
    args = ["analyze", "ckpt.pt", "--bits", "2", "--budget", "quick", "--max-samples", "255", "--skip", "density,layers,paths"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "riverscape"]
    launched = [subprocess.Popen(cmd + args + ["--out", out], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for cmd, out in (([sys.executable, "-m", "riverscape"], "one"), (torchrun, "two"))]  # side by side
    try:
        (out1, err1), (out2, err2) = (p.communicate(timeout=2 * TIMEOUT) for p in launched)
    finally:
        for p in launched:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in launched] == [0, 0], err1[-2000:] + err2[-2000:]
    one, two = (json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("one", "two"))
    assert (one["run"]["world_size"], two["run"]["world_size"]) == (1, 2)
    assert two["analysis_samples"] == one["analysis_samples"] == 255
    # float32 model: the two processes add the per-sample terms in another order, so values differ by
    # float32 rounding (~1e-7 relative, amplified at most 10x by Hutch++/ARPACK); 1e-5 relative is far
    # below any real disagreement (a shard counted twice or missing moves the loss by percents)
    for path in ("fp.loss", "fp.accuracy", "ptq.loss", "qat.loss", "hessian.fp.top_eigenvalues", "hessian.fp.trace",
                 "hessian.quantized.top_eigenvalues", "hessian.quantized.trace", "alignment.cosine_to_fp", "damage.rho_max"):
        a, b = one, two
        for key in path.split("."):
            a, b = a[key], b[key]
        assert_close(b, a, rtol=1e-5, what=path)
    assert out2.count("wrote ") == 1 and out2.count("riverscape:") == 0
    assert err2.count("riverscape: plan (quick)") == 1, err2  # the stage lines of process 0 only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "one", "two"]


# ---------------------------------------------------------------------------------------- workers
def _worker(mode: str, out: Path) -> int:
    from riverscape.cli import _run

    class Args:  # the command line's error handling (_run) around a worker "command"
        debug = False

        @staticmethod
        def func(_args) -> int:
            distributed.init()
            rank = distributed.rank()
            if mode == "worker":
                shard_size = distributed.shard(_classifier()[1])[0].shape[0]
                out.write_text(json.dumps({**compute(distributed.world_size()), "rank": rank, "shard_size": shard_size}))
            elif mode == "fail":
                model, data = _classifier()
                obj = distributed.data_parallel(rs.Objective(model, "cross_entropy", distributed.shard(data)))
                obj.loss(obj.theta0)
                if rank == 1:
                    raise rs.errors.InputError(f"boom on rank {rank}")
                obj.metric(obj.theta0)  # rank 0 waits here for a peer that has failed
            elif mode == "hang" and rank == 0:
                model, data = _classifier()
                obj = distributed.data_parallel(rs.Objective(model, "cross_entropy", distributed.shard(data)))
                obj.loss(obj.theta0)  # rank 1 never joins
            elif mode == "hang":
                distributed.agree(None)  # joins data_parallel's first collective (a broadcast) only
                time.sleep(5)  # past rank 0's all-reduce timeout of 2 s
            return 0

    return _run(Args())


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], Path(sys.argv[2])))
