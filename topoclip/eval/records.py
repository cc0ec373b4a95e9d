"""Results in CLIP_benchmark's schema, so topoclip's rows concatenate with its results.

One record per (dataset, task) with CLIP_benchmark's keys, ``dataset``, ``model``,
``pretrained``, ``task``, ``metrics``, ``language``, and its metric names:
``zeroshot_classification`` (``acc1``, ``acc5``, ``mean_per_class_recall``),
``zeroshot_retrieval`` (``image_retrieval_recall@K`` — a text query finds its image — and
``text_retrieval_recall@K``) and ``linear_probe`` (``lp_acc1``, ...). topoclip's own metrics
go into the same record under their own names: mAP@R and R-Precision
(``image_retrieval_map@r``, ``text_retrieval_r_precision``, ...), ECE, alignment,
uniformity and the modality gap.

CLIP_benchmark scores with normalised dot products, which is the similarity of the sphere
only; topoclip scores every record with the run's own topology.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from topoclip.atomic import atomic_write_text, json_safe

from .evaluation import EvalRecord

__all__ = ["BENCHMARK_TASKS", "benchmark_metrics", "clip_benchmark_records", "write_jsonl"]

# topoclip task -> CLIP_benchmark task (several topoclip tasks share the retrieval record).
BENCHMARK_TASKS = {
    "zeroshot": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "map_at_r": "zeroshot_retrieval",
    "robustness": "zeroshot_retrieval",
    "linear_probe": "linear_probe",
    "arithmetic": "embedding_arithmetic",  # topoclip's own: CLIP_benchmark has no such task
}


def _direction(prefix: str) -> str:
    # CLIP_benchmark names retrieval by what is retrieved: images for a text query (t2i).
    return "image_retrieval" if prefix == "t2i" else "text_retrieval"


def benchmark_metrics(task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """One topoclip task's metrics under CLIP_benchmark's names (topoclip's own under theirs)."""
    if task == "zeroshot":
        out = {"acc1": metrics["top1"], "mean_per_class_recall": metrics.get("mean_per_class_recall")}
        if "top5" in metrics:
            out["acc5"] = metrics["top5"]
        return {k: v for k, v in out.items() if v is not None}
    if task == "retrieval":
        out = {}
        for key, value in metrics.items():
            prefix, _, k = key.partition("_R@")
            if k and prefix in ("i2t", "t2i"):
                out[f"{_direction(prefix)}_recall@{k}"] = value
        return out
    if task == "map_at_r":
        names = {"mAP@R": "map@r", "R-P": "r_precision", "R@1": None}
        out = {}
        for key, value in metrics.items():
            prefix, _, metric = key.partition("_")
            if prefix in ("i2t", "t2i") and names.get(metric):
                out[f"{_direction(prefix)}_{names[metric]}"] = value
        return out
    if task == "robustness":
        cal, geo = metrics["calibration"], metrics["geometry"]
        out = {f"{_direction(d)}_ece@{b}": cal[f"{d}_ece_{b}"] for b in cal["bins"] for d in ("i2t", "t2i")}
        out.update({k: geo[k] for k in ("alignment", "uniformity", "relative_alignment", "modality_gap")})
        return out
    if task == "linear_probe":
        return {"lp_acc1": metrics["top1"], "lp_l2": metrics["l2"], "lp_n_train": metrics["n_train"]}
    if task == "arithmetic":
        return {f"simat_{k}": v for k, v in metrics.items()}
    raise ValueError(f"no CLIP_benchmark form for task {task!r}")


def clip_benchmark_records(
    records: Sequence[EvalRecord], model: str, pretrained: str, language: str = "en"
) -> list[dict[str, Any]]:
    """``records`` as CLIP_benchmark rows: one per (dataset, CLIP_benchmark task), in order."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        task = BENCHMARK_TASKS[r.task]
        row = rows.setdefault((r.dataset, task), {
            "dataset": r.dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": {}, "language": language,
        })
        row["metrics"].update(benchmark_metrics(r.task, r.metrics))
    return list(rows.values())


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line (CLIP_benchmark's files concatenate this way), atomically."""
    atomic_write_text(path, "".join(json.dumps(json_safe(row), allow_nan=False) + "\n" for row in rows))
