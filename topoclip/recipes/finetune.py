"""Fine-tune a pretrained dual encoder on new data, robustly.

Sources (``source.path``):
- a topoclip run or checkpoint directory (trained by ``topoclip train`` or by this module);
- an OpenCLIP weights file plus ``source.model_name`` (its architecture), or an OpenCLIP
  model directory (``open_clip_config.json``);
- a Hugging Face CLIP model directory.

Methods (``finetune.method``):
- ``ft``: plain contrastive fine-tuning;
- ``m2mix``, ``vmix``, ``lmix``, ``vlmix``, ``m3mix``: the contrastive loss plus the geodesic
  multi-modal mixup terms (``topoclip.losses.mixup``), on the model's own topology;
- ``lp-ft``: a linear probe first (the image projection on frozen features, from the
  zero-shot classifier), then ``ft`` (Kumar et al., 2022);
- ``wise-ft``: ``ft``, then the weights interpolated between the zero-shot and the
  fine-tuned model with ``finetune.wise_alpha`` (``topoclip.models.weight_space``);
- a base with mixups joined by ``+``: ``wise-ft+m2mix``, ``lp-ft+m2mix``, ``ft+vmix+lmix``
  (the paper's "WiSE-FT w/ m²-Mix"); ``finetune.mix_path=linear`` mixes along straight lines;
- ``embedding-shift``: no training; the modality gap measured on the fine-tuning pairs is
  closed at inference (``topoclip.eval.shift``).

Every model is evaluated on two distributions: ``target`` (the fine-tuning data's test
split) and ``reference`` (the original distribution the source was trained on), so a
table shows what fine-tuning gains on the one and loses on the other.

The data is the embedded shapes generator: by default the fine-tuning distribution differs
from the default training data by its light background (``data.shapes.background``), and it is
rendered at the source model's image size and normalisation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from topoclip.atomic import atomic_write, atomic_write_json
from topoclip.config import FinetuneConfig, load_finetune_config, split_method
from topoclip.data import make_collate, make_shapes
from topoclip.data.shapes import ShapesConfig
from topoclip.data.sources import open_training_source
from topoclip.engine.distributed import DistInfo, process_group
from topoclip.engine.task import ContrastiveTask
from topoclip.engine.trainer import seed_everything
from topoclip.eval import EmbeddingShiftModel, EvalEntry, arithmetic_options, arithmetic_set, estimate_modality_gap
from topoclip.losses.mixup import M3MixLoss
from topoclip.models import interpolate_weights
from topoclip.runs import PLOTS_DIR, RECORDS_FILE, RESULTS_FILE, LoadedRun, load_finetune_source

from .common import build_loss, finished_results, make_trainer, periodic_evaluator, record_skips, start_run
from .evaluate import eval_entries, evaluate_entries, shapes_eval_sets, suite_entries, write_records

__all__ = ["WISE_DIR", "LP_DIR", "run_finetune", "lp_ft_configs", "format_finetune_table", "model_label", "load_finetune_config"]

WISE_DIR = "wise_ft"
LP_DIR = "linear_probe"  # LP-FT's first stage: its own checkpoints and log


# ------------------------------------------------------------------------------ fine-tuning

def _rendered_for(shapes: ShapesConfig, loaded: LoadedRun, **extra) -> ShapesConfig:
    return dataclasses.replace(shapes, image_size=loaded.image_size, mean=loaded.mean, std=loaded.std, **extra)


def _shapes_entries(data, config: FinetuneConfig) -> list[EvalEntry]:
    """The shapes test split's zero-shot tasks and retrieval, and the embedding arithmetic
    (SIMAT-style, ``finetune.simat_lambda``) on its single-object images."""
    entries = eval_entries(*shapes_eval_sets(data, config.eval), config.eval.robustness)
    lam = config.finetune.simat_lambda
    if lam is not None and config.eval.retrieval:
        try:
            queries = arithmetic_set(data.test, name="shapes-arithmetic")
        except ValueError as err:  # a small test split may hold no answerable query: no metric
            print(f"note: no embedding arithmetic on {data.test.split}: {err}")
            return entries
        entries.append(EvalEntry(queries, ("arithmetic",), options={"arithmetic": arithmetic_options(queries, lam)}))
    return entries


def _target_data(config: FinetuneConfig, loaded: LoadedRun):
    """(training pairs, target evaluation entries) of the fine-tuning distribution: the shapes
    generator rendered for the model, or your files with their held-out part. Suites given in
    ``eval`` are the target evaluation instead."""
    suites = suite_entries(config.eval, loaded.transform)
    if config.data.source != "shapes":
        source = open_training_source(config.data.source, config.data, loaded.transform, config.train.seed)
        held = source.held_out
        if suites is not None:
            return source.train, suites
        if hasattr(held, "classnames"):
            return source.train, eval_entries([held] if config.eval.zeroshot else [], None, config.eval.robustness)
        return source.train, eval_entries([], held if config.eval.retrieval else None, config.eval.robustness)
    data = make_shapes(_rendered_for(config.data.shapes, loaded))
    return data.train, suites if suites is not None else _shapes_entries(data, config)


def _evaluate_both(model, loaded: LoadedRun, distributions: dict[str, list[EvalEntry]], config: FinetuneConfig, device,
                   plot_dir: Path | None, records: list | None = None):
    """Each distribution's ``eval`` section; the target's records are appended to ``records``."""
    out: dict[str, Any] = {}
    if not config.eval.enabled:
        return out
    for name, entries in distributions.items():
        out[name], recs = evaluate_entries(model, loaded.tokenizer, entries, config.eval.batch_size, device,
                                           None if plot_dir is None else plot_dir / name)
        if records is not None and name == "target":
            records.extend(recs)
    return out


def _save_weights_atomic(model: nn.Module, path: Path) -> None:
    atomic_write(path, lambda tmp: save_model(model, str(tmp)))


def _fix_temperature(model, temperature: float) -> None:
    """The high-temperature variant: the logit scale held at 1/temperature while fine-tuning
    (the same parameter, set and frozen: the checkpoint keeps its layout)."""
    scale = model.logit_scale
    if scale.max is not None and 1.0 / temperature > scale.max + 1e-9:
        raise ValueError(f"finetune.temperature: 1/{temperature} exceeds the model's maximum logit scale {scale.max}")
    with torch.no_grad():
        scale.log_scale.fill_(math.log(1.0 / temperature))
    scale.log_scale.requires_grad_(False)


def _loss(config: FinetuneConfig, model) -> nn.Module:
    """The contrastive loss, with the method's mixup terms on the model's topology."""
    loss_fn: nn.Module = build_loss(config, model.topology)
    if config.finetune.mixup_terms:
        loss_fn = M3MixLoss(model.topology, config.finetune.mixup_weights(), config.train.seed, loss_fn,
                            path=config.finetune.mix_path)
    return loss_fn


def lp_ft_configs(config: FinetuneConfig, total_steps: int) -> tuple[FinetuneConfig, FinetuneConfig]:
    """LP-FT's two stages out of one run of ``total_steps``: the probe's first ``lp_ratio`` of
    the steps at ``lp_lr`` (null: 10x the lr, as a linear probe takes a larger step), with plain
    contrastive loss; then full fine-tuning for the rest, with the method's mixups."""
    fc = config.finetune
    lp_steps = max(1, round(fc.lp_ratio * total_steps))
    if lp_steps >= total_steps:
        raise ValueError(f"finetune.lp_ratio: {fc.lp_ratio} of {total_steps} steps leaves none for fine-tuning")

    def stage(steps: int, **optim) -> FinetuneConfig:
        train = dataclasses.replace(config.train, steps=steps, epochs=None)
        warmup = config.optim.warmup_steps
        optim.setdefault("warmup_steps", None if warmup is None else min(warmup, steps))
        return dataclasses.replace(config, train=train, optim=dataclasses.replace(config.optim, **optim))

    lp = stage(lp_steps, lr=fc.lp_lr if fc.lp_lr is not None else 10 * config.optim.lr)
    lp = dataclasses.replace(lp, finetune=dataclasses.replace(fc, method="ft"))
    return lp, stage(total_steps - lp_steps)


