"""The entailment-cone loss of hyperbolic image-text models (MERU: Desai et al., *Hyperbolic
Image-Text Representations*, ICML 2023): a caption is more generic than its image, so the image
should lie inside a cone that opens from the text point away from the origin.

On the hyperboloid of curvature -c (space components stored, ``topology.time`` derived):

    half-aperture(t) = asin( 2K / (sqrt(c) |t_s|) ),      K = 0.1 (the cone's minimal radius)
    exterior angle(t, v) = angle at t between the ray away from the origin and the geodesic to v,
        cos = (v_0 + c <t, v>_L t_0) / ( |t_s| sqrt((c <t, v>_L)^2 - 1) )
    loss = mean_i relu( angle(t_i, v_i) - half-aperture(t_i) )

Arguments of asin and acos are kept inside (-1, 1), so values and gradients stay finite at the
origin (aperture pi/2) and for coincident points.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..geometry import Lorentz

__all__ = ["half_aperture", "exterior_angle", "entailment_loss", "EntailmentLoss"]

_EDGE = 1e-6  # keeps asin/acos arguments off +-1, where their derivatives are infinite


def half_aperture(topology: Lorentz, t: Tensor, min_radius: float = 0.1) -> Tensor:
    c = topology.c(t)
    norm = torch.linalg.vector_norm(t, dim=-1)
    return torch.asin((2.0 * min_radius / (torch.sqrt(c) * norm).clamp_min(1e-12)).clamp(-1 + _EDGE, 1 - _EDGE))


def exterior_angle(topology: Lorentz, t: Tensor, v: Tensor) -> Tensor:
    c = topology.c(t)
    t0, v0 = topology.time(t), topology.time(v)
    c_inner = c * ((t * v).sum(-1) - t0 * v0)  # <= -1 on the hyperboloid
    numerator = v0 + c_inner * t0
    denominator = torch.linalg.vector_norm(t, dim=-1) * torch.sqrt((c_inner * c_inner - 1.0).clamp_min(1e-12))
    return torch.acos((numerator / denominator.clamp_min(1e-12)).clamp(-1 + _EDGE, 1 - _EDGE))


def entailment_loss(topology: Lorentz, text: Tensor, image: Tensor, min_radius: float = 0.1) -> Tensor:
    """mean relu(exterior angle - half-aperture): zero when every image is inside its
    caption's cone."""
    if not isinstance(topology, Lorentz):
        raise ValueError(f"the entailment loss needs the lorentz topology, got {topology.name}")
    return torch.relu(exterior_angle(topology, text, image) - half_aperture(topology, text, min_radius)).mean()


class EntailmentLoss(nn.Module):
    """``inner(u, v, scale, ...) + weight * entailment_loss(v, u)``: the contrastive (or
    sigmoid) loss with MERU's cone term (MERU's weight: 0.2); u are image points, v text."""

    def __init__(self, inner: nn.Module, topology: Lorentz, weight: float = 0.2, min_radius: float = 0.1):
        super().__init__()
        if not isinstance(topology, Lorentz):
            raise ValueError(f"loss.entailment: needs topology.name=lorentz, got {topology.name}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"loss.entailment: the weight must be > 0, got {weight}")
        self.inner, self.topology, self.weight, self.min_radius = inner, topology, float(weight), float(min_radius)

    def forward(self, u: Tensor, v: Tensor, scale: Tensor, *extra: Tensor, return_details: bool = False):
        out = self.inner(u, v, scale, *extra, return_details=return_details)
        loss, details = out if return_details else (out, {})
        cone = entailment_loss(self.topology, v, u, self.min_radius)
        total = loss + self.weight * cone
        if not return_details:
            return total
        return total, {**details, "loss_entailment": float(cone.detach())}
