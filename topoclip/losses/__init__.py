"""Losses over any topology."""

from .contrastive import ContrastiveLoss, gather_features, symmetric_cross_entropy

__all__ = ["ContrastiveLoss", "gather_features", "symmetric_cross_entropy"]
