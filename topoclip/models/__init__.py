"""Dual encoders with k [CLS] tokens per tower, mapped onto a topology.

Names are imported on first use: the config classes alone (``topoclip.models.config``) load
neither timm's models nor transformers.
"""

from topoclip._lazy import exported, lazy_attributes

# Eager (it needs torch only): the function shares its module's name, and a lazy attribute would
# be shadowed by the submodule once anything imported ``topoclip.models.wise_ft``.
from .wise_ft import interpolate_weights as interpolate_weights  # re-exported
from .wise_ft import wise_ft as wise_ft

_WHERE = exported({
    ".config": ["DEFAULT_IMAGE_MODEL", "ImageTowerConfig", "LogitScaleConfig", "ModelConfig", "TextTowerConfig",
                "check_tokens_fit_topology"],
    ".dual_encoder": ["DualEncoder", "TokenProjection", "build_model", "ensure_logit_bias"],
    ".pretrained": ["HFClipDualEncoder", "OpenClipDualEncoder", "OpenClipTokenizer", "load_hf_clip", "load_openclip",
                    "load_pretrained"],
    ".towers": ["ImageTower", "TextTower"],
})
__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
__all__ = sorted([*_WHERE, "interpolate_weights", "wise_ft"])
