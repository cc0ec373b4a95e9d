"""A run from config to results: data -> tokenizer -> model -> Trainer -> evaluation -> JSON.

A run directory holds::

    config.yaml          the validated config the run was started with (resume reads it)
    tokenizer/           the tokenizer (trained on the training captions unless given)
    checkpoints/         step_<N>/ {model.safetensors, state.pt, config.json}
    log.jsonl            one line per step
    tensorboard/         the same scalars for TensorBoard
    results.json         zero-shot and retrieval metrics after training
    plots/               reliability diagrams and the mixup-hardness histogram (eval.robustness)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from topoclip.data import (
    ClassificationSet,
    ImageFolderClassification,
    KarpathyRetrieval,
    RetrievalSet,
    ShapesData,
    TextTokenizer,
    build_tokenizer,
    make_collate,
    make_shapes,
)
from topoclip.eval import evaluate_retrieval, evaluate_robustness, zeroshot_classify
from topoclip.losses import ContrastiveLoss
from topoclip.data.shapes import ShapesConfig
from topoclip.models import build_model

from topoclip.atomic import atomic_write_json
from topoclip.config import ExperimentConfig, load_config, save_config
from topoclip.dataclass_io import apply_overrides, from_dict, to_dict
from topoclip.devices import resolve_device
from topoclip.engine.distributed import DistInfo, barrier, broadcast_object, process_group
from topoclip.engine.trainer import Trainer, TrainResult, seed_everything
from topoclip.runs import (
    CONFIG_FILE,
    PLOTS_DIR,
    RESULTS_FILE,
    TOKENIZER_DIR,
    latest_checkpoint,
    load_run,
    resolve_checkpoint,
    write_run_info,
)

__all__ = ["run", "build_loss", "evaluate", "evaluate_checkpoint", "shapes_eval_sets", "prepare_run_dir", "format_summary"]


def prepare_run_dir(config: ExperimentConfig, run_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """``(run_dir, resume)``: where the run lives and whether it continues a checkpoint.

    A fresh run never writes into a non-empty directory: ``runs/default`` becomes
    ``runs/default-1`` and so on.
    """
    if run_dir is not None:
        run_dir = Path(run_dir)
        return run_dir, latest_checkpoint(run_dir) is not None
    base = Path(config.output.dir) / (config.output.name or "run")
    if config.train.resume:
        return base, latest_checkpoint(base) is not None
    candidate, i = base, 0
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    return candidate, False


def _tokenizer(config: ExperimentConfig, data: ShapesData, run_dir: Path) -> TextTokenizer:
    saved = run_dir / TOKENIZER_DIR
    if saved.is_dir():
        return TextTokenizer.load(saved)
    context_length = config.model.text.context_length
    if config.data.tokenizer is not None:
        tokenizer = TextTokenizer.load(config.data.tokenizer, context_length=context_length)
    else:
        if config.data.source == "shards":
            from topoclip.data.shards import shard_captions

            captions = shard_captions(config.data.shards.urls, limit=config.data.shards.tokenizer_captions)
        else:
            captions = data.captions("train")
        tokenizer = build_tokenizer(captions, config.data.vocab_size, context_length)
    tokenizer.save(saved)
    return tokenizer


def build_components(config: ExperimentConfig, run_dir: Path):
    """Data, tokenizer and model of a run, in a fixed order from a fixed seed.

    With ``data.source: shards`` the embedded data serves evaluation only (its training split
    is cut to 2 pairs; the test splits do not depend on it)."""
    seed_everything(config.train.seed)
    shapes = config.data.shapes
    if config.data.source == "shards":
        shapes = dataclasses.replace(shapes, num_train=2)
    data = make_shapes(shapes)
    tokenizer = _tokenizer(config, data, run_dir)
    model = build_model(config.model, config.topology.build(), vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)
    return data, tokenizer, model


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[ClassificationSet],
    retrieval_set: RetrievalSet | None,
    batch_size: int,
    device: torch.device,
    robustness: bool = True,
    plot_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy on each classification task and recall on the retrieval set; with
    ``robustness`` also calibration, geometry and mixup hardness on the retrieval set (its
    PNG plots go to ``plot_dir`` when given)."""
    results: dict[str, Any] = {}
    if tasks:
        results["zeroshot"] = {
            task.name: zeroshot_classify(model, task, tokenizer, batch_size=batch_size, device=device) for task in tasks
        }
    if retrieval_set is not None:
        results["retrieval"] = evaluate_retrieval(model, retrieval_set, tokenizer, batch_size=batch_size, device=device)
        if robustness:
            results["robustness"] = evaluate_robustness(
                model, retrieval_set, tokenizer, batch_size=batch_size, device=device, plot_dir=plot_dir
            )
    return results


def shapes_eval_sets(data: ShapesData, config: ExperimentConfig) -> tuple[list[ClassificationSet], RetrievalSet | None]:
    """The embedded data's test-split zero-shot tasks and retrieval set, as the config asks."""
    tasks = data.zeroshot_tasks("test") if config.eval.zeroshot else []
    return tasks, (data.retrieval_set("test") if config.eval.retrieval else None)


