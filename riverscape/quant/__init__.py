"""Quantization: uniform quantizers, the layout-aware map theta -> Q(theta), PTQ, and QAT with gradient estimators.

PTQ methods (RTN, GPTQ, AdaRound) and QAT estimators are frozen configs looked up in registries
(:data:`PTQ_METHODS` with :func:`register_ptq_method`; :data:`ESTIMATOR_REGISTRY` with
:func:`register_estimator`): ``ptq(obj, 2, method="rtn")``, ``qat(obj, 2, estimator=LSQ(init="lsq"))``.
Every function taking a quantizer accepts a bit-width, a :class:`UniformQuantizer` or a
:class:`QuantMap` through :func:`resolve_quant_map`.
"""
from types import ModuleType as _ModuleType

from .estimators import (
    ESTIMATORS,
    GRADIENT_POINT_ARMS,
    clip_mask,
    clipped_ste,
    ewgs,
    get_estimator,
    latent,
    lsq,
    lsq_grad_scale,
    lsq_initial_scale,
    make_estimator,
    matched_noise,
    pege,
    pege_mask,
    pege_rho,
    random_signs,
    ste,
    stochastic_codes,
    stochastic_rounding,
)
from .estimator_configs import (
    ARM_SEED_OFFSET,
    ESTIMATOR_REGISTRY,
    EWGS,
    LSQ,
    LSQ_INITS,
    PEGE,
    STE,
    ClippedSTE,
    EstimatorConfig,
    Latent,
    MatchedNoise,
    StochasticRounding,
    EstimatorHandler,
    QATContext,
    build_estimator,
    estimator_config,
    register_estimator,
)
from .qat import SCALE_MODES, QATResult, count_grid_flips, ewgs_deltas, first_hitting_time, qat
from .layers import (
    UnsupportedWeight,
    channel_axis_of,
    register_quantizable,
    registered_layers,
    unsupported_weight_warning,
    unsupported_weights,
)
from .qmap import KEPT_REASONS, QUANTIZABLE_MODULES, LayerSelection, QuantizerLike, QuantMap, QuantTarget, WeightStatus, resolve_quant_map
from .ptq import (
    GPTQ,
    PTQ_CONFIGS,
    PTQ_METHODS,
    RTN,
    AdaRound,
    PTQConfig,
    PTQDiagnostics,
    PTQResult,
    ptq,
    ptq_config,
    ptq_result,
    register_ptq_method,
)
from .quantizers import GRIDS, RANGE_METHODS, QParams, UniformQuantizer, fake_quantize, integer_grid
from .bn_fold import BatchNormFolding, FoldedPair, UnfoldedBatchNorm, fold_batchnorm
from .bn_reestimate import objective_with_reestimated_bn
from .grid import CoordinateGrid
from .nearby import NearbySearchResult, best_of_stochastic_rounding, greedy_flip_search
from .mixed_precision import BitPlan, LayerSensitivity, PlanVerification, Sensitivities, layer_sensitivities, plan_bits, verify_plan

__all__ = sorted(name for name, value in globals().items() if not name.startswith("_") and not isinstance(value, _ModuleType))
