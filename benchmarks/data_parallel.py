"""Data-parallel speed-up: top-5 eigenpairs and a Hutch++ trace in 1 vs 2 processes, one thread each.

The workload is :func:`benchmarks.workloads.mlp_of_size` (a tanh MLP, random data). One
process runs on all samples; two Gloo processes on strided halves
(:func:`riverscape.distributed.shard`, :func:`riverscape.distributed.data_parallel`). Both
configurations run side by side in one invocation, one after the other; a task's time in two
processes is process 0's wall time between two barriers. Also checks that the two
configurations give the same eigenvalues and trace (float32: to ~1e-5 relative).

    python benchmarks/data_parallel.py [--params 1000000] [--samples 2048] [--trace-matvecs 30]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(params: int, samples: int, trace_matvecs: int) -> dict:
    """Run both tasks in this process (one of a data-parallel group when launched so)."""
    import torch

    from benchmarks.workloads import mlp_of_size
    import riverscape as rs
    from riverscape import distributed
    from riverscape.landscape import hessian_eigs, hessian_trace

    torch.set_num_threads(1)
    distributed.init()
    workload = mlp_of_size(params, samples=samples)
    data = distributed.shard((workload.x, workload.y))
    obj = distributed.data_parallel(rs.Objective(workload.model, workload.loss_fn, data, hvp_mode="forward"))
    theta = obj.theta0
    obj.hvp(theta, theta)  # warm-up (lazy imports, allocator)
    out = {"world_size": distributed.world_size(), "dim": obj.dim, "samples": obj.n_samples}

    def timed(name: str, run) -> None:
        distributed.agree(None)  # barrier
        start = time.perf_counter()
        out[name] = run()
        distributed.agree(None)
        out[f"{name}_seconds"] = time.perf_counter() - start

    timed("gradient", lambda: float(obj.grad(theta).norm()))
    timed("hvp", lambda: float(obj.hvp(theta, theta).norm()))
    timed("top5", lambda: hessian_eigs(obj, theta, k=5, seed=0)[0].tolist())
    timed("trace", lambda: hessian_trace(obj, theta, matvecs=trace_matvecs, seed=0).value)
    distributed.shutdown()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, args: argparse.Namespace, timeout: float) -> dict:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    cmd = [sys.executable, __file__, "--child", "--params", str(args.params), "--samples", str(args.samples),
           "--trace-matvecs", str(args.trace_matvecs)]
    procs = []
    for rank in range(world):
        extra = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)} if world > 1 else {}
        child_env = {k: v for k, v in env.items() if world > 1 or k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        procs.append(subprocess.Popen(cmd, env={**child_env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"a benchmark process failed:\n{stderr[-2000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--trace-matvecs", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(measure(args.params, args.samples, args.trace_matvecs)))
        return
    one, two = _run(1, args, args.timeout), _run(2, args, args.timeout)
    print(f"{one['dim']:,} parameters, {one['samples']} samples, one thread per process")
    print("| task | 1 process (s) | 2 processes (s) | speed-up |")
    print("|---|---|---|---|")
    for task in ("gradient", "hvp", "top5", "trace"):
        a, b = one[f"{task}_seconds"], two[f"{task}_seconds"]
        print(f"| {task} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    top1, top2 = one["top5"], two["top5"]
    print("agreement: top-5 max rel. diff",
          f"{max(abs(x - y) / abs(x) for x, y in zip(top1, top2)):.1e},",
          f"trace rel. diff {abs(one['trace'] - two['trace']) / abs(one['trace']):.1e}")


if __name__ == "__main__":
    main()
