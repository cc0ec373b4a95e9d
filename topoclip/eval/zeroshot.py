"""Zero-shot classification with prompt-template ensembling, for any topology.

A class's score for an image is the MEAN over templates of ``topology.similarity(image,
template text)``. The usual CLIP recipe (average the template embeddings, renormalise, then
score) only makes sense on a single sphere: on Euclidean space the mean of the similarities
is not the similarity to the mean, and on the oblique manifold with geodesic distance the
renormalised average is not even the (Frechet) mean. Averaging the similarities asks the
topology and nothing else.

Top-k accuracy counts ties against the image (see ``topoclip.eval.retrieval``), and k is
capped at the number of classes, so with C < 5 classes "top5" is top-C (= 1.0).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from topoclip.eval.embed import embed_texts
from topoclip.eval.embedded import EmbeddedSet, embed_dataset
from topoclip.eval.retrieval import rank_of_best_positive


def zeroshot_logits(
    topology,
    image_points: torch.Tensor,
    class_text_points: torch.Tensor,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Class scores ``[N, C]``: mean over the T templates of the image-text similarity.

    ``image_points`` ``[N, d]``, ``class_text_points`` ``[C, T, d]``. One similarity call per
    chunk of images against all C*T texts, so memory is O(chunk_size * C * T).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dim = topology.dim
    if image_points.dim() != 2 or image_points.shape[1] != dim:
        raise ValueError(
            f"image_points must have shape [N, {dim}] (topology.dim), got {tuple(image_points.shape)}"
        )
    if class_text_points.dim() != 3 or class_text_points.shape[2] != dim:
        raise ValueError(
            f"class_text_points must have shape [classes, templates, {dim}], "
            f"got {tuple(class_text_points.shape)}"
        )
    num_classes, num_templates, _ = class_text_points.shape
    if num_classes == 0 or num_templates == 0:
        raise ValueError(
            "class_text_points needs at least one class and one template, "
            f"got {tuple(class_text_points.shape)}"
        )
    texts = class_text_points.to(image_points.device).reshape(num_classes * num_templates, dim)
    logits = []
    for start in range(0, image_points.shape[0], chunk_size):
        scores = topology.similarity(image_points[start : start + chunk_size], texts)
        logits.append(scores.float().reshape(-1, num_classes, num_templates).mean(dim=2))
    if not logits:
        return image_points.new_zeros((0, num_classes), dtype=torch.float32)
    return torch.cat(logits)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top{k}": fraction}``; k capped at the number of classes, ties count as misses."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [N, classes], got {tuple(logits.shape)}")
    labels = torch.as_tensor(labels, device=logits.device).long()
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape [{logits.shape[0]}], got {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no images to score (logits is empty)")
    num_classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels outside [0, {num_classes}) (the number of classes)")
    positive = torch.nn.functional.one_hot(labels, num_classes).bool()
    rank = rank_of_best_positive(logits, positive)
    return {f"top{k}": float((rank < min(k, num_classes)).float().mean()) for k in ks}


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over classes of each class's top-1 recall (balanced accuracy, CLIP_benchmark's
    ``mean_per_class_recall``); ties count as misses, as in ``topk_accuracy``."""
    labels = torch.as_tensor(labels, device=logits.device).long()
    positive = torch.nn.functional.one_hot(labels, logits.shape[1]).bool()
    hit = (rank_of_best_positive(logits, positive) == 0).float()
    present = labels.unique()
    return float(torch.stack([hit[labels == c].mean() for c in present]).mean())


def zeroshot_accuracy(
    topology,
    image_points: torch.Tensor,
    labels: torch.Tensor,
    class_text_points: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 256,
) -> dict[str, float]:
    """Top-k accuracy from precomputed points: ``{"top1", "top5", "n", "mean_per_class_recall"}``.

    The entry point for evaluations that build their own points (e.g. a subset of the
    [CLS] tokens with a matching smaller topology).
    """
    logits = zeroshot_logits(topology, image_points, class_text_points, chunk_size)
    result: dict = topk_accuracy(logits, labels, ks)
    result["n"] = int(logits.shape[0])
    result["mean_per_class_recall"] = mean_per_class_recall(logits, labels)
    return result


def embed_class_texts(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenizer,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Text points ``[C, T, d]`` for every class name in every template."""
    if not classnames or not templates:
        raise ValueError("classnames and templates must both be non-empty")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")
    texts = [template.format(name) for name in classnames for template in templates]
    points = embed_texts(model, texts, tokenizer, batch_size, device, progress=progress)
    return points.view(len(classnames), len(templates), -1)


def zeroshot_classify(
    model: nn.Module,
    dataset,
    tokenizer,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    class_text_points: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 256,
    progress: bool | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy of ``model`` on a ``ClassificationSet``: ``{"top1", "top5", "n", "mean_per_class_recall"}``.

    Texts are ``template.format(classname)`` for ``dataset.classnames`` x ``dataset.templates``,
    unless ``class_text_points`` ``[C, T, d]`` is given (then no text is embedded).
    """
    if class_text_points is None:
        for attribute in ("classnames", "templates"):
            if not hasattr(dataset, attribute):
                raise ValueError(f"dataset has no '{attribute}' attribute; expected a ClassificationSet")
    emb = embed_dataset(model, dataset, tokenizer, batch_size, device, num_workers, progress, class_text_points)
    return zeroshot_metrics(emb, ks, chunk_size)


def zeroshot_metrics(emb: EmbeddedSet, ks: Sequence[int] = (1, 5), chunk_size: int = 256) -> dict[str, float]:
    """Zero-shot accuracy of an embedded classification set: ``{"top1", "top5", "n",
    "mean_per_class_recall"}``."""
    emb.require("classification")
    return zeroshot_accuracy(emb.topology, emb.image_points, emb.labels, emb.class_text_points, ks, chunk_size)
