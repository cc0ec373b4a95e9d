"""Linear probe: multinomial logistic regression on the image features before the projection head.

As in *Design of the topology for contrastive visual-textual alignment* (§4.1, §4.4), the probe sees the image tower's [CLS] features with the learned
projection (and so the topology) removed; a multi-token model's k [CLS] features are
concatenated (``model.image_features`` -> ``[b, k*width]``).

The classifier is written in torch rather than taken from scikit-learn: no extra dependency,
the same code runs on whatever device the features are on, and full-batch L-BFGS on this
smooth, strongly convex objective converges to the same optimum as sklearn's lbfgs solver.
It is deterministic (zero initialisation, no sampling). The objective is

    mean_i CE(W x_i + b, y_i) + (l2 / 2) * ||W||^2          (bias not penalised)

on features standardised with the training set's mean and std; sklearn's ``C`` corresponds
to ``1 / (l2 * n_train)``. ``l2`` may be a list: the value with the best accuracy on a
held-out part of the training set is chosen (ties go to the stronger penalty) and the probe is
refit on the whole training set with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from topoclip.devices import resolve_device
from topoclip.eval.embed import embed_labelled_images
from topoclip.eval.embedded import EmbeddedSet
from topoclip.eval.zeroshot import topk_accuracy

__all__ = ["LinearProbe", "fit_logistic_regression", "probe_accuracy", "extract_features", "run_linear_probe"]

# Features with a (near) zero training std carry no information; dividing by this instead of
# ~0 maps them to ~0 rather than blowing them up.
_MIN_STD = 1e-6


@dataclass
class LinearProbe:
    """A fitted probe: standardisation then a linear map to class logits."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    l2: float
    loss: float  # the objective at the solution
    iterations: int

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.weight) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(dim=1)


def _check_xy(features: torch.Tensor, labels: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"{what} features must have shape [N > 0, D], got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{what} features must be floating point, got {features.dtype}")
    labels = torch.as_tensor(labels, device=features.device)
    if labels.shape != (features.shape[0],) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{what} labels must be {features.shape[0]} integers, got {labels.dtype} {tuple(labels.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{what} features contain NaN or inf")
    return features, labels.long()


def logistic_objective(weight, bias, x, y, l2):
    """Mean cross-entropy plus (l2/2)||W||^2, on standardised features x."""
    return nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    l2: float = 1e-3,
    num_classes: int | None = None,
    max_iter: int = 500,
    tolerance: float = 1e-6,
) -> LinearProbe:
    """Fit multinomial logistic regression by full-batch L-BFGS; returns a ``LinearProbe``.

    Computes in float32, or float64 if the features are float64. ``num_classes`` defaults to
    ``max(label) + 1``. ``tolerance`` bounds the gradient's largest entry at the solution.
    """
    features, labels = _check_xy(features, labels, "train")
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0:
        raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if labels.min() < 0:
        raise ValueError("labels must be >= 0")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.max() >= num_classes:
        raise ValueError(f"labels outside [0, num_classes={num_classes})")
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    features = features.to(dtype)
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False).clamp_min(_MIN_STD)
    x = (features - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=dtype, device=x.device, requires_grad=True)
    # Stop on the gradient; a loss change below machine epsilon (loss ~ 1) is rounding noise,
    # so that criterion only ends runs that can make no further progress in this dtype.
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=tolerance, tolerance_change=torch.finfo(dtype).eps, line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = logistic_objective(weight, bias, x, labels, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        loss = float(logistic_objective(weight, bias, x, labels, l2))
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return LinearProbe(mean, std, weight.detach(), bias.detach(), float(l2), loss, iterations)


def probe_accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``probe``; ties among logits count as misses (as in zero-shot)."""
    features, labels = _check_xy(features, labels, "test")
    return topk_accuracy(probe.logits(features), labels, ks=(1,))["top1"]


def _select_l2(features, labels, candidates, num_classes, max_iter, val_fraction, seed) -> float:
    n = features.shape[0]
    num_val = int(round(n * val_fraction))
    if not 1 <= num_val < n:
        raise ValueError(f"val_fraction={val_fraction} leaves no validation or no training items out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(features.device)
    val, train = order[:num_val], order[num_val:]
    best, best_accuracy = None, -1.0
    for l2 in sorted(candidates, reverse=True):  # strongest first: ties keep the stronger penalty
        probe = fit_logistic_regression(features[train], labels[train], l2, num_classes, max_iter)
        accuracy = probe_accuracy(probe, features[val], labels[val])
        if accuracy > best_accuracy:
            best, best_accuracy = l2, accuracy
    return float(best)


class _FeatureEncoder(nn.Module):
    """Presents ``model.image_features`` as ``encode_image`` so the embedding helpers apply."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(images)


def extract_features(
    model: nn.Module,
    dataset,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, k*width], labels [N])``: pre-projection image features of a labelled set."""
    if not hasattr(model, "image_features"):
        raise ValueError(f"{type(model).__name__} has no image_features(images) method for a linear probe")
    device = resolve_device(device, model)
    return embed_labelled_images(_FeatureEncoder(model), dataset, batch_size, device, num_workers, progress)


def run_linear_probe(
    model: nn.Module,
    train_set,
    test_set,
    *,
    l2: float | Sequence[float] = 1e-3,
    max_iter: int = 500,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool | None = None,
) -> dict:
    """Linear-probe top-1 accuracy of ``model``'s image features: ``{top1, n_train, n_test, l2, num_features}``.

    ``train_set`` / ``test_set`` yield ``(image, label)`` with the same label space. ``l2`` is
    one value or a list to choose from on a ``val_fraction`` split of the training set.
    """
    train_x, train_y = extract_features(model, train_set, batch_size, device, num_workers, progress)
    test_x, test_y = extract_features(model, test_set, batch_size, device, num_workers, progress)
    classnames = getattr(train_set, "classnames", None)
    return probe_features(train_x, train_y, test_x, test_y, len(classnames) if classnames else None,
                          l2=l2, max_iter=max_iter, val_fraction=val_fraction, seed=seed)


def probe_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int | None = None,
    *,
    l2: float | Sequence[float] = 1e-3,
    max_iter: int = 500,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Fit the probe on given features and score it (``run_linear_probe`` without the
    embedding); ``num_classes`` defaults to the largest label + 1."""
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    if isinstance(l2, (list, tuple)):
        if not l2:
            raise ValueError("l2 is an empty list")
        chosen = l2[0] if len(l2) == 1 else _select_l2(train_x, train_y, l2, num_classes, max_iter, val_fraction, seed)
    else:
        chosen = l2
    probe = fit_logistic_regression(train_x, train_y, chosen, num_classes, max_iter)
    return {
        "top1": probe_accuracy(probe, test_x, test_y),
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
        "l2": float(chosen),
        "num_features": int(train_x.shape[1]),
    }


def linear_probe_metrics(train: EmbeddedSet, test: EmbeddedSet, **options) -> dict:
    """The linear probe of two embedded classification sets made ``with_features=True``."""
    for emb in (train, test):
        if emb.image_features is None or emb.labels is None:
            raise ValueError(f"{emb.name}: a linear probe needs image features and labels (embed_dataset(..., with_features=True))")
    num_classes = train.class_text_points.shape[0] if train.class_text_points is not None else None
    return probe_features(train.image_features, train.labels, test.image_features, test.labels, num_classes, **options)
