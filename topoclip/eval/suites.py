"""Evaluation suites as data: ``SuiteConfig`` entries (from a run's ``eval.suites``, a suite
file, or ``topoclip eval --suite FILE``) become ``EvalEntry`` objects on real datasets.

    suites = load_suite_file("suite.yaml")          # [{name, task, data}, ...]
    entries = build_entries(suites, transform)      # ImageFolder / CSV / Karpathy datasets
    records = run_evaluation(model, tokenizer, entries)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from topoclip.config.sections import SuiteConfig
from topoclip.data.datasets import ClassificationSet, LazyImageFiles, SkipStats
from topoclip.data.folder import DEFAULT_TEMPLATES, ImageFolderClassification
from topoclip.data.karpathy import KarpathyRetrieval
from topoclip.data.pairs import CsvPairs, PairsRetrieval, separator_hint
from topoclip.data.sources import read_classnames, read_templates
from topoclip.data.text_files import csv_rows
from topoclip.dataclass_io import from_dict

from .evaluation import EvalEntry

__all__ = ["CsvClassification", "load_suite_file", "build_entries", "resolve_suite_paths"]

_PATH_KEYS = ("folder", "csv", "karpathy", "image_root", "classnames", "templates", "train", "test")


class CsvClassification(ClassificationSet, LazyImageFiles):
    """``ds[i] -> (image, label)`` from a CSV/TSV of (image path, label) rows.

    A label is a class name, or an integer index into ``classnames``. Class names default to
    the sorted distinct labels. Images are checked up front (``verify``, the default for an
    evaluation set): a bad one is a counted skip, or with ``strict`` an error naming the file.
    """

    def __init__(self, path, transform: Callable, *, name: str, classnames: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None, image_root=None, image_key: str = "filepath",
                 label_key: str = "label", sep: str = "\t", verify: bool = True, strict: bool = False,
                 encoding: str = "utf-8"):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{name}: labels file {os.fspath(path)!r} does not exist")
        root = Path(image_root) if image_root is not None else path.parent
        source = os.fspath(path)
        stats = SkipStats(source)
        rows: list[tuple[str, str]] = []
        columns, records = csv_rows(path, sep, encoding)
        for key, what in ((image_key, "image_key"), (label_key, "label_key")):
            if key not in columns:
                raise ValueError(f"{source}: no column {key!r} ({what}); columns are {columns} (separator "
                                 f"{sep!r}){separator_hint(columns, sep)}")
        for line, row, problem in records:
            where = f"{source}:{line}"
            if not stats.accept_text(problem, where, strict=strict):
                continue
            file = os.fspath(root / (row[image_key] or "").strip())
            label = (row[label_key] or "").strip()
            if not label:
                if strict:
                    raise ValueError(f"{where}: empty label")
                stats.skip("empty_label", where)
                continue
            if stats.accept_image(file, where, strict=strict, verify=verify):
                rows.append((file, label))
        stats.summarize(len(rows), "images")
        if not rows:
            raise ValueError(f"{source}: no usable (image, label) rows (skipped: {stats.as_dict()})")
        names = list(classnames) if classnames is not None else sorted({label for _, label in rows})
        index = {n: i for i, n in enumerate(names)}
        labels = []
        for file, label in rows:
            if label in index:
                labels.append(index[label])
            elif label.isdigit() and int(label) < len(names):
                labels.append(int(label))
            else:
                raise ValueError(f"{source}: label {label!r} of {file!r} is neither a class name nor an index into the {len(names)} classnames")
        super().__init__(name, names, list(templates) if templates is not None else list(DEFAULT_TEMPLATES))
        self.image_paths = [file for file, _ in rows]
        self.labels = torch.tensor(labels, dtype=torch.long)
        self._init_files(source, self.image_paths, transform, strict, stats)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int):
        # An evaluation item: dropped, not replaced, when unreadable (``drop_unreadable``).
        return self._load_or_drop(index), int(self.labels[index])


def resolve_suite_paths(suite: SuiteConfig, base: str | os.PathLike) -> SuiteConfig:
    """``suite`` with its relative paths taken from ``base`` (the suite file's folder)."""
    data = dict(suite.data)
    for key in _PATH_KEYS:
        if isinstance(data.get(key), str) and not os.path.isabs(data[key]):
            data[key] = os.fspath(Path(base) / data[key])
    return SuiteConfig(suite.name, suite.task, data)


def load_suite_file(path: str | os.PathLike) -> list[SuiteConfig]:
    """The suites of a YAML or JSON file: a list of ``{name, task, data}`` (or ``{suites: [...]}``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"suite file {os.fspath(path)!r} does not exist")
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except yaml.YAMLError as err:
        raise ValueError(f"suite file {os.fspath(path)!r} is not valid YAML/JSON: {err}") from None
    if isinstance(data, dict) and "suites" in data:
        data = data["suites"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"suite file {os.fspath(path)!r}: expected a non-empty list of {{name, task, data}} entries")
    suites = []
    for i, entry in enumerate(data):
        try:
            suite = from_dict(SuiteConfig, entry, f"{os.fspath(path)}[{i}]")
        except ValueError as err:
            raise ValueError(f"suite file {os.fspath(path)!r}: {err}") from None
        suites.append(resolve_suite_paths(suite, path.parent))
    return suites


def _class_pairs(data: dict, dataset: PairsRetrieval) -> torch.Tensor:
    """(image, caption) pairs of a class-level retrieval set: every caption is a positive of
    every image whose row has the caption's label."""
    root = Path(data.get("image_root") or Path(data["csv"]).parent)
    label_of: dict[str, str] = {}
    columns, records = csv_rows(data["csv"], data.get("sep", "\t"), data.get("encoding", "utf-8"))
    if data["label_key"] not in columns:
        raise ValueError(f"{data['csv']}: no column {data['label_key']!r} (label_key); columns are {columns}")
    for _, row, problem in records:
        if problem is None:  # a row the pairs skipped for its encoding is not among them either
            label_of[os.fspath(root / (row[data.get("image_key", "filepath")] or "").strip())] = (row[data["label_key"]] or "").strip()
    image_paths = [dataset.pairs.image_paths[r] for r in dataset._rows]
    image_labels = [label_of[p] for p in image_paths]
    caption_labels = [image_labels[i] for i in dataset.caption_to_image.tolist()]
    names = {n: i for i, n in enumerate(sorted(set(image_labels)))}
    images = torch.tensor([names[n] for n in image_labels])
    captions = torch.tensor([names[n] for n in caption_labels])
    return torch.nonzero(images[:, None] == captions[None, :])


def _class_lists(data: dict) -> dict:
    out = {}
    if data.get("classnames") is not None:
        out["classnames"] = read_classnames(data["classnames"])
    if data.get("templates") is not None:
        out["templates"] = read_templates(data["templates"])
    return out


def _entry(suite: SuiteConfig, transform: Callable) -> EvalEntry:
    d, check = suite.data, dict(verify=suite.data.get("verify", True), strict=suite.data.get("strict", False))
    if suite.task == "zeroshot":
        if "folder" in d:
            dataset = ImageFolderClassification(d["folder"], transform, name=suite.name, **_class_lists(d), **check)
        else:
            dataset = CsvClassification(d["csv"], transform, name=suite.name, image_root=d.get("image_root"),
                                        image_key=d.get("image_key", "filepath"), label_key=d.get("label_key", "label"),
                                        sep=d.get("sep", "\t"), encoding=d.get("encoding", "utf-8"), **_class_lists(d),
                                        **check)
        return EvalEntry(dataset, ("zeroshot",), suite.name)
    if suite.task == "retrieval":
        if "karpathy" in d:
            dataset = KarpathyRetrieval(d["karpathy"], d["image_root"], d.get("split", "test"), transform,
                                        name=suite.name, **check)
        else:
            pairs = CsvPairs(d["csv"], d.get("image_root"), transform, sep=d.get("sep", "\t"),
                             image_key=d.get("image_key", "filepath"), caption_key=d.get("caption_key", "title"),
                             encoding=d.get("encoding", "utf-8"), **check)
            dataset = PairsRetrieval(pairs, range(len(pairs)), name=suite.name)
            if d.get("class_level"):
                dataset.positive_pairs = _class_pairs(d, dataset)
                options = {"positives": "annotated"}
                return EvalEntry(dataset, ("retrieval", "map_at_r"), suite.name, {"retrieval": options})
        return EvalEntry(dataset, ("retrieval",), suite.name)
    lists = _class_lists(d)
    train = ImageFolderClassification(d["train"], transform, name=f"{suite.name}-train", **lists, **check)
    test = ImageFolderClassification(d["test"], transform, name=suite.name, **lists, **check)
    if train.classnames != test.classnames:
        raise ValueError(f"eval.suites.{suite.name}: train and test folders have different classes "
                         f"({train.class_folders} vs {test.class_folders})")
    return EvalEntry(test, ("linear_probe",), suite.name, train_dataset=train)


def build_entries(suites: Sequence[SuiteConfig], transform: Callable, robustness: bool = False) -> list[EvalEntry]:
    """One ``EvalEntry`` per suite; every file is opened (and, by default, every image
    checked) here, before any embedding, so a bad suite fails early and names its file.
    ``robustness`` adds calibration and geometry to the retrieval suites."""
    entries = [_entry(s, transform) for s in suites]
    if robustness:
        for e in entries:
            if "retrieval" in e.tasks:
                e.tasks = (*e.tasks, "robustness")
    return entries
