"""mAP@R and R-Precision (the ECCV Caption metrics) for image<->text retrieval, in chunks.

A query with R positives is judged on its top R results only:

    R-Precision = (#positives in the top R) / R
    mAP@R       = (1/R) * sum_{i=1..R} P(i) * rel(i),   P(i) = (#positives in the top i) / i

Both reward a model for ranking ALL of a query's positives first, not just one (as R@k does),
which is why they need several positives per query: COCO-style data gives an image ~5
captions; ECCV Caption adds extra positive pairs in both directions (``positive_pairs``).

Ties follow ``topoclip.eval.retrieval`` and count AGAINST the query: among items with equal
scores, the negatives are ranked before the positives. Then the i-th best positive (scores
sorted descending) sits at 1-based position ``i + #{negatives with score >= its score}``, and
the positives in the top R and their precisions follow from those positions. Counting this
way is exact whatever the tie pattern; ``topk`` would not be (its order among equal scores is
unspecified). NaN scores are treated as -inf. A collapsed model scoring everything equally
therefore gets 0, not credit for the index order of the ground truth.

Memory: one ``[chunk, N]`` score block at a time; the count above is one pass over the block
per positive rank (R_max passes, R_max ~ 5 for COCO-style data).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from topoclip.eval.embedded import EmbeddedSet, embed_dataset
from topoclip.eval.retrieval import _check_points, check_caption_to_image

logger = logging.getLogger(__name__)

__all__ = ["retrieval_map_at_r", "map_at_r_scores", "map_at_r_metrics", "evaluate_map_at_r", "positive_pairs_from_captions"]


def positive_pairs_from_captions(caption_to_image: torch.Tensor) -> torch.Tensor:
    """``[M, 2]`` (image, caption) pairs: caption j is a positive of image ``caption_to_image[j]``."""
    caption_to_image = torch.as_tensor(caption_to_image).long()
    return torch.stack([caption_to_image, torch.arange(caption_to_image.shape[0], device=caption_to_image.device)], 1)


def map_at_r_scores(scores: torch.Tensor, positive: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query metrics for a block of scores ``[q, K]`` and a bool mask of positives.

    Returns ``{"mAP@R", "R-P", "R@1"}`` (float64 ``[q]``) and ``"R"`` (positives per query).
    Ties count against the query (see the module docstring). Rows without a positive get
    R = 0 and metric values 0; callers leave them out of averages.
    """
    if scores.shape != positive.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and positive must both be [queries, items], got {tuple(scores.shape)} and {tuple(positive.shape)}"
        )
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    positive = positive.bool()
    negative = ~positive
    num_pos = positive.sum(dim=1)  # R per query
    r_max = int(num_pos.max()) if num_pos.numel() else 0
    ap = torch.zeros(scores.shape[0], dtype=torch.float64, device=scores.device)
    hits = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    first_position = torch.zeros_like(hits)
    if r_max > 0:
        # Positive scores sorted descending; slots beyond a row's R are padding (masked below).
        pos_sorted = scores.masked_fill(negative, float("-inf")).topk(r_max, dim=1).values
    for r in range(r_max):  # r = 0-based index of the (r+1)-th best positive
        negatives_above = ((scores >= pos_sorted[:, r : r + 1]) & negative).sum(dim=1)
        position = r + 1 + negatives_above  # 1-based, negatives first among ties
        if r == 0:
            first_position = position
        in_top_r = (r < num_pos) & (position <= num_pos)
        # Exactly r+1 positives fill the first `position` places: P(position) = (r+1)/position.
        ap += torch.where(in_top_r, (r + 1) / position.double(), 0.0)
        hits += in_top_r.long()
    denom = num_pos.clamp_min(1).double()
    has_positive = num_pos > 0
    return {
        "mAP@R": ap / denom,
        "R-P": hits.double() / denom,
        "R@1": (has_positive & (first_position == 1)).double(),
        "R": num_pos,
    }


def _check_pairs(positive_pairs: torch.Tensor, num_images: int, num_texts: int) -> torch.Tensor:
    pairs = torch.as_tensor(positive_pairs)
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"positive_pairs must have shape [P, 2] of (image, caption) indices, got {tuple(pairs.shape)}")
    if pairs.dtype.is_floating_point or pairs.dtype == torch.bool:
        raise ValueError(f"positive_pairs must hold integer indices, got dtype {pairs.dtype}")
    if pairs.shape[0] == 0:
        raise ValueError("positive_pairs is empty: no query has a positive")
    pairs = pairs.long()
    if pairs[:, 0].min() < 0 or pairs[:, 0].max() >= num_images:
        raise ValueError(f"positive_pairs has image indices outside [0, {num_images}) (the number of images)")
    if pairs[:, 1].min() < 0 or pairs[:, 1].max() >= num_texts:
        raise ValueError(f"positive_pairs has caption indices outside [0, {num_texts}) (the number of captions)")
    return torch.unique(pairs, dim=0)  # a pair listed twice is still one positive


