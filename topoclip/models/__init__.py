"""Dual encoders with k [CLS] tokens per tower, mapped onto a topology."""

from .config import DEFAULT_IMAGE_MODEL, ImageTowerConfig, LogitScaleConfig, ModelConfig, TextTowerConfig
from .dual_encoder import DualEncoder, TokenProjection, build_model, check_tokens_fit_topology, ensure_logit_bias
from .pretrained import HFClipDualEncoder, OpenClipDualEncoder, OpenClipTokenizer, load_hf_clip, load_openclip, load_pretrained
from .towers import ImageTower, TextTower  # first: registers the default timm image model
from .wise_ft import interpolate_weights, wise_ft

__all__ = [
    "DEFAULT_IMAGE_MODEL",
    "DualEncoder",
    "ImageTower",
    "ImageTowerConfig",
    "LogitScaleConfig",
    "ModelConfig",
    "TextTower",
    "TextTowerConfig",
    "TokenProjection",
    "build_model",
    "check_tokens_fit_topology",
    "ensure_logit_bias",
    "interpolate_weights",
    "wise_ft",
    "HFClipDualEncoder", "OpenClipDualEncoder", "OpenClipTokenizer", "load_hf_clip", "load_openclip", "load_pretrained",
]
