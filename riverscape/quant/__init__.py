"""Quantization: uniform quantizers, the layout-aware map theta -> Q(theta), and PTQ."""
from .qmap import QUANTIZABLE_MODULES, QuantMap, QuantTarget, ptq
from .quantizers import RANGE_METHODS, QParams, UniformQuantizer, fake_quantize, integer_grid

__all__ = [
    "UniformQuantizer",
    "QParams",
    "fake_quantize",
    "integer_grid",
    "RANGE_METHODS",
    "QuantMap",
    "QuantTarget",
    "ptq",
    "QUANTIZABLE_MODULES",
]
