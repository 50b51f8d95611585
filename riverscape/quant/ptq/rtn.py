"""Round-to-nearest PTQ: ``theta_q = Q(theta)`` with the quantizer's own calibration at ``theta``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import Tensor

from ...objective import Objective
from ..qmap import QuantMap
from ..quantizers import QParams
from .base import PTQConfig
from .layerwise import quantize_layerwise
from .options import check_calibration_options

__all__ = ["RTN", "round_to_nearest"]


@dataclass(frozen=True)
class RTN(PTQConfig):
    """Round-to-nearest: every quantized tensor rounded to its nearest grid point.

    Scales and zero points are chosen at ``theta`` by the quantizer's range method
    (``minmax``, ``percentile`` or ``mse``); no data are used. The baseline of the PTQ
    literature (e.g. Nagel et al. 2021, arXiv 2106.08295, section 3).

    Parameters
    ----------
    calibration_samples : int, optional
        Default ``None``: data-free. A number of samples: the point is the same, and the
        result also reports the relative layer-wise reconstruction error of every supported
        layer on that many samples (docs/ptq_methods.md §3), for comparison with GPTQ/AdaRound.
    seed : int
        Seed of the draw of the calibration samples.
    """

    method: ClassVar[str] = "rtn"
    calibration_samples: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_calibration_options(self, allow_none=True)


def round_to_nearest(config: RTN, objective: Objective, qmap: QuantMap, theta: Tensor) -> tuple:
    """Handler of :class:`RTN`: ``(Q(theta), qparams chosen at theta)`` (plus reconstruction errors when calibrated)."""
    if config.calibration_samples is None:
        qparams = qmap.qparams(theta)
        return qmap(theta, qparams), qparams
    return quantize_layerwise(objective, qmap, theta, None, calibration_samples=config.calibration_samples, seed=config.seed)
