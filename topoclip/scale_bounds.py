"""The rule for a logit scale's bounds, torch-free so that a config can check it cheaply."""

from __future__ import annotations

import math

__all__ = ["check_scale_bounds"]


def check_scale_bounds(init: float, max: float | None, prefix: str = "LogitScale.") -> None:
    """The rule for a logit scale's bounds, stated once (``LogitScale`` and the model config use
    it): ``init`` positive and finite, ``max`` positive and finite or None, ``init <= max``.
    ``prefix`` names the fields in the message (``model.logit_scale.`` in a config)."""
    if isinstance(init, bool) or not (isinstance(init, (int, float)) and math.isfinite(init) and init > 0):
        raise ValueError(f"{prefix}init must be a positive finite number, got {init!r}")
    if max is not None and (isinstance(max, bool) or not (isinstance(max, (int, float)) and math.isfinite(max) and max > 0)):
        raise ValueError(f"{prefix}max must be a positive finite number or None, got {max!r}")
    if max is not None and init > max:
        raise ValueError(f"{prefix}init={init} exceeds {prefix}max={max}")
