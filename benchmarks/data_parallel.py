"""Data-parallel scaling: 1 vs 2 processes (one thread each) from 1e4 to 1e7 parameters.

For each model size the same tasks run in one process on all samples and in two Gloo
processes on strided halves (:func:`riverscape.distributed.shard`,
:func:`riverscape.distributed.data_parallel`), side by side in one invocation:

- ``gradient``: one full-data gradient (the unit of cost);
- ``hvp``: one Hessian-vector product of the Hessian operator the eigensolver and trace use, in
  ``--hvp-mode`` (default ``"auto"``, the library's default: ``"reuse"`` for these materialised
  data, i.e. the gradient graph is built once per operator and each product is the second
  backward; ``"forward"`` is forward-over-reverse, no graph kept), also as a multiple of ``gradient``;
- ``top5``: the top-5 Hessian eigenpairs (:func:`~riverscape.landscape.hessian_eigs`);
- ``trace``: a Hutch++ trace with ``--trace-matvecs`` products;
- ``slice``: a 25 x 25 2D slice (:func:`~riverscape.landscape.slice_2d`);
- ``alignment``: :func:`~riverscape.gradients.alignment` at the 2-bit point, the hill basis
  taken from ``top5``, ``--null-draws`` matched null draws, the valley floor without its null
  (its line search takes a number of gradients that float32 rounding changes; the table shows
  the count in each configuration).

A task's time in two processes is process 0's wall time between two barriers. Every process
reports its peak resident memory (``ru_maxrss``); ``allreduce`` times one all-reduce of a
``D``-vector, the message an HVP or gradient sends. The two configurations must agree
(float32: top-5, trace, slice and alignment to ~1e-4 relative). The workload is
:func:`benchmarks.workloads.mlp_of_size` (a tanh MLP, random data).

    python benchmarks/data_parallel.py [--sizes 1e4,1e5,1e6,1e7] [--samples N] [--tasks top5,trace] [--hvp-mode auto] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ("gradient", "hvp", "top5", "trace", "slice", "alignment")


def measure(params: int, samples: int, trace_matvecs: int, null_draws: int, repeats: int, tasks: tuple[str, ...] = TASKS,
            hvp_mode: str = "auto") -> dict:
    """Run every task in this process (one of a data-parallel group when launched so)."""
    import torch

    from benchmarks.workloads import mlp_of_size
    import riverscape as rs
    from riverscape import distributed
    from riverscape.gradients import HillBasis, alignment
    from riverscape.landscape import hessian_eigs, hessian_trace, random_direction, slice_2d
    from riverscape.quant import UniformQuantizer

    torch.set_num_threads(1)
    distributed.init()
    workload = mlp_of_size(params, samples=samples)
    data = distributed.shard((workload.x, workload.y))
    obj = distributed.data_parallel(rs.Objective(workload.model, workload.loss_fn, data, hvp_mode=hvp_mode))
    theta = obj.theta0
    hessian = obj.hessian(theta)  # the operator hessian_eigs and hessian_trace build, in the same mode
    probe = theta[:, None]
    obj.grad(theta)  # warm-up (lazy imports, allocator)
    hessian.torch_matmat(probe)  # mode "reuse" builds its gradient graph here
    out: dict = {"world_size": distributed.world_size(), "dim": obj.dim, "samples": obj.n_samples, "hvp_mode": hessian.mode}

    def timed(name: str, run, times: int = 1) -> None:
        distributed.agree(None)  # barrier
        start = time.perf_counter()
        for _ in range(times):
            value = run()
        distributed.agree(None)
        out[name] = value
        out[f"{name}_seconds"] = (time.perf_counter() - start) / times

    timed("gradient", lambda: float(obj.grad(theta).norm()), repeats)
    timed("hvp", lambda: float(hessian.torch_matmat(probe).norm()), repeats)
    hessian.release()  # the tasks below build their own operators
    if obj.reduction is not None:
        message = torch.ones(obj.dim + 2, dtype=obj.dtype)
        timed("allreduce", lambda: float(obj.reduction.sum(message)[0]), repeats)
    eigs: dict = {}

    def top5() -> list[float]:
        eigs["values"], eigs["vectors"] = hessian_eigs(obj, theta, k=5, seed=0)
        return eigs["values"].tolist()

    if "top5" in tasks or "alignment" in tasks:
        timed("top5", top5)
    if "trace" in tasks:
        timed("trace", lambda: hessian_trace(obj, theta, matvecs=trace_matvecs, seed=0).value)
    if "slice" in tasks:
        d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)
        timed("slice", lambda: slice_2d(obj, theta, d1, d2, span=0.5, steps=25, progress=False).loss.flatten().tolist())

    gradients = {"count": 0}
    grad_terms = obj._grad_terms

    def counted_grad_terms(*args, **kwargs):
        gradients["count"] += 1
        return grad_terms(*args, **kwargs)

    obj._grad_terms = counted_grad_terms  # the floor's line search needs a float-rounding-dependent number

    def align() -> list[float]:
        res = alignment(obj, theta, UniformQuantizer(2), basis=basis, n_null=null_draws, floor_steps=20,
                        floor_null=False, per_layer=False, seed=0, progress=False)
        return [res.inward, res.cosine_floor, res.null_z]

    if "alignment" in tasks:
        basis = HillBasis.from_vectors(obj, theta, eigs["vectors"], values=eigs["values"])
        timed("alignment", align)
        out["alignment_gradients"] = gradients["count"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ranks = [None] * distributed.world_size()
    if obj.reduction is not None:
        torch.distributed.all_gather_object(ranks, out["peak_rss_mb"])
    else:
        ranks = [out["peak_rss_mb"]]
    out["peak_rss_mb_per_rank"] = ranks
    distributed.shutdown()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int, params: int, args: argparse.Namespace) -> dict:
    """Launch ``world`` processes (one thread each) measuring one size; process 0's result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, __file__, "--child", "--sizes", str(params), "--samples", str(args.samples),
           "--trace-matvecs", str(args.trace_matvecs), "--null-draws", str(args.null_draws), "--repeats", str(args.repeats),
           "--tasks", args.tasks, "--hvp-mode", args.hvp_mode]
    procs = []
    for rank in range(world):
        extra = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)} if world > 1 else {}
        procs.append(subprocess.Popen(cmd, env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            raise RuntimeError(f"a benchmark process failed:\n{stderr[-2000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results[0]


def _max_rel(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b) if x is not None and y is not None), default=0.0)


def agreement(one: dict, two: dict) -> dict:
    """Largest relative difference between the two configurations, per task."""
    out = {}
    for task in ("top5", "trace", "slice", "alignment"):
        if task in one:
            a, b = (one[task], two[task]) if isinstance(one[task], list) else ([one[task]], [two[task]])
            out[task] = _max_rel(a[:2], b[:2]) if task == "alignment" else _max_rel(a, b)
    return out


def dominant_cost(two: dict) -> str:
    """What dominates at this size, from the 2-process timings."""
    comm = two.get("allreduce_seconds", 0.0) / max(two["hvp_seconds"], 1e-12)
    if comm > 0.25:
        return f"the all-reduce ({comm:.0%} of an HVP)"
    if two["gradient_seconds"] < 5e-3:
        return "per-call overhead (Python, autograd set-up)"
    return f"model arithmetic (all-reduce {comm:.0%} of an HVP)"


def table(rows: list[dict]) -> str:
    """The README table: seconds at 1 and 2 processes, speed-up, peak memory per rank, what dominates."""
    lines = ["| parameters | samples | HVP mode | HVP / gradient | task | 1 process (s) | 2 processes (s) | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        one, two = row["one"], row["two"]
        ratio = one["hvp_seconds"] / one["gradient_seconds"]
        for i, task in enumerate(t for t in TASKS if f"{t}_seconds" in one):
            head = (f"{one['dim']:,}", str(one["samples"]), one["hvp_mode"], f"{ratio:.2f}") if i == 0 else ("", "", "", "")
            a, b = one[f"{task}_seconds"], two[f"{task}_seconds"]
            name = task
            if task == "alignment" and "alignment_gradients" in one:
                name = f"alignment ({one['alignment_gradients']} / {two['alignment_gradients']} gradients)"
            lines.append(f"| {' | '.join(head)} | {name} | {a:.3g} | {b:.3g} | {a / b:.2f}x |")
    lines += ["", "| parameters | peak RSS 1 process (MB) | peak RSS per rank, 2 processes (MB) | all-reduce of D floats (s) | dominant cost | agreement (max rel.) |",
              "|---|---|---|---|---|---|"]
    for row in rows:
        one, two, agree = row["one"], row["two"], row["agreement"]
        per_rank = ", ".join(f"{m:.0f}" for m in two["peak_rss_mb_per_rank"])
        lines.append(f"| {one['dim']:,} | {one['peak_rss_mb']:.0f} | {per_rank} | {two['allreduce_seconds']:.3g} | "
                     f"{dominant_cost(two)} | {max(agree.values(), default=0.0):.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e4,1e5,1e6,1e7", help="comma-separated parameter counts")
    parser.add_argument("--samples", type=int, default=2048,
                        help="samples at every size (default 2048; at 1e7 parameters fewer leave the D-sized work per product and the collectives a larger share)")
    parser.add_argument("--trace-matvecs", type=int, default=30)
    parser.add_argument("--null-draws", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="gradients/HVPs averaged for those rows")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--hvp-mode", default="auto", help="the Objective's hvp_mode (default: the library default, 'auto')")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(measure(sizes[0], args.samples, args.trace_matvecs, args.null_draws, args.repeats, tuple(args.tasks.split(",")),
                                 args.hvp_mode)))
        return
    rows = []
    for params in sizes:
        start = time.perf_counter()
        one, two = run_group(1, params, args), run_group(2, params, args)
        rows.append({"one": one, "two": two, "agreement": agreement(one, two)})
        print(f"{one['dim']:,} parameters done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=1))
    print("one thread per process; 2 processes hold strided halves of the samples")
    print(table(rows))


if __name__ == "__main__":
    main()
