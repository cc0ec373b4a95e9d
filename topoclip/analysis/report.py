"""A self-contained HTML report of one run or of an ablation grid: tables plus PNG plots embedded
as base64 data URIs (one file, no external resources; opens offline and can be mailed).

- A grid directory (it holds ``table.json``): the ablation table, every PNG under ``plots/``,
  and per run its token-subset table (multi-token runs) and Grad-CAM figures.
- A run directory (it holds ``results.json``): zero-shot and retrieval tables, the run's
  analysis (computed from its checkpoint, or reused from its cache while current), mAP@R and
  R-Precision, the token-subset table (multi-token runs), the Grad-CAM figures, the temperature
  trajectory and similarity distributions (written to ``plots/``), and every other PNG in ``plots/``.

Of the Grad-CAM PNGs only each pair's combined ``figure.png`` is embedded, to keep the page small.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from topoclip.recipes.evaluate import format_number
from topoclip.runs import EVAL_LOG_FILE, read_jsonl

from .plots import plot_eval_curves, plot_similarity_distributions, plot_temperature_trajectories
from .run_metrics import (
    ANALYSIS_FILE,
    SIMILARITY_FILE,
    cached_settings,
    is_analysable,
    load_run_metrics,
    load_similarities,
    scale_trajectory,
)
from .table import format_cell, table_columns

__all__ = ["write_report", "grid_report_html", "run_report_html", "REPORT_FILE"]

REPORT_FILE = "report.html"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
"""


def _image(path: Path, root: Path, note: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(str(path.relative_to(root)) + (f": {note}" if note else ""))
    return f'<figure><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], text_columns: int = 1) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="text">{html.escape(str(c))}</td>' if i < text_columns else f"<td>{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _page(title: str, sections: Sequence[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def _pngs(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.png")) if directory.is_dir() else []


def _map_at_r_table(analysis: dict) -> list[str]:
    metrics = analysis.get("map_at_r")
    if not metrics:
        return []
    rows = [[d, *(f"{100 * metrics[f'{d}_{k}']:.1f}" for k in ("mAP@R", "R-P"))] for d in ("i2t", "t2i")]
    return ["<h3>Retrieval with several positives per query (%)</h3>",
            "<p>A caption has one positive image, so T→I mAP@R = R-Precision = R@1.</p>",
            _table(["direction", "mAP@R", "R-Precision"], rows)]


