"""DualEncoder: two towers, a projection per tower, the topology's project, and the temperature.

Multi-token (k = m > 1): each [CLS] token's width -> n by one linear head shared over the
tokens (Fig. 2 of *Design of the topology for contrastive visual-textual alignment*), then ``topology.project`` on ``[b, m, n]``: one unit sphere per
token. Single-token (k = 1): the token -> d = n*m by a linear head, then ``topology.project`` on
``[b, d]`` (the oblique topology splits it into m blocks of n). Points leave flat, ``[b, d]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..geometry import Topology
from ..temperature import Curvature, LogitBias, LogitScale
from .config import ModelConfig, check_tokens_fit_topology
from .towers import ImageTower, TextTower

__all__ = ["DualEncoder", "TokenProjection", "build_model", "check_tokens_fit_topology", "ensure_logit_bias"]


class TokenProjection(nn.Module):
    """``[b, k, width]`` token features -> flat manifold points ``[b, d]``."""

    def __init__(self, width: int, num_tokens: int, topology: Topology):
        super().__init__()
        check_tokens_fit_topology(num_tokens, topology)
        self.num_tokens = num_tokens
        self.topology = topology
        out = topology.block_dim if num_tokens > 1 else topology.dim
        # No bias: a constant offset before normalisation only shifts every point alike.
        self.linear = nn.Linear(width, out, bias=False)
        # Gaussian with std = 1/sqrt(fan_in), the "Kaiming" init of *Design of the topology*, §4.1.
        nn.init.normal_(self.linear.weight, std=width ** -0.5)
        # A topology whose project is an exponential map (lorentz) reads the features as a
        # tangent vector, whose length is a distance: MERU scales them by a learnable
        # alpha <= 1 that starts at d^-1/2, so that points start near the origin.
        self.log_alpha = None
        if getattr(topology, "scales_tangent_input", False):
            self.log_alpha = nn.Parameter(torch.tensor(-0.5 * math.log(out)))

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 3 or tokens.shape[1] != self.num_tokens:
            raise ValueError(f"expected token features [b, {self.num_tokens}, width], got {tuple(tokens.shape)}")
        x = self.linear(tokens if self.num_tokens > 1 else tokens[:, 0])
        if self.log_alpha is not None:
            x = x * self.log_alpha.exp().clamp(max=1.0)
        return self.topology.project(x).reshape(tokens.shape[0], self.topology.dim)


class DualEncoder(nn.Module):
    """Image and text towers mapped to points of one topology, plus the logit scale.

    Attributes: ``image`` / ``text`` (towers), ``image_proj`` / ``text_proj``, ``topology``,
    ``logit_scale`` (a :class:`topoclip.LogitScale`), ``logit_bias`` (a
    :class:`topoclip.temperature.LogitBias` for the sigmoid loss, or None), ``num_tokens`` (k).
    """

    def __init__(self, image: ImageTower, text: TextTower, topology: Topology, logit_scale: LogitScale,
                 logit_bias: LogitBias | None = None):
        super().__init__()
        if image.num_tokens != text.num_tokens:
            raise ValueError(f"image tower has {image.num_tokens} [CLS] tokens, text tower {text.num_tokens}")
        check_tokens_fit_topology(image.num_tokens, topology)
        self.image = image
        self.text = text
        self.topology = topology
        self.num_tokens = image.num_tokens
        self.image_proj = TokenProjection(image.width, self.num_tokens, topology)
        self.text_proj = TokenProjection(text.width, self.num_tokens, topology)
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias  # the sigmoid loss's offset, or None

    def encode_image(self, images: Tensor) -> Tensor:
        """Images ``[b, 3, H, W]`` -> points ``[b, d]``."""
        return self.image_proj(self.image(images))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Token ids ``[b, L]`` (position 0 = [CLS]) and mask -> points ``[b, d]``."""
        return self.text_proj(self.text(input_ids, attention_mask))

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)

    def image_features(self, images: Tensor) -> Tensor:
        """Pre-projection [CLS] features concatenated, ``[b, k*width]`` (for linear probes)."""
        return self.image(images).flatten(1)

    def image_head_parameters(self) -> list[nn.Parameter]:
        """The image projection onto the embedding: what a linear probe on the frozen image
        features trains (LP-FT's first stage)."""
        return list(self.image_proj.parameters())

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names to exclude from weight decay: every 1-d parameter (biases, norm
        gains, the logit scale) plus the towers' [CLS]/register tokens and position embeddings."""
        names = {n for n, p in self.named_parameters() if p.ndim < 2}
        names |= {f"image.{n}" for n in self.image.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names


def build_model(cfg: ModelConfig, topology: Topology, vocab_size: int, pad_token_id: int = 0) -> DualEncoder:
    """Build a randomly initialised DualEncoder.

    ``vocab_size`` and ``pad_token_id`` come from the tokenizer, not the config, since the
    tokenizer is built from (or loaded with) the data. The [CLS] id needs no argument: the text
    tower copies whatever id the tokenizer put at position 0.
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"build_model needs a ModelConfig, got {type(cfg).__name__}")
    cfg.validate()
    check_tokens_fit_topology(cfg.num_tokens, topology)  # before the towers cost any time
    image = ImageTower(cfg.image, cfg.num_tokens)
    text = TextTower(cfg.text, vocab_size, pad_token_id, cfg.num_tokens)
    scale = LogitScale(init=cfg.logit_scale.init, learnable=cfg.logit_scale.learnable, max=cfg.logit_scale.max)
    bias = LogitBias(cfg.logit_bias) if cfg.logit_bias is not None else None
    model = DualEncoder(image, text, topology, scale, bias)
    if getattr(topology, "learn_curvature", False):
        # The model owns the learnable curvature (saved, resumed, optimised); the topology
        # reads it at every call.
        model.curvature = Curvature(float(topology.curvature))
        topology.curvature = model.curvature
    return model


def ensure_logit_bias(model: nn.Module, init: float | None = None) -> LogitBias:
    """Give ``model`` the sigmoid loss's learnable logit bias, if it has none, and return it.

    A model trained with the sigmoid loss keeps its own bias (``init`` is then ignored). Else
    the bias starts at ``init``; null takes the wrapped pretrained model's own ``logit_bias``
    (an OpenCLIP or Hugging Face SigLIP model carries one) or, failing that, SigLIP's -10.
    The bias sits on the device of the model's logit scale and, being 0-dim, is exempt from
    weight decay like the scale.
    """
    existing = getattr(model, "logit_bias", None)
    if existing is not None:
        return existing
    if init is None:
        own = getattr(getattr(model, "clip", None), "logit_bias", None)
        init = float(own.detach().float().reshape(-1)[0]) if isinstance(own, Tensor) else -10.0
    model.logit_bias = LogitBias(init).to(model.logit_scale().device)
    return model.logit_bias
