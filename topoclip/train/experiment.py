"""A run from config to results: data -> tokenizer -> model -> Trainer -> evaluation -> JSON.

A run directory holds::

    config.yaml          the validated config the run was started with (resume reads it)
    tokenizer/           the tokenizer (trained on the training captions unless given)
    checkpoints/         step_<N>/ {model.safetensors, state.pt, config.json}
    log.jsonl            one line per step
    tensorboard/         the same scalars for TensorBoard
    results.json         zero-shot and retrieval metrics after training
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

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
from topoclip.eval import evaluate_retrieval, zeroshot_classify
from topoclip.losses import ContrastiveLoss
from topoclip.models import build_model

from .checkpoint import latest_checkpoint, load_weights, read_checkpoint_config, resolve_checkpoint
from .config import RUN_CONFIG_FILE, ExperimentConfig, config_from_dict, save_config
from .dataclass_io import apply_overrides, to_dict
from .trainer import Trainer, TrainResult, seed_everything

__all__ = ["run", "evaluate", "evaluate_checkpoint", "shapes_eval_sets", "prepare_run_dir", "resolve_device", "format_summary"]

TOKENIZER_DIR = "tokenizer"
RESULTS_FILE = "results.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        tokenizer = build_tokenizer(data.captions("train"), config.data.vocab_size, context_length)
    tokenizer.save(saved)
    return tokenizer


def build_components(config: ExperimentConfig, run_dir: Path):
    """Data, tokenizer and model of a run, in a fixed order from a fixed seed."""
    seed_everything(config.train.seed)
    data = make_shapes(config.data.shapes)
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
) -> dict[str, Any]:
    """Zero-shot accuracy on each classification task and recall on the retrieval set."""
    results: dict[str, Any] = {}
    if tasks:
        results["zeroshot"] = {
            task.name: zeroshot_classify(model, task, tokenizer, batch_size=batch_size, device=device) for task in tasks
        }
    if retrieval_set is not None:
        results["retrieval"] = evaluate_retrieval(model, retrieval_set, tokenizer, batch_size=batch_size, device=device)
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
    return "\n".join(lines)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys


def run(config: ExperimentConfig, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or continue) a run, evaluate it and write ``results.json``; returns the results."""
    started = time.perf_counter()
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    run_dir, resume = prepare_run_dir(config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_config = run_dir / RUN_CONFIG_FILE
    if resume and saved_config.is_file():
        from .config import load_config

        changed = [
            k for k in _config_differences(to_dict(load_config(saved_config)), to_dict(config)) if k != "train.resume"
        ]
        if changed:
            print(f"warning: resuming with a config that differs from the run's in: {', '.join(changed)}")
    else:
        save_config(config, saved_config)

    data, tokenizer, model = build_components(config, run_dir)
    trainer = Trainer(
        model, ContrastiveLoss(model.topology), data.train, make_collate(tokenizer), config, run_dir, device=device
    )
    if resume:
        trainer.resume()
        print(f"resuming {run_dir} at step {trainer.step}/{trainer.total_steps}")
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"run {run_dir}: {config.topology.name} (d={model.topology.dim}, k={config.model.num_tokens}), "
        f"{num_params / 1e6:.2f}M parameters, {len(data.train)} training pairs, device {device}"
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
    if config.eval.enabled:
        start = time.perf_counter()
        tasks, retrieval_set = shapes_eval_sets(data, config)
        results["eval"] = evaluate(model, tokenizer, tasks, retrieval_set, config.eval.batch_size, device)
        results["eval"]["seconds"] = time.perf_counter() - start
    results["total_seconds"] = time.perf_counter() - started  # data + model + training + evaluation
    _write_json(run_dir / RESULTS_FILE, results)
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
    """
    ckpt = resolve_checkpoint(checkpoint)
    for text in data_overrides:
        if not text.startswith("data."):
            raise ValueError(f"--data {text}: data overrides must start with data., e.g. data.shapes.noise=0.0")
    if karpathy is not None and image_root is None:
        raise ValueError("--image-root: needed with --karpathy (the directory the JSON's file names are under)")
    config = config_from_dict(apply_overrides(read_checkpoint_config(ckpt), list(data_overrides)))
    bs = batch_size if batch_size is not None else config.eval.batch_size
    if bs < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {bs}")
    tokenizer_dir = ckpt.parent.parent / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise ValueError(f"checkpoint: no tokenizer directory at {tokenizer_dir}")

    if folders or karpathy is not None:
        shapes = config.data.shapes
        image = dict(image_size=shapes.image_size, mean=shapes.mean, std=shapes.std)
        # verify: drop unreadable files up front, so every image is evaluated once under its own label.
        tasks = [ImageFolderClassification(folder, verify=True, **image) for folder in folders]
        retrieval_set = KarpathyRetrieval(karpathy, image_root, split, **image) if karpathy is not None else None
    else:
        tasks, retrieval_set = shapes_eval_sets(make_shapes(config.data.shapes), config)

    tokenizer = TextTokenizer.load(tokenizer_dir)
    model = build_model(config.model, config.topology.build(), vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)
    load_weights(model, ckpt)
    dev = resolve_device(device)
    model.to(dev)
    results = {"checkpoint": str(ckpt), "eval": evaluate(model, tokenizer, tasks, retrieval_set, bs, dev)}
    out = Path(output) if output is not None else ckpt.parent.parent / "eval_results.json"
    _write_json(out, results)
    print(format_summary(results))
    print(f"results: {out}")
    return results
