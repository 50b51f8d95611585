"""Side-by-side benchmarks of riverscape against PyHessian, curvlinops, hessian-eigenthings, loss-landscapes.

    python benchmarks/run.py --quick                 # < 5 min: digits MLP + CIFAR CNN, 1 repeat, no analyze
    python benchmarks/run.py                         # full: 4 workloads (< 30 min)
    python benchmarks/run.py --only top5,trace --workload cifar_cnn
    python benchmarks/run.py --scaling               # cost growth with parameters (subprocess per size)

Tools run alternately (A B A B) in one process. Every riverscape answer is checked against a
reference before any time is printed: a disagreement beyond tolerance exits with status 1.
Results go to ``benchmarks/results/<timestamp>.json`` (gitignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import torch  # noqa: E402

from benchmarks import peers  # noqa: E402
from benchmarks.tasks import TASKS, TaskConfig, warm_up  # noqa: E402
from benchmarks.timing import Row, check_agreement, drain_peer_crashes, fill_ratios  # noqa: E402
from benchmarks.workloads import QUICK_WORKLOADS, WORKLOADS, build_workload  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALL_TASKS = tuple(TASKS)
QUICK_TASKS = ("hvp", "top1", "top5", "trace", "density", "slice")  # a whole `riverscape analyze` takes minutes
# Tasks too slow for the full run's 30-minute budget. ResNet-20 (272k parameters, 64 inputs):
# one HVP ~0.7 s on one core, so top-5 alone is ~7 min (PyHessian's ~320 HVPs) and the float64
# references of trace and density another ~15 min.
SKIP = {("resnet20", "top5"), ("resnet20", "trace"), ("resnet20", "density")}
# Timed repeats per tool in the full run: the median of 3 where a task takes seconds; one run
# where a single task already averages over tens of HVPs or hundreds of forwards.
FULL_REPEATS = {"digits_mlp": 3, "cifar_cnn": 1, "resnet20": 1, "transformer": 3}


def machine_info() -> dict:
    """CPU model, cores, threads, torch and peer versions."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import riverscape

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "riverscape": riverscape.__version__,
        "peers": peers.versions(),
    }


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: list[Row]) -> str:
    """The results as a markdown table (time = median of the repeats)."""
    lines = [
        "| workload | task | tool | time (s) | HVPs | error | rs/peer | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        err = _fmt(r.error, ".1e") + (f" (tol {r.tolerance:.0e})" if r.tolerance is not None else "")
        lines.append(
            f"| {r.workload} | {r.task} | {r.tool} | {_fmt(r.seconds, '.3f')} | {_fmt(r.hvps, 'd')} | {err} | {_fmt(r.ratio, '.2f')} | {r.note} |"
        )
    return "\n".join(lines)


def error_kinds(rows: list[Row]) -> str:
    kinds = {}
    for r in rows:
        if r.error_kind:
            kinds.setdefault((r.workload, r.task), r.error_kind)
    return "\n".join(f"- {w}/{t}: {k}" for (w, t), k in kinds.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits MLP + CIFAR CNN, 1 repeat, smaller references (< 5 min)")
    parser.add_argument("--only", default=None, help=f"comma-separated tasks from {list(TASKS)}")
    parser.add_argument("--workload", default=None, help=f"comma-separated workloads from {list(WORKLOADS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per tool (default: quick 1, full FULL_REPEATS)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the reference answers")
    parser.add_argument("--scaling", action="store_true", help="cost growth of top-5 and a 25x25 slice with the parameter count")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<timestamp>.json)")
    args = parser.parse_args(argv)
    for name, allowed in (("only", TASKS), ("workload", WORKLOADS)):
        value = getattr(args, name)
        if value is not None:
            items = [v.strip() for v in value.split(",") if v.strip()]
            bad = [v for v in items if v not in allowed]
            if bad:
                parser.error(f"unknown --{name} {bad}; choose from {list(allowed)}")
            setattr(args, name, items)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"{stamp}.json"
    info = machine_info()
    if args.scaling:
        from benchmarks.scaling import run_scaling, scaling_table

        results = run_scaling(quick=args.quick, threads=args.threads)
        print(scaling_table(results))
        _write(out, {"mode": "scaling", "machine": info, "results": results})
        return 0

    tasks = args.only or list(QUICK_TASKS if args.quick else ALL_TASKS)
    workloads = args.workload or list(QUICK_WORKLOADS if args.quick else WORKLOADS)
    cfg = TaskConfig(
        seed=args.seed,
        trace_reference_matvecs=300 if args.quick else 1500,
        use_cache=not args.no_cache,
    )
    rows: list[Row] = []
    started = time.perf_counter()
    for wname in workloads:
        t0 = time.perf_counter()
        workload = build_workload(wname, seed=args.seed)
        warm_up(workload)
        print(f"[{wname}] {workload.num_params} parameters, built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        planned = [t for t in tasks if (wname, t) not in SKIP and not (t == "analyze" and wname != workloads[0])]
        cfg.repeats = args.repeats or (1 if args.quick else FULL_REPEATS.get(wname, 3))
        cfg.reference_top = 5 if "top5" in planned else 1  # references converge only what is compared
        # lambda_min only feeds a note of the density task; its float64 eigsh costs minutes
        cfg.reference_smallest = "density" in planned and not args.quick
        for task in planned:
            t0 = time.perf_counter()
            try:
                new = TASKS[task](workload, cfg)
            except Exception as err:  # a crashing task is a failure, never a silent skip
                cfg.fail(f"{wname}/{task}: {type(err).__name__}: {err}")
                drain_peer_crashes()
                continue
            rows.extend(new)
            for tool, message in drain_peer_crashes():
                rows.append(Row(wname, task, tool, None, note=f"crashed: {message[:200]}"))
            print(f"[{wname}] {task}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    failures = cfg.failures + check_agreement(rows)
    fill_ratios(rows)
    payload = {"mode": "quick" if args.quick else "full", "machine": info, "config": {k: v for k, v in vars(cfg).items() if k != "failures"},
               "rows": [r.to_dict() for r in rows], "agreement_failures": failures, "seconds": time.perf_counter() - started}
    _write(out, payload)
    if failures:
        print("AGREEMENT FAILURES (speeds not reported):", file=sys.stderr)
        for message in failures:
            print(f"  {message}", file=sys.stderr)
        print(f"details: {out}", file=sys.stderr)
        return 1
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, load {info['load_average']}")
    print(f"python {info['python']}, torch {info['torch']}, riverscape {info['riverscape']}; peers: "
          + ", ".join(f"{k} {v or 'missing'}" for k, v in info["peers"].items()))
    print()
    print(markdown_table(rows))
    print()
    print("Errors are relative to:\n" + error_kinds(rows))
    print(f"\nrs/peer = riverscape time / peer time (< 1: riverscape faster). Results: {out}")
    return 0


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float))


if __name__ == "__main__":
    sys.exit(main())
