"""``topoclip train``: config -> data, tokenizer, model -> engine -> evaluation -> results.json.

The run directory's layout is ``topoclip.runs.layout``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from topoclip.atomic import atomic_write_json
from topoclip.config import ExperimentConfig
from topoclip.data import ImageTransform, ShapesData, TextTokenizer, build_tokenizer, make_collate, make_shapes
from topoclip.data.sources import TrainingSource, held_out_pairs, open_training_source
from topoclip.engine.distributed import DistInfo, barrier, process_group
from topoclip.engine.task import ContrastiveTask
from topoclip.engine.trainer import seed_everything
from topoclip.eval import EvalEntry
from topoclip.models import build_model
from topoclip.runs import PLOTS_DIR, RECORDS_FILE, RESULTS_FILE, TOKENIZER_DIR

from .common import build_loss, finished_results, make_trainer, periodic_evaluator, record_skips, start_run
from .evaluate import eval_entries, evaluate_entries, format_summary, shapes_eval_sets, suite_entries, write_records

__all__ = ["run", "RunData", "open_data", "build_components"]


def run(config: ExperimentConfig, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or continue) a run, evaluate it and write ``results.json``; returns the results.

    Under torchrun (or srun) every process calls this: it joins the process group, trains
    its share of each batch, and rank 0 evaluates and writes the results (the other ranks
    return the training summary only).
    """
    with process_group(config.train.device) as info, contextlib.ExitStack() as held:
        return _run(config, run_dir, info, held)


@dataclass
class RunData:
    """The data of a pretraining run: the embedded shapes (the training data for ``shapes``,
    the evaluation data for ``shards``; for file sources only what a shapes suite needs) and,
    for ``csv`` / ``folder`` / ``karpathy``, the opened file source with its held-out part."""

    shapes: ShapesData
    source: TrainingSource | None = None

    def captions(self, config: ExperimentConfig) -> list[str]:
        """The captions the tokenizer is trained on."""
        if config.data.source == "shards":
            from topoclip.data.shards import shard_captions

            shards = config.data.shards
            return shard_captions(shards.urls, limit=shards.tokenizer_captions, encoding=shards.encoding, strict=shards.strict)
        return self.source.captions if self.source is not None else self.shapes.captions("train")

    def val_pairs(self, config: ExperimentConfig):
        """Held-out (image, caption) pairs for the validation loss: the shapes' validation
        split, or a file source's held-out part; None for shards (no split of theirs is held out)."""
        if self.source is not None:
            return held_out_pairs(self.source.held_out)
        return None if config.data.source == "shards" else self.shapes.val

    def eval_sets(self, eval_config) -> tuple[list, object]:
        """(zero-shot sets, retrieval set) the run is evaluated on when no suite is given."""
        if self.source is None:
            return shapes_eval_sets(self.shapes, eval_config)
        held = self.source.held_out
        if hasattr(held, "classnames"):
            return ([held] if eval_config.zeroshot else []), None
        return [], (held if eval_config.retrieval else None)


def open_data(config: ExperimentConfig) -> RunData:
    """The run's data. Only a ``shapes`` run renders the 20,000 training images; the test
    splits are generated independently, so a 2-pair training split leaves them unchanged."""
    shapes = config.data.shapes
    if config.data.source != "shapes":
        shapes = dataclasses.replace(shapes, num_train=2)
    data = RunData(make_shapes(shapes))
    if config.data.source in ("csv", "folder", "karpathy"):
        transform = ImageTransform(shapes.image_size, shapes.mean, shapes.std)
        data.source = open_training_source(config.data.source, config.data, transform, config.train.seed)
    return data


def _tokenizer(config: ExperimentConfig, data: RunData, run_dir: Path) -> TextTokenizer:
    saved = run_dir / TOKENIZER_DIR
    if saved.is_dir():
        return TextTokenizer.load(saved)
    context_length = config.model.text.context_length
    if config.data.tokenizer is not None:
        tokenizer = TextTokenizer.load(config.data.tokenizer, context_length=context_length)
    else:
        tokenizer = build_tokenizer(data.captions(config), config.data.vocab_size, context_length)
    tokenizer.save(saved)
    return tokenizer