def _linear_probe_stage(model, train_set, collate, config: FinetuneConfig, stage_dir: Path, device, info: DistInfo,
                        resume: bool, say) -> dict[str, Any]:
    """LP-FT's first stage: only the image projection (and the logit scale) train, on frozen
    image features -- a linear probe whose starting classifier is the zero-shot one (the class
    prompts' text embeddings, which the frozen text tower keeps). Its checkpoints live in
    ``stage_dir``; a finished stage is not trained again on resume."""
    trainable = {id(p) for p in [*model.image_head_parameters(), *model.logit_scale.parameters()]}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, was in flags:
        p.requires_grad_(was and id(p) in trainable)
    try:
        trainer = make_trainer(ContrastiveTask(model, _loss(config, model)), train_set, collate, config, stage_dir,
                               device, info)
        if resume and trainer.resume():
            say(f"linear probe: resuming {stage_dir} at step {trainer.step}/{trainer.total_steps}")
        say(f"linear probe: {trainer.total_steps} steps on the image projection "
            f"({sum(p.numel() for p in trainer.params) / 1e3:.1f}k parameters), then full fine-tuning")
        return trainer.fit().summary()
    finally:
        for p, was in flags:
            p.requires_grad_(was)


def run_finetune(config: FinetuneConfig, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one fine-tuning method (see the module docstring); writes and returns results.json.

    Under torchrun every process calls this: each trains its share of every batch (the
    contrastive term gathers the whole batch; mixup terms use each process's own pairs), and
    rank 0 evaluates and writes the results.
    """
    with process_group(config.train.device) as info, contextlib.ExitStack() as held:
        return _run_finetune(config, run_dir, info, held)


def _run_finetune(config: FinetuneConfig, run_dir: str | os.PathLike | None, info: DistInfo,
                  held: contextlib.ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir, resume, device, say, training_starts = start_run(config, run_dir, info, "finetune", held)

    seed_everything(config.train.seed)
    loaded = load_finetune_source(config, device)
    model = loaded.model
    train_set, target = _target_data(config, loaded)
    # Only the reference's test split is used; its splits are generated independently, so a
    # 2-pair training split leaves the test split unchanged and saves the rendering time.
    reference = make_shapes(_rendered_for(config.data.reference or loaded.reference, loaded, num_train=2))
    distributions = {"target": target, "reference": _shapes_entries(reference, config)}
    collate = make_collate(loaded.tokenizer)
    method = config.finetune.method
    plots = run_dir / PLOTS_DIR
    processes = f", {info.world_size} processes" if info.distributed else ""
    say(f"finetune {run_dir}: {method} from {loaded.description} on {model.topology.name}, device {device}{processes}")
    training_starts()  # the source, data and evaluation sets are open: from here on the directory stays

    results: dict[str, Any] = {"run_dir": str(run_dir), "method": method, "source": loaded.description, "models": {},
                               # the target is your suites: the summary adds a table per dataset
                               "target_suites": bool(config.eval.suites) or config.eval.suite_file is not None}
    if method == "embedding-shift" and not info.is_main:
        return results  # nothing to train: rank 0 measures and evaluates alone
    if config.finetune.eval_zero_shot and info.is_main:
        results["models"]["zero_shot"] = _evaluate_both(model, loaded, distributions, config, device, plots / "zero_shot")

    if method == "embedding-shift":
        gap = estimate_modality_gap(model, train_set, collate, config.eval.batch_size, config.finetune.gap_pairs, device)
        shifted = EmbeddingShiftModel(model, gap, config.finetune.shift)
        results["models"]["embedding_shift"] = _evaluate_both(shifted, loaded, distributions, config, device, plots / "embedding_shift")
        results["gap_norm"] = float(gap.norm())
    else:
        zero_shot_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if config.finetune.temperature is not None:
            _fix_temperature(model, config.finetune.temperature)
        base = config.finetune.base
        # eval.every: the target distribution's entries during fine-tuning (rank 0).
        evaluator = periodic_evaluator(model, loaded.tokenizer, target, None, collate, config, device)
        trainer = make_trainer(ContrastiveTask(model, _loss(config, model)), train_set, collate, config, run_dir, device, info,
                               evaluator)
        if base == "lp-ft":
            lp_config, ft_config = lp_ft_configs(config, trainer.total_steps)
            results["train_lp"] = _linear_probe_stage(model, train_set, collate, lp_config, run_dir / LP_DIR, device, info,
                                                      resume, say)
            trainer = make_trainer(ContrastiveTask(model, _loss(ft_config, model)), train_set, collate, ft_config, run_dir,
                                   device, info, evaluator)
        if resume and trainer.resume():
            finished = finished_results(trainer, run_dir, say)
            if finished is not None:
                return finished
            say(f"resuming {run_dir} at step {trainer.step}/{trainer.total_steps}")
        results["train"] = trainer.fit().summary()
        if not info.is_main:
            return results  # rank 0 evaluates and writes results.json
        records: list = []
        results["models"]["finetuned"] = _evaluate_both(model, loaded, distributions, config, device, plots / "finetuned", records)
        write_records(run_dir / RECORDS_FILE, records, model, str(run_dir))
        if base == "wise-ft":
            wise = copy.deepcopy(model)
            wise.load_state_dict(interpolate_weights(zero_shot_state, model.state_dict(), config.finetune.wise_alpha))
            _save_weights_atomic(wise, run_dir / WISE_DIR / "model.safetensors")
            results["wise_alpha"] = config.finetune.wise_alpha
            results["models"]["wise_ft"] = _evaluate_both(wise, loaded, distributions, config, device, plots / "wise_ft")
    record_skips(results, train_set, *(e for entries in distributions.values() for e in entries), say=say)
    results["total_seconds"] = time.perf_counter() - started
    atomic_write_json(run_dir / RESULTS_FILE, results)
    print(format_finetune_table({method: results}))
    print(f"results: {run_dir / RESULTS_FILE}")
    return results


# --------------------------------------------------------------------------------- the table

_LABELS = {"ft": "FT", "lp-ft": "LP-FT", "wise-ft": "WiSE-FT", "embedding-shift": "embedding shift", "m2mix": "m²-Mix",
           "vmix": "V-Mix", "lmix": "L-Mix", "vlmix": "VL-Mix", "m3mix": "m³-Mix"}


def model_label(method: str, model: str = "finetuned") -> str:
    """The paper's name of one model of a method's run: "m²-Mix", "LP-FT w/ m²-Mix", "WiSE-FT
    w/ m²-Mix" (the interpolated model of wise-ft+m2mix; its fine-tuned one is "m²-Mix")."""
    if model == "zero_shot":
        return "zero-shot"
    if model == "embedding_shift":
        return "embedding shift"
    base, mixups = split_method(method)
    if base == "wise-ft" and model != "wise_ft":
        base = "ft"
    mixed = " + ".join(_LABELS[m] for m in mixups)
    if base == "ft" and mixups:
        return mixed
    return f"{_LABELS[base]} w/ {mixed}" if mixups else _LABELS[base]


def _cells(evaluation: dict) -> list[float]:
    retrieval = evaluation.get("retrieval", {})
    zeroshot = evaluation.get("zeroshot", {})
    robust = evaluation.get("robustness", {})
    calib = robust.get("calibration", {})
    geometry = robust.get("geometry", {})
    ece = [calib[k] for k in sorted(calib) if k.startswith("i2t_ece_")]
    nan = float("nan")
    arithmetic = evaluation.get("arithmetic", {})
    return [
        100 * retrieval.get("i2t_R@1", nan),
        100 * retrieval.get("t2i_R@1", nan),
        100 * sum(m["top1"] for m in zeroshot.values()) / len(zeroshot) if zeroshot else nan,
        100 * ece[-1] if ece else nan,
        geometry.get("uniformity", nan),
        geometry.get("alignment", nan),
        geometry.get("modality_gap", nan),
        100 * arithmetic.get("r1", nan),
    ]


def format_finetune_table(results_by_method: dict[str, dict]) -> str:
    """A Markdown table: one row per model (zero-shot, each method's fine-tuned model,
    WiSE-FT, embedding shift), columns for the target and the reference distribution."""
    columns = ["I→T R@1", "T→I R@1", "zero-shot acc", "ECE I→T", "uniformity", "alignment", "gap", "SIMAT R@1"]
    header = "| model | " + " | ".join(f"target {c}" for c in columns) + " | " + " | ".join(f"reference {c}" for c in columns) + " |"
    lines = [header, "|---|" + "---:|" * (2 * len(columns))]
    seen_zero_shot = False
    for method, results in results_by_method.items():
        for key, evaluation in results.get("models", {}).items():
            if key == "zero_shot":
                if seen_zero_shot:
                    continue
                seen_zero_shot = True
            label = model_label(method, key)
            cells = _cells(evaluation.get("target", {})) + _cells(evaluation.get("reference", {}))
            formats = ["{:.1f}", "{:.1f}", "{:.1f}", "{:.2f}", "{:.3f}", "{:.3f}", "{:.3f}", "{:.1f}"] * 2
            lines.append(f"| {label} | " + " | ".join(f.format(c) for f, c in zip(formats, cells)) + " |")
    datasets = _dataset_table(results_by_method)
    return "\n".join(lines) + (f"\n\nTarget datasets (%):\n\n{datasets}" if datasets else "")


# A suite's headline metric per task, as the per-dataset table shows it.
_HEADLINES = {"zeroshot": ("top1",), "retrieval": ("i2t_R@1", "t2i_R@1"), "linear_probe": ("top1",), "arithmetic": ("r1",)}


def dataset_headlines(evaluation: dict) -> dict[str, float]:
    """``{"<dataset> <metric>": value}`` of an ``eval`` section whose tasks ran on several
    datasets (suites: keyed by dataset); empty when each task ran on one."""
    out: dict[str, float] = {}
    for task, metrics in _HEADLINES.items():
        section = evaluation.get(task) or {}
        if not section:
            continue
        if any(m in section for m in metrics):  # one dataset: the main table has all but the probe
            if task == "linear_probe":
                out["linear probe top1"] = section["top1"]
            continue
        for dataset, values in section.items():
            for metric in metrics:
                if isinstance(values, dict) and metric in values:
                    out[f"{dataset} {metric}"] = values[metric]
    return out


def _dataset_table(results_by_method: dict[str, dict]) -> str:
    """Models x (dataset, headline metric) of the target, when it is several datasets (suites:
    a few-shot set's test folder and its shifted folders, say)."""
    rows, seen_zero_shot = [], False
    for method, results in results_by_method.items():
        if not results.get("target_suites"):
            continue
        for key, evaluation in results.get("models", {}).items():
            if key == "zero_shot":
                if seen_zero_shot:
                    continue
                seen_zero_shot = True
            cells = dataset_headlines(evaluation.get("target", {}))
            if cells:
                rows.append((model_label(method, key), cells))
    if not rows:
        return ""
    columns = list(dict.fromkeys(c for _, cells in rows for c in cells))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(f"{100 * cells[c]:.1f}" if c in cells else "–" for c in columns) + " |")
    return "\n".join(lines)
