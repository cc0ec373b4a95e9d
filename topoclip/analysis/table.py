"""The ablation table (the shape of Tables 3/6 of *Design of the topology for contrastive visual-textual alignment*) and CLIP_benchmark-style result rows.

One row per run: its axis values, the space, the temperature (initial, learnable, final scale
and temperature 1/scale, converge step) and zero-shot I->T / T->I R@1, mean zero-shot
classification accuracy, linear-probe accuracy and mAP@R / R-Precision in both directions
(the ECCV Caption metrics; a caption has one positive image, so T->I mAP@R = R-P = R@1). ``table.json`` and ``table.csv`` hold the
numbers as computed (accuracies as fractions); ``table.md`` shows percentages like the paper.

CLIP_benchmark (LAION) writes one JSON object per evaluation,
``{dataset, model, pretrained, task, metrics, language}``, with ``acc1``/``acc5`` for
``zeroshot_classification``, ``image_retrieval_recall@k`` (text -> image) and
``text_retrieval_recall@k`` (image -> text) for ``zeroshot_retrieval`` and ``lp_acc1`` for
``linear_probe``, all fractions; ``clip_benchmark.jsonl`` uses the same keys so its rows can
be concatenated with CLIP_benchmark's own, and adds ``{text,image}_retrieval_map@r`` and
``{text,image}_retrieval_r_precision`` (mAP@R, R-Precision) to the retrieval row.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from topoclip.atomic import atomic_write_text

__all__ = [
    "METRIC_COLUMNS", "RESERVED_COLUMNS", "table_row", "token_subset_tables", "format_cell", "write_table",
    "format_markdown", "clip_benchmark_rows", "write_clip_benchmark", "suite_row", "SUITE_METRICS", "table_columns",
]

# (key in a row, Markdown header, how Markdown shows it)
METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("embedding", "embedding", "text"),
    ("scale_init", "scale init", "num"),
    ("learnable", "learnable", "bool"),
    ("i2t_R@1", "I→T R@1", "pct"),
    ("t2i_R@1", "T→I R@1", "pct"),
    ("i2t_mAP@R", "I→T mAP@R", "pct"),
    ("i2t_R-P", "I→T R-P", "pct"),
    ("t2i_mAP@R", "T→I mAP@R", "pct"),
    ("t2i_R-P", "T→I R-P", "pct"),
    ("zeroshot_acc", "ZS cls. acc", "pct"),
    ("linear_probe_acc", "linear probe acc", "pct"),
    ("scale_final", "final scale", "num"),
    ("temperature_final", "final T = 1/scale", "num4"),
    ("converge_step", "converge step", "step"),
)

# Keys of a row besides the axes: an axis may not take one of these names.
RESERVED_COLUMNS = frozenset(
    ["run", "steps", "steps_per_epoch", "alignment", "uniformity", "train_seconds", *(k for k, _, _ in METRIC_COLUMNS)]
)


def table_row(run_name: str, axes: dict[str, str], analysis: dict[str, Any]) -> dict[str, Any]:
    """A flat row of the table from a run's cached analysis."""
    temperature = analysis["temperature"]
    retrieval = analysis.get("retrieval", {})
    map_at_r = analysis.get("map_at_r") or {}
    return {
        "run": run_name,
        **axes,
        "embedding": analysis["topology"]["label"],
        "scale_init": temperature["init_scale"],
        "learnable": temperature["learnable"],
        "i2t_R@1": retrieval.get("i2t_R@1"),
        "t2i_R@1": retrieval.get("t2i_R@1"),
        **{key: map_at_r.get(key) for key in ("i2t_mAP@R", "i2t_R-P", "t2i_mAP@R", "t2i_R-P")},
        "zeroshot_acc": analysis.get("zeroshot_mean_top1"),
        "linear_probe_acc": analysis["linear_probe"]["top1"],
        "scale_final": temperature["final_scale"],
        "temperature_final": temperature["final_temperature"],
        "converge_step": analysis["convergence"]["step"],
        "steps": analysis["convergence"]["steps"],
        "steps_per_epoch": analysis["convergence"]["steps_per_epoch"],
        "alignment": analysis["geometry"]["in-domain"]["alignment"],
        "uniformity": analysis["geometry"]["in-domain"]["uniformity"],
        "train_seconds": analysis.get("train_seconds"),
    }


def format_cell(value: Any, kind: str, row: dict[str, Any]) -> str:
    if kind == "step" and value is None:
        # The paper writes "Detach" for a fixed temperature; "-" marks a learned one that never settled.
        return "fixed" if row.get("learnable") is False else "-"
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "num":
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if kind == "num4":
        return f"{value:.4f}"
    if kind == "bool":
        return "yes" if value else "no"
    return str(value)


