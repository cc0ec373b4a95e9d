"""Training pairs from your own files, with a held-out part for evaluation.

- ``csv``: a CSV/TSV of (image path, caption) rows; the held-out part is a retrieval set of a
  seeded fraction of the distinct images, with all their captions;
- ``folder``: an image-folder classification set; each training image is captioned from its
  class name through a prompt template (one per image, seeded); the held-out images (those not
  among the k shots per class, or a seeded fraction of each class) are a zero-shot set;
- ``karpathy``: every caption of a COCO/Flickr30k-style split is a pair; the held-out part is
  another split of the same file, or a seeded fraction of the images.

Images are decoded on access, in DataLoader workers when ``train.num_workers`` > 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from topoclip.data.datasets import ClassificationSet, RetrievalSet
from topoclip.data.folder import DEFAULT_TEMPLATES, ImageFolderClassification
from topoclip.data.karpathy import KarpathyRetrieval
from topoclip.data.pairs import CsvPairs, FilePairs, holdout_split
from topoclip.data.text_files import read_text

__all__ = [
    "TrainingSource",
    "ClassificationSubset",
    "read_classnames",
    "read_templates",
    "folder_split",
    "open_csv_source",
    "open_folder_source",
    "open_karpathy_source",
    "open_training_source",
    "held_out_pairs",
]


@dataclass
class TrainingSource:
    """What a run needs of its data: the training pairs, their captions (the tokenizer is
    trained on them) and the held-out evaluation set."""

    train: torch.utils.data.Dataset
    captions: list[str]
    held_out: ClassificationSet | RetrievalSet


# ----------------------------------------------------------------- class names and templates

def _read_list(path: str | os.PathLike, what: str, key: str | None = None) -> list[str]:
    """A JSON list (or a JSON object holding one list, or the list under ``key``), or a text
    file with one entry per line."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{what} file {os.fspath(file)!r} does not exist")
    text = read_text(file)
    if file.suffix.lower() == ".json":
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} file {os.fspath(file)!r} is not valid JSON: {err}") from None
        if isinstance(data, dict):  # CLIP_benchmark keys its files by dataset name
            if key is not None and key in data:
                data = data[key]
            elif len(data) == 1:
                data = next(iter(data.values()))
            else:
                raise ValueError(f"{what} file {os.fspath(file)!r} holds several lists ({', '.join(sorted(data))}); name one")
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{what} file {os.fspath(file)!r} must hold a list of strings")
        items = [x.strip() for x in data]
    else:
        items = [line.strip() for line in text.splitlines()]
    items = [x for x in items if x]
    if not items:
        raise ValueError(f"{what} file {os.fspath(file)!r} is empty")
    return items


def read_classnames(path: str | os.PathLike, dataset: str | None = None) -> list[str]:
    """Class names from a text file (one per line, in the sorted folder order) or a JSON list
    (CLIP_benchmark's ``classnames.json`` maps dataset names to lists: ``dataset`` picks one)."""
    return _read_list(path, "classnames", dataset)


def read_templates(path: str | os.PathLike, dataset: str | None = None) -> list[str]:
    """Prompt templates from a JSON list or a text file. CLIP_benchmark writes the class name
    as ``{c}``; topoclip's templates use ``{}``: both are accepted, and a template with
    neither is an error that names the file."""
    templates = []
    for t in _read_list(path, "templates", dataset):
        if "{c}" in t:
            t = t.replace("{c}", "{}")
        if "{}" not in t:
            raise ValueError(f"templates file {os.fspath(path)!r}: template {t!r} has no {{}} or {{c}} for the class name")
        templates.append(t)
    return templates


# ----------------------------------------------------------------------------- the sources

class ClassificationSubset(ClassificationSet):
    """Some items of a classification set, with its name, class names and templates."""

    def __init__(self, base: ClassificationSet, indices: Sequence[int], name: str | None = None):
        super().__init__(name or base.name, base.classnames, base.templates)
        self.base = base
        self.indices = list(indices)
        self.labels = base.labels[self.indices] if hasattr(base, "labels") else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]


