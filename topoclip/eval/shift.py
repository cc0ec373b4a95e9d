"""Embedding shift: close the modality gap at inference, without training.

The image and text embeddings of a contrastive model sit in two separated cones; shifting
each modality by half the centroid difference (scaled by ``c``) and projecting back onto the
topology moves them together (v' = proj(v - c gap/2), t' = proj(t + c gap/2)). The gap is
measured once, on pairs from the data the model will be used on, and then applied to every
embedding; :class:`EmbeddingShiftModel` wraps a dual encoder so every evaluation in
``topoclip.eval`` sees the shifted points.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from topoclip.devices import resolve_device

from .embed import eval_mode

__all__ = ["EmbeddingShiftModel", "estimate_modality_gap"]


@torch.no_grad()
def estimate_modality_gap(
    model: nn.Module, pairs: Dataset, collate_fn, batch_size: int = 256, max_pairs: int | None = 4096, device=None
) -> Tensor:
    """mean(image points) - mean(text points) over (up to ``max_pairs``) training pairs."""
    if len(pairs) == 0:
        raise ValueError("estimate_modality_gap: the pair set is empty")
    count = len(pairs) if max_pairs is None else min(len(pairs), max_pairs)
    subset = torch.utils.data.Subset(pairs, range(count))
    device = resolve_device(device, model)
    v_sum = t_sum = None
    with eval_mode(model):
        for batch in DataLoader(subset, batch_size=batch_size, collate_fn=collate_fn):
            v, t = model(
                batch["images"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )
            # Sums rather than stored points: memory stays O(d) for any number of pairs.
            v_sum = v.float().sum(0) if v_sum is None else v_sum + v.float().sum(0)
            t_sum = t.float().sum(0) if t_sum is None else t_sum + t.float().sum(0)
    return (v_sum - t_sum) / count


class EmbeddingShiftModel(nn.Module):
    """``model`` with every image point moved by -c gap/2 and every text point by +c gap/2,
    then projected back onto ``model.topology``.

    Exposes the dual-encoder interface the evaluations use (``encode_image``,
    ``encode_text``, ``forward``, ``topology``, ``logit_scale``, ``num_tokens``).
    """

    def __init__(self, model: nn.Module, gap: Tensor, c: float = 1.0):
        super().__init__()
        dim = model.topology.dim
        if gap.shape != (dim,):
            raise ValueError(f"gap: expected shape ({dim},) for the model's topology, got {tuple(gap.shape)}")
        self.model = model
        self.c = float(c)
        self.register_buffer("shift", 0.5 * self.c * gap.detach().float().clone())

    @property
    def topology(self):
        return self.model.topology

    @property
    def logit_scale(self):
        return self.model.logit_scale

    @property
    def num_tokens(self) -> int:
        return getattr(self.model, "num_tokens", 1)

    def _moved(self, points: Tensor, sign: float) -> Tensor:
        flat = points.reshape(points.shape[0], -1).float()
        return self.topology.project(flat + sign * self.shift.to(flat.device)).reshape(flat.shape)

    def encode_image(self, images: Tensor) -> Tensor:
        return self._moved(self.model.encode_image(images), -1.0)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._moved(self.model.encode_text(input_ids, attention_mask), +1.0)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None):
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)

    def image_features(self, images: Tensor) -> Tensor:
        return self.model.image_features(images)
