"""Model configuration: image tower, text tower, temperature and the number k of [CLS] tokens.

Plain dataclasses, validated on construction so that a bad config fails before any work. Errors
name the field by its path in an experiment config (``model.text.depth``), because that is what
the user has to edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from topoclip.dataclass_io import check_types, from_dict, to_dict
from topoclip.scale_bounds import check_scale_bounds

if TYPE_CHECKING:
    from topoclip.geometry import Topology

__all__ = [
    "DEFAULT_IMAGE_MODEL",
    "ImageTowerConfig",
    "LogitScaleConfig",
    "ModelConfig",
    "TextTowerConfig",
    "check_tokens_fit_topology",
]

# Registered with timm by topoclip.models.towers: a ViT sized for the embedded 32x32 data.
DEFAULT_IMAGE_MODEL = "topoclip_vit_tiny"

# timm.create_model arguments the image tower sets itself; taking them from timm_kwargs would
# silently fight the tower (or download weights).
_RESERVED_TIMM_KWARGS = {
    "pretrained": "the project never downloads weights",
    "pretrained_cfg": "the project never downloads weights",
    "pretrained_cfg_overlay": "the project never downloads weights",
    "num_classes": "the tower always drops the classifier",
    "class_token": "set by model.num_tokens",
    "reg_tokens": "set by model.num_tokens",
    "global_pool": "the tower reads the [CLS] tokens itself",
    "img_size": "use model.image.img_size",
    "patch_size": "use model.image.patch_size",
    "depth": "use model.image.depth",
    "embed_dim": "use model.image.width",
    "num_heads": "use model.image.heads",
    "mlp_ratio": "use model.image.mlp_ratio",
}


def _is_timm_model(name: str) -> bool:
    # timm (and our towers, which register the default model with it) load only for a name
    # that is not the default: validating the default config stays light.
    import timm

    from . import towers as _towers  # noqa: F401

    return timm.is_model(name)


def check_tokens_fit_topology(num_tokens: int, topology: Topology) -> None:
    """k = 1 works with every topology; k > 1 needs one unit sphere per token (k = m).

    The one statement of the rule: configs check it up front with the topology they will build.
    """
    if num_tokens == 1 or num_tokens == topology.num_blocks:
        return
    rule = f"model.num_tokens={num_tokens} must be 1 (single-token) or equal the topology's m={topology.num_blocks}"
    if not topology.blockwise:
        raise ValueError(
            f"model.num_tokens: {num_tokens} [CLS] tokens need an oblique topology (one sphere per token), "
            f"but topology.name is {topology.name} ({rule})"
        )
    raise ValueError(
        f"model.num_tokens: multi-token models need num_tokens == topology.m, got {num_tokens} != "
        f"{topology.num_blocks} ({rule})"
    )



def _int(value: Any, name: str, minimum: int = 1) -> None:
    # bool is an int subclass; `depth: true` in YAML is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass
class ImageTowerConfig:
    """A timm image model, named as in timm's registry and built with random weights.

    The size fields apply to timm VisionTransformers only and override the named model's own
    values; None keeps them. The default model ``topoclip_vit_tiny`` is a ViT for 32x32 images
    with 4x4 patches, depth 4, width 128, 4 heads, MLP ratio 4. ``timm_kwargs`` go to
    ``timm.create_model`` unchanged (e.g. ``drop_path_rate``).
    """

    name: str = DEFAULT_IMAGE_MODEL
    img_size: int | None = None
    patch_size: int | None = None
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    # How a ViT's patch position embeddings start (they stay learnable): "learned" keeps timm's
    # small random init (std 0.02); "sincos" starts from 2-D sine-cosine embeddings. On small
    # data timm's init leaves position invisible next to patch features of std ~0.6, and
    # captions that differ only in position ("... on the left") then cannot be told apart.
    pos_embed: str = "learned"
    pos_embed_temperature: float = 10.0
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        p = "model.image"
        check_types(self, p)
        if not self.name:
            raise ValueError(f"{p}.name must be a timm model name, got {self.name!r}")
        if self.name != DEFAULT_IMAGE_MODEL and not _is_timm_model(self.name):
            raise ValueError(f"{p}.name: {self.name!r} is not a timm model (see timm.list_models())")
        for attr in ("img_size", "patch_size", "depth", "width", "heads"):
            if getattr(self, attr) is not None:
                _int(getattr(self, attr), f"{p}.{attr}")
        if self.mlp_ratio is not None:
            _positive(self.mlp_ratio, f"{p}.mlp_ratio")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"{p}.pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        _positive(self.pos_embed_temperature, f"{p}.pos_embed_temperature")
        if self.img_size is not None and self.patch_size is not None and self.img_size % self.patch_size:
            raise ValueError(
                f"{p}.patch_size={self.patch_size} must divide {p}.img_size={self.img_size}"
            )
        if self.width is not None and self.heads is not None and self.width % self.heads:
            raise ValueError(f"{p}.heads={self.heads} must divide {p}.width={self.width}")
        for key in self.timm_kwargs:
            if key in _RESERVED_TIMM_KWARGS:
                raise ValueError(f"{p}.timm_kwargs.{key} is not allowed: {_RESERVED_TIMM_KWARGS[key]}")

    def vit_overrides(self) -> dict[str, Any]:
        """The size fields that are set, under timm's VisionTransformer argument names."""
        timm_names = {
            "img_size": "img_size",
            "patch_size": "patch_size",
            "depth": "depth",
            "width": "embed_dim",
            "heads": "num_heads",
            "mlp_ratio": "mlp_ratio",
        }
        return {timm_names[a]: getattr(self, a) for a in timm_names if getattr(self, a) is not None}


