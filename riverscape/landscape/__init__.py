"""Loss landscape around full-precision and quantized weights: curvature, directions, paths, slices."""
from .curvature import (
    BlockOperator,
    DiagonalEstimate,
    LayerCurvature,
    SpectralDensity,
    TraceEstimate,
    block_slice,
    eigenpair_residuals,
    hessian_diagonal,
    hessian_eigs,
    hessian_trace,
    lanczos,
    layer_curvature,
    spectral_density,
)
from .directions import (
    Plane,
    eigenvector_directions,
    orthonormalize,
    plane_coordinates,
    plane_through,
    quantization_direction,
    random_direction,
)
from .paths import (
    Barrier,
    BezierPath,
    LinearPath,
    PathProfile,
    PolylinePath,
    WeightPath,
    fit_bezier,
    loss_barrier,
    nudged_elastic_band,
    path_losses,
    project_onto_path,
    refine_path,
    river,
)
from .slices import Slice1D, Slice2D, slice_1d, slice_2d

__all__ = [
    "hessian_eigs", "eigenpair_residuals", "hessian_trace", "TraceEstimate", "hessian_diagonal", "DiagonalEstimate",
    "lanczos", "spectral_density", "SpectralDensity", "layer_curvature", "LayerCurvature", "block_slice", "BlockOperator",
    "random_direction", "eigenvector_directions", "quantization_direction", "orthonormalize", "plane_coordinates",
    "Plane", "plane_through",
    "WeightPath", "LinearPath", "PolylinePath", "BezierPath", "PathProfile", "path_losses", "Barrier", "loss_barrier",
    "river", "project_onto_path", "fit_bezier", "nudged_elastic_band", "refine_path",
    "Slice1D", "Slice2D", "slice_1d", "slice_2d",
]
