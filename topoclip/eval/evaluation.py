"""An evaluation as data: a list of (dataset, tasks) entries, each dataset embedded once.

    entries = [EvalEntry(shape_task, ("zeroshot",)), EvalEntry(test_pairs, ("retrieval", "robustness"))]
    records = run_evaluation(model, tokenizer, entries, batch_size=512)
    results = nest_records(records)     # {"zeroshot": {"shape": ...}, "retrieval": ..., "robustness": ...}

A task is a name in ``TASKS``: a function of the ``EmbeddedSet`` (and options), so a new metric
or a new dataset is one more entry, and no metric embeds anything itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .arithmetic import arithmetic_metrics
from .embedded import EmbeddedSet, embed_dataset
from .linear_probe import linear_probe_metrics
from .map_at_r import map_at_r_metrics
from .retrieval import retrieval_metrics
from .robustness import robustness_metrics
from .zeroshot import zeroshot_metrics

__all__ = ["TASKS", "EvalEntry", "EvalRecord", "run_evaluation", "nest_records", "flat_metrics"]


def _robustness(emb: EmbeddedSet, plot_dir: Path | None = None, **options) -> dict:
    return robustness_metrics(emb, plot_dir=plot_dir, **options)


# task name -> (what it needs, metric function of the embedded set)
TASKS: dict[str, tuple[str, Callable[..., dict]]] = {
    "zeroshot": ("classification", zeroshot_metrics),
    "retrieval": ("retrieval", retrieval_metrics),
    "map_at_r": ("retrieval", map_at_r_metrics),
    "robustness": ("retrieval", _robustness),
    # Needs the entry's train_dataset too; run_evaluation embeds both with their features.
    "linear_probe": ("classification", linear_probe_metrics),
    # On an ArithmeticSet; its queries come in the entry's options (arithmetic_options).
    "arithmetic": ("retrieval", arithmetic_metrics),
}


@dataclass
class EvalEntry:
    """One dataset and the tasks to run on it; ``options`` per task (keyword arguments of
    its metric, e.g. ``{"robustness": {"bins": (10, 15)}}``). A ``linear_probe`` entry fits
    its probe on ``train_dataset`` and scores it on ``dataset``."""

    dataset: Any
    tasks: Sequence[str]
    name: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_dataset: Any = None

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"eval task {unknown[0]!r}: unknown (known: {', '.join(TASKS)})")
        if not self.tasks:
            raise ValueError(f"eval entry {self.label}: no tasks")
        if "linear_probe" in self.tasks and self.train_dataset is None:
            raise ValueError(f"eval entry {self.label}: a linear probe needs a train_dataset")

    @property
    def label(self) -> str:
        return self.name or getattr(self.dataset, "name", type(self.dataset).__name__)


@dataclass
class EvalRecord:
    dataset: str
    task: str
    metrics: dict[str, Any]


def run_evaluation(
    model: nn.Module,
    tokenizer,
    entries: Sequence[EvalEntry],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    plot_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> list[EvalRecord]:
    """Embed each entry's dataset once and run its tasks; one record per (dataset, task).

    Tasks that draw plots (robustness) write them to ``plot_dir`` (a sub-folder per dataset
    when several entries share a task)."""
    shared = {t for t in TASKS if sum(t in e.tasks for e in entries) > 1}
    records = []
    for entry in entries:
        probe = "linear_probe" in entry.tasks
        emb = embed_dataset(model, entry.dataset, tokenizer, batch_size, device, progress=progress, with_features=probe)
        for task in entry.tasks:
            _, metric = TASKS[task]
            options = dict(entry.options.get(task, {}))
            if task == "linear_probe":
                train = embed_dataset(model, entry.train_dataset, tokenizer, batch_size, device, progress=progress, with_features=True)
                records.append(EvalRecord(entry.label, task, metric(train, emb, **options)))
                continue
            if task == "robustness" and plot_dir is not None:
                options["plot_dir"] = Path(plot_dir) / entry.label if task in shared else Path(plot_dir)
            # no graph: a learned curvature (or any parameter a topology reads) would build one
            with torch.no_grad():
                records.append(EvalRecord(entry.label, task, metric(emb, **options)))
    return records


def nest_records(records: Sequence[EvalRecord]) -> dict[str, Any]:
    """Records as a run's ``results.json`` holds them: ``zeroshot`` by dataset, every other
    task by dataset when several datasets ran it, else directly under the task."""
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for r in records:
        counts[r.task] = counts.get(r.task, 0) + 1
    for r in records:
        if r.task == "zeroshot" or counts[r.task] > 1:
            out.setdefault(r.task, {})[r.dataset] = r.metrics
        else:
            out[r.task] = r.metrics
    return out


def flat_metrics(records: Sequence[EvalRecord]) -> dict[str, float]:
    """``{"dataset/metric": value}`` of every number in the records (nested sections joined
    with dots, e.g. ``pairs/calibration.i2t_ece_15``): what a log line or ``eval.best`` names."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if not prefix.endswith("/") else f"{prefix}{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for r in records:
        walk(f"{r.dataset}/", r.metrics)
    return out