def format_summary(results: dict[str, Any]) -> str:
    """A short table of the headline numbers."""
    lines = []
    train = results.get("train")
    if train:
        total = f" ({results['total_seconds']:.0f}s in all)" if "total_seconds" in results else ""
        lines.append(
            f"trained {train['steps']} steps in {train['seconds']:.0f}s{total}; final loss {train['final_loss']:.3f}, "
            f"scale {train['final_scale']:.2f}, skipped steps {train['skipped_steps']}"
        )
    zeroshot = results.get("eval", {}).get("zeroshot", {})
    if zeroshot:
        lines.append(f"{'zero-shot task':<16}{'top1':>8}{'top5':>8}")
        for name, metrics in zeroshot.items():
            lines.append(f"{name:<16}{100 * metrics['top1']:>7.1f}%{100 * metrics.get('top5', float('nan')):>7.1f}%")
    retrieval = results.get("eval", {}).get("retrieval", {})
    if retrieval:
        lines.append(f"{'retrieval':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
        for direction in ("i2t", "t2i"):
            cells = "".join(f"{100 * retrieval.get(f'{direction}_R@{k}', float('nan')):>7.1f}%" for k in (1, 5, 10))
            lines.append(f"{direction:<16}{cells}")
    robustness = results.get("eval", {}).get("robustness", {})
    if robustness:
        def num(x):  # None: a non-finite value made JSON-safe
            return "n/a" if x is None else f"{x:.3f}"

        cal, geo, hard = robustness["calibration"], robustness["geometry"], robustness["hardness"]
        b = cal["reliability_bins"]
        lines.append(f"{'ECE (' + str(b) + ' bins)':<16}i2t {num(cal[f'i2t_ece_{b}'])}  t2i {num(cal[f't2i_ece_{b}'])}")
        lines.append(
            f"{'geometry':<16}align {num(geo['alignment'])}  unif {num(geo['uniformity'])}  "
            f"gap {num(geo['modality_gap'])}  (lower is better)"
        )
        lines.append(
            f"{'mixup hardness':<16}similarity to positives {num(hard['mean_positive'])}, original negatives "
            f"{num(hard['mean_original'])}, mixed negatives {num(hard['mean_mixed'])} (lam {hard['lam']:g})"
        )
    return "\n".join(lines)


def _config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys


def build_loss(config: ExperimentConfig, topology) -> ContrastiveLoss:
    """The run's contrastive loss: ``train.local_loss`` and the ``loss`` section's tiling."""
    return ContrastiveLoss(
        topology,
        local_loss=config.train.local_loss,
        tile_threshold=config.loss.tile_threshold,
        tile_size=config.loss.tile_size,
    )


def _shard_stream(config: ExperimentConfig, info: DistInfo):
    from topoclip.data.shards import ShardStream
    from topoclip.data.transforms import ImageTransform

    sc, shapes = config.data.shards, config.data.shapes
    return ShardStream(
        sc.urls,
        epoch_length=sc.epoch_length,
        batch_size=config.train.batch_size,
        transform=ImageTransform(shapes.image_size, shapes.mean, shapes.std),
        shuffle_buffer=sc.shuffle_buffer,
        resampled=sc.resample,
        seed=config.train.seed,
        rank=info.rank,
        world=info.world_size,
        strict=sc.strict,
    )


def run(config: ExperimentConfig, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or continue) a run, evaluate it and write ``results.json``; returns the results.

    Under torchrun (or srun) every process calls this: it joins the process group, trains
    its share of each batch, and rank 0 evaluates and writes the results (the other ranks
    return the training summary only).
    """
    with process_group(config.train.device) as info:
        return _run(config, run_dir, info)


def start_run(config, run_dir: str | os.PathLike | None, info: DistInfo, record_config: Callable[[Path, bool], None]):
    """What every process of a run does first: threads, device, and the run directory.

    Rank 0 picks and prepares the directory (a fresh run's "-1" suffix must not be decided by
    each rank after another one has already written into it) and calls ``record_config(run_dir,
    resume)``; the others receive the choice. Returns ``(run_dir, resume, device, say)``, where
    ``say`` prints on rank 0 only.
    """
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    device = info.device if info.distributed else resolve_device(config.train.device)
    if info.is_main:
        run_dir, resume = prepare_run_dir(config, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record_config(run_dir, resume)
    run_dir, resume = broadcast_object((run_dir, resume) if info.is_main else None, info)
    say = print if info.is_main else (lambda *args, **kwargs: None)
    return run_dir, resume, device, say


def _record_training_config(config: ExperimentConfig) -> Callable[[Path, bool], None]:
    """Save the config of a fresh run; warn when a resumed run's config has changed."""

    def record(run_dir: Path, resume: bool) -> None:
        saved_config = run_dir / CONFIG_FILE
        if resume and saved_config.is_file():
            changed = [
                k for k in _config_differences(to_dict(load_config(saved_config)), to_dict(config)) if k != "train.resume"
            ]
            if changed:
                print(f"warning: resuming with a config that differs from the run's in: {', '.join(changed)}")
        else:
            save_config(config, saved_config)
            write_run_info(run_dir, "pretrain")

    return record


def _run(config: ExperimentConfig, run_dir: str | os.PathLike | None, info: DistInfo) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir, resume, device, say = start_run(config, run_dir, info, _record_training_config(config))

    # Rank 0 builds first and saves the tokenizer; the others then load that one (training a
    # WordPiece twice need not give the same vocabulary).
    if not info.is_main:
        barrier(info)
    data, tokenizer, model = build_components(config, run_dir)
    if info.is_main:
        barrier(info)
    loss_fn = build_loss(config, model.topology)
    train_set = _shard_stream(config, info) if config.data.source == "shards" else data.train
    trainer = Trainer(
        model, loss_fn, train_set, make_collate(tokenizer), config, run_dir, device=device, dist_info=info
    )
    if resume:
        trainer.resume()
        say(f"resuming {run_dir} at step {trainer.step}/{trainer.total_steps}")
    num_params = sum(p.numel() for p in model.parameters())
    processes = f", {info.world_size} processes" if info.distributed else ""
    say(
        f"run {run_dir}: {config.topology.name} (d={model.topology.dim}, k={config.model.num_tokens}), "
        f"{num_params / 1e6:.2f}M parameters, {trainer.num_items} training pairs per epoch, device {device}{processes}"
    )
    result: TrainResult = trainer.fit()
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "train": {
            "steps": result.steps,
            "skipped_steps": result.skipped_steps,
            "resumed_from": result.resumed_from,
            "final_loss": result.final_loss,
            "final_scale": result.final_scale,
            "seconds": result.train_seconds,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        },
    }
    if not info.is_main:
        return results  # rank 0 evaluates and writes results.json
    if config.eval.enabled:
        start = time.perf_counter()
        tasks, retrieval_set = shapes_eval_sets(data, config)
        results["eval"] = evaluate(
            model, tokenizer, tasks, retrieval_set, config.eval.batch_size, device,
            robustness=config.eval.robustness, plot_dir=run_dir / PLOTS_DIR,
        )
        results["eval"]["seconds"] = time.perf_counter() - start
    results["total_seconds"] = time.perf_counter() - started  # data + model + training + evaluation
    atomic_write_json(run_dir / RESULTS_FILE, results)
    print(format_summary(results))
    print(f"results: {run_dir / RESULTS_FILE}")
    return results


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_overrides: Sequence[str] = (),
    output: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    folders: Sequence[str | os.PathLike] = (),
    karpathy: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Evaluate a saved model and write the results JSON.

    Without ``folders``/``karpathy`` it evaluates on the embedded data of its config (with
    ``data.*`` overrides applied). ``folders``: image-folder classification sets for
    zero-shot; ``karpathy``: a Karpathy-style JSON retrieval set whose images are under
    ``image_root``. Real images are resized to the size the model was trained on.
    Robustness plots (``eval.robustness``) go to ``<output stem>_plots/`` beside the JSON.
    """
    ckpt = resolve_checkpoint(checkpoint)
    for text in data_overrides:
        if not text.startswith("data.shapes."):
            raise ValueError(f"--data {text}: data overrides must start with data.shapes., e.g. data.shapes.noise=0.0")
    if karpathy is not None and image_root is None:
        raise ValueError("--image-root: needed with --karpathy (the directory the JSON's file names are under)")
    # A trained or a fine-tuned run: the model, its tokenizer and the data it was trained on.
    loaded = load_run(ckpt)
    model, tokenizer, eval_config = loaded.model, loaded.tokenizer, loaded.eval
    bs = batch_size if batch_size is not None else eval_config.batch_size
    if bs < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {bs}")

    if folders or karpathy is not None:
        image = dict(image_size=loaded.image_size, mean=loaded.mean, std=loaded.std)
        # verify: drop unreadable files up front, so every image is evaluated once under its own label.
        tasks = [ImageFolderClassification(folder, verify=True, **image) for folder in folders]
        retrieval_set = KarpathyRetrieval(karpathy, image_root, split, **image) if karpathy is not None else None
    else:
        shapes = apply_overrides({"shapes": to_dict(loaded.data or loaded.reference)}, [t[len("data."):] for t in data_overrides])
        data = make_shapes(from_dict(ShapesConfig, shapes["shapes"], "data.shapes"))
        tasks = data.zeroshot_tasks("test") if eval_config.zeroshot else []
        retrieval_set = data.retrieval_set("test") if eval_config.retrieval else None

    dev = resolve_device(device)
    model.to(dev)
    out = Path(output) if output is not None else ckpt.parent.parent / "eval_results.json"
    # <stem>_plots beside the JSON: never overwrites the training run's own plots/.
    plot_dir = out.parent / f"{out.stem}_plots"
    results = {
        "checkpoint": str(ckpt),
        "eval": evaluate(
            model, tokenizer, tasks, retrieval_set, bs, dev, robustness=eval_config.robustness, plot_dir=plot_dir
        ),
    }
    atomic_write_json(out, results)
    print(format_summary(results))
    print(f"results: {out}")
    return results
