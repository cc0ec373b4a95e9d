"""Losses over any topology."""

from .contrastive import ContrastiveLoss, gather_features, symmetric_cross_entropy
from .sigmoid import SIGLIP_INIT, SigmoidLoss, sigmoid_loss

__all__ = ["ContrastiveLoss", "SigmoidLoss", "SIGLIP_INIT", "gather_features", "sigmoid_loss", "symmetric_cross_entropy"]
