"""PNG plots of ablation runs: temperature trajectories (Fig. 4 of *Design of the topology for contrastive visual-textual alignment*), similarity
distributions in- and out-of-domain (Fig. 6) and uniformity vs alignment.

matplotlib is imported inside each function and used through ``Figure`` + the Agg canvas (no
pyplot), so importing this module costs nothing and no global backend is switched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_temperature_trajectories", "plot_eval_curves", "plot_similarity_distributions", "plot_uniformity_alignment"]

_KIND_COLOURS = {"positive": "tab:green", "negative": "tab:red", "image-image": "tab:blue", "text-text": "tab:orange"}


def _new_figure(width: float, height: float, panels: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, axes


def _save(figure, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_temperature_trajectories(
    trajectories: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike, title: str = ""
) -> Path:
    """The logit scale (1/T) over training steps, one line per run, log scale on y."""
    if not trajectories:
        raise ValueError("plot_temperature_trajectories: no trajectories")
    figure, (ax,) = _new_figure(8.0, 4.5)
    # The colour cycle has 10 entries; a new line style per 10 runs keeps every legend entry
    # distinct in grids of more runs (Table 3 has 16).
    styles = ("-", "--", ":", "-.")
    for i, (label, points) in enumerate(trajectories.items()):
        if points:
            steps, scales = zip(*points)
            ax.plot(steps, scales, label=label, linewidth=1.2, linestyle=styles[(i // 10) % len(styles)])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("logit scale = 1 / temperature")
    ax.set_title(title or "temperature during training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(figure, path)


def plot_eval_curves(records: Sequence[dict], path: str | os.PathLike, title: str = "", max_panels: int = 12) -> Path | None:
    """One panel per metric of the evaluations during training (``eval.jsonl``), over steps;
    counts (``.../n``) are left out. None when there is nothing to plot."""
    metrics = [k for k in records[0] if k != "step" and not k.endswith("/n")] if records else []
    metrics = [k for k in metrics if any(isinstance(r.get(k), (int, float)) for r in records)][:max_panels]
    if not metrics:
        return None
    from matplotlib.figure import Figure

    columns = min(3, len(metrics))
    rows = (len(metrics) + columns - 1) // columns
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows), dpi=100)
    for i, key in enumerate(metrics):
        ax = figure.add_subplot(rows, columns, i + 1)
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(True, alpha=0.3)
    figure.suptitle(title or "evaluation during training")
    figure.tight_layout()
    return _save(figure, path)


def plot_similarity_distributions(
    samples: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike, title: str = "", bins: int = 60
) -> Path:
    """One panel per domain; in each, histograms (densities) of every similarity kind."""
    if not samples:
        raise ValueError("plot_similarity_distributions: no samples")
    figure, axes = _new_figure(5.0 * len(samples), 3.8, len(samples))
    for ax, (domain, kinds) in zip(axes, samples.items()):
        finite = [np.asarray(v)[np.isfinite(v)] for v in kinds.values()]
        everything = np.concatenate([v for v in finite if v.size]) if any(v.size for v in finite) else np.zeros(1)
        lo, hi = float(everything.min()), float(everything.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for (kind, _values), clean in zip(kinds.items(), finite):
            if clean.size:
                ax.hist(clean, bins=edges, density=True, histtype="step", linewidth=1.4,
                        color=_KIND_COLOURS.get(kind), label=f"{kind} (mean {clean.mean():.3g})")
        ax.set_title(domain)
        ax.set_xlabel("similarity (the topology's own, unscaled)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_uniformity_alignment(
    points: Mapping[str, tuple[float, float]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Scatter of (alignment, uniformity) per run, each point labelled; lower is better on both."""
    if not points:
        raise ValueError("plot_uniformity_alignment: no points")
    figure, (ax,) = _new_figure(6.5, 5.0)
    for label, (align, unif) in points.items():
        ax.scatter([align], [unif], s=25)
        ax.annotate(label, (align, unif), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("alignment  E||u - v||²  (lower is better)")
    ax.set_ylabel("uniformity  log E exp(-2||x - y||²)  (lower is better)")
    ax.set_title(title or "uniformity vs alignment (test pairs)")
    ax.grid(True, alpha=0.3)
    return _save(figure, path)
