"""Calibration of retrieval-as-classification: expected calibration error and reliability.

For each query, probabilities are the softmax over the candidate set of scale * similarity;
confidence is the largest probability and the query is correct when that candidate is a
ground-truth match. With equal-width bins on (0, 1]:

    ECE = sum_b (n_b / N) * | acc_b - conf_b |
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import Topology

__all__ = ["confidences", "expected_calibration_error", "reliability_bins", "retrieval_calibration", "save_reliability_diagram"]


def confidences(
    topology: Topology,
    queries: Tensor,
    candidates: Tensor,
    positives: Tensor,
    scale: float,
    chunk_size: int = 1024,
    candidate_groups: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(confidence, correct) per query: softmax over the candidates of scale * similarity.

    ``positives`` [Q, K] bool marks ground-truth candidates. With ``candidate_groups`` [K]
    (the class of each candidate, e.g. the image each caption describes) the probabilities are
    summed per group first and ``positives`` is [Q, G]: the prediction is a group. Why: with c
    equally good captions per image the best single caption can hold at most ~1/c of the mass,
    so a per-caption confidence reads as under-confidence even for a perfect model.
    """
    conf, correct = [], []
    num_groups = positives.shape[1]
    for i in range(0, queries.shape[0], chunk_size):
        probs = torch.softmax((scale * topology.similarity(queries[i:i + chunk_size], candidates)).float(), dim=1)
        if candidate_groups is not None:
            grouped = probs.new_zeros(probs.shape[0], num_groups)
            probs = grouped.index_add_(1, candidate_groups.to(probs.device), probs)
        p, idx = probs.max(dim=1)
        conf.append(p)
        correct.append(positives[i:i + chunk_size].gather(1, idx.unsqueeze(1)).squeeze(1))
    return torch.cat(conf), torch.cat(correct).float()


def reliability_bins(conf: Tensor, correct: Tensor, num_bins: int = 15) -> dict[str, list[float]]:
    """Per equal-width bin on (0, 1]: count, mean confidence, accuracy (NaN for empty bins)."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    # bin b holds (b/B, (b+1)/B]; ceil(conf * B) - 1 puts conf = 1 in the last bin.
    idx = (torch.ceil(conf.double() * num_bins) - 1).clamp(0, num_bins - 1).long()
    count = torch.bincount(idx, minlength=num_bins).double()
    conf_sum = torch.bincount(idx, weights=conf.double(), minlength=num_bins)
    acc_sum = torch.bincount(idx, weights=correct.double(), minlength=num_bins)
    nan = torch.full_like(count, float("nan"))
    return {
        "count": count.tolist(),
        "confidence": torch.where(count > 0, conf_sum / count.clamp_min(1), nan).tolist(),
        "accuracy": torch.where(count > 0, acc_sum / count.clamp_min(1), nan).tolist(),
    }


def expected_calibration_error(conf: Tensor, correct: Tensor, num_bins: int = 15) -> float:
    bins = reliability_bins(conf, correct, num_bins)
    n = float(conf.numel())
    return float(
        sum(c / n * abs(a - p) for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c > 0)
    )


def retrieval_calibration(
    topology: Topology,
    image_points: Tensor,
    text_points: Tensor,
    caption_to_image: Tensor,
    scale: float,
    num_bins: int = 15,
    chunk_size: int = 1024,
) -> dict:
    """ECE and reliability bins for image->text and text->image retrieval. I->T predicts an
    image's caption set: the probabilities of its captions are summed (see ``confidences``)."""
    caption_to_image = torch.as_tensor(caption_to_image, device=image_points.device)
    images = torch.arange(image_points.shape[0], device=image_points.device)
    i2t_pos = images.unsqueeze(1) == images.unsqueeze(0)  # [N, N]: the query's own caption set
    t2i_pos = caption_to_image.unsqueeze(1) == images.unsqueeze(0)  # [M, N]
    out = {}
    for name, q, c, pos, groups in (
        ("i2t", image_points, text_points, i2t_pos, caption_to_image),
        ("t2i", text_points, image_points, t2i_pos, None),
    ):
        conf, correct = confidences(topology, q, c, pos, scale, chunk_size, groups)
        out[f"{name}_ece"] = expected_calibration_error(conf, correct, num_bins)
        out[f"{name}_reliability"] = reliability_bins(conf, correct, num_bins)
    return out


def save_reliability_diagram(bins: dict, path, title: str = "") -> None:
    """Accuracy per confidence bin against the diagonal, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(bins["count"])
    centers = [(b + 0.5) / k for b in range(k)]
    acc = [0.0 if a != a else a for a in bins["accuracy"]]  # NaN (empty bin) -> no bar
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.bar(centers, acc, width=1 / k, edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
