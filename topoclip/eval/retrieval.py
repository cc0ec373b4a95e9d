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


def _positive_rows(pairs: torch.Tensor, start: int, stop: int, num_cols: int) -> torch.Tensor:
    """``[stop - start, num_cols]`` bool: row q is positive at column c when (start + q, c) is
    a pair. Built per chunk of queries, so memory stays O(chunk * N)."""
    block = torch.zeros(stop - start, num_cols, dtype=torch.bool, device=pairs.device)
    inside = pairs[(pairs[:, 0] >= start) & (pairs[:, 0] < stop)]
    block[inside[:, 0] - start, inside[:, 1]] = True
    return block


def retrieval_recall(
    topology,
    image_points: torch.Tensor,
    text_points: torch.Tensor,
    caption_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    positive_pairs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall at each k for image->text and text->image retrieval.

    ``image_points`` ``[N, d]``, ``text_points`` ``[M, d]``, ``caption_to_image`` LongTensor ``[M]``
    (the image each caption describes). I->T: an image is a hit at k if ANY of its captions is
    in its top k; T->I: a caption is a hit if its image is in its top k. ``positive_pairs``
    ``[P, 2]`` of (image, caption) replaces ``caption_to_image`` as the relation when a text
    has several positive images (a caption string shared by several images, merged into one
    text: see ``topoclip.eval.embedded``); a T->I query is then a hit if ANY of them is in its
    top k. Queries without a positive are left out of their direction's average (with a
    warning). Returns ``{"i2t_R@k": float, ..., "t2i_R@k": float, ...}`` with fractions in
    [0, 1]. Memory is O(chunk_size * max(N, M)).
    """
    ks = _check_ks(ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_points("image_points", image_points, topology.dim)
    _check_points("text_points", text_points, topology.dim)
    num_images, num_texts = image_points.shape[0], text_points.shape[0]
    device = image_points.device
    if positive_pairs is None:
        caption_to_image = check_caption_to_image(caption_to_image, num_texts)
        if caption_to_image.min() < 0 or caption_to_image.max() >= num_images:
            raise ValueError(f"caption_to_image has indices outside [0, {num_images}) (the number of images)")
        pairs = torch.stack([caption_to_image.long(), torch.arange(num_texts)], dim=1)
    else:
        pairs = torch.as_tensor(positive_pairs).long()
        if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
            raise ValueError(f"positive_pairs must have shape [P, 2] of (image, caption), got {tuple(pairs.shape)}")
        if pairs[:, 0].min() < 0 or pairs[:, 0].max() >= num_images or pairs[:, 1].min() < 0 or pairs[:, 1].max() >= num_texts:
            raise ValueError(f"positive_pairs has indices outside [0, {num_images}) x [0, {num_texts})")
    pairs = pairs.to(device)
    text_points = text_points.to(device)

    def ranks(queries, items, query_pairs, num_queries, what):
        out, has_positive = [], torch.zeros(num_queries, dtype=torch.bool, device=device)
        has_positive[query_pairs[:, 0]] = True
        for start in range(0, num_queries, chunk_size):
            stop = min(num_queries, start + chunk_size)
            scores = topology.similarity(queries[start:stop], items)
            out.append(rank_of_best_positive(scores, _positive_rows(query_pairs, start, stop, items.shape[0])))
        if not bool(has_positive.all()):
            logger.warning("%d of %d %s have no positive; left out of %s recall",
                           int((~has_positive).sum()), num_queries, *what)
        return torch.cat(out)[has_positive]

    i2t_rank = ranks(image_points, text_points, pairs, num_images, ("images", "image->text"))
    t2i_rank = ranks(text_points, image_points, pairs.flip(1), num_texts, ("captions", "text->image"))

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


def retrieval_metrics(emb, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024, positives: str = "captions") -> dict[str, float]:
    """R@k of an embedded retrieval set (``topoclip.eval.embedded.EmbeddedSet``).

    ``positives``: ``captions`` (an image's own captions) or ``annotated`` (the set's
    ``positive_pairs``, e.g. every caption of the image's class for class-level retrieval)."""
    emb.require("retrieval")
    if positives == "annotated":
        if emb.positive_pairs is None:
            raise ValueError(f"{emb.name}: positives='annotated' needs a set with positive_pairs")
        return retrieval_recall(emb.topology, emb.image_points, emb.text_points, None, ks, chunk_size,
                                positive_pairs=emb.merged_positive_pairs())
    if positives != "captions":
        raise ValueError(f"positives: must be 'captions' or 'annotated', got {positives!r}")
    if emb.caption_text is None:
        return retrieval_recall(emb.topology, emb.image_points, emb.text_points, emb.caption_to_image, ks, chunk_size)
    return retrieval_recall(emb.topology, emb.image_points, emb.text_points, None, ks, chunk_size,
                            positive_pairs=emb.merged_pairs)
