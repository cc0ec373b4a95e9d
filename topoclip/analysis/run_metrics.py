"""The metrics an ablation table needs beyond ``results.json``, computed once per finished run.

From the run's last checkpoint and its ``log.jsonl``:

- temperature: initial, final (scale and temperature 1/scale), learnable or fixed;
- converge step of the learned scale (``eval.convergence``: < 2% change per epoch, *Design of the topology*'s
  Table 6), with the trainer's epoch of ``num_train // batch_size`` steps;
- linear-probe accuracy on the pre-projection image features (``eval.linear_probe``) for one
  shapes attribute, trained on the train split and tested on the test split;
- similarity samples (the topology's own similarity, unscaled) of positive pairs, negative
  pairs, image-image and text-text pairs, in-domain (the test split) and out-of-domain (a
  shifted shapes test split, ``ood_shapes``), and alignment / uniformity of both;
- mAP@R and R-Precision, I->T and T->I, on the test retrieval set (``eval.map_at_r``; an image
  has several captions, a caption one image, so T->I mAP@R = R-P = R@1);
- multi-token runs: zero-shot accuracy from random subsets of 1, 2, 4, ..., k tokens
  (``eval.token_subsets``, *Design of the topology*, Table 10), mean and std over ``subset_draws`` draws;
- Grad-CAM overlays of the first ``gradcam_pairs`` test pairs (``run_attribution``).

Cached as ``analysis.json`` + ``similarities.npz`` (+ ``analysis/gradcam/``) in the run
directory; the cache is reused
while the analysis settings and the run's ``results.json`` are unchanged, so a table is rebuilt
without recomputation and a retrained run is analysed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from topoclip.atomic import atomic_write, atomic_write_json
from topoclip.config import load_config
from topoclip.data.shapes import ZEROSHOT_TASKS, ShapesConfig, make_shapes
from topoclip.dataclass_io import from_dict
from topoclip.devices import resolve_device
from topoclip.eval import embed_images, embed_texts, run_linear_probe, temperature_convergence_step
from topoclip.eval.geometry_metrics import alignment, uniformity
from topoclip.eval.map_at_r import evaluate_map_at_r
from topoclip.eval.token_subsets import evaluate_token_subsets
from topoclip.runs import LOG_FILE, RESULTS_FILE, load_run, read_jsonl, read_run_config, run_config_path

from .run_attribution import write_gradcam_overlays

__all__ = [
    "AnalysisConfig",
    "ANALYSIS_FILE",
    "SIMILARITY_FILE",
    "SIMILARITY_KINDS",
    "topology_label",
    "scale_trajectory",
    "similarity_samples",
    "map_at_r_columns",
    "token_subset_table",
    "compute_run_metrics",
    "load_run_metrics",
    "load_similarities",
    "cached_settings",
    "to_json_settings",
]

ANALYSIS_FILE = "analysis.json"
SIMILARITY_FILE = "similarities.npz"
SIMILARITY_KINDS = ("positive", "negative", "image-image", "text-text")
# Out-of-domain by default: 4x the pixel noise, more two-object scenes, only partial captions,
# from another seed (a shift in both modalities, as a different web dataset would be).
DEFAULT_OOD = {"seed": 1, "pixel_noise": 24.0, "two_object_prob": 0.6, "full_caption_prob": 0.0}
_OOD_FORBIDDEN = ("image_size", "mean", "std", "num_train", "num_val", "num_test")


@dataclass
class AnalysisConfig:
    """Settings of the per-run analysis (the ``analysis:`` section of a grid file)."""

    probe_task: str = "shape"  # the shapes attribute the linear probe classifies
    probe_train_size: int = 2000  # training images of the probe (the first ones of the train split)
    probe_l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)  # chosen on a held-out fifth of them
    similarity_pairs: int = 500  # test pairs embedded per domain
    similarity_samples: int = 5000  # values kept per kind for the plots
    rel_tol: float = 0.02  # converge step: relative change per epoch below this
    ood_shapes: dict = field(default_factory=lambda: dict(DEFAULT_OOD))  # ShapesConfig fields changed out-of-domain
    subset_task: str = "shape"  # multi-token runs: the zero-shot task of the token-subset table
    subset_draws: int = 5  # random token subsets per size (all of them when there are fewer)
    gradcam_pairs: int = 2  # test pairs explained by Grad-CAM overlays (0: none)
    gradcam_tokens: int = 2  # multi-token runs: best-aligned tokens per pair with their own map

    def __post_init__(self):
        if self.probe_task not in ZEROSHOT_TASKS:
            raise ValueError(f"AnalysisConfig.probe_task: must be one of {list(ZEROSHOT_TASKS)}, got {self.probe_task!r}")
        for name in ("probe_train_size", "similarity_pairs", "similarity_samples"):
            if getattr(self, name) < 2:
                raise ValueError(f"AnalysisConfig.{name}: must be >= 2, got {getattr(self, name)}")
        if self.subset_task not in ZEROSHOT_TASKS:
            raise ValueError(f"AnalysisConfig.subset_task: must be one of {list(ZEROSHOT_TASKS)}, got {self.subset_task!r}")
        if self.subset_draws < 1:
            raise ValueError(f"AnalysisConfig.subset_draws: must be >= 1, got {self.subset_draws}")
        for name in ("gradcam_pairs", "gradcam_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"AnalysisConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if not self.probe_l2 or any(not (math.isfinite(v) and v >= 0) for v in self.probe_l2):
            raise ValueError(f"AnalysisConfig.probe_l2: must be a non-empty list of numbers >= 0, got {list(self.probe_l2)}")
        if not 0 < self.rel_tol < 1:
            raise ValueError(f"AnalysisConfig.rel_tol: must lie in (0, 1), got {self.rel_tol}")
        known = set(ShapesConfig.field_names()) - set(_OOD_FORBIDDEN)
        bad = sorted(set(self.ood_shapes) - known)
        if bad:
            raise ValueError(f"AnalysisConfig.ood_shapes.{bad[0]}: not a shapes field that can shift (allowed: {', '.join(sorted(known))})")


def is_analysable(run_dir: str | os.PathLike) -> bool:
    """The analysis (linear probe, similarity samples, Grad-CAM on the shapes data) applies to
    pretraining runs on the embedded shapes; runs on other data report their own suites."""
    try:
        config, info = read_run_config(run_dir)
    except ValueError:
        return False
    return info.kind == "pretrain" and (config.get("data") or {}).get("source", "shapes") == "shapes"


def topology_label(config) -> str:
    """``Sphere(128)``, ``Euclidean(128)``, ``Ob(16,8) inner``, ``Multi(16,8) geodesic``."""
    label = config.topology.build().label
    # A multi-token oblique model: one [CLS] token per sphere.
    return label.replace("Ob(", "Multi(", 1) if config.model.num_tokens > 1 else label


def scale_trajectory(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """``[(step, logit scale)]`` from the run's ``log.jsonl`` (empty if it has none)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [(int(r["step"]), float(r["scale"])) for r in read_jsonl(path) if isinstance(r.get("scale"), (int, float))]


