"""riverscape: loss-landscape geometry of quantization.

Why post-training quantization (PTQ) collapses at aggressive bit-widths while
quantization-aware training (QAT) recovers, measured with Hessian spectra, river paths,
landscape slices and the alignment of gradients at quantized weights.
"""
from . import data, models, quant
from .data import Dataset, load_dataset
from .models import build_model
from .objective import Objective
from .train import TrainResult, train

__version__ = "0.1.0"

__all__ = ["Objective", "quant", "models", "data", "train", "TrainResult", "Dataset", "load_dataset", "build_model", "__version__"]
