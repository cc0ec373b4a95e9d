"""Embedding arithmetic on the embedded shapes: "this image, but blue instead of red".

SIMAT-style (Couairon et al., *Embedding Arithmetic of Multimodal Queries for Image Retrieval*,
2022), as *Geodesic Multi-Modal Mixup for Robust Fine-Tuning* (Oh et al., NeurIPS 2023), §5.6
uses it: take an image v and a caption t of it, change one attribute word (t' = the caption
with "blue" for "red"), move the image point by lam times the text difference and retrieve;
a query scores when its nearest image (itself left out) has the changed attribute and every
other attribute of the query image.

The move stays on the manifold: ``topology.translate(v, t, t', lam)``, the log map of t' at t
transported to v and followed by the exp map there (per block on Ob(n, m)); in Euclidean space
it is plain addition, v + lam (t' - t).

The queries are a dataset like any other (``ArithmeticSet``: the split's images, and every
query's source and edited caption as its texts), so the evaluation embeds them once; the
``arithmetic`` task reads the queries from the entry's options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .embedded import EmbeddedSet

__all__ = ["ATTRIBUTES", "ArithmeticSet", "arithmetic_set", "arithmetic_metrics", "arithmetic_options"]

ATTRIBUTES = ("colour", "shape", "size")


@dataclass
class ArithmeticQueries:
    image: Tensor  # [Q] the query image
    source: Tensor  # [Q] caption index of its description
    edited: Tensor  # [Q] caption index of the edited description
    attribute: list[str]  # [Q] which attribute the edit changed
    targets: Tensor  # [Q, N] bool: the images that answer the query


class ArithmeticSet:
    """A retrieval-shaped dataset over a shapes split: ``ds[i]`` is the split's i-th pair, and
    ``captions`` holds every query's source and edited caption (``caption_to_image``: the query
    image for both). ``queries`` says which is which, and which images answer each query."""

    def __init__(self, split, captions: list[str], caption_to_image: list[int], queries: ArithmeticQueries, name: str):
        self.split, self.captions, self.caption_to_image, self.queries = split, captions, caption_to_image, queries
        self.name = name

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split[i]


def arithmetic_set(split, attributes=ATTRIBUTES, max_queries: int = 600, name: str = "arithmetic") -> ArithmeticSet:
    """The queries of a shapes split: each single-object image, each attribute, the first other
    value (in the generator's order) that some other single-object image of the split has
    with every remaining attribute equal. Deterministic; at most ``max_queries``."""
    from topoclip.data.shapes import COLOUR_NAMES, POSITIONS, SHAPES, SIZES, describe

    values = {"colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
    unknown = [a for a in attributes if a not in values]
    if unknown:
        raise ValueError(f"arithmetic: unknown attribute {unknown[0]!r} (known: {', '.join(values)})")
    objects = split.attributes.all_objects()
    single = {i: objs[0] for i, objs in enumerate(objects) if len(objs) == 1}
    by_key: dict[tuple, list[int]] = {}
    keys = ("colour", "shape", "size", "position")
    for i, o in single.items():
        by_key.setdefault(tuple(o[k] for k in keys), []).append(i)

    captions: list[str] = []
    caption_to_image: list[int] = []
    rows: list[tuple[int, int, int, str, list[int]]] = []
    for i, o in single.items():
        for attribute in attributes:
            options = values[attribute]
            start = options.index(o[attribute])
            for step in range(1, len(options)):
                new = dict(o, **{attribute: options[(start + step) % len(options)]})
                answers = [j for j in by_key.get(tuple(new[k] for k in keys), []) if j != i]
                if answers:
                    captions += [describe([o]), describe([new])]
                    caption_to_image += [i, i]
                    rows.append((i, len(captions) - 2, len(captions) - 1, attribute, answers))
                    break
            if len(rows) >= max_queries:
                break
        if len(rows) >= max_queries:
            break
    if not rows:
        raise ValueError("arithmetic: no query has an answer in this split (too few single-object images)")
    targets = torch.zeros(len(rows), len(split), dtype=torch.bool)
    for q, (*_, answers) in enumerate(rows):
        targets[q, answers] = True
    queries = ArithmeticQueries(
        image=torch.tensor([r[0] for r in rows]), source=torch.tensor([r[1] for r in rows]),
        edited=torch.tensor([r[2] for r in rows]), attribute=[r[3] for r in rows], targets=targets,
    )
    return ArithmeticSet(split, captions, caption_to_image, queries, name)


def arithmetic_options(dataset: ArithmeticSet, lam: float = 1.0) -> dict:
    """The ``arithmetic`` task's options for an entry on ``dataset``."""
    return {"queries": dataset.queries, "lam": lam}


def _caption_points(emb: EmbeddedSet, index: Tensor) -> Tensor:
    # caption_points: one point per caption, also where identical strings were merged.
    points = emb.caption_points
    return points[index.to(points.device)]


@torch.no_grad()
def _hits(emb: EmbeddedSet, queries: ArithmeticQueries, lam: float) -> Tensor:
    topo, images = emb.topology, emb.image_points
    device = images.device
    v = images[queries.image.to(device)]
    moved = topo.translate(v, _caption_points(emb, queries.source), _caption_points(emb, queries.edited), lam)
    sims = topo.similarity(moved.to(images.dtype), images).float()
    sims[torch.arange(len(sims), device=device), queries.image.to(device)] = float("-inf")  # not the query itself
    best = sims.argmax(dim=1)
    return queries.targets.to(device)[torch.arange(len(best), device=device), best]


def arithmetic_metrics(emb: EmbeddedSet, queries: ArithmeticQueries, lam: float = 1.0) -> dict:
    """R@1 of the moved queries (``r1``, and per attribute ``r1_<attribute>``); ``r1_unmoved``
    is the same retrieval without the move (lam = 0): what the image alone finds."""
    hits, still = _hits(emb, queries, lam).float(), _hits(emb, queries, 0.0).float()
    out = {"r1": float(hits.mean()), "r1_unmoved": float(still.mean()), "lambda": float(lam), "queries": len(hits)}
    for attribute in dict.fromkeys(queries.attribute):
        mask = torch.tensor([a == attribute for a in queries.attribute], device=hits.device)
        out[f"r1_{attribute}"] = float(hits[mask].mean())
    return out
