"""Cost growth: time and peak memory of top-5 eigenpairs and a 25x25 slice vs parameter count.

Each (size, task) runs in a fresh subprocess, so the peak resident set size
(``resource.getrusage(...).ru_maxrss``) measured after the task minus the one measured after
setup is the task's own peak memory (tracemalloc does not see torch's allocator).

    python benchmarks/run.py --scaling [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = (10_000, 100_000, 1_000_000)
SAMPLES = 512


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def measure(size: int, task: str, samples: int = SAMPLES) -> dict:
    """Run one task on an MLP of about ``size`` parameters in this process (called in a child)."""
    import torch

    from benchmarks.workloads import mlp_of_size
    from riverscape.landscape import hessian_eigs
    from riverscape.landscape.directions import random_direction
    from riverscape.landscape.slices import slice_2d

    workload = mlp_of_size(size, samples=samples)
    obj = workload.objective()
    theta = obj.theta0
    obj.loss(theta)
    before = _peak_mb()
    start = time.perf_counter()
    hvps = None
    if task == "top5":
        op = obj.hessian(theta)
        hessian_eigs(obj, theta, k=5, operator=op)
        hvps = op.matvecs
    elif task == "slice":
        slice_2d(obj, theta, random_direction(obj, seed=0), random_direction(obj, seed=1), span=1.0, steps=25, progress=False)
    else:
        raise ValueError(f"task must be 'top5' or 'slice', got {task!r}")
    seconds = time.perf_counter() - start
    return {
        "task": task, "params": obj.dim, "samples": samples, "seconds": seconds, "hvps": hvps,
        "peak_mb_setup": before, "peak_mb_delta": _peak_mb() - before, "torch_threads": torch.get_num_threads(),
    }


def run_scaling(quick: bool = False, threads: int | None = None) -> list[dict]:
    """Measure every size and task in its own subprocess (with ``threads`` torch threads)."""
    sizes = SIZES[:2] if quick else SIZES
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = []
    for task in ("top5", "slice"):
        for size in sizes:
            command = [sys.executable, "-m", "benchmarks.scaling", "--size", str(size), "--task", task]
            if threads:
                command += ["--threads", str(threads)]
            done = subprocess.run(command,
                                  cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"scaling child failed for {task} at {size}: {done.stderr.strip()[-500:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"[scaling] {task} {size}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
    return results


def scaling_table(results: list[dict]) -> str:
    """Markdown table with time per (parameter x sample) to show linear growth."""
    lines = ["| task | params | samples | time (s) | HVPs | ns per param x sample | peak RSS delta (MB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        unit = r["seconds"] / (r["params"] * r["samples"]) * 1e9
        if r["hvps"]:
            unit /= r["hvps"]
        hvps = "" if r["hvps"] is None else str(r["hvps"])
        lines.append(f"| {r['task']} | {r['params']} | {r['samples']} | {r['seconds']:.2f} | {hvps} | {unit:.3f} | {r['peak_mb_delta']:.0f} |")
    return "\n".join(lines) + "\n\n(top5: ns per param x sample x HVP; slice: per param x sample for all 625 points)"


def main() -> None:
    parser = argparse.ArgumentParser(description="one scaling measurement (run by benchmarks/run.py --scaling)")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--task", choices=("top5", "slice"), required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.size, args.task)))


if __name__ == "__main__":
    main()
