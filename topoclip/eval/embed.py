"""Embed images and texts in batches with a dual encoder, for evaluation.

The model interface is duck-typed: ``model.encode_image(images) -> [b, d]`` and
``model.encode_text(input_ids, attention_mask) -> [b, d]``; the tokenizer maps a list of
strings to ``dict(input_ids, attention_mask)``. Everything runs under ``torch.no_grad()``
with the model in eval mode, and every submodule's train/eval flag is put back afterwards
(a trainer calls this mid-run and must not find dropout switched off, or a deliberately
frozen submodule switched on).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from topoclip.data.datasets import drop_unreadable
from topoclip.devices import resolve_device

# Below this many items a progress bar is noise in test logs and CLI output.
PROGRESS_MIN_ITEMS = 2048


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore each submodule's own flag on exit."""
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, was_training in previous:
            module.training = was_training


def _show_progress(progress: bool | None, total: int | None) -> bool:
    if progress is not None:
        return progress
    return total is not None and total >= PROGRESS_MIN_ITEMS


def _as_loader(dataset_or_loader: Dataset | DataLoader, batch_size: int, num_workers: int) -> DataLoader:
    if isinstance(dataset_or_loader, DataLoader):
        # Results are matched to captions / labels by position, so a shuffled loader would
        # silently pair the wrong items.
        if isinstance(dataset_or_loader.sampler, RandomSampler):
            raise ValueError(
                "dataset_or_loader: a shuffling DataLoader would break the item order; use shuffle=False"
            )
        return dataset_or_loader
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # drop_unreadable: a classification item whose file cannot be decoded is left out with its
    # label (retrieval sets check their files when built, so they never drop one here).
    return DataLoader(dataset_or_loader, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=drop_unreadable)


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and (if present) labels from the batch layouts our datasets produce."""
    if isinstance(batch, torch.Tensor):  # RetrievalSet: items are bare images
        return batch, None
    if isinstance(batch, dict):  # make_collate output
        if "images" not in batch:
            raise ValueError(f"batch dict has no 'images' key (keys: {sorted(batch)})")
        return batch["images"], batch.get("labels")
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        # ClassificationSet: (image, label); pair sets give (image, caption) -> no labels.
        second = batch[1] if len(batch) > 1 else None
        return batch[0], second if isinstance(second, torch.Tensor) else None
    raise ValueError(f"cannot find images in a batch of type {type(batch).__name__}")


def _embed_batches(model, loader: DataLoader, device: torch.device, progress: bool | None, desc: str):
    try:
        total = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:  # iterable datasets have no length
        total = None
    points, labels = [], []
    with eval_mode(model), torch.no_grad():
        bar = tqdm(loader, desc=desc, leave=False, disable=not _show_progress(progress, total))
        for batch in bar:
            if batch is None:  # every item of this batch was unreadable
                continue
            images, batch_labels = _split_batch(batch)
            points.append(model.encode_image(images.to(device, non_blocking=True)).float())
            if batch_labels is not None:
                labels.append(batch_labels)
    if not points:
        raise ValueError("dataset_or_loader is empty: nothing to embed")
    return torch.cat(points), (torch.cat(labels).long() if labels else None)


def embed_images(
    model: nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """Image points ``[N, d]`` (float32, on ``device``) in dataset order.

    ``dataset_or_loader`` yields bare images, ``(image, label)`` pairs, or dict batches with
    an ``images`` key. ``progress=None`` shows a bar only for large datasets.
    """
    device = resolve_device(device, model)
    loader = _as_loader(dataset_or_loader, batch_size, num_workers)
    points, _ = _embed_batches(model, loader, device, progress, "embed images")
    return points


def embed_labelled_images(
    model: nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(points [N, d], labels LongTensor[N])`` from a set of ``(image, label)`` items, one pass."""
    device = resolve_device(device, model)
    loader = _as_loader(dataset_or_loader, batch_size, num_workers)
    points, labels = _embed_batches(model, loader, device, progress, "embed images")
    if labels is None or len(labels) != len(points):
        raise ValueError("dataset_or_loader: items must be (image, label) pairs with integer labels")
    return points, labels.to(points.device)


def embed_texts(
    model: nn.Module,
    texts: Sequence[str],
    tokenizer,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Text points ``[M, d]`` (float32, on ``device``) in the order of ``texts``."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not a single string")
    if len(texts) == 0:
        raise ValueError("texts is empty: nothing to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = resolve_device(device, model)
    texts = list(texts)
    starts = range(0, len(texts), batch_size)
    points = []
    with eval_mode(model), torch.no_grad():
        bar = tqdm(starts, desc="embed texts", leave=False, disable=not _show_progress(progress, len(texts)))
        for start in bar:
            tokens = tokenizer(texts[start : start + batch_size])
            points.append(
                model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float()
            )
    return torch.cat(points)
