"""What every recipe does around the engine: choose and prepare the run directory, build the
contrastive loss from the config, and hand the engine its training settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from topoclip.config import RunSettings
from topoclip.dataclass_io import to_dict
from topoclip.devices import resolve_device
from topoclip.engine.distributed import DistInfo, broadcast_object
from topoclip.engine.settings import TrainingSettings
from topoclip.engine.trainer import Trainer
from topoclip.losses import ContrastiveLoss
from topoclip.runs import latest_checkpoint

__all__ = ["prepare_run_dir", "start_run", "build_loss", "make_trainer"]


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



def build_loss(config: RunSettings, topology) -> ContrastiveLoss:
    """The run's contrastive loss: ``train.local_loss`` and the ``loss`` section's tiling."""
    return ContrastiveLoss(
        topology,
        local_loss=config.train.local_loss,
        tile_threshold=config.loss.tile_threshold,
        tile_size=config.loss.tile_size,
    )



def make_trainer(task, train_set, collate, config: RunSettings, run_dir: Path, device, info: DistInfo) -> Trainer:
    """The engine for a recipe's task, with the config's training settings; every checkpoint
    records the whole config, so the run opens again with ``topoclip.load_run``."""
    return Trainer(
        task, train_set, collate, TrainingSettings.of(config), run_dir, device=device, dist_info=info,
        run_config=to_dict(config),
    )
