"""Dual encoders with k [CLS] tokens per tower, mapped onto a topology.

Names are imported on first use: the config classes alone (``topoclip.models.config``) load
neither timm's models nor transformers.
"""

from topoclip._lazy import exported, lazy_attributes

_WHERE = exported({
    ".config": ["DEFAULT_IMAGE_MODEL", "ImageTowerConfig", "LogitScaleConfig", "ModelConfig", "TextTowerConfig",
                "check_tokens_fit_topology"],
    ".dual_encoder": ["DualEncoder", "TokenProjection", "build_model", "ensure_logit_bias"],
    ".pretrained": ["HFClipDualEncoder", "OpenClipDualEncoder", "OpenClipTokenizer", "load_hf_clip", "load_openclip",
                    "load_pretrained"],
    ".towers": ["ImageTower", "TextTower"],
    ".weight_space": ["interpolate_weights", "wise_ft"],
})
__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
__all__ = sorted(_WHERE)
