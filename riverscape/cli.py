"""Command line: ``riverscape demo | --version``."""
from __future__ import annotations

import argparse
import sys
import time

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset
    from .models import build_model
    from .objective import Objective
    from .quant import UniformQuantizer, ptq
    from .train import train

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    ds = load_dataset("digits")
    result = train(build_model("mlp", **ds.model_kwargs("mlp")), ds, steps=1500, lr=1e-2, seed=args.seed, progress=True)
    obj = Objective(result.model, ds.loss, ds.test)
    print(f"digits MLP ({obj.dim} parameters): FP test accuracy {obj.metric(obj.theta0):.4f}, loss {obj.loss(obj.theta0):.4f}")
    print(f"{'bits':>4} {'minmax acc':>11} {'mse acc':>9} {'minmax loss':>12} {'mse loss':>9}")
    for bits in (8, 6, 4, 3, 2, 1):
        row = []
        for method in ("minmax", "mse"):
            theta_q = ptq(obj, UniformQuantizer(bits, range=method))
            row.append(obj.loss_and_metric(theta_q))
        print(f"{bits:>4} {row[0][1]:>11.4f} {row[1][1]:>9.4f} {row[0][0]:>12.4f} {row[1][0]:>9.4f}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="riverscape",
        description="Loss-landscape geometry of quantization: why PTQ collapses at low bit-widths and QAT recovers.",
    )
    parser.add_argument("--version", action="version", version=f"riverscape {__version__}")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="train the digits MLP and show its PTQ accuracy at 8..1 bits")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("riverscape: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
