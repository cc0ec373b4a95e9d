"""The contrastive loss on held-out pairs: how well a model fits pairs it did not train on.

Computed in fixed batches (a contrastive loss depends on the batch size: compare runs at the
same one), on this process alone (no gather across ranks), in eval mode without gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from topoclip.devices import resolve_device

from .embed import eval_mode
from .embedded import model_scale

__all__ = ["validation_loss"]


@torch.no_grad()
def validation_loss(model: nn.Module, pairs, collate, batch_size: int, device=None) -> float:
    """Mean symmetric InfoNCE of ``model`` over the full batches of ``pairs`` (items
    ``(image, caption)``; ``collate`` as in training), scored with the model's topology and
    logit scale. NaN when ``pairs`` holds less than one batch."""
    device = resolve_device(device, model)
    scale = model_scale(model)
    loader = DataLoader(pairs, batch_size=batch_size, shuffle=False, drop_last=True, collate_fn=collate)
    losses = []
    with eval_mode(model):
        for batch in loader:
            u, v = model(batch["images"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device))
            logits = scale * model.topology.similarity(u, v).float()
            labels = torch.arange(logits.shape[0], device=logits.device)
            losses.append(0.5 * float(F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)))
    return sum(losses) / len(losses) if losses else math.nan
