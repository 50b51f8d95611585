"""Loss landscape around full-precision and quantized weights: curvature, directions, paths, slices."""
from .curvature import hessian_eigs, hessian_trace

__all__ = ["hessian_eigs", "hessian_trace"]
