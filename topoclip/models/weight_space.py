"""WiSE-FT: interpolate the weights of a zero-shot model and its fine-tuned version.

    theta(alpha) = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned

alpha = 0 is the zero-shot model, alpha = 1 the fine-tuned one; values in between usually
keep most of the fine-tuned accuracy on the new distribution and much of the zero-shot
robustness on the old one. Both models must have the same architecture (same state-dict
keys and shapes). Floating-point tensors are interpolated in fp32 and cast back; integer
buffers (counters, index tables) must agree and are copied.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

__all__ = ["interpolate_weights", "wise_ft"]


def _state(model_or_state: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state


def interpolate_weights(
    zero_shot: nn.Module | Mapping[str, Tensor], finetuned: nn.Module | Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """The WiSE-FT state dict at coefficient ``alpha`` (0: zero-shot, 1: fine-tuned)."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ValueError(f"alpha: must be a finite number, got {alpha!r}")
    a, b = _state(zero_shot), _state(finetuned)
    if set(a) != set(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"the two models differ in their parameters: only zero-shot {missing[:5]}, only fine-tuned {extra[:5]}")
    out: dict[str, Tensor] = {}
    for key, x in a.items():
        y = b[key]
        if not torch.is_tensor(x):  # extra state (e.g. a generator's state) comes from the fine-tuned side
            out[key] = y
            continue
        if x.shape != y.shape:
            raise ValueError(f"{key}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.is_floating_point():
            # Exact endpoints: torch.lerp(x, y, 1.0) is y exactly, (1 - a) x + a y need not be.
            mixed = torch.lerp(x.float(), y.to(x.device).float(), float(alpha))
            out[key] = mixed.to(x.dtype)
        else:
            if not torch.equal(x, y.to(x.device)):
                raise ValueError(f"{key}: non-floating tensors differ between the two models and cannot be interpolated")
            out[key] = x.clone()
    return out


def wise_ft(zero_shot: nn.Module, finetuned: nn.Module | Mapping[str, Tensor], alpha: float, into: nn.Module | None = None) -> nn.Module:
    """Load the WiSE-FT weights at ``alpha`` into ``into`` (default: ``zero_shot`` itself) and
    return it."""
    state = interpolate_weights(zero_shot, finetuned, alpha)
    target = zero_shot if into is None else into
    target.load_state_dict(state)
    return target
