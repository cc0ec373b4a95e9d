"""The training loop: contrastive steps, checkpoints, exact resume, logs.

One step:  forward both towers -> loss(u, v, scale) -> backward -> clip grad norm ->
AdamW step -> lr schedule step -> clamp the logit scale to its max.

A non-finite loss (or gradient norm) skips the update: no optimizer step, nothing changes
in the weights or the optimizer moments. The step still counts (the schedule and the data
order move on), is flagged in the log, and the total is reported at the end.

Exact resume: the batch order is a function of (seed, epoch) (see ``sampler.py``), and a
checkpoint stores the weights, optimizer, scheduler, every RNG state and the step; a run
killed at any point and resumed from its last checkpoint replays the same batches with the
same random numbers and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import (
    CHECKPOINTS_DIR,
    capture_rng_state,
    latest_checkpoint,
    load_training_state,
    load_weights,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from .config import ExperimentConfig
from .dataclass_io import to_dict
from .gradcache import gradcache_backward, split_batch
from .logging import RunLogger
from .optim import build_optimizer, build_scheduler
from .sampler import EpochBatchSampler, epoch_seed

__all__ = ["Trainer", "TrainResult", "seed_everything", "seed_worker"]


def seed_everything(seed: int) -> None:
    """Seed every global RNG a run touches (model init, dropout, augmentation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: derive python/numpy seeds from the worker's torch seed, which
    the loader draws from its own seeded generator (so it is reproducible per epoch)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class TrainResult:
    steps: int
    skipped_steps: int
    resumed_from: int
    final_loss: float
    final_scale: float
    train_seconds: float
    checkpoint: Path | None
    step_times: list[float] = field(default_factory=list, repr=False)


class Trainer:
    """Trains ``model`` (a DualEncoder-like module) with ``loss_fn`` on ``train_set``.

    ``model(images, input_ids, attention_mask) -> (u, v)`` and ``model.logit_scale()`` give the
    points and the scale; ``collate_fn`` turns a list of dataset items into a dict with
    ``images``, ``input_ids``, ``attention_mask``. ``config`` supplies the optim, schedule,
    train and logging sections; ``run_dir`` receives checkpoints and logs.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        train_set: Dataset,
        collate_fn: Callable,
        config: ExperimentConfig,
        run_dir: str | os.PathLike,
        device: torch.device | str | None = None,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        precision = config.train.precision
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision: fp16 needs a CUDA device (use bf16 on the CPU)")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.grad_scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.loss_fn = loss_fn
        self.train_set = train_set
        self.collate_fn = collate_fn

        tc = config.train
        self.batch_size = tc.batch_size
        self.batches_per_epoch = len(train_set) // tc.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"train.batch_size: {tc.batch_size} is larger than the training set ({len(train_set)} pairs)"
            )
        self.total_steps = tc.steps if tc.steps is not None else tc.epochs * self.batches_per_epoch

        oc = config.optim
        self.optimizer = build_optimizer(model, oc.lr, oc.weight_decay, tuple(oc.betas), oc.eps)
        self.scheduler = build_scheduler(
            self.optimizer, oc.warmup_steps, self.total_steps, config.schedule.name, config.schedule.min_lr_ratio
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_clip = oc.grad_clip if oc.grad_clip else math.inf

        self.step = 0
        self.skipped_steps = 0
        self.resumed_from = 0
        self.step_times: list[float] = []

    # ----------------------------------------------------------------- state
    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    def training_state(self) -> dict[str, Any]:
        epoch, batch = divmod(self.step, self.batches_per_epoch)
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "data": {"epoch": epoch, "batch": batch, "num_items": len(self.train_set), "batch_size": self.batch_size},
            "skipped_steps": self.skipped_steps,
            "total_steps": self.total_steps,
            # A loss with state of its own (the mixup losses' lambda generator) resumes too.
            "loss": self.loss_fn.state_dict() if isinstance(self.loss_fn, nn.Module) else {},
        }

    def save(self) -> Path:
        return save_checkpoint(
            self.checkpoints_dir,
            self.step,
            self.model,
            self.training_state(),
            to_dict(self.config),
            keep_last=self.config.train.keep_last,
        )

    def resume(self, checkpoint_dir: str | os.PathLike | None = None) -> bool:
        """Load the latest (or the given) checkpoint; False if there is none."""
        remove_stale_temporaries(self.checkpoints_dir)
        path = Path(checkpoint_dir) if checkpoint_dir is not None else latest_checkpoint(self.run_dir)
        if path is None:
            return False
        state = load_training_state(path)
        data = state["data"]
        if data["num_items"] != len(self.train_set) or data["batch_size"] != self.batch_size:
            raise ValueError(
                f"checkpoint {path}: trained on {data['num_items']} pairs in batches of {data['batch_size']}, "
                f"but this run has {len(self.train_set)} pairs in batches of {self.batch_size}; "
                "the data order cannot be continued"
            )
        load_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved lr was computed for the saved run length; recompute it from the schedule
        # so that a resume with a longer train.steps continues on the new curve (for the
        # same length this is the identical expression, so exact resume is unaffected).
        for group, base_lr, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
        ):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        if isinstance(self.loss_fn, nn.Module) and state.get("loss"):
            self.loss_fn.load_state_dict(state["loss"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.resumed_from = self.step
        return True

    # ------------------------------------------------------------------ data
    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        seed = self.config.train.seed
        sampler = EpochBatchSampler(len(self.train_set), self.batch_size, seed, epoch, start_batch)
        workers = self.config.train.num_workers
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=workers,
            # The loader's own generator seeds the workers: reproducible per epoch, and the
            # global RNG (dropout etc.) is not consumed by starting an epoch.
            generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)),
            worker_init_fn=seed_worker if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
        )

    def _batches(self):
        """Batches from the current step on, across epoch boundaries, until total_steps."""
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.batches_per_epoch)
            if hasattr(self.loss_fn, "set_epoch"):
                self.loss_fn.set_epoch(epoch)  # epoch-dependent losses (mixup weight decay)
            for batch in self._loader(epoch, start):
                yield epoch, batch
                if self.step >= self.total_steps:
                    return

    # ------------------------------------------------------------------ step
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One update on ``batch``; returns the step's metrics (floats)."""
        model = self.model
        images = batch["images"].to(self.device, non_blocking=True)
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = math.nan
        chunk = self.config.train.grad_cache_chunk
        scaler = self.grad_scaler
        if chunk is not None and chunk < images.shape[0]:
            # Exact full-batch step, encoded chunk by chunk (gradcache.py); it back-propagates
            # itself, so a non-finite loss is caught afterwards and its gradients dropped.
            if scaler is not None:
                raise ValueError("train.grad_cache_chunk: not supported with train.precision=fp16 (use bf16)")
            chunks = split_batch({"images": images, "input_ids": input_ids, "attention_mask": attention_mask}, chunk)
            loss, info = gradcache_backward(
                lambda c: self._encode(c["images"], c["input_ids"], c["attention_mask"]),
                chunks,
                lambda a, b: self.loss_fn(a, b, model.logit_scale(), return_details=True),
            )
            scale = model.logit_scale().detach()
            loss_value = loss.item()
            skipped = not math.isfinite(loss_value)
        else:
            u, v = self._encode(images, input_ids, attention_mask)
            scale = model.logit_scale()
            loss, info = self.loss_fn(u, v, scale, return_details=True)
            loss_value = loss.item()
            skipped = not math.isfinite(loss_value)
            if not skipped:
                (scaler.scale(loss) if scaler is not None else loss).backward()
        if not skipped:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
            skipped = not math.isfinite(grad_norm)
            if scaler is not None and skipped:
                scaler.update()  # an overflow: lower the loss scale; the step is skipped below
        lr = self.scheduler.get_last_lr()[0]
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        else:
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            model.logit_scale.clamp_()
        # The schedule follows the step count even over a skipped step, so the run's length
        # and lr curve do not depend on how many batches were bad.
        self.scheduler.step()
        # Whatever else the loss reports (e.g. the mixup terms and their lambdas) is logged too.
        extra = {k: v for k, v in info.items() if k not in ("pos_sim", "neg_sim", "accuracy")}
        return {
            **extra,
            "loss": loss_value,
            "scale": scale.item(),
            "lr": lr,
            "grad_norm": grad_norm,
            "pos_sim": info.get("pos_sim", math.nan),
            "neg_sim": info.get("neg_sim", math.nan),
            "acc": info.get("accuracy", math.nan),
            "skipped": skipped,
        }

    def _encode(self, images, input_ids, attention_mask):
        """The towers under autocast when configured; points come out in fp32 (the topology's
        project computes half precision in fp32), so the loss never sees bf16/fp16."""
        if self.autocast_dtype is None:
            return self.model(images, input_ids, attention_mask)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            u, v = self.model(images, input_ids, attention_mask)
        return u.float(), v.float()

    # ------------------------------------------------------------------- fit
    def fit(self) -> TrainResult:
        tc, lc = self.config.train, self.config.logging
        self.model.train()
        every = tc.checkpoint_every
        logger = RunLogger(self.run_dir, jsonl=lc.jsonl, tensorboard=lc.tensorboard, resume_step=self.step)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            disable=not lc.progress,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        metrics: dict[str, Any] = {"loss": math.nan, "scale": self.model.logit_scale.value}
        checkpoint: Path | None = None
        start = time.perf_counter()
        try:
            tick = time.perf_counter()
            for epoch, batch in self._batches():
                metrics = self.train_step(batch)
                self.step += 1
                now = time.perf_counter()
                elapsed, tick = now - tick, now
                self.step_times.append(elapsed)
                metrics["samples_per_s"] = self.batch_size / elapsed if elapsed > 0 else math.nan
                logger.log({"step": self.step, "epoch": epoch, **metrics, "skipped_total": self.skipped_steps})
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    scale=f"{metrics['scale']:.2f}",
                    samples_s=f"{metrics['samples_per_s']:.0f}",
                    refresh=False,
                )
                bar.update(1)
                if every and self.step % every == 0 and self.step < self.total_steps:
                    checkpoint = self.save()
                    tick = time.perf_counter()  # a checkpoint is not part of a step's time
            checkpoint = self.save() if self.step > 0 else None
        finally:
            bar.close()
            logger.close()
        if self.skipped_steps:
            tqdm.write(f"warning: {self.skipped_steps} step(s) skipped because of a non-finite loss or gradient")
        return TrainResult(
            steps=self.step,
            skipped_steps=self.skipped_steps,
            resumed_from=self.resumed_from,
            final_loss=metrics["loss"],
            final_scale=metrics["scale"],
            train_seconds=time.perf_counter() - start,
            checkpoint=checkpoint,
            step_times=self.step_times,
        )