def folder_split(labels: torch.Tensor, shots_per_class: int | None, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices: per class, a seeded permutation; its first k images (or
    all but a ``holdout`` fraction, at least one held out when the class has two) train."""
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for label in labels.unique(sorted=True).tolist():
        members = torch.nonzero(labels == label).squeeze(1)
        order = members[torch.randperm(len(members), generator=g)].tolist()
        if shots_per_class is not None:
            if len(order) <= shots_per_class:
                raise ValueError(
                    f"data.folder.shots_per_class: class {label} has {len(order)} images, "
                    f"not more than the {shots_per_class} shots (none would be left to evaluate)"
                )
            keep = shots_per_class
        else:
            keep = len(order) - (max(1, round(holdout * len(order))) if len(order) > 1 else 0)
        train += order[:keep]
        held += order[keep:]
    return sorted(train), sorted(held)


def open_csv_source(cfg, transform: Callable, seed: int) -> TrainingSource:
    pairs = CsvPairs(cfg.path, cfg.image_root, transform, sep=cfg.sep, image_key=cfg.image_key,
                     caption_key=cfg.caption_key, verify=cfg.verify, strict=cfg.strict, encoding=cfg.encoding)
    train, held_out = holdout_split(pairs, cfg.holdout, seed)
    return TrainingSource(train, [pairs.captions[i] for i in train.indices], held_out)


def open_folder_source(cfg, transform: Callable, seed: int) -> TrainingSource:
    templates = read_templates(cfg.templates) if cfg.templates is not None else list(DEFAULT_TEMPLATES)
    classnames = read_classnames(cfg.classnames) if cfg.classnames is not None else None
    folder = ImageFolderClassification(cfg.root, transform, classnames=classnames, templates=templates,
                                       verify=cfg.verify, strict=cfg.strict)
    train_idx, held_idx = folder_split(folder.labels, cfg.shots_per_class, cfg.holdout, seed)
    # One template per training image, drawn once from the run's seed: the captions, and so
    # every epoch's batches, are the same on a resume.
    choice = np.random.default_rng(seed).integers(len(templates), size=len(train_idx))
    captions = [templates[t].format(folder.classnames[int(folder.labels[i])]) for i, t in zip(train_idx, choice)]
    pairs = FilePairs(folder.root, [folder.image_paths[i] for i in train_idx], captions, transform,
                      strict=cfg.strict, skip_stats=folder.skip_stats)
    return TrainingSource(pairs, captions, ClassificationSubset(folder, held_idx, f"{folder.name}-heldout"))


def open_karpathy_source(cfg, transform: Callable, seed: int) -> TrainingSource:
    split = KarpathyRetrieval(cfg.path, cfg.image_root, cfg.split, transform, verify=cfg.verify, strict=cfg.strict)
    c2i = split.caption_to_image.tolist()
    pairs = FilePairs(split.name, [split.image_paths[i] for i in c2i], split.captions, transform,
                      strict=cfg.strict, skip_stats=split.skip_stats)
    if cfg.eval_split is not None:
        held_out = KarpathyRetrieval(cfg.path, cfg.image_root, cfg.eval_split, transform, verify=True, strict=cfg.strict)
        return TrainingSource(pairs, list(split.captions), held_out)
    train, held_out = holdout_split(pairs, cfg.holdout, seed)
    return TrainingSource(train, [pairs.captions[i] for i in train.indices], held_out)


def open_training_source(source: str, data_config, transform: Callable, seed: int) -> TrainingSource:
    """The ``csv``, ``folder`` or ``karpathy`` source of a run's ``data`` section."""
    openers = {"csv": open_csv_source, "folder": open_folder_source, "karpathy": open_karpathy_source}
    if source not in openers:
        raise ValueError(f"data.source: {source!r} is not a file source ({', '.join(openers)})")
    return openers[source](getattr(data_config, source), transform, seed)


class _HeldOutPairs(torch.utils.data.Dataset):
    """``(image, caption)`` items of an evaluation set: a retrieval set's images with their
    first caption, or a classification set's images captioned by the first template."""

    def __init__(self, held):
        self.held = held
        if hasattr(held, "caption_to_image"):
            first: dict[int, str] = {}
            for caption, image in zip(held.captions, held.caption_to_image.tolist()):
                first.setdefault(image, caption)
            self.captions = [first[i] for i in range(len(held))]
        else:
            labels = held.labels.tolist()
            self.captions = [held.templates[0].format(held.classnames[c]) for c in labels]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        item = self.held[index]
        image = item[0] if isinstance(item, tuple) else item
        return image, self.captions[index]


def held_out_pairs(held: ClassificationSet | RetrievalSet) -> torch.utils.data.Dataset:
    """The held-out part of a source as pairs, for the validation loss during training."""
    return _HeldOutPairs(held)
