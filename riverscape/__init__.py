"""riverscape: loss-landscape geometry of quantization.

Why post-training quantization (PTQ) collapses at aggressive bit-widths while
quantization-aware training (QAT) recovers, measured with Hessian spectra, river paths,
landscape slices and the alignment of gradients at quantized weights.

The public names below are imported on first use (PEP 562), so ``import riverscape``
and the command line start without loading torch; ``riverscape.Objective``,
``riverscape.quant``, ``riverscape.landscape``, ``riverscape.gradients`` and ``riverscape.stats``
work as usual.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("data", "models", "quant", "linalg", "landscape", "gradients", "report", "stats")
_NAMES = {
    "Dataset": "data",
    "load_dataset": "data",
    "build_model": "models",
    "Objective": "objective",
    "LossOnBatch": "batching",
    "TrainResult": "training",
    "train": "training",
    "ensure_twice_differentiable": "differentiability",
    "check_batchnorm": "batchnorm",
    "recalibrate_batchnorm": "batchnorm",
}

__all__ = ["Objective", "LossOnBatch", "quant", "landscape", "gradients", "models", "data", "stats", "train", "TrainResult", "Dataset", "load_dataset", "build_model", "__version__",
           "ensure_twice_differentiable", "check_batchnorm", "recalibrate_batchnorm"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
    elif name in _NAMES:
        module = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'riverscape' has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