# Headline metrics of a run's CLIP_benchmark records, as "<dataset>/<metric>" columns of a grid
# table of runs on your own data (the suites are the columns).
SUITE_METRICS = ("acc1", "mean_per_class_recall", "text_retrieval_recall@1", "image_retrieval_recall@1", "lp_acc1")


def suite_row(run_name: str, axes: dict[str, str], label: str, results: dict[str, Any], records: Sequence[dict]) -> dict[str, Any]:
    """A flat row of the table for a run on your own data: its embedding, final scale, and the
    headline metric of each suite record (``<dataset>/<metric>``)."""
    row: dict[str, Any] = {"run": run_name, **axes, "embedding": label,
                           "scale_final": results.get("train", {}).get("final_scale"),
                           "train_seconds": results.get("train", {}).get("seconds")}
    for record in records:
        for metric in SUITE_METRICS:
            if metric in record["metrics"]:
                row[f"{record['dataset']}/{metric}"] = record["metrics"][metric]
    return row


def table_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The fixed columns some row has, then the rows' suite columns (``dataset/metric``)."""
    present = {k for row in rows for k in row}
    fixed = [c for c in METRIC_COLUMNS if c[0] in present]
    suites = list(dict.fromkeys(k for row in rows for k in row if "/" in k))
    return fixed + [(k, k, "pct") for k in suites]


def format_markdown(rows: Sequence[dict[str, Any]], axes: Sequence[str]) -> str:
    columns = table_columns(rows)
    headers = ["run", *axes, *(header for _, header, _ in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["run"], *(str(row[a]) for a in axes), *(format_cell(row.get(k), kind, row) for k, _, kind in columns)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def write_table(rows: Sequence[dict[str, Any]], axes: Sequence[str], out_dir: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and ``table.json`` (rows plus ``meta``) into ``out_dir``."""
    if not rows:
        raise ValueError("write_table: no rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "table.md", "csv": out_dir / "table.csv", "json": out_dir / "table.json"}
    atomic_write_text(paths["md"], format_markdown(rows, axes))
    atomic_write_text(paths["csv"], _csv_text(rows))
    payload = {**meta, "axes": list(axes), "columns": list(dict.fromkeys(k for row in rows for k in row)), "rows": list(rows)}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2) + "\n")
    return paths


def clip_benchmark_rows(model: str, pretrained: str, analysis: dict[str, Any], dataset_prefix: str = "shapes") -> list[dict]:
    """CLIP_benchmark-style rows of one run: per zero-shot task, retrieval and the linear probe."""
    rows = []
    base = {"model": model, "pretrained": pretrained, "language": "en"}
    for task, top1 in analysis.get("zeroshot_top1", {}).items():
        rows.append({"dataset": f"{dataset_prefix}_{task}", **base, "task": "zeroshot_classification", "metrics": {"acc1": top1}})
    retrieval = analysis.get("retrieval", {})
    if retrieval:
        metrics = {}
        for key, value in retrieval.items():
            direction, _, k = key.partition("_R@")
            if k and direction in ("i2t", "t2i"):
                # CLIP_benchmark names retrieval by what is retrieved: images for a text query.
                name = "image_retrieval" if direction == "t2i" else "text_retrieval"
                metrics[f"{name}_recall@{k}"] = value
        for key, value in (analysis.get("map_at_r") or {}).items():
            direction, _, metric = key.partition("_")
            name = "image_retrieval" if direction == "t2i" else "text_retrieval"
            metrics[f"{name}_{_BENCH_NAMES[metric]}"] = value
        rows.append({"dataset": f"{dataset_prefix}_retrieval", **base, "task": "zeroshot_retrieval", "metrics": metrics})
    probe = analysis.get("linear_probe")
    if probe:
        rows.append({"dataset": f"{dataset_prefix}_{probe['task']}", **base, "task": "linear_probe", "metrics": {"lp_acc1": probe["top1"]}})
    return rows


_BENCH_NAMES = {"mAP@R": "map@r", "R-P": "r_precision"}


def token_subset_tables(analyses: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{run: {task, rows: [{size, mean, std, draws}]}}`` of the multi-token runs, for ``table.json``."""
    return {
        name: {"task": a["token_subsets"]["task"],
               "rows": [{k: r[k] for k in ("size", "mean", "std", "draws")} for r in a["token_subsets"]["rows"]]}
        for name, a in analyses.items() if a.get("token_subsets")
    }


def write_clip_benchmark(rows: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """``clip_benchmark.jsonl`` (one object per line, as CLIP_benchmark's files concatenate) and a JSON list."""
    out_dir = Path(out_dir)
    paths = {"jsonl": out_dir / "clip_benchmark.jsonl", "json": out_dir / "clip_benchmark.json"}
    atomic_write_text(paths["jsonl"], "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(paths["json"], json.dumps(list(rows), indent=2) + "\n")
    return paths
