"""Image normalisation statistics and their check (torch-free, so configs can use them)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["CLIP_MEAN", "CLIP_STD", "check_mean_std"]

# The statistics the public CLIP checkpoints were trained with; a sensible default because
# pretrained towers loaded from disk expect exactly this normalisation.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def check_mean_std(mean: Sequence[float], std: Sequence[float], where: str = "") -> None:
    """Raise ValueError (naming ``where``.mean/std) unless both are 3 finite numbers, std > 0."""
    prefix = f"{where}." if where else ""
    for field, values in (("mean", mean), ("std", std)):
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != 3 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values
        ):
            raise ValueError(f"{prefix}{field} must be 3 numbers (one per RGB channel), got {values!r}")
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f"{prefix}{field} must be finite, got {values!r}")
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"{prefix}std must be > 0 per channel, got {std!r}")
