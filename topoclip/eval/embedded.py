"""A dataset embedded once, and the metrics computed from it.

Embedding is the expensive part of an evaluation; every metric after it is a function of the
points. ``embed_dataset`` runs the model once over a dataset and returns an ``EmbeddedSet``:
image points, text points, how they relate (which image each caption describes, or each
image's class and the class prompts' points), the topology that scores them and the model's
logit scale. R@K, mAP@R, zero-shot accuracy, calibration, alignment / uniformity / gap and the
mixup hardness all read it; none embeds again.

    emb = embed_dataset(model, retrieval_set, tokenizer, batch_size=512)
    recall = retrieval_recall(emb.topology, emb.image_points, emb.text_points, emb.caption_to_image)

Conventions: ``u`` / image points come first and ``v`` / text points second everywhere in
topoclip, as in the loss ``ContrastiveLoss(u, v, scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from topoclip.devices import resolve_device
from topoclip.geometry import Topology

from .embed import embed_images, embed_labelled_images, embed_texts

__all__ = ["EmbeddedSet", "embed_dataset", "model_scale", "check_caption_to_image", "is_retrieval_set", "is_classification_set"]


def is_retrieval_set(dataset) -> bool:
    return hasattr(dataset, "captions") and hasattr(dataset, "caption_to_image")


def is_classification_set(dataset) -> bool:
    return hasattr(dataset, "classnames") and hasattr(dataset, "templates")


def check_caption_to_image(caption_to_image, num_texts: int) -> torch.Tensor:
    """caption_to_image as a tensor of integer image indices, one per caption, or a ValueError."""
    caption_to_image = torch.as_tensor(caption_to_image)
    if caption_to_image.dim() != 1 or caption_to_image.shape[0] != num_texts:
        raise ValueError(
            f"caption_to_image must have shape [{num_texts}] (one image index per caption), "
            f"got {tuple(caption_to_image.shape)}"
        )
    if caption_to_image.dtype.is_floating_point or caption_to_image.dtype == torch.bool:
        raise ValueError(f"caption_to_image must hold integer image indices, got dtype {caption_to_image.dtype}")
    return caption_to_image


def model_scale(model: nn.Module) -> float:
    """The model's logit scale as a float (a ``topoclip.LogitScale`` or a callable)."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise ValueError("model has no logit_scale; pass scale= explicitly")
    if hasattr(scale, "value"):  # topoclip.LogitScale
        return float(scale.value)
    if callable(scale):
        return float(scale())
    raise ValueError(f"model.logit_scale must be a LogitScale or callable, got {type(scale).__name__}")


@dataclass
class EmbeddedSet:
    """The points of one dataset under one model.

    A retrieval set has ``text_points`` ``[M, d]`` and ``caption_to_image`` ``[M]`` (the image
    of each caption); a classification set has ``labels`` ``[N]`` and ``class_text_points``
    ``[C, T, d]`` (every class name in every template). ``image_points`` is ``[N, d]`` in both.
    """

    name: str
    topology: Topology
    scale: float | None
    image_points: Tensor
    text_points: Tensor | None = None
    caption_to_image: Tensor | None = None
    labels: Tensor | None = None
    class_text_points: Tensor | None = None
    positive_pairs: Tensor | None = None  # extra annotated (image, caption) positives, if any
    # When identical caption strings were merged: caption j is text ``caption_text[j]`` of
    # ``text_points`` (which then holds each distinct string once). None: text j is caption j.
    caption_text: Tensor | None = None
    # Pre-projection image features [N, k*width] for linear probes (``with_features=True``).
    image_features: Tensor | None = None

    @property
    def caption_points(self) -> Tensor:
        """One point per caption of the dataset, ``[M, d]`` (merged texts repeated), for the
        metrics of aligned pairs (calibration, geometry)."""
        return self.text_points if self.caption_text is None else self.text_points[self.caption_text]

    @property
    def merged_pairs(self) -> Tensor | None:
        """(image, text) pairs over the distinct texts when captions were merged, else None."""
        if self.caption_text is None:
            return None
        return torch.unique(torch.stack([self.caption_to_image.long(), self.caption_text.to(self.caption_to_image.device)], 1), dim=0)

    def merged_positive_pairs(self) -> Tensor | None:
        """The dataset's annotated (image, caption) positives over the distinct texts."""
        if self.positive_pairs is None or self.caption_text is None:
            return self.positive_pairs
        pairs = torch.as_tensor(self.positive_pairs).long()
        return torch.unique(torch.stack([pairs[:, 0], self.caption_text[pairs[:, 1]]], 1), dim=0)

    @property
    def is_retrieval(self) -> bool:
        return self.text_points is not None and self.caption_to_image is not None

    @property
    def is_classification(self) -> bool:
        return self.labels is not None and self.class_text_points is not None

    def require(self, kind: str) -> None:
        ok = self.is_retrieval if kind == "retrieval" else self.is_classification
        if not ok:
            expected = "a RetrievalSet (captions, caption_to_image)" if kind == "retrieval" else "a ClassificationSet (classnames, templates)"
            raise ValueError(f"{self.name}: this metric needs {expected}")