def _token_subset_table(analysis: dict) -> list[str]:
    subsets = analysis.get("token_subsets")
    if not subsets:
        return []
    rows = [[r["size"], f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}", r["draws"]] for r in subsets["rows"]]
    return [f"<h3>Token subsets: zero-shot {html.escape(subsets['task'])} accuracy (%)</h3>",
            _table(["tokens used", "accuracy mean ± std", "draws"], rows)]


def _gradcam_figures(analysis: dict, run_dir: Path, root: Path) -> list[str]:
    pairs = [p for p in analysis.get("gradcam") or [] if (run_dir / p["figure"]).is_file()]
    if not pairs:
        return []
    figures = [_image(run_dir / p["figure"], root, f"“{p['caption']}”") for p in pairs]
    return ["<h3>Grad-CAM: final matching score and best-aligned tokens' scores</h3>", *figures]


def run_details(analysis: dict, run_dir: Path, root: Path) -> list[str]:
    """mAP@R / R-Precision, token-subset table and Grad-CAM figures of one analysed run."""
    return [*_map_at_r_table(analysis), *_token_subset_table(analysis), *_gradcam_figures(analysis, run_dir, root)]


def _grid_run_sections(grid_dir: Path, names: Sequence[str]) -> list[str]:
    sections = []
    for name in names:
        path = grid_dir / "runs" / name / ANALYSIS_FILE
        if path.is_file():
            analysis = json.loads(path.read_text())
            details = [*_token_subset_table(analysis), *_gradcam_figures(analysis, path.parent, grid_dir)]
            if details:
                sections += [f"<h2>Run {html.escape(name)}</h2>", *details]
    return sections


def grid_report_html(grid_dir: str | os.PathLike) -> str:
    grid_dir = Path(grid_dir)
    table = json.loads((grid_dir / "table.json").read_text())
    axes = table["axes"]
    columns = table_columns(table["rows"])
    headers = ["run", *axes, *(h for _, h, _ in columns)]
    rows = [
        [row["run"], *(row[a] for a in axes), *(format_cell(row.get(k), kind, row) for k, _, kind in columns)]
        for row in table["rows"]
    ]
    sections = [
        f"<p>Grid file: {html.escape(str(table.get('grid_file')))}; {len(rows)} runs. Accuracies and recalls in %; "
        "converge step: the first epoch after which the learned scale changes by less than 2% per epoch.</p>",
        "<h2>Table</h2>", _table(headers, rows, text_columns=1 + len(axes) + 1),
        "<h2>Plots</h2>", *(_image(p, grid_dir) for p in _pngs(grid_dir / "plots")),
        *_grid_run_sections(grid_dir, [row["run"] for row in table["rows"]]),
    ]
    return _page(f"topoclip ablation: {grid_dir.name}", sections)


def _run_analysis(run_dir: Path) -> dict | None:
    # With a checkpoint: the cached analysis while current (same settings, same results), else
    # recomputed, so an analysis from before a new metric existed gets it. Without: the cache.
    if not is_analysable(run_dir):
        return None
    if (run_dir / "checkpoints").is_dir():
        return load_run_metrics(run_dir, cached_settings(run_dir))[0]
    if (run_dir / ANALYSIS_FILE).is_file() and (run_dir / SIMILARITY_FILE).is_file():
        return json.loads((run_dir / ANALYSIS_FILE).read_text())
    return None


def _evaluation_sections(results: dict, run_dir: Path) -> list[str]:
    """The run's evaluation, whatever it ran on: zero-shot per dataset, retrieval (one table
    row per dataset and direction), linear probes; a fine-tuning run's table of models on the
    target and reference distributions."""
    sections = []
    if "models" in results:  # a fine-tuning run
        from topoclip.recipes.finetune import format_finetune_table

        table = format_finetune_table({results.get("method", "ft"): results})
        sections += ["<h2>Fine-tuned models: target and reference distributions</h2>", f"<pre>{html.escape(table)}</pre>"]
    evaluation = results.get("eval", {})
    if evaluation.get("zeroshot"):
        rows = [[task, f"{100 * m['top1']:.1f}", f"{100 * m.get('top5', float('nan')):.1f}"] for task, m in evaluation["zeroshot"].items()]
        sections += ["<h2>Zero-shot classification (%)</h2>", _table(["task", "top-1", "top-5"], rows)]
    retrieval = evaluation.get("retrieval")
    if retrieval:
        by_dataset = {"": retrieval} if "i2t_R@1" in retrieval else retrieval
        rows = [[f"{name} {d}".strip(), *(f"{100 * r.get(f'{d}_R@{k}', float('nan')):.1f}" for k in (1, 5, 10))]
                for name, r in by_dataset.items() for d in ("i2t", "t2i")]
        sections += ["<h2>Retrieval (%)</h2>", _table(["direction", "R@1", "R@5", "R@10"], rows)]
    probes = evaluation.get("linear_probe")
    if probes:
        by_dataset = {"": probes} if "top1" in probes else probes
        rows = [[name or "linear probe", f"{100 * p['top1']:.1f}", p["n_train"]] for name, p in by_dataset.items()]
        sections += ["<h2>Linear probe (%)</h2>", _table(["dataset", "top-1", "training images"], rows)]
    return sections


def run_report_html(run_dir: str | os.PathLike) -> str:
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    sections = []
    train = results.get("train")
    if train:
        sections.append(
            f"<p>{train['steps']} steps in {train['seconds']:.0f}s; final loss {format_number(train['final_loss'], '.4f')}, "
            f"final logit scale {format_number(train['final_scale'], '.4g')}.</p>"
        )
    sections += _evaluation_sections(results, run_dir)
    analysis = _run_analysis(run_dir)
    plots = run_dir / "plots"
    evaluations = read_jsonl(run_dir / EVAL_LOG_FILE) if (run_dir / EVAL_LOG_FILE).is_file() else []
    if evaluations:
        plot_eval_curves(evaluations, plots / "eval_during_training.png")
    if analysis is not None:
        row = {"learnable": analysis["temperature"]["learnable"]}
        step = format_cell(analysis["convergence"]["step"], "step", row)
        rows = [
            ["space", analysis["topology"]["label"]],
            ["logit scale: init / final", f"{analysis['temperature']['init_scale']:.4g} / {analysis['temperature']['final_scale']:.4g}"],
            ["final temperature 1/scale", f"{analysis['temperature']['final_temperature']:.4f}"],
            ["converge step (< 2% per epoch)", step],
            [f"linear probe ({analysis['linear_probe']['task']}) %", f"{100 * analysis['linear_probe']['top1']:.1f}"],
            *([f"{name} {d}", f"{value:.4f}"] for d, g in analysis["geometry"].items() for name, value in g.items() if name != "pairs"),
        ]
        sections += ["<h2>Analysis</h2>", _table(["metric", "value"], rows, text_columns=2), *run_details(analysis, run_dir, run_dir)]
        plot_similarity_distributions(load_similarities(run_dir), plots / "similarity.png", title=analysis["topology"]["label"])
    trajectory = scale_trajectory(run_dir)
    if trajectory:
        plot_temperature_trajectories({run_dir.name: trajectory}, plots / "temperature.png")
    sections += ["<h2>Plots</h2>", *(_image(p, run_dir) for p in _pngs(plots))]
    return _page(f"topoclip run: {run_dir.name}", sections)


def write_report(directory: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the HTML report of a grid or run directory (default ``DIR/report.html``)."""
    directory = Path(directory)
    if (directory / "table.json").is_file():
        text = grid_report_html(directory)
    elif (directory / "results.json").is_file():
        text = run_report_html(directory)
    else:
        raise ValueError(f"report: {directory} is neither a grid directory (table.json) nor a finished run (results.json)")
    out = Path(output) if output is not None else directory / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
