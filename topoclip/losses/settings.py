"""The losses' settings that configs hold: the mixup terms (``MixupConfig``) and SigLIP's
initial scale and bias. Kept free of torch so that validating a config imports nothing heavy."""

from __future__ import annotations

import math
from dataclasses import dataclass

from topoclip.dataclass_io import check_types

__all__ = ["MixupConfig", "SIGLIP_INIT"]

# Zhai et al., Sigmoid Loss for Language Image Pre-Training: t' = log 10, b = -10.
SIGLIP_INIT = {"scale": 10.0, "bias": -10.0}


@dataclass
class MixupConfig:
    """The m³-Mix terms' settings (``finetune.mixup``): each term's weight in the loss (0
    disables it), the Beta(alpha, alpha) parameters its lam is drawn from, and the m²-Mix
    term's own logit scale.

    Defaults are the middle of the public scripts' ranges: w_m2 in {0.001..0.05}, w_V = w_L =
    0.05, w_VL in {0.05, 0.1, 0.2}; alpha 0.2-0.5 (V/L, m2), 0.5-1.0 (VL).
    """

    m2: float = 0.01
    v: float = 0.05
    l: float = 0.05
    vl: float = 0.1
    alpha_m2: float = 0.3
    alpha_uni: float = 0.3
    alpha_vl: float = 0.7
    m2_scale: float = 1 / 0.07
    decay: bool = False  # multiply the mixup weights by 1/(epoch+1)

    def __post_init__(self) -> None:
        check_types(self, "mixup")
        for name in ("m2", "v", "l", "vl"):
            if getattr(self, name) < 0:
                raise ValueError(f"mixup.{name}: weight must be >= 0, got {getattr(self, name)}")
        for name in ("alpha_m2", "alpha_uni", "alpha_vl", "m2_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"mixup.{name}: must be a positive number, got {value}")
