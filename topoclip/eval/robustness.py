"""Robustness metrics of a retrieval set, from one embedding pass: calibration, geometry, hardness.

- calibration: retrieval as classification (softmax over the candidates of scale * similarity).
  I->T: the probabilities of each image's captions are summed and an image query is correct
  when its own caption set is the most probable (with c captions per image, the best single
  caption could hold only ~1/c of the mass; images without a caption are left out, as in
  recall); T->I: a caption is correct when its most probable image is its own. ECE with each requested bin count; reliability bins for the largest.
- geometry: alignment, uniformity over the union of both modalities, relative alignment and
  the modality-gap norm, on aligned pairs (each image with its FIRST caption).
- hardness: similarities of image anchors to the original negatives <v_i, t_j> and to the
  m²-Mix negatives <v_i, m_lam(v_j, t_j)> on the same pairs.

Lower is better for every ECE and geometry number (the result's ``better`` says so per key).
Everything returned is JSON-ready: non-finite floats (e.g. empty reliability bins) become None.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from topoclip.atomic import json_safe
from topoclip.eval.calibration import (
    confidences,
    expected_calibration_error,
    reliability_bins,
    save_reliability_diagram,
)
from topoclip.eval.embedded import EmbeddedSet, embed_dataset
from topoclip.eval.geometry_metrics import geometry_report
from topoclip.losses.mixup import mixup_hardness

__all__ = ["evaluate_robustness", "robustness_metrics", "first_caption_pairs", "save_hardness_histogram"]

GEOMETRY_KEYS = ("alignment", "uniformity", "relative_alignment", "modality_gap")


def first_caption_pairs(caption_to_image: Tensor, num_images: int) -> tuple[Tensor, Tensor]:
    """``(image_index, caption_index)`` of the aligned pairs: each image that has a caption,
    with its first caption (lowest caption index)."""
    caption_to_image = caption_to_image.long()
    captions = torch.arange(caption_to_image.shape[0], device=caption_to_image.device)
    no_caption = caption_to_image.shape[0]
    first = torch.full((num_images,), no_caption, dtype=torch.long, device=caption_to_image.device)
    first = first.scatter_reduce(0, caption_to_image, captions, reduce="amin")
    images = torch.nonzero(first < no_caption).squeeze(1)
    return images, first[images]


def _check_bins(bins: int | Sequence[int]) -> tuple[int, ...]:
    bins = (bins,) if isinstance(bins, int) else tuple(bins)
    if not bins or any(not isinstance(b, int) or b < 1 for b in bins):
        raise ValueError(f"bins must be a non-empty list of integers >= 1, got {bins}")
    return tuple(dict.fromkeys(bins))  # drop repeats, keep order


def _check_options(bins, hardness_lam: float, hardness_bins: int, chunk_size: int) -> tuple[int, ...]:
    bins = _check_bins(bins)
    if not 0.0 <= hardness_lam <= 1.0:
        raise ValueError(f"hardness_lam must be in [0, 1], got {hardness_lam}")
    if hardness_bins < 1:
        raise ValueError(f"hardness_bins must be >= 1, got {hardness_bins}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return bins


def _calibration(topology, image: Tensor, text: Tensor, caption_to_image: Tensor, scale: float, bins, chunk_size: int):
    images = torch.arange(image.shape[0], device=image.device)
    has_caption = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
    has_caption[caption_to_image] = True
    # Same ground truth as retrieval_calibration / retrieval_recall.
    # I->T predicts an image's caption set (probabilities summed over its captions);
    # T->I predicts one image.
    i2t_pos = images[has_caption].unsqueeze(1) == images.unsqueeze(0)
    t2i_pos = caption_to_image.unsqueeze(1) == images.unsqueeze(0)
    directions = {
        "i2t": confidences(topology, image[has_caption], text, i2t_pos, scale, chunk_size, caption_to_image),
        "t2i": confidences(topology, text, image, t2i_pos, scale, chunk_size),
    }
    out: dict = {"bins": list(bins)}
    for b in bins:
        for name, (conf, correct) in directions.items():
            out[f"{name}_ece_{b}"] = expected_calibration_error(conf, correct, b)
    for name, (conf, correct) in directions.items():
        out[f"{name}_accuracy"] = float(correct.mean())
        out[f"{name}_mean_confidence"] = float(conf.mean())
    out["reliability_bins"] = max(bins)
    for name, (conf, correct) in directions.items():
        out[f"{name}_reliability"] = reliability_bins(conf, correct, max(bins))
    return out


def save_hardness_histogram(hardness: dict, path: str | os.PathLike, title: str = "") -> None:
    """Histograms of the original and the mixed negatives' similarities, the positives' mean
    marked, as a PNG (the output of ``mixup_hardness``)."""
    # Figure + Agg canvas directly: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges = hardness["edges"]
    ax.stairs(hardness["original"], edges, fill=True, alpha=0.5, label="original negatives <v_i, t_j>")
    ax.stairs(hardness["mixed"], edges, fill=True, alpha=0.5, label="mixed negatives <v_i, m_j>")
    ax.axvline(hardness["mean_positive"], color="black", linestyle="--", label="positives' mean <v_i, t_i>")
    ax.set_xlabel("similarity to the image anchor")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def evaluate_robustness(
    model: nn.Module,
    retrieval_set,
    tokenizer,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    bins: int | Sequence[int] = (10, 15),
    hardness_lam: float = 0.5,
    hardness_bins: int = 50,
    scale: float | None = None,
    plot_dir: str | os.PathLike | None = None,
    chunk_size: int = 1024,
    progress: bool | None = None,
) -> dict:
    """Calibration, geometry and m²-Mix hardness of ``model`` on a ``RetrievalSet``.

    The images and captions are embedded once. ``scale`` defaults to the model's logit scale
    (a separate temperature T is ``scale=1/T``). Returns::

        num_images, num_captions, scale
        calibration: bins, {i2t,t2i}_ece_{b} for each b in bins, {i2t,t2i}_accuracy,
                     {i2t,t2i}_mean_confidence, reliability_bins (= max(bins)),
                     {i2t,t2i}_reliability (count / confidence / accuracy per bin)
        geometry:    alignment, uniformity, relative_alignment, modality_gap, num_pairs
        hardness:    lam, mean_positive, mean_original, mean_mixed, edges, original, mixed
        better:      "lower" for each ECE and geometry key
        plots:       reliability_i2t / reliability_t2i / hardness PNG paths (with plot_dir)
    """
    for attribute in ("captions", "caption_to_image"):
        if not hasattr(retrieval_set, attribute):
            raise ValueError(f"retrieval_set has no '{attribute}' attribute; expected a RetrievalSet")
    _check_options(bins, hardness_lam, hardness_bins, chunk_size)  # before the embedding's cost
    emb = embed_dataset(model, retrieval_set, tokenizer, batch_size, device, progress=progress)
    return robustness_metrics(
        emb, bins=bins, hardness_lam=hardness_lam, hardness_bins=hardness_bins, scale=scale,
        plot_dir=plot_dir, chunk_size=chunk_size,
    )


def robustness_metrics(
    emb: EmbeddedSet,
    *,
    bins: int | Sequence[int] = (10, 15),
    hardness_lam: float = 0.5,
    hardness_bins: int = 50,
    scale: float | None = None,
    plot_dir: str | os.PathLike | None = None,
    chunk_size: int = 1024,
) -> dict:
    """``evaluate_robustness`` on an embedded retrieval set (see there for the keys);
    ``scale`` defaults to the embedded model's logit scale."""
    emb.require("retrieval")
    bins = _check_options(bins, hardness_lam, hardness_bins, chunk_size)
    topology = emb.topology
    if scale is None and emb.scale is None:
        raise ValueError("model has no logit_scale; pass scale= explicitly")
    scale = emb.scale if scale is None else float(scale)
    # Aligned pairs: one point per caption (merged duplicate texts repeated).
    image, text = emb.image_points, emb.caption_points
    caption_to_image = emb.caption_to_image
    if caption_to_image.min() < 0 or caption_to_image.max() >= image.shape[0]:
        raise ValueError(f"retrieval_set.caption_to_image has indices outside [0, {image.shape[0]}) (the number of images)")
    caption_to_image = caption_to_image.to(device=image.device, dtype=torch.long)
    pair_images, pair_captions = first_caption_pairs(caption_to_image, image.shape[0])
    if pair_images.numel() < 2:
        raise ValueError("retrieval_set: robustness metrics need at least two images with a caption")
    image_pairs, text_pairs = image[pair_images], text[pair_captions]

    calibration = _calibration(topology, image, text, caption_to_image, scale, bins, chunk_size)
    geometry = {**geometry_report(image_pairs.cpu(), text_pairs.cpu(), topology), "num_pairs": int(pair_images.numel())}
    hardness = {"lam": float(hardness_lam), **mixup_hardness(topology, image_pairs, text_pairs, hardness_lam, hardness_bins)}
    better = {f"{d}_ece_{b}": "lower" for b in bins for d in ("i2t", "t2i")}
    better.update({key: "lower" for key in GEOMETRY_KEYS})
    result = {
        "num_images": int(image.shape[0]),
        "num_captions": int(text.shape[0]),
        "scale": scale,
        "calibration": calibration,
        "geometry": geometry,
        "hardness": hardness,
        "better": better,
    }
    if plot_dir is not None:
        plot_dir = Path(plot_dir)
        plot_dir.mkdir(parents=True, exist_ok=True)
        plots = {
            "reliability_i2t": plot_dir / "reliability_i2t.png",
            "reliability_t2i": plot_dir / "reliability_t2i.png",
            "hardness": plot_dir / "hardness.png",
        }
        b = calibration["reliability_bins"]
        for direction, label in (("i2t", "image -> text"), ("t2i", "text -> image")):
            ece = calibration[f"{direction}_ece_{b}"]
            save_reliability_diagram(
                calibration[f"{direction}_reliability"], plots[f"reliability_{direction}"], f"{label}: ECE {ece:.3f}"
            )
        save_hardness_histogram(hardness, plots["hardness"], f"m2-Mix negatives, lam = {hardness_lam:g}")
        result["plots"] = {name: str(path) for name, path in plots.items()}
    return json_safe(result)
