"""Ablation grids (``topoclip ablate``), their tables and plots, and HTML reports (``topoclip report``).

Application level: unlike the library (geometry, losses, models, data, eval, runs, config) it
builds on ``topoclip.recipes`` to train the runs of a grid.
"""
from topoclip.analysis.grid import Grid, GridRun, load_grid, parse_grid
from topoclip.analysis.report import write_report
from topoclip.analysis.run_metrics import AnalysisConfig, compute_run_metrics, load_run_metrics
from topoclip.analysis.runner import run_grid

__all__ = [
    "AnalysisConfig",
    "Grid",
    "GridRun",
    "compute_run_metrics",
    "load_grid",
    "load_run_metrics",
    "parse_grid",
    "run_grid",
    "write_report",
]
