"""The training loop: contrastive steps, checkpoints, exact resume, logs.

The engine of every recipe. It trains a ``Task`` (``task.py``: the model and its loss) with
``TrainingSettings`` (``settings.py``: optimizer, schedule, length, precision, checkpointing,
logging) and knows nothing else of the recipe.

One step:  task.encode(batch) -> task.loss(...) -> backward -> clip grad norm -> AdamW step ->
lr schedule step -> task.after_step() (e.g. clamp the logit scale to its max).

A non-finite loss (or gradient norm) skips the update: no optimizer step, nothing changes
in the weights or the optimizer moments. The step still counts (the schedule and the data
order move on), is flagged in the log, and the total is reported at the end.

Exact resume: the batch order is a function of (seed, epoch) (see ``sampler.py``), and a
checkpoint stores the weights, optimizer, scheduler, every RNG state and the step; a run
killed at any point and resumed from its last checkpoint replays the same batches with the
same random numbers and ends with the same weights as an uninterrupted run.

Multi-process (``distributed.py``, launched by torchrun): ``train.batch_size`` is the global
batch; every rank draws the same global batch and keeps its slice, the model runs under
DistributedDataParallel, and the loss gathers the features with gradients. ``task.encode`` (the
towers and the logit scale) is the DDP forward, so that every gradient is averaged. Rank 0
alone writes logs and checkpoints; every rank loads a checkpoint on resume.

A streaming training set (an IterableDataset such as ``topoclip.data.shards.ShardStream``)
has no random access: an epoch is ``epoch_length // batch_size`` batches read from the
stream, and a resumed run continues with a fresh pass (not bit-exact).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from topoclip.dataclass_io import to_dict
from topoclip.devices import resolve_precision
from topoclip.runs.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointWriteError,
    CorruptCheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    load_weights,
    remove_stale_temporaries,
    restore_rng_state,
    save_best,
    save_checkpoint,
)

from .distributed import (
    DistInfo,
    all_gather_object,
    barrier,
    broadcast_object,
    current_info,
    mean_across_ranks,
    rank_slice,
    wrap_model,
)
from .gradcache import gradcache_backward, split_batch
from .logging import RunLogger
from .optim import build_optimizer, build_scheduler
from .sampler import EpochBatchSampler, RankBatchSampler, epoch_seed
from .settings import TrainingSettings
from .task import Task

__all__ = ["BestRule", "Trainer", "TrainResult", "TrainingDiverged", "seed_everything", "seed_worker", "enable_grad_checkpointing"]


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


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Switch on activation checkpointing in every part of ``model`` that supports it (the
    towers: timm / OpenCLIP ``set_grad_checkpointing``, transformers models); returns how many.
    Raises ValueError if nothing supports it."""
    switched = 0

    def visit(module: nn.Module) -> None:
        nonlocal switched
        if callable(getattr(module, "set_grad_checkpointing", None)):
            module.set_grad_checkpointing(True)
            switched += 1
            return
        if getattr(module, "supports_gradient_checkpointing", False):  # a transformers model
            if hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            switched += 1
            return
        for child in module.children():
            visit(child)

    visit(model)
    if not switched:
        raise ValueError(f"train.grad_checkpointing: no part of the {type(model).__name__} supports activation checkpointing")
    return switched


class _Encode(nn.Module):
    """``task.encode`` as a module's forward: the module DistributedDataParallel wraps (a
    parameter used outside the wrapped forward would get a gradient that is never averaged)."""

    def __init__(self, task: Task):
        super().__init__()
        self.task = task

    def forward(self, batch):
        return self.task.encode(batch)


# A run whose loss sits at ln(batch) -- uniform logits, every pair alike -- with a vanishing
# gradient for this many steps in a row has collapsed; the trainer says so once.
COLLAPSE_STEPS = 50
COLLAPSE_GRAD_NORM = 0.05
COLLAPSE_MESSAGE = (
    "warning: for {steps} steps the loss has sat at ln(batch) = {ln_b:.3f} with a gradient norm below {g}: "
    "the logits are uniform and the run has collapsed. Likely causes: data sorted by class or caption (batches "
    "of one class; `topoclip data convert` shuffles, a CSV keeps its order within a shuffle buffer), many "
    "identical captions per batch, a learning rate far too high or too low, or a temperature too low for the "
    "topology's similarity range (model.logit_scale.init, optim.logit_scale_lr)."
)


