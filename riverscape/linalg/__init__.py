"""Curvature algorithms on symmetric operators (in the style of curvlinops).

Every algorithm takes an :class:`Operator` (never a model), so each is testable on a known
matrix (:class:`DenseOperator`); :class:`HessianOperator` is the exact Hessian of an
Objective, and :mod:`riverscape.landscape.curvature` is the glue from an Objective to these.
Every Operator is also a float64 scipy ``LinearOperator`` (:meth:`Operator.to_scipy`).
"""
from .diagonal import DiagonalEstimate, estimate_diagonal
from .eigs import EIG_SOLVERS, EIG_WHICH, default_ncv, default_solver, eigenpair_residuals, eigenpairs
from .lanczos import SpectralDensity, lanczos, spectral_density
from .operators import HVP_MODES, BlockOperator, DenseOperator, HessianOperator, Operator, ScaledOperator, as_operator
from .restart import thick_restart_lanczos
from .trace import TRACE_METHODS, TraceEstimate, estimate_trace, exact_trace, hutchinson_trace, hutchpp_trace, rademacher, random_signs

__all__ = [
    "Operator", "DenseOperator", "BlockOperator", "ScaledOperator", "HessianOperator", "as_operator", "HVP_MODES",
    "eigenpairs", "eigenpair_residuals", "default_ncv", "default_solver", "EIG_WHICH", "EIG_SOLVERS", "thick_restart_lanczos",
    "estimate_trace", "hutchinson_trace", "hutchpp_trace", "exact_trace", "TraceEstimate", "TRACE_METHODS", "rademacher", "random_signs",
    "lanczos", "spectral_density", "SpectralDensity",
    "estimate_diagonal", "DiagonalEstimate",
]
