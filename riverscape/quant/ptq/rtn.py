"""Round-to-nearest PTQ: ``theta_q = Q(theta)`` with the quantizer's own calibration at ``theta``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...objective import Objective
from ..qmap import QuantMap
from ..quantizers import QParams
from .base import PTQConfig

__all__ = ["RTN", "round_to_nearest"]


@dataclass(frozen=True)
class RTN(PTQConfig):
    """Round-to-nearest: every quantized tensor rounded to its nearest grid point.

    Scales and zero points are chosen at ``theta`` by the quantizer's range method
    (``minmax``, ``percentile`` or ``mse``); no data are used. The baseline of the PTQ
    literature (e.g. Nagel et al. 2021, arXiv 2106.08295, section 3).
    """

    method: ClassVar[str] = "rtn"


def round_to_nearest(config: RTN, objective: Objective, qmap: QuantMap, theta: Tensor) -> tuple[Tensor, list[QParams]]:
    """Handler of :class:`RTN`: ``(Q(theta), qparams chosen at theta)``."""
    qparams = qmap.qparams(theta)
    return qmap(theta, qparams), qparams