def _one_direction(topology, queries, items, pairs, chunk_size, direction):
    """Mean mAP@R, R-P and R@1 over the queries that have at least one positive."""
    num_queries, num_items = queries.shape[0], items.shape[0]
    # Pairs sorted by query: each chunk's positives are one contiguous slice.
    pairs = pairs[torch.argsort(pairs[:, 0], stable=True)]
    chunk_starts = torch.arange(0, num_queries + chunk_size, chunk_size, device=pairs.device)
    bounds = torch.searchsorted(pairs[:, 0].contiguous(), chunk_starts).tolist()
    sums = {"mAP@R": 0.0, "R-P": 0.0, "R@1": 0.0}
    counted = 0
    for c, start in enumerate(range(0, num_queries, chunk_size)):
        stop = min(start + chunk_size, num_queries)
        chunk_pairs = pairs[bounds[c] : bounds[c + 1]]
        positive = torch.zeros(stop - start, num_items, dtype=torch.bool, device=queries.device)
        positive[chunk_pairs[:, 0] - start, chunk_pairs[:, 1]] = True
        per_query = map_at_r_scores(topology.similarity(queries[start:stop], items), positive)
        valid = per_query["R"] > 0
        for key in sums:
            sums[key] += float(per_query[key][valid].sum())
        counted += int(valid.sum())
    if counted == 0:
        raise ValueError(f"no {direction} query has a positive")
    if counted < num_queries:
        logger.warning(
            "%d of %d %s queries have no positive; left out of mAP@R", num_queries - counted, num_queries, direction
        )
    return {key: value / counted for key, value in sums.items()}


def retrieval_map_at_r(
    topology,
    image_points: torch.Tensor,
    text_points: torch.Tensor,
    caption_to_image: torch.Tensor | None = None,
    *,
    positive_pairs: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """mAP@R, R-Precision and R@1 for image->text and text->image retrieval.

    Positives are the (image, caption) pairs in ``positive_pairs`` ``[P, 2]`` if given (e.g.
    ECCV Caption's extra positives), else caption j and image ``caption_to_image[j]``; with
    only ``caption_to_image`` every caption has one positive image, so t2i mAP@R = R-P = R@1.
    Queries without a positive are left out (with a warning). Returns
    ``{"i2t_mAP@R", "i2t_R-P", "i2t_R@1", "t2i_mAP@R", "t2i_R-P", "t2i_R@1"}``, fractions in [0, 1].
    Memory is O(chunk_size * max(N, M)).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_points("image_points", image_points, topology.dim)
    _check_points("text_points", text_points, topology.dim)
    num_images, num_texts = image_points.shape[0], text_points.shape[0]
    if positive_pairs is None:
        if caption_to_image is None:
            raise ValueError("give caption_to_image or positive_pairs (which captions match which images)")
        caption_to_image = check_caption_to_image(caption_to_image, num_texts)
        positive_pairs = positive_pairs_from_captions(caption_to_image)
    device = image_points.device
    pairs = _check_pairs(positive_pairs, num_images, num_texts).to(device)
    text_points = text_points.to(device)

    results = {}
    i2t = _one_direction(topology, image_points, text_points, pairs, chunk_size, "image->text")
    t2i = _one_direction(topology, text_points, image_points, pairs.flip(1), chunk_size, "text->image")
    for prefix, values in (("i2t", i2t), ("t2i", t2i)):
        for key, value in values.items():
            results[f"{prefix}_{key}"] = value
    return results


def evaluate_map_at_r(
    model: nn.Module,
    dataset,
    tokenizer,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    positive_pairs: torch.Tensor | None = None,
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> dict[str, float]:
    """Embed a ``RetrievalSet`` and return its mAP@R / R-Precision / R@1 (see ``map_at_r``).

    ``positive_pairs`` defaults to ``dataset.positive_pairs`` if the dataset has one (extra
    annotated positives), else to its ``caption_to_image``.
    """
    for attribute in ("captions", "caption_to_image"):
        if not hasattr(dataset, attribute):
            raise ValueError(f"dataset has no '{attribute}' attribute; expected a RetrievalSet")
    emb = embed_dataset(model, dataset, tokenizer, batch_size, device, num_workers, progress)
    return map_at_r_metrics(emb, positive_pairs, chunk_size)


def map_at_r_metrics(emb: EmbeddedSet, positive_pairs: torch.Tensor | None = None, chunk_size: int = 1024) -> dict[str, float]:
    """mAP@R / R-Precision / R@1 of an embedded retrieval set; ``positive_pairs`` defaults to
    the set's own annotated pairs, else its ``caption_to_image``."""
    emb.require("retrieval")
    if positive_pairs is None:
        annotated = emb.merged_positive_pairs()
        positive_pairs = annotated if annotated is not None else emb.merged_pairs
    caption_to_image = emb.caption_to_image
    if emb.caption_text is not None:  # a placeholder one-to-one relation of the distinct texts
        caption_to_image = torch.zeros(emb.text_points.shape[0], dtype=torch.long, device=caption_to_image.device)
        caption_to_image[emb.caption_text] = emb.caption_to_image
    return retrieval_map_at_r(
        emb.topology, emb.image_points, emb.text_points, caption_to_image,
        positive_pairs=positive_pairs, chunk_size=chunk_size,
    )
