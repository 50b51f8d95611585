"""Post-training quantization methods: one frozen config and one handler per method, in a registry.

``ptq(objective, quantizer, method="rtn")`` looks the method up in :data:`PTQ_METHODS`. To add
a method, write a module next to :mod:`.rtn` with its :class:`PTQConfig` subclass and handler
and add one :func:`register_ptq_method` line below.
"""
from types import ModuleType as _ModuleType

from .base import (
    PTQ_CONFIGS,
    PTQ_METHODS,
    PTQConfig,
    PTQDiagnostics,
    PTQHandler,
    PTQResult,
    ptq,
    ptq_config,
    ptq_result,
    register_ptq_method,
)
from .activations import (
    ActivationCalibration,
    ActivationQuantization,
    activation_hooks,
    calibrate_activations,
    setting_name,
    with_activation_quantization,
)
from .adaround import AdaRound, adaround, adaround_quantize
from .calibration import Calibration, collect_input_hessians, relative_reconstruction_error
from .external import External, InferredGrid, dequantized_weights, external_quantize, infer_grid
from .gptq import GPTQ, gptq, gptq_quantize
from .rtn import RTN, round_to_nearest

register_ptq_method("rtn", RTN, round_to_nearest)
register_ptq_method("gptq", GPTQ, gptq)
register_ptq_method("adaround", AdaRound, adaround)
register_ptq_method("external", External, external_quantize)

__all__ = sorted(name for name, value in globals().items() if not name.startswith("_") and not isinstance(value, _ModuleType))
