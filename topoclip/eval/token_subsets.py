"""Zero-shot accuracy from random subsets of a multi-token model's [CLS] tokens (Table 10).

Tests the mixture-of-experts reading of Ob(n, m) in *Design of the topology for
contrastive visual-textual alignment* (Table 10): if each sub-sphere (token) aligns
images and texts on its own, a subset S of the m tokens should still classify. For a subset,
image and class-text points are cut to the blocks in S (``[N, m, n] -> [N, |S|, n]``) and
scored by the same kind of topology with m' = |S|, so oblique-inner sums the block inner
products over S and oblique-geodesic takes sqrt of the summed squared angles over S.

Points are embedded once and sliced; the model never runs per subset. Subsets of a size are
drawn uniformly without replacement of tokens (independently per draw), from a generator
seeded by (seed, size) so a size's result does not depend on which other sizes are asked for.
When the number of distinct subsets C(m, size) is at most ``draws``, all of them are used
instead (the mean is then exact and ``draws`` reports how many there were). ``std`` is the
population standard deviation of the per-subset accuracies.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

import topoclip.geometry as geometry
from topoclip.devices import resolve_device
from topoclip.eval.embed import embed_labelled_images
from topoclip.eval.zeroshot import embed_class_texts, zeroshot_accuracy

__all__ = ["default_subset_sizes", "draw_subsets", "subset_topology", "token_subset_accuracy", "evaluate_token_subsets"]


def default_subset_sizes(m: int) -> tuple[int, ...]:
    """1, 2, 4, ... below m, then m itself (the full model, for reference)."""
    sizes = [1 << i for i in range(max(m - 1, 0).bit_length()) if (1 << i) < m]
    return tuple(sizes + [m])


def subset_topology(topology, size: int):
    """The topology of the same kind on ``size`` blocks of the same dimension n."""
    if topology.num_blocks < 2:
        raise ValueError(
            f"token subsets need a topology with several blocks (m > 1, e.g. oblique), got {topology!r}"
        )
    try:
        return geometry.topology(topology.name, n=topology.block_dim, m=size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot build a {size}-block version of {topology!r}: {err}") from err


def draw_subsets(m: int, size: int, draws: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Sorted token index tuples: all C(m, size) subsets if there are <= ``draws``, else ``draws`` random ones."""
    if not 1 <= size <= m:
        raise ValueError(f"subset size must be in [1, m={m}], got {size}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if math.comb(m, size) <= draws:
        return list(itertools.combinations(range(m), size))
    rng = np.random.default_rng([seed, size])
    return [tuple(sorted(int(i) for i in rng.choice(m, size, replace=False))) for _ in range(draws)]


def _check_sizes(sizes: Sequence[int] | None, m: int) -> tuple[int, ...]:
    if sizes is None:
        return default_subset_sizes(m)
    sizes = tuple(sizes)
    if not sizes:
        raise ValueError("sizes is empty")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= m:
            raise ValueError(f"sizes must be integers in [1, m={m}] (the number of tokens), got {size!r}")
    return tuple(int(s) for s in sizes)


def token_subset_accuracy(
    topology,
    image_points: torch.Tensor,
    labels: torch.Tensor,
    class_text_points: torch.Tensor,
    sizes: Sequence[int] | None = None,
    draws: int = 10,
    seed: int = 0,
    chunk_size: int = 256,
) -> list[dict]:
    """Top-1 zero-shot accuracy per subset size: ``[{size, mean, std, draws, accuracies, subsets}]``.

    ``image_points`` ``[N, d]``, ``labels`` ``[N]``, ``class_text_points`` ``[C, T, d]`` as for
    ``zeroshot_accuracy``; ``topology`` has m > 1 blocks. ``sizes`` defaults to 1, 2, 4, ..., m.
    """
    m, n = topology.num_blocks, topology.block_dim
    subset_topology(topology, 1)  # fails early for single-block topologies
    sizes = _check_sizes(sizes, m)
    if image_points.dim() != 2 or image_points.shape[1] != topology.dim:
        raise ValueError(f"image_points must have shape [N, {topology.dim}] (topology.dim), got {tuple(image_points.shape)}")
    if class_text_points.dim() != 3 or class_text_points.shape[2] != topology.dim:
        raise ValueError(
            f"class_text_points must have shape [classes, templates, {topology.dim}], got {tuple(class_text_points.shape)}"
        )
    images = image_points.reshape(image_points.shape[0], m, n)
    texts = class_text_points.reshape(*class_text_points.shape[:2], m, n)
    results = []
    for size in sizes:
        sub_topology = subset_topology(topology, size)
        subsets = draw_subsets(m, size, draws, seed)
        accuracies = []
        for subset in subsets:
            index = torch.tensor(subset, device=image_points.device)
            sub_images = images.index_select(1, index).reshape(images.shape[0], size * n)
            sub_texts = texts.index_select(2, index.to(texts.device)).reshape(*texts.shape[:2], size * n)
            accuracies.append(
                zeroshot_accuracy(sub_topology, sub_images, labels, sub_texts, ks=(1,), chunk_size=chunk_size)["top1"]
            )
        results.append({
            "size": size,
            "mean": float(np.mean(accuracies)),
            "std": float(np.std(accuracies)),
            "draws": len(subsets),
            "accuracies": accuracies,
            "subsets": subsets,
        })
    return results


def evaluate_token_subsets(
    model: nn.Module,
    dataset,
    tokenizer,
    sizes: Sequence[int] | None = None,
    draws: int = 10,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
) -> list[dict]:
    """``token_subset_accuracy`` of ``model`` on a ``ClassificationSet``, embedding everything once."""
    for attribute in ("classnames", "templates"):
        if not hasattr(dataset, attribute):
            raise ValueError(f"dataset has no '{attribute}' attribute; expected a ClassificationSet")
    topology = model.topology
    subset_topology(topology, 1)  # before any embedding work
    _check_sizes(sizes, topology.num_blocks)
    device = resolve_device(device, model)
    class_text_points = embed_class_texts(
        model, dataset.classnames, dataset.templates, tokenizer, batch_size, device, progress
    )
    image_points, labels = embed_labelled_images(
        model, dataset, batch_size, device, num_workers=num_workers, progress=progress
    )
    return token_subset_accuracy(topology, image_points, labels, class_text_points, sizes, draws, seed)
