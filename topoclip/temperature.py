"""The softmax temperature, as a multiplier on similarities ("logit scale").

Stored as log(scale) so that gradient steps are multiplicative and the scale stays positive.
*Design of the topology for contrastive visual-textual alignment* reads it as the factor that stretches the similarity range: [-1, 1] on the sphere
becomes [-scale, scale]. A maximum (CLIP's 100; 100/16 for a 16-token oblique model) keeps
the logits finite in low precision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from topoclip.scale_bounds import check_scale_bounds  # re-exported

__all__ = ["LogitScale", "LogitBias", "Curvature", "check_scale_bounds"]


class LogitScale(nn.Module):
    """``scale = exp(log_scale)``, clamped to ``max``.

    Args:
        init: initial scale (CLIP: 1/0.07; the ablations of *Design of the topology*, Table 3, use e^0, e^2.64, e^5.31).
        learnable: whether ``log_scale`` is a trainable parameter or a fixed buffer.
        max: upper bound of the scale (None for no bound).
    """

    def __init__(self, init: float = 1 / 0.07, learnable: bool = True, max: float | None = 100.0):
        super().__init__()
        check_scale_bounds(init, max)
        self.learnable = bool(learnable)
        self.max = None if max is None else float(max)
        value = torch.tensor(math.log(init), dtype=torch.float32)
        if self.learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    def forward(self) -> Tensor:
        scale = self.log_scale.float().exp()
        if self.max is not None:
            scale = scale.clamp(max=self.max)
        return scale

    @torch.no_grad()
    def clamp_(self) -> None:
        """Pull the parameter back to [.., log(max)] after an optimizer step (as CLIP does), so
        that it does not drift above the bound where the clamp in forward blocks its gradient."""
        if self.max is not None:
            self.log_scale.clamp_(max=math.log(self.max))

    @property
    def value(self) -> float:
        return float(self.forward().detach())

    def extra_repr(self) -> str:
        return f"value={self.value:.4g}, learnable={self.learnable}, max={self.max}"


class LogitBias(nn.Module):
    """The sigmoid loss's learnable logit offset (SigLIP starts it at -10): ``bias()``, a
    0-dim tensor. A model carries it next to its LogitScale, so that under DDP its gradient
    is averaged like every other parameter's."""

    def __init__(self, init: float = -10.0, learnable: bool = True):
        super().__init__()
        if not math.isfinite(init):
            raise ValueError(f"logit bias: init must be finite, got {init}")
        value = torch.tensor(float(init), dtype=torch.float32)
        if learnable:
            self.bias = nn.Parameter(value)
        else:
            self.register_buffer("bias", value)

    def forward(self) -> Tensor:
        return self.bias.float()

    @property
    def value(self) -> float:
        return float(self.bias.detach())


class Curvature(nn.Module):
    """A learnable curvature c = exp(log_c) of hyperbolic space, clamped to [c0/10, 10 c0]
    around its initial value c0 (MERU's range), so that training cannot flatten the space to
    zero or fold it without bound. ``curvature()`` is a 0-dim tensor; the model owns it (it is
    saved, resumed and, as a 0-dim parameter, exempt from weight decay)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        if not (math.isfinite(init) and init > 0):
            raise ValueError(f"curvature: init must be a positive number, got {init}")
        self.low, self.high = math.log(init / 10.0), math.log(init * 10.0)
        self.log_c = nn.Parameter(torch.tensor(math.log(init), dtype=torch.float32))

    def forward(self) -> Tensor:
        return self.log_c.float().clamp(self.low, self.high).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Pull the parameter back into its range after an optimizer step (where the clamp in
        forward would block its gradient)."""
        self.log_c.clamp_(self.low, self.high)

    @property
    def value(self) -> float:
        return float(self.forward().detach())

