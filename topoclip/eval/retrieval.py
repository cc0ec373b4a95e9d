"""Image<->text retrieval recall (R@k) for any topology, in chunks of queries.

Scores come from ``topology.similarity`` (higher = closer), so the same code ranks by cosine,
negative L2, oblique inner product or negative geodesic distance. Only a ``[chunk, N]`` block
of scores exists at any time, never the full ``[N, M]`` matrix.

Ties are counted AGAINST the query (pessimistic): a query's rank is the number of wrong items
scoring greater than OR EQUAL TO its best correct item, and it is a hit at k when that rank is
< k. A collapsed model that gives every item the same score therefore scores R@k ~ 0 instead of
looking perfect because ground truth happens to come first in index order. NaN scores are
treated as -inf, so a diverged model is not rewarded either.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from topoclip.eval.embedded import check_caption_to_image, embed_dataset

logger = logging.getLogger(__name__)


def rank_of_best_positive(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Pessimistic 0-based rank of each row's best positive: ``#{negatives with score >= it}``.

    ``scores`` ``[q, K]``, ``positive`` bool ``[q, K]``. A row without any positive gets rank K.
    """
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    best_positive = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    rank = ((scores >= best_positive) & ~positive).sum(dim=1)
    return torch.where(positive.any(dim=1), rank, torch.full_like(rank, scores.shape[1]))


def _check_points(name: str, points: torch.Tensor, dim: int) -> None:
    if points.dim() != 2 or points.shape[1] != dim:
        raise ValueError(f"{name} must have shape [count, {dim}] (topology.dim), got {tuple(points.shape)}")
    if points.shape[0] == 0:
        raise ValueError(f"{name} is empty")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of integers >= 1, got {ks}")
    return ks


def retrieval_recall(
    topology,
    image_points: torch.Tensor,
    text_points: torch.Tensor,
    caption_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall at each k for image->text and text->image retrieval.

    ``image_points`` ``[N, d]``, ``text_points`` ``[M, d]``, ``caption_to_image`` LongTensor ``[M]``
    (the image each caption describes). I->T: an image is a hit at k if ANY of its captions is
    in its top k; T->I: a caption is a hit if its image is in its top k. Images without a
    caption cannot be I->T queries and are left out of that average (with a warning).
    Returns ``{"i2t_R@k": float, ..., "t2i_R@k": float, ...}`` with fractions in [0, 1].
    Memory is O(chunk_size * max(N, M)).
    """
    ks = _check_ks(ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_points("image_points", image_points, topology.dim)
    _check_points("text_points", text_points, topology.dim)
    num_images, num_texts = image_points.shape[0], text_points.shape[0]
    caption_to_image = check_caption_to_image(caption_to_image, num_texts)
    if caption_to_image.min() < 0 or caption_to_image.max() >= num_images:
        raise ValueError(f"caption_to_image has indices outside [0, {num_images}) (the number of images)")

    device = image_points.device
    text_points = text_points.to(device)
    caption_to_image = caption_to_image.to(device=device, dtype=torch.long)
    image_index = torch.arange(num_images, device=device)

    # I->T: each image query against all captions.
    i2t_ranks = []
    for start in range(0, num_images, chunk_size):
        queries = image_index[start : start + chunk_size]
        scores = topology.similarity(image_points[start : start + chunk_size], text_points)
        positive = caption_to_image.unsqueeze(0) == queries.unsqueeze(1)
        i2t_ranks.append(rank_of_best_positive(scores, positive))
    i2t_rank = torch.cat(i2t_ranks)
    has_caption = torch.zeros(num_images, dtype=torch.bool, device=device)
    has_caption[caption_to_image] = True
    if not bool(has_caption.all()):
        logger.warning(
            "%d of %d images have no caption; left out of image->text recall",
            int((~has_caption).sum()),
            num_images,
        )
    i2t_rank = i2t_rank[has_caption]

    # T->I: each caption query against all images.
    t2i_ranks = []
    for start in range(0, num_texts, chunk_size):
        targets = caption_to_image[start : start + chunk_size]
        scores = topology.similarity(text_points[start : start + chunk_size], image_points)
        positive = image_index.unsqueeze(0) == targets.unsqueeze(1)
        t2i_ranks.append(rank_of_best_positive(scores, positive))
    t2i_rank = torch.cat(t2i_ranks)

    results = {}
    for k in ks:
        results[f"i2t_R@{k}"] = float((i2t_rank < k).float().mean())
    for k in ks:
        results[f"t2i_R@{k}"] = float((t2i_rank < k).float().mean())
    return results


def evaluate_retrieval(
    model: nn.Module,
    dataset,
    tokenizer,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> dict[str, float]:
    """Embed a ``RetrievalSet`` (images, ``captions``, ``caption_to_image``) and return its R@k."""
    for attribute in ("captions", "caption_to_image"):
        if not hasattr(dataset, attribute):
            raise ValueError(f"dataset has no '{attribute}' attribute; expected a RetrievalSet")
    emb = embed_dataset(model, dataset, tokenizer, batch_size, device, num_workers, progress)
    return retrieval_metrics(emb, ks, chunk_size)


def retrieval_metrics(emb, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """R@k of an embedded retrieval set (``topoclip.eval.embedded.EmbeddedSet``)."""
    emb.require("retrieval")
    return retrieval_recall(emb.topology, emb.image_points, emb.text_points, emb.caption_to_image, ks, chunk_size)
