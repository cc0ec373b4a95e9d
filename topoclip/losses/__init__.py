"""Losses over any topology.

Names are imported on first use, so a config (which needs ``topoclip.losses.settings`` only)
does not load torch.
"""

from topoclip._lazy import exported, lazy_attributes

_WHERE = exported({
    "topoclip.losses.contrastive": ["ContrastiveLoss", "gather_features", "symmetric_cross_entropy"],
    "topoclip.losses.settings": ["MixupConfig", "SIGLIP_INIT"],
    "topoclip.losses.sigmoid": ["SigmoidLoss", "sigmoid_loss"],
})
__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
__all__ = sorted(_WHERE)