@contextlib.contextmanager
def _one_thread():
    # The probe's L-BFGS is a long chain of small ops; on a busy 2-core machine intra-op
    # threads waiting for a descheduled sibling made it ~10x slower (measured 3.1 s vs 0.26 s
    # for 4 fits of 4000 x 128 features).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sample(values: torch.Tensor, count: int, generator: torch.Generator) -> np.ndarray:
    values = values.flatten()
    if values.numel() > count:
        values = values[torch.randperm(values.numel(), generator=generator)[:count]]
    return values.double().cpu().numpy()


@torch.no_grad()
def similarity_samples(
    model, tokenizer, pairs, max_pairs: int, samples: int, batch_size: int, device, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Similarities of the first ``max_pairs`` (image, caption) pairs, by kind, and their geometry.

    positive: s(u_i, v_i); negative: s(u_i, v_j), i != j; image-image: s(u_i, u_j), i < j;
    text-text: s(v_i, v_j), i < j. Each kind is subsampled to ``samples`` values (seeded).
    """
    n = min(len(pairs), max_pairs)
    if n < 2:
        raise ValueError(f"similarity_samples: need at least two pairs, got {n}")
    u = embed_images(model, Subset(pairs, range(n)), batch_size, device, progress=False)
    v = embed_texts(model, list(pairs.captions[:n]), tokenizer, batch_size, device, progress=False)
    topo = model.topology
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=u.device)
    upper = torch.ones(n, n, dtype=torch.bool, device=u.device).triu(1)
    g = torch.Generator().manual_seed(seed)
    values = {
        "positive": _sample(topo.paired_similarity(u, v), samples, g),
        "negative": _sample(topo.similarity(u, v)[off_diagonal], samples, g),
        "image-image": _sample(topo.similarity(u, u)[upper], samples, g),
        "text-text": _sample(topo.similarity(v, v)[upper], samples, g),
    }
    geometry = {"alignment": alignment(u, v, topology=topo), "uniformity": uniformity(u, v, topology=topo), "pairs": n}
    return values, geometry


# Keys of ``retrieval_map_at_r`` kept in the analysis (its R@1 is already in results.json).
MAP_AT_R_KEYS = ("i2t_mAP@R", "i2t_R-P", "t2i_mAP@R", "t2i_R-P")


def map_at_r_columns(model, tokenizer, retrieval_set, batch_size: int, device) -> dict[str, float]:
    """mAP@R and R-Precision, I->T and T->I, of ``model`` on ``retrieval_set``."""
    metrics = evaluate_map_at_r(model, retrieval_set, tokenizer, batch_size=batch_size, device=device, progress=False)
    return {key: metrics[key] for key in MAP_AT_R_KEYS}


def token_subset_table(model, tokenizer, task_set, draws: int, batch_size: int, device) -> list[dict]:
    """``[{size, mean, std, draws, accuracies, subsets}]`` for sizes 1, 2, 4, ..., k of a multi-token model."""
    rows = evaluate_token_subsets(model, task_set, tokenizer, draws=draws, batch_size=batch_size, device=device, progress=False)
    return [dict(row, subsets=[list(s) for s in row["subsets"]]) for row in rows]


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _headline(results: dict) -> dict[str, Any]:
    evaluation = results.get("eval", {})
    zeroshot = evaluation.get("zeroshot", {})
    retrieval = evaluation.get("retrieval", {})
    return {
        "zeroshot_top1": {task: m["top1"] for task, m in zeroshot.items()},
        "zeroshot_mean_top1": float(np.mean([m["top1"] for m in zeroshot.values()])) if zeroshot else None,
        "retrieval": dict(retrieval),
        "train_seconds": results.get("train", {}).get("seconds"),
    }


def compute_run_metrics(run_dir: str | os.PathLike, settings: AnalysisConfig | None = None, device: str | None = None) -> dict:
    """Compute the analysis of a finished run, write ``analysis.json`` + ``similarities.npz``, return it."""
    settings = settings or AnalysisConfig()
    run_dir = Path(run_dir)
    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        raise ValueError(f"run {run_dir}: no {RESULTS_FILE}; the run has not finished")
    results = json.loads(results_path.read_text())
    config = load_config(run_config_path(run_dir))
    loaded = load_run(run_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    data = make_shapes(config.data.shapes)
    dev = resolve_device(device or config.train.device)
    model.to(dev)
    batch_size = config.eval.batch_size

    scale = config.model.logit_scale
    steps_per_epoch = len(data.train) // config.train.batch_size
    trajectory = scale_trajectory(run_dir)
    converge = None
    if scale.learnable and trajectory:
        converge = temperature_convergence_step(trajectory, steps_per_epoch, settings.rel_tol)
    final_scale = model.logit_scale.value

    probe_train = data.zeroshot_tasks("train", [settings.probe_task])[0]
    probe_test = data.zeroshot_tasks("test", [settings.probe_task])[0]
    with _one_thread():
        probe = run_linear_probe(
            model, Subset(probe_train, range(min(len(probe_train), settings.probe_train_size))), probe_test,
            l2=list(settings.probe_l2), batch_size=batch_size, device=dev, progress=False,
        )

    shapes = config.data.shapes
    ood_config = replace(shapes, num_train=2, num_val=1, num_test=min(shapes.num_test, settings.similarity_pairs), **settings.ood_shapes)
    domains = {"in-domain": data.test, "out-of-domain": make_shapes(ood_config).test}
    arrays, geometry = {}, {}
    for domain, pairs in domains.items():
        values, geometry[domain] = similarity_samples(
            model, tokenizer, pairs, settings.similarity_pairs, settings.similarity_samples, batch_size, dev
        )
        arrays.update({f"{domain}/{kind}": array for kind, array in values.items()})

    map_at_r = map_at_r_columns(model, tokenizer, data.retrieval_set("test"), batch_size, dev) if config.eval.retrieval else None
    token_subsets = None
    if config.model.num_tokens > 1:
        task_set = data.zeroshot_tasks("test", [settings.subset_task])[0]
        token_subsets = {"task": settings.subset_task,
                         "rows": token_subset_table(model, tokenizer, task_set, settings.subset_draws, batch_size, dev)}
    gradcam = write_gradcam_overlays(
        model, tokenizer, data.test, run_dir, settings.gradcam_pairs, settings.gradcam_tokens, shapes.mean, shapes.std
    )

    analysis = {
        "settings": to_json_settings(settings),
        "results_sha256": _fingerprint(results_path),
        "checkpoint": Path(loaded.description).name,
        "topology": {
            "label": topology_label(config), "name": config.topology.name, "dim": config.topology.dim,
            "n": config.topology.n, "m": config.topology.m, "num_tokens": config.model.num_tokens,
        },
        "temperature": {
            "init_scale": scale.init, "learnable": scale.learnable, "max_scale": scale.max,
            "final_scale": final_scale, "final_temperature": 1.0 / final_scale,
        },
        "convergence": {"step": converge, "steps_per_epoch": steps_per_epoch, "rel_tol": settings.rel_tol,
                        "steps": trajectory[-1][0] if trajectory else None},
        "linear_probe": {"task": settings.probe_task, **probe},
        "geometry": geometry,
        "similarity_means": {key: float(np.mean(a)) for key, a in arrays.items()},
        "map_at_r": map_at_r,
        "token_subsets": token_subsets,
        "gradcam": gradcam,
        **_headline(results),
    }
    atomic_write(run_dir / SIMILARITY_FILE, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
    atomic_write_json(run_dir / ANALYSIS_FILE, analysis)  # last: its presence marks a complete analysis
    return analysis


def to_json_settings(settings: AnalysisConfig) -> dict:
    data = asdict(settings)
    data["probe_l2"] = list(data["probe_l2"])
    return data


def load_run_metrics(run_dir: str | os.PathLike, settings: AnalysisConfig | None = None, device: str | None = None) -> tuple[dict, bool]:
    """``(analysis, computed)``: the cached analysis if it was made with these settings from
    the run's current ``results.json``, else a fresh one."""
    settings = settings or AnalysisConfig()
    run_dir = Path(run_dir)
    path, results = run_dir / ANALYSIS_FILE, run_dir / RESULTS_FILE
    if path.is_file() and (run_dir / SIMILARITY_FILE).is_file() and results.is_file():
        try:
            cached = json.loads(path.read_text())
        except json.JSONDecodeError:
            cached = None
        if (
            cached is not None
            and cached.get("settings") == to_json_settings(settings)
            and cached.get("results_sha256") == _fingerprint(results)
            and all((run_dir / f).is_file() for pair in cached.get("gradcam", []) for f in pair["files"])
        ):
            return cached, False
    return compute_run_metrics(run_dir, settings, device), True


def cached_settings(run_dir: str | os.PathLike) -> AnalysisConfig:
    """The settings a run was last analysed with (defaults for new fields), or the defaults.

    ``topoclip report RUN_DIR`` reuses them, so a grid run's report does not redo its analysis
    with other settings.
    """
    try:
        cached = json.loads((Path(run_dir) / ANALYSIS_FILE).read_text())
        return from_dict(AnalysisConfig, cached["settings"], "analysis")
    except (OSError, ValueError, KeyError, TypeError):
        return AnalysisConfig()


def load_similarities(run_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """``{domain: {kind: values}}`` from a run's cached ``similarities.npz``."""
    with np.load(Path(run_dir) / SIMILARITY_FILE) as arrays:
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in arrays.files:
            domain, kind = key.split("/", 1)
            out.setdefault(domain, {})[kind] = arrays[key]
    return out