def build_components(config: ExperimentConfig, run_dir: Path) -> tuple[RunData, TextTokenizer, nn.Module]:
    """Data, tokenizer and model of a run, in a fixed order from a fixed seed."""
    seed_everything(config.train.seed)
    data = open_data(config)
    tokenizer = _tokenizer(config, data, run_dir)
    model = build_model(config.model, config.topology.build(), vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)
    return data, tokenizer, model


def _eval_entries(config: ExperimentConfig, data: RunData) -> list[EvalEntry]:
    shapes = config.data.shapes
    suites = suite_entries(config.eval, ImageTransform(shapes.image_size, shapes.mean, shapes.std))
    return suites if suites is not None else eval_entries(*data.eval_sets(config.eval), config.eval.robustness)


def _train_set(config: ExperimentConfig, data: RunData, info: DistInfo):
    if config.data.source == "shards":
        return _shard_stream(config, info)
    return data.source.train if data.source is not None else data.shapes.train


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
        encoding=sc.encoding,
    )


def _run(config: ExperimentConfig, run_dir: str | os.PathLike | None, info: DistInfo,
         held: contextlib.ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir, resume, device, say, training_starts = start_run(config, run_dir, info, "pretrain", held)

    # Rank 0 builds first and saves the tokenizer; the others then load that one (training a
    # WordPiece twice need not give the same vocabulary).
    if not info.is_main:
        barrier(info)
    data, tokenizer, model = build_components(config, run_dir)
    if info.is_main:
        barrier(info)
    # Suites are opened (and their images checked) before training: a bad file fails now.
    entries = _eval_entries(config, data) if config.eval.enabled and info.is_main else []
    train_set = _train_set(config, data, info)
    task = ContrastiveTask(model, build_loss(config, model.topology))
    collate = make_collate(tokenizer, trim_padding=True)  # topoclip's text tower masks padding
    evaluator = periodic_evaluator(model, tokenizer, entries, data.val_pairs(config), collate, config, device)
    trainer = make_trainer(task, train_set, collate, config, run_dir, device, info, evaluator)
    training_starts()  # data, tokenizer, model and trainer are set up: from here on the directory stays
    if resume:
        trainer.resume()
        finished = finished_results(trainer, run_dir, say)
        if finished is not None:
            return finished
        say(f"resuming {run_dir} at step {trainer.step}/{trainer.total_steps}")
    num_params = sum(p.numel() for p in model.parameters())
    processes = f", {info.world_size} processes" if info.distributed else ""
    say(
        f"run {run_dir}: {config.topology.name} (d={model.topology.dim}, k={config.model.num_tokens}), "
        f"{num_params / 1e6:.2f}M parameters, {trainer.num_items} training pairs per epoch, device {device}"
        f"{'' if trainer.precision == 'fp32' else f' ({trainer.precision} autocast)'}{processes}"
    )
    results: dict[str, Any] = {"run_dir": str(run_dir), "train": trainer.fit().summary()}
    if not info.is_main:
        return results  # rank 0 evaluates and writes results.json
    if config.eval.enabled:
        start = time.perf_counter()
        results["eval"], records = evaluate_entries(model, tokenizer, entries, config.eval.batch_size, device, run_dir / PLOTS_DIR)
        results["eval"]["seconds"] = time.perf_counter() - start
        write_records(run_dir / RECORDS_FILE, records, model, str(run_dir))
    record_skips(results, train_set, data.source and data.source.held_out, *entries, say=say)
    results["total_seconds"] = time.perf_counter() - started  # data + model + training + evaluation
    atomic_write_json(run_dir / RESULTS_FILE, results)
    print(format_summary(results))
    print(f"results: {run_dir / RESULTS_FILE}")
    return results