def embed_dataset(
    model: nn.Module,
    dataset,
    tokenizer,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
    class_text_points: Tensor | None = None,
    with_features: bool = False,
    merge_duplicate_captions: bool = True,
) -> EmbeddedSet:
    """Embed every image and text of ``dataset`` once (see the module docstring).

    ``dataset``: a ``RetrievalSet`` (images; ``captions``, ``caption_to_image``) or a
    ``ClassificationSet`` (``(image, label)`` items; ``classnames``, ``templates``).
    ``class_text_points`` ``[C, T, d]`` replaces the class prompts' embedding.
    ``merge_duplicate_captions``: a caption string that several images share is one text
    with several positive images (``merged_pairs``), so that identical texts never count
    against each other in retrieval (ties count against the query, and identical texts tie).
    ``caption_to_image`` stays one image per caption; ``caption_text`` maps captions to texts.
    ``with_features``: also the pre-projection image features (``model.image_features``), for
    linear probes. They take a second pass through the image tower: models reach them through
    their own ``image_features``, which OpenCLIP and Hugging Face towers define differently.
    """
    device = resolve_device(device, model)
    name = getattr(dataset, "name", type(dataset).__name__)
    # A model without a logit scale (a bare encoder) can still be scored; only metrics that
    # need probabilities (calibration) then ask for an explicit scale.
    scale = model_scale(model) if getattr(model, "logit_scale", None) is not None else None
    common = dict(name=name, topology=model.topology, scale=scale)
    if is_retrieval_set(dataset):
        image_points = embed_images(model, dataset, batch_size, device, num_workers=num_workers, progress=progress)
        captions = list(dataset.captions)
        caption_to_image = check_caption_to_image(dataset.caption_to_image, len(captions)).long()
        text_id: dict[str, int] = {}
        ids = torch.tensor([text_id.setdefault(c, len(text_id)) for c in captions], dtype=torch.long)
        caption_text = None
        if merge_duplicate_captions and len(text_id) < len(captions):
            captions, caption_text = list(text_id), ids
        text_points = embed_texts(model, captions, tokenizer, batch_size, device, progress=progress)
        return EmbeddedSet(
            **common, image_points=image_points, text_points=text_points,
            caption_to_image=caption_to_image.to(image_points.device),
            positive_pairs=getattr(dataset, "positive_pairs", None),
            caption_text=None if caption_text is None else caption_text.to(image_points.device),
        )
    if is_classification_set(dataset):
        from .zeroshot import embed_class_texts

        if class_text_points is None:
            class_text_points = embed_class_texts(
                model, dataset.classnames, dataset.templates, tokenizer, batch_size, device, progress
            )
        image_points, labels = embed_labelled_images(
            model, dataset, batch_size, device, num_workers=num_workers, progress=progress
        )
        features = None
        if with_features:
            from .linear_probe import extract_features

            features, _ = extract_features(model, dataset, batch_size, device, num_workers, progress)
        return EmbeddedSet(
            **common, image_points=image_points, labels=labels, class_text_points=class_text_points, image_features=features
        )
    raise ValueError(
        f"{name}: cannot embed a {type(dataset).__name__}; expected a RetrievalSet (captions, caption_to_image) "
        "or a ClassificationSet (classnames, templates)"
    )