@dataclass
class TextTowerConfig:
    """A BERT encoder built from scratch (HF transformers), sized for CPU by default.

    ``context_length`` is the tokenizer's padded length L. The tower inserts k-1 extra [CLS]
    tokens, so it needs L + k - 1 positions; ``max_positions`` None means exactly that.
    """

    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    context_length: int = 32
    max_positions: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        p = "model.text"
        check_types(self, p)
        for attr in ("width", "depth", "heads"):
            _int(getattr(self, attr), f"{p}.{attr}")
        _int(self.context_length, f"{p}.context_length", minimum=2)
        if self.max_positions is not None:
            _int(self.max_positions, f"{p}.max_positions", minimum=2)
        if self.width % self.heads:
            raise ValueError(f"{p}.heads={self.heads} must divide {p}.width={self.width}")
        _positive(self.mlp_ratio, f"{p}.mlp_ratio")
        if round(self.mlp_ratio * self.width) < 1:
            raise ValueError(f"{p}.mlp_ratio={self.mlp_ratio} gives an empty MLP at width {self.width}")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"{p}.dropout must be in [0, 1), got {d!r}")

    def positions_needed(self, num_tokens: int) -> int:
        return self.context_length + num_tokens - 1

    def resolved_max_positions(self, num_tokens: int) -> int:
        return self.max_positions if self.max_positions is not None else self.positions_needed(num_tokens)


@dataclass
class LogitScaleConfig:
    """The temperature as a multiplier: initial value, trainable or fixed, upper bound."""

    init: float = 1 / 0.07
    learnable: bool = True
    max: float | None = 100.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_types(self, "model.logit_scale")
        check_scale_bounds(self.init, self.max, "model.logit_scale.")


@dataclass
class ModelConfig:
    """Both towers, the temperature, and k = ``num_tokens`` [CLS] tokens per tower.

    One k for both towers because the similarity pairs image token i with text token i.
    k = 1 is the single-token model (any topology); k > 1 is the multi-token oblique model and
    must equal the topology's m (checked by ``build_model``, which sees the topology).
    """

    num_tokens: int = 1
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    logit_scale: LogitScaleConfig = field(default_factory=LogitScaleConfig)
    # The sigmoid loss's learnable logit bias, its initial value (SigLIP: -10); null: none
    # (the softmax loss has no use for one).
    logit_bias: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_types(self, "model")
        if self.logit_bias is not None and not math.isfinite(self.logit_bias):
            raise ValueError(f"model.logit_bias: must be a finite number or null, got {self.logit_bias}")
        _int(self.num_tokens, "model.num_tokens")
        for attr in ("image", "text", "logit_scale"):
            getattr(self, attr).validate()
        need = self.text.positions_needed(self.num_tokens)
        if self.text.max_positions is not None and self.text.max_positions < need:
            raise ValueError(
                f"model.text.max_positions={self.text.max_positions} is too small: the text tower sees "
                f"model.text.context_length + model.num_tokens - 1 = {need} positions"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ModelConfig":
        """Build from a nested mapping (e.g. parsed YAML); unknown keys are errors."""
        return from_dict(cls, data or {}, "model")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
