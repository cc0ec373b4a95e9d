"""Run an ablation grid: train every run that has not finished, analyse it, write the table and plots.

    GRID_DIR/
      grid.yaml                  the expanded grid (base, overrides, axes, runs) for reference
      runs/<run name>/           an ordinary run directory (+ analysis.json, similarities.npz, analysis/gradcam/)
      table.md  table.csv  table.json   (table.json also: the multi-token runs' token-subset tables)
      clip_benchmark.jsonl  clip_benchmark.json
      plots/temperature.png  plots/uniformity_alignment.png  plots/similarity/<run>.png

Resumable: a run with ``results.json`` is finished and skipped; one with checkpoints but no
results continues from its latest checkpoint (``topoclip.recipes.pretrain.run`` does that). A finished run
whose saved config differs from the grid's is an error rather than a silently stale row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import yaml

from topoclip.config import load_config
from topoclip.recipes import pretrain
from topoclip.runs import RECORDS_FILE, RESULTS_FILE, read_jsonl, run_config_path

from .grid import Grid, GridRun, config_differences, select_runs
from .plots import plot_similarity_distributions, plot_temperature_trajectories, plot_uniformity_alignment
from .run_metrics import ANALYSIS_FILE, is_analysable, load_run_metrics, load_similarities, scale_trajectory, to_json_settings
from .table import clip_benchmark_rows, suite_row, table_row, token_subset_tables, write_clip_benchmark, write_table

__all__ = ["run_grid", "write_grid_outputs", "RUNS_DIR", "PLOTS_DIR"]

RUNS_DIR = "runs"
PLOTS_DIR = "plots"


def _check_unchanged(run, run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file():
        return
    changed = config_differences(load_config(run_config_path(run_dir)), run.config)
    if changed:
        raise ValueError(
            f"run {run.name}: {run_dir} was trained with a different config ({', '.join(changed[:5])}); "
            f"delete that directory to retrain it, or use another grid directory"
        )


def _describe(row: dict) -> str:
    def pct(key):
        value = row.get(key)
        return "-" if value is None else f"{100 * value:.1f}"

    if "converge_step" not in row:  # a run on your own data: its suites' headline metrics
        suites = "  ".join(f"{k} {pct(k)}" for k in row if "/" in k)
        return f"{suites}  scale {row['scale_final']:.3g}"
    step = row["converge_step"]
    converge = "fixed" if not row["learnable"] else ("-" if step is None else str(step))
    return (
        f"I→T R@1 {pct('i2t_R@1')}  T→I R@1 {pct('t2i_R@1')}  ZS {pct('zeroshot_acc')}  "
        f"LP {pct('linear_probe_acc')}  scale {row['scale_final']:.3g}  converge {converge}"
    )


def _write_grid_spec(grid: Grid, grid_dir: Path) -> None:
    spec = {
        "grid_file": str(grid.path) if grid.path else None,
        "axes": {axis: [{"name": v.name, **v.settings} for v in values] for axis, values in grid.axes.items()},
        "excluded": grid.num_excluded,
        "analysis": to_json_settings(grid.analysis),
        "runs": {run.name: run.axes for run in grid.runs},
    }
    (grid_dir / "grid.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))


def run_grid(
    grid: Grid,
    grid_dir: str | os.PathLike,
    device: str | None = None,
    echo: Callable[[str], None] = print,
    only: list[str] = (),
) -> list[dict]:
    """Train and analyse the runs of ``grid`` under ``grid_dir``; returns the table rows.

    ``only``: shell patterns of the run names to train (default: all). The table lists every
    finished run of the grid, in grid order, whether trained now or before.
    """

    grid_dir = Path(grid_dir)
    selected = select_runs(grid, list(only)).runs
    (grid_dir / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    for run in grid.runs:  # fail on a stale run before training anything
        _check_unchanged(run, grid_dir / RUNS_DIR / run.name)
    _write_grid_spec(grid, grid_dir)
    total, started = len(selected), time.perf_counter()
    echo(f"grid {grid.path or ''}: {total} of {len(grid.runs)} runs ({grid.num_excluded} combinations excluded) in {grid_dir}")
    rows_by_name = {}
    for k, run in enumerate(selected, 1):
        run_dir = grid_dir / RUNS_DIR / run.name
        run_started = time.perf_counter()
        finished = (run_dir / RESULTS_FILE).is_file()
        if not finished:
            echo(f"[{k}/{total}] {run.name}: training")
            config = run.config
            if device is not None:
                config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))
            pretrain.run(config, run_dir)
        row, computed = _row(run, run_dir, grid, device)
        rows_by_name[run.name] = row
        status = "trained" if not finished else ("analysed" if computed else "done already")
        echo(
            f"[{k}/{total}] {run.name}: {status} in {time.perf_counter() - run_started:.0f}s "
            f"(grid {time.perf_counter() - started:.0f}s) | {_describe(row)}"
        )
    table_runs, rows = [], []
    for run in grid.runs:
        if run.name not in rows_by_name and (grid_dir / RUNS_DIR / run.name / RESULTS_FILE).is_file():
            rows_by_name[run.name], _ = _row(run, grid_dir / RUNS_DIR / run.name, grid, device)
        if run.name in rows_by_name:
            table_runs.append(run)
            rows.append(rows_by_name[run.name])
    if len(rows) < len(grid.runs):
        echo(f"{len(grid.runs) - len(rows)} runs of the grid have not finished yet and are not in the table")
    write_grid_outputs(grid, table_runs, grid_dir, rows)
    echo(f"table: {grid_dir / 'table.md'}")
    return rows


def _row(run: GridRun, run_dir: Path, grid: Grid, device) -> tuple[dict, bool]:
    """(the run's table row, whether its analysis was computed now). Runs on the shapes get the
    analysis; runs on your own data a row of their suites' records."""
    if is_analysable(run_dir):
        analysis, computed = load_run_metrics(run_dir, grid.analysis, device)
        return table_row(run.name, run.axes, analysis), computed
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    records = read_jsonl(run_dir / RECORDS_FILE) if (run_dir / RECORDS_FILE).is_file() else []
    return suite_row(run.name, run.axes, run.config.topology.build().label, results, records), False


def write_grid_outputs(grid: Grid, runs: list[GridRun], grid_dir: Path, rows: list[dict]) -> None:
    """Table, CLIP_benchmark rows and plots of the analysed ``runs`` of a grid (``rows`` in the same order)."""
    axes = list(grid.axes)
    analyses = {run.name: json.loads((grid_dir / RUNS_DIR / run.name / ANALYSIS_FILE).read_text())
                for run in runs if is_analysable(grid_dir / RUNS_DIR / run.name)}
    meta = {"grid_file": str(grid.path) if grid.path else None, "token_subsets": token_subset_tables(analyses)}
    write_table(rows, axes, grid_dir, meta)
    bench_rows = []
    plots = grid_dir / PLOTS_DIR
    trajectories, geometry = {}, {}
    for run in runs:
        run_dir = grid_dir / RUNS_DIR / run.name
        trajectories[run.name] = scale_trajectory(run_dir)
        if run.name not in analyses:  # a run on your own data: its records as they are
            if (run_dir / RECORDS_FILE).is_file():
                bench_rows += read_jsonl(run_dir / RECORDS_FILE)
            continue
        analysis = analyses[run.name]
        model = f"topoclip-{analysis['topology']['label'].replace(' ', '-')}"
        bench_rows += clip_benchmark_rows(model, f"{grid_dir.name}/{run.name}", analysis)
        in_domain = analysis["geometry"]["in-domain"]
        geometry[run.name] = (in_domain["alignment"], in_domain["uniformity"])
        plot_similarity_distributions(
            load_similarities(run_dir), plots / "similarity" / f"{run.name}.png", title=f"{run.name}: {analysis['topology']['label']}"
        )
    write_clip_benchmark(bench_rows, grid_dir)
    plot_temperature_trajectories(trajectories, plots / "temperature.png", title=f"{grid_dir.name}: logit scale during training")
    if geometry:
        plot_uniformity_alignment(geometry, plots / "uniformity_alignment.png", title=f"{grid_dir.name}: uniformity vs alignment")