def is_collapsed_step(loss: float, grad_norm: float, batch_size: int) -> bool:
    """Uniform logits: the loss within 0.5% of ln(batch) and (almost) no gradient."""
    ln_b = math.log(batch_size)
    return abs(loss - ln_b) < 0.005 * ln_b and not grad_norm >= COLLAPSE_GRAD_NORM


@dataclass(frozen=True)
class BestRule:
    """Which evaluation metric picks the best checkpoint, and whether higher is better."""

    metric: str
    higher_is_better: bool = True

    def better(self, value: float, than: float) -> bool:
        if not math.isfinite(value):
            return False
        return value > than if self.higher_is_better else value < than


class TrainingDiverged(ValueError):
    """Every recent step was skipped: training cannot make progress."""


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

    def summary(self) -> dict[str, Any]:
        """The ``train`` section of a run's results."""
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "resumed_from": self.resumed_from,
            "final_loss": self.final_loss,
            "final_scale": self.final_scale,
            "seconds": self.train_seconds,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


class Trainer:
    """Trains ``task`` (a :class:`~topoclip.engine.task.Task`) on ``train_set``.

    ``collate_fn`` turns a list of dataset items into the batch dict the task encodes;
    ``settings`` supplies the optimizer, schedule, train and logging sections; ``run_dir``
    receives checkpoints and logs. ``run_config`` is the recipe's whole config as plain data,
    saved beside every checkpoint so that the run can be opened again (default: the settings).

    ``evaluator() -> {"dataset/metric": value}`` runs every ``eval_every`` steps and after the
    last one, on rank 0, in eval mode and with every random number generator put back
    afterwards, so a run with evaluation trains exactly as one without; its metrics go to
    ``eval.jsonl`` and TensorBoard, and ``best`` keeps the weights of the best one in
    ``checkpoints/best``.

    ``dist_info``: this process's place in a multi-process run (default: the initialised
    torch.distributed group, if any). ``train_set`` may be an IterableDataset with an
    ``epoch_length`` attribute (samples per epoch over all ranks) that yields this rank's
    pairs, e.g. ``ShardStream``.
    """

    def __init__(
        self,
        task: Task,
        train_set: Dataset,
        collate_fn: Callable,
        settings: TrainingSettings,
        run_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        *,
        dist_info: DistInfo | None = None,
        run_config: dict[str, Any] | None = None,
        evaluator: Callable[[], dict[str, float]] | None = None,
        eval_every: int = 0,
        best: BestRule | None = None,
    ):
        model = task.model
        self.settings = config = settings
        self.run_config = run_config if run_config is not None else to_dict(settings)
        self.run_dir = Path(run_dir)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dist = dist_info if dist_info is not None else current_info(self.device)
        self.task = task.to(self.device)
        self.precision = precision = resolve_precision(config.train.precision, self.device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision: fp16 needs a CUDA device (use bf16 on the CPU)")
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        # The fused attention kernel is slow in bf16 on the CPU (towers.py says by how much):
        # the towers attend eagerly while the trainer encodes, and as before anywhere else (an
        # evaluation gives the same numbers as a later `topoclip eval`). With gradient
        # checkpointing the backward recomputes the forward outside the trainer's encode, so
        # there it stays eager throughout.
        self._eager_attention = []
        if precision == "bf16" and self.device.type == "cpu":
            self._eager_attention = [m for m in model.modules() if callable(getattr(m, "set_eager_attention", None))]
            if config.train.grad_checkpointing:
                for module in self._eager_attention:
                    module.set_eager_attention(True)
                self._eager_attention = []
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.grad_scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.train_set = train_set
        self.collate_fn = collate_fn

        tc = config.train
        self.batch_size = tc.batch_size  # the global batch, over all ranks
        # This rank's rows of each global batch; None in a single process.
        self.rows = rank_slice(tc.batch_size, self.dist) if self.dist.distributed else None
        self.local_batch_size = tc.batch_size // self.dist.world_size
        self.streaming = isinstance(train_set, IterableDataset)
        if self.streaming:
            self.num_items = getattr(train_set, "epoch_length", None)
            if self.num_items is None:
                raise ValueError("train_set: a streaming training set needs an epoch_length (samples per epoch)")
            stream_batch = getattr(train_set, "batch_size", tc.batch_size)
            if stream_batch != tc.batch_size:
                raise ValueError(f"train.batch_size: {tc.batch_size} differs from the stream's batch_size={stream_batch}")
        else:
            self.num_items = len(train_set)
        self.batches_per_epoch = self.num_items // tc.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"train.batch_size: {tc.batch_size} is larger than the training set ({self.num_items} pairs)"
            )
        self.total_steps = tc.steps if tc.steps is not None else tc.epochs * self.batches_per_epoch

        if tc.grad_checkpointing:
            enable_grad_checkpointing(model)
        self._forward: nn.Module = _Encode(self.task)
        self._ddp = None
        if self.dist.distributed:
            self._ddp = wrap_model(self._forward, self.dist)
            self._forward = self._ddp
            # Same weights on every rank (DDP broadcast rank 0's); from here on each rank draws
            # its own random numbers, so that dropout masks differ between ranks' samples.
            seed_everything(tc.seed + 1_000_003 * self.dist.rank)
        if tc.compile:
            if not hasattr(torch, "compile"):
                raise ValueError("train.compile: this torch has no torch.compile")
            self._forward = torch.compile(self._forward)

        oc = config.optim
        self.optimizer = build_optimizer(model, oc.lr, oc.weight_decay, tuple(oc.betas), oc.eps, oc.logit_scale_lr)
        self.scheduler = build_scheduler(
            self.optimizer, oc.warmup_for(self.total_steps), self.total_steps, config.schedule.name, config.schedule.min_lr_ratio
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_clip = oc.grad_clip if oc.grad_clip else math.inf

        self.step = 0
        self.skipped_steps = 0
        self.resumed_from = 0
        self.step_times: list[float] = []
        if eval_every < 0:
            raise ValueError(f"eval.every: must be >= 0 (0 = only after training), got {eval_every}")
        if best is not None and evaluator is None:
            raise ValueError("eval.best: needs an evaluation during training (eval.every)")
        self.evaluator, self.eval_every, self.best = evaluator, eval_every, best
        self.best_so_far: dict[str, Any] | None = None  # {step, metric, value}

    @property
    def model(self) -> nn.Module:
        return self.task.model

    # ----------------------------------------------------------------- state
    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    def training_state(self) -> dict[str, Any]:
        """The state to checkpoint. In a multi-process run every rank must call it (it gathers
        each rank's RNG state)."""
        epoch, batch = divmod(self.step, self.batches_per_epoch)
        rng = capture_rng_state()
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "data": {"epoch": epoch, "batch": batch, "num_items": self.num_items, "batch_size": self.batch_size},
            "skipped_steps": self.skipped_steps,
            "total_steps": self.total_steps,
            # A loss with state of its own (the mixup losses' lambda generator) resumes too.
            "loss": self.task.loss_state(),
            # fp16 loss scaling: the current scale and its growth tracker.
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else {},
            # The best evaluation so far, so that a resumed run keeps the same best checkpoint.
            "best": dict(self.best_so_far) if self.best_so_far is not None else {},
        }
        if self.dist.distributed:
            state["rng_ranks"] = all_gather_object(rng, self.dist)
        return state

    def save(self) -> Path:
        """Write a checkpoint (rank 0 writes; every rank must call this and waits for it)."""
        state = self.training_state()
        path = self.checkpoints_dir / f"step_{self.step:08d}"
        if self.dist.is_main:
            try:
                path = save_checkpoint(
                    self.checkpoints_dir,
                    self.step,
                    self.task.model,
                    state,
                    self.run_config,
                    keep_last=self.settings.train.keep_last,
                )
            except CheckpointWriteError as err:
                last = latest_checkpoint(self.run_dir)
                kept = f"the last good checkpoint {last} is intact" if last is not None else "no checkpoint was kept"
                raise CheckpointWriteError(f"{err}; {kept}") from None
        barrier(self.dist)
        return path

    def resume(self, checkpoint_dir: str | os.PathLike | None = None) -> bool:
        """Load the latest loadable (or the given) checkpoint; False if there is none.

        A checkpoint whose files cannot be read (cut short by a full disk, zero bytes) is
        reported with its path and the next older one is tried; none loadable is an error
        listing each. In a multi-process run rank 0 chooses, every rank loads its choice."""
        if self.dist.is_main:
            remove_stale_temporaries(self.checkpoints_dir)
        if checkpoint_dir is not None:
            self._load_checkpoint(Path(checkpoint_dir))
            return True
        chosen: str | None = None
        if self.dist.is_main:
            candidates = list_checkpoints(self.run_dir)
            failures = []
            for path in reversed(candidates):
                try:
                    self._load_checkpoint(path)
                except CorruptCheckpointError as err:
                    failures.append(str(err))
                    tqdm.write(f"warning: {err}; trying an older checkpoint")
                    continue
                chosen = str(path)
                if failures:
                    tqdm.write(f"resume: continuing from the older checkpoint {path}")
                break
            if candidates and chosen is None:
                error = "resume: no checkpoint of this run can be read: " + "; ".join(failures)
                broadcast_object(("error", error), self.dist)
                raise ValueError(error)
        if not self.dist.distributed:
            return chosen is not None
        received = broadcast_object(("ok", chosen) if self.dist.is_main else None, self.dist)
        if received[0] == "error":
            raise ValueError(received[1])
        if received[1] is None:
            return False
        if not self.dist.is_main:
            self._load_checkpoint(Path(received[1]))
        return True

    def _load_checkpoint(self, path: Path) -> None:
        state = load_training_state(path)
        data = state.get("data") or {}
        if data.get("num_items") != self.num_items or data.get("batch_size") != self.batch_size:
            raise ValueError(
                f"checkpoint {path}: trained on {data.get('num_items')} pairs in batches of {data.get('batch_size')}, "
                f"but this run has {self.num_items} pairs in batches of {self.batch_size}; "
                "the data order cannot be continued"
            )
        load_weights(self.task.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved lr was computed for the saved run length; recompute it from the schedule
        # so that a resume with a longer train.steps continues on the new curve (for the
        # same length this is the identical expression, so exact resume is unaffected).
        for group, base_lr, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
        ):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        self.task.load_loss_state(state.get("loss") or {})
        if self.grad_scaler is not None and state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        rng_ranks = state.get("rng_ranks")
        # Each rank continues its own random stream; a run resumed on another number of
        # processes starts every rank from rank 0's.
        if rng_ranks and len(rng_ranks) == self.dist.world_size:
            restore_rng_state(rng_ranks[self.dist.rank])
        else:
            restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.best_so_far = dict(state["best"]) if state.get("best") else None
        self.resumed_from = self.step

    # ------------------------------------------------------------------ data
    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        seed = self.settings.train.seed
        workers = self.settings.train.num_workers
        loader_seed = epoch_seed(seed, epoch)
        if self.dist.distributed:  # each rank's workers draw their own augmentations
            loader_seed = (loader_seed + self.dist.rank * 2**40) % (2**63 - 1)
        common = dict(
            collate_fn=self.collate_fn,
            num_workers=workers,
            # The loader's own generator seeds the workers: reproducible per epoch, and the
            # global RNG (dropout etc.) is not consumed by starting an epoch.
            generator=torch.Generator().manual_seed(loader_seed),
            worker_init_fn=seed_worker if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
        )
        if self.streaming:
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(epoch)
            return DataLoader(self.train_set, batch_size=self.local_batch_size, drop_last=True, **common)
        sampler = EpochBatchSampler(self.num_items, self.batch_size, seed, epoch, start_batch)
        if self.rows is not None:
            sampler = RankBatchSampler(sampler, self.rows)
        return DataLoader(self.train_set, batch_sampler=sampler, **common)

    def _batches(self):
        """Batches from the current step on, across epoch boundaries, until total_steps."""
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.batches_per_epoch)
            self.task.set_epoch(epoch)
            loader = self._loader(epoch, start)
            if self.streaming:
                # Every rank must take the same number of steps: exactly the epoch's remaining
                # batch count, and a stream that ends early is an error, not a shorter epoch.
                expected, got = self.batches_per_epoch - start, 0
                for batch in islice(loader, expected):
                    got += 1
                    yield epoch, batch
                    if self.step >= self.total_steps:
                        return
                if got < expected:
                    raise ValueError(
                        f"train_set: the stream ended after {got} of {expected} batches in epoch {epoch} "
                        "(too few shards for the ranks x workers, or unreadable samples)"
                    )
                continue
            for batch in loader:
                yield epoch, batch
                if self.step >= self.total_steps:
                    return

    # ------------------------------------------------------------------ step
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One update on ``batch``; returns the step's metrics (floats)."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = math.nan
        chunk = self.settings.train.grad_cache_chunk
        scaler = self.grad_scaler
        rows = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
        if chunk is not None and chunk < rows:
            # Exact full-batch step, encoded chunk by chunk (gradcache.py); it back-propagates
            # itself, so a non-finite loss is caught afterwards and its gradients dropped.
            if scaler is not None:
                raise ValueError("train.grad_cache_chunk: not supported with train.precision=fp16 (use bf16)")
            tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
            # Shared outputs (the scale) come out of the (DDP) forward and their gradient goes
            # back through the last chunk's backward, where DDP averages it (gradcache.py).
            loss, info = gradcache_backward(
                self._encode, split_batch(tensors, chunk), self.task.loss,
                no_sync=self._ddp.no_sync if self._ddp is not None else None,
            )
            loss_value, info = self._mean_over_ranks(loss.item(), info)
            skipped = not math.isfinite(loss_value)
        else:
            loss, info = self.task.loss(*self._encode(batch))
            # Every rank must take the same decision (a backward runs collectives).
            loss_value, info = self._mean_over_ranks(loss.item(), info)
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
            self.task.after_step()
        # The schedule follows the step count even over a skipped step, so the run's length
        # and lr curve do not depend on how many batches were bad.
        self.scheduler.step()
        # Whatever else the loss reports (e.g. the mixup terms and their lambdas) is logged too.
        extra = {k: v for k, v in info.items() if k not in ("pos_sim", "neg_sim", "accuracy", "scale")}
        return {
            **extra,
            "loss": loss_value,
            "scale": info.get("scale", math.nan),
            "lr": lr,
            "grad_norm": grad_norm,
            "pos_sim": info.get("pos_sim", math.nan),
            "neg_sim": info.get("neg_sim", math.nan),
            "acc": info.get("accuracy", math.nan),
            "skipped": skipped,
        }

    def _mean_over_ranks(self, loss_value: float, info: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """The loss and numeric details averaged over the ranks (with local_loss each rank
        reports its own rows; equal row counts make the mean the global value)."""
        if not self.dist.distributed:
            return loss_value, info
        keys = sorted(k for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        means = mean_across_ranks([loss_value] + [float(info[k]) for k in keys], self.dist)
        return means[0], {**info, **dict(zip(keys, means[1:]))}

    def _encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``task.encode(batch)`` through the (DDP) forward, the towers under autocast when
        configured; floating outputs come out in fp32 (the topology's project computes half
        precision in fp32), so the loss never sees bf16/fp16."""
        if self.autocast_dtype is None:
            return self._forward(batch)
        for module in self._eager_attention:
            module.set_eager_attention(True)
        try:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                outputs = self._forward(batch)
        finally:
            for module in self._eager_attention:
                module.set_eager_attention(False)
        return tuple(t.float() if t.is_floating_point() else t for t in outputs)

    # ------------------------------------------------------------------ eval
    def _evaluate(self, logger: RunLogger | None) -> None:
        """One evaluation during training (rank 0; the other ranks wait for it)."""
        if self.dist.is_main:
            rng = capture_rng_state()
            try:
                metrics = self.evaluator()
            finally:
                restore_rng_state(rng)  # the training's random stream goes on untouched
            if logger is not None:
                logger.log_eval(self.step, metrics)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in list(metrics.items())[:4] if isinstance(v, (int, float)))
            if self.settings.logging.progress:
                tqdm.write(f"eval @ step {self.step}: {shown}")
            if self.best is not None:
                value = metrics.get(self.best.metric)
                if value is None:
                    raise ValueError(f"eval.best: no metric {self.best.metric!r} in the evaluation (known: {', '.join(metrics)})")
                if self.best_so_far is None or self.best.better(value, self.best_so_far["value"]):
                    self.best_so_far = {"step": self.step, "metric": self.best.metric, "value": float(value)}
                    save_best(self.checkpoints_dir, self.task.model, self.best_so_far, self.run_config)
        barrier(self.dist)

    # ------------------------------------------------------------------- fit
    def _diverged_message(self, in_a_row: int, checkpoint: Path | None) -> str:
        last = checkpoint or latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written"
        return (f"train: {in_a_row} steps in a row skipped (non-finite loss or gradient) up to step {self.step}; "
                f"the run is diverging, so it stops (lower optim.lr, bound model.logit_scale.max, or raise "
                f"train.max_consecutive_skips); {kept}")

    def fit(self) -> TrainResult:
        tc, lc = self.settings.train, self.settings.logging
        self._forward.train()
        every = tc.checkpoint_every
        main = self.dist.is_main  # rank 0 alone logs and shows progress
        logger = RunLogger(self.run_dir, jsonl=lc.jsonl, tensorboard=lc.tensorboard, resume_step=self.step) if main else None
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            disable=not (lc.progress and main),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        metrics: dict[str, Any] = {"loss": math.nan, "scale": self.task.current_scale()}
        checkpoint: Path | None = None
        collapsed, warned = 0, False
        in_a_row = 0  # skipped steps in a row
        start = time.perf_counter()
        try:
            tick = time.perf_counter()
            for epoch, batch in self._batches():
                metrics = self.train_step(batch)
                self.step += 1
                in_a_row = in_a_row + 1 if metrics["skipped"] else 0
                if tc.max_consecutive_skips and in_a_row >= tc.max_consecutive_skips:
                    raise TrainingDiverged(self._diverged_message(in_a_row, checkpoint))
                collapsed = collapsed + 1 if is_collapsed_step(metrics["loss"], metrics["grad_norm"], self.batch_size) else 0
                if collapsed >= COLLAPSE_STEPS and not warned and main:
                    warned = True
                    tqdm.write(COLLAPSE_MESSAGE.format(steps=collapsed, ln_b=math.log(self.batch_size), g=COLLAPSE_GRAD_NORM))
                now = time.perf_counter()
                elapsed, tick = now - tick, now
                self.step_times.append(elapsed)
                metrics["samples_per_s"] = self.batch_size / elapsed if elapsed > 0 else math.nan
                if logger is not None:
                    logger.log({"step": self.step, "epoch": epoch, **metrics, "skipped_total": self.skipped_steps})
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    scale=f"{metrics['scale']:.2f}",
                    samples_s=f"{metrics['samples_per_s']:.0f}",
                    refresh=False,
                )
                bar.update(1)
                evaluate_now = self.evaluator is not None and self.eval_every and (
                    self.step % self.eval_every == 0 or self.step == self.total_steps)
                if evaluate_now:
                    self._evaluate(logger)
                # Not while steps are being skipped: the last good checkpoint is kept to go back to.
                if every and self.step % every == 0 and self.step < self.total_steps and not in_a_row:
                    checkpoint = self.save()
                if evaluate_now or (every and self.step % every == 0):
                    tick = time.perf_counter()  # an evaluation or checkpoint is not part of a step's time
            checkpoint = self.save() if self.step > 0 else None
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        if self.skipped_steps and main:
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
