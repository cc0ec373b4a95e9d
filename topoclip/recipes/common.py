"""What every recipe does around the engine: choose and prepare the run directory, build the
contrastive loss from the config, and hand the engine its training settings."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from topoclip.config import RunSettings, read_config_file, save_config
from topoclip.dataclass_io import config_differences, to_dict
from topoclip.devices import resolve_device
from topoclip.engine.distributed import DistInfo, broadcast_object
from topoclip.engine.settings import TrainingSettings
from topoclip.engine.trainer import BestRule, Trainer
from topoclip.eval import flat_metrics, run_evaluation
from topoclip.eval.validation import validation_loss
from topoclip.losses import ContrastiveLoss, SigmoidLoss
from topoclip.runs import CONFIG_FILE, RESULTS_FILE, latest_checkpoint, write_run_info

__all__ = ["prepare_run_dir", "record_run", "start_run", "build_loss", "make_trainer", "periodic_evaluator",
           "finished_results"]


def prepare_run_dir(config: RunSettings, run_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
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


def record_run(run_dir: Path, resume: bool, config: RunSettings, kind: str) -> None:
    """A fresh run saves its config and its kind; a resumed one keeps the saved config and
    warns about every field the new one changes."""
    saved_config = run_dir / CONFIG_FILE
    if resume and saved_config.is_file():
        changed = config_differences(read_config_file(saved_config), to_dict(config), ignore=("train.resume",))
        if changed:
            print(f"warning: resuming with a config that differs from the run's in: {', '.join(changed)}")
    else:
        save_config(config, saved_config)
        write_run_info(run_dir, kind)


def start_run(config: RunSettings, run_dir: str | os.PathLike | None, info: DistInfo, kind: str):
    """What every process of a run does first: threads, device, and the run directory.

    Rank 0 picks and prepares the directory (a fresh run's "-1" suffix must not be decided by
    each rank after another one has already written into it) and records the run
    (``record_run``); the others receive the choice. Returns ``(run_dir, resume, device, say)``,
    where ``say`` prints on rank 0 only.
    """
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    device = info.device if info.distributed else resolve_device(config.train.device)
    if info.is_main:
        run_dir, resume = prepare_run_dir(config, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record_run(run_dir, resume, config, kind)
    run_dir, resume = broadcast_object((run_dir, resume) if info.is_main else None, info)
    say = print if info.is_main else (lambda *args, **kwargs: None)
    return run_dir, resume, device, say


def build_loss(config: RunSettings, topology) -> torch.nn.Module:
    """The run's loss: ``loss.kind`` (softmax: with ``train.local_loss``; sigmoid: always the
    local rows against every rank's texts), the ``loss`` section's tiling, and MERU's
    entailment term when ``loss.entailment`` > 0."""
    if config.loss.kind == "sigmoid":
        loss = SigmoidLoss(topology, tile_threshold=config.loss.tile_threshold, tile_size=config.loss.tile_size)
    else:
        loss = ContrastiveLoss(
            topology,
            local_loss=config.train.local_loss,
            tile_threshold=config.loss.tile_threshold,
            tile_size=config.loss.tile_size,
        )
    if config.loss.entailment > 0:
        from topoclip.losses.entailment import EntailmentLoss

        loss = EntailmentLoss(loss, topology, config.loss.entailment)
    return loss


def finished_results(trainer: Trainer, run_dir: Path, say) -> dict | None:
    """The results of a run that a resume found finished (its checkpoint at the last step and
    its results.json written), or None if there is training left. A finished run keeps its
    results: training zero steps again would overwrite the real summary with an empty one.
    A resume with a longer ``train.steps`` is not finished and goes on."""
    import json

    results_file = run_dir / RESULTS_FILE
    # Rank 0's view decides for every rank (each must return, or each must train).
    done = trainer.step >= trainer.total_steps and (results_file.is_file() if trainer.dist.is_main else True)
    if not broadcast_object(done if trainer.dist.is_main else None, trainer.dist):
        return None
    if not trainer.dist.is_main:
        return {}

    say(f"{run_dir} is finished (step {trainer.step}/{trainer.total_steps}); its results are kept in {results_file} "
        "(give a larger train.steps to train on)")
    return json.loads(results_file.read_text())


def make_trainer(task, train_set, collate, config: RunSettings, run_dir: Path, device, info: DistInfo,
                 evaluator=None) -> Trainer:
    """The engine for a recipe's task, with the config's training settings; every checkpoint
    records the whole config, so the run opens again with ``topoclip.load_run``.
    ``evaluator`` runs every ``eval.every`` steps (rank 0), ``eval.best`` picks the best."""
    ev = config.eval
    every = ev.every if (ev.enabled and evaluator is not None) else 0
    best = BestRule(ev.best, ev.higher_is_better()) if (every and ev.best) else None
    return Trainer(
        task, train_set, collate, TrainingSettings.of(config), run_dir, device=device, dist_info=info,
        run_config=to_dict(config), evaluator=evaluator if every else None, eval_every=every, best=best,
    )


def periodic_evaluator(model, tokenizer, entries, val_pairs, collate, config: RunSettings, device):
    """``() -> {"dataset/metric": value}``: the entries' metrics (no plots) and, when there
    are held-out pairs, ``val/loss`` at the training batch size."""

    def evaluate() -> dict[str, float]:
        metrics = flat_metrics(run_evaluation(model, tokenizer, entries, config.eval.batch_size, device))
        if val_pairs is not None:
            metrics["val/loss"] = validation_loss(model, val_pairs, collate, config.train.batch_size, device)
        return metrics

    return evaluate
