"""What ``torch.compile`` buys for an exact Hessian-vector product on CPU, by model size.

riverscape's two forward-over-reverse HVPs side by side in one invocation, one thread: the eager
``Objective(hvp_mode="forward")`` and the opt-in ``Objective(hvp_mode="compiled")`` (``torch.func.jvp``
of ``torch.func.grad`` through ``torch.compile``), on a tanh MLP
(:func:`benchmarks.workloads.mlp_of_size`) and fixed random data in one batch. The table gives the
mean time per HVP after one warm-up call, the compile time (the first compiled call) and the number
of HVPs after which compiling pays for itself.

    python benchmarks/compile_hvp.py [--sizes 10000 100000 1000000] [--samples 1024] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _mean_seconds(fn, args: tuple, repeats: int) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


def measure(size: int, samples: int, repeats: int) -> dict:
    """Eager vs compiled riverscape HVP on an MLP of about ``size`` parameters."""
    import torch

    import riverscape as rs
    from benchmarks.workloads import mlp_of_size

    torch.set_num_threads(1)
    workload = mlp_of_size(size, samples=samples)

    def objective(mode: str) -> rs.Objective:
        return rs.Objective(workload.fresh_model(), "cross_entropy", (workload.x, workload.y), batch_size=samples,
                            dtype=torch.float32, hvp_mode=mode)

    eager, compiled = objective("forward"), objective("compiled")
    theta = eager.theta0
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0))
    eager_seconds = _mean_seconds(eager.hvp, (theta, v), repeats)
    start = time.perf_counter()
    compiled.hvp(theta, v)
    compile_seconds = time.perf_counter() - start
    fast = _mean_seconds(compiled.hvp, (theta, v), repeats)
    reference = eager.hvp(theta, v)
    difference = float((compiled.hvp(theta, v) - reference).norm() / reference.norm())
    gain = eager_seconds - fast
    return {"dim": int(theta.numel()), "eager": eager_seconds, "compiled": fast, "compile_seconds": compile_seconds,
            "break_even_hvps": compile_seconds / gain if gain > 0 else None, "relative_difference": difference}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # benchmarks.workloads, when run as a script from anywhere
    print(f"{args.samples} samples, one thread")
    print("| parameters | eager (ms) | compiled (ms) | speed-up | compile (s) | pays off after | relative difference |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        r = measure(size, args.samples, args.repeats)
        pays = "never" if r["break_even_hvps"] is None else f"{r['break_even_hvps']:,.0f} HVPs"
        print(f"| {r['dim']:,} | {r['eager'] * 1e3:.1f} | {r['compiled'] * 1e3:.1f} | {r['eager'] / r['compiled']:.2f}x | "
              f"{r['compile_seconds']:.1f} | {pays} | {r['relative_difference']:.1e} |")


if __name__ == "__main__":
    main()
