"""What every recipe does around the engine: choose and prepare the run directory, build the
contrastive loss from the config, and hand the engine its training settings."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from topoclip.atomic import TMP_PREFIX
from topoclip.config import RunSettings, read_config_file, save_config
from topoclip.dataclass_io import to_dict
from topoclip.devices import check_device_available, resolve_device
from topoclip.engine.distributed import DistInfo, broadcast_object
from topoclip.engine.settings import TrainingSettings
from topoclip.engine.trainer import BestRule, Trainer
from topoclip.eval import flat_metrics, run_evaluation
from topoclip.eval.validation import validation_loss
from topoclip.losses import ContrastiveLoss, SigmoidLoss
from topoclip.runs import CONFIG_FILE, RESULTS_FILE, RUN_INFO_FILE, latest_checkpoint, list_checkpoints, write_run_info
from topoclip.runs.lock import LOCK_FILE, RunLock, RunLockedError
from topoclip.runs.resume_rules import resume_changes

__all__ = ["prepare_run_dir", "record_run", "check_machine", "start_run", "build_loss", "make_trainer", "periodic_evaluator",
           "finished_results", "record_skips"]


def prepare_run_dir(config: RunSettings, run_dir: str | os.PathLike | None = None) -> tuple[Path, bool, RunLock]:
    """``(run_dir, resume, lock)``: where the run lives, whether it continues a checkpoint, and
    the lock that keeps every other process out of it until the run ends.

    A fresh run never writes into a non-empty directory or one another process holds:
    ``runs/default`` becomes ``runs/default-1`` and so on (two runs started at once with one
    name get one directory each). A resume locks its directory or fails at once, naming the
    process that writes there. Errors name the path and come before anything is written.
    """
    if run_dir is not None:
        run_dir = Path(run_dir)
        return run_dir, latest_checkpoint(run_dir) is not None, _lock(run_dir)
    base = Path(config.output.dir) / (config.output.name or "run")
    _check_output_parent(base)
    if base.exists() and not base.is_dir():
        raise ValueError(f"output.name: {base} is a file, not a run directory")
    if config.train.resume:
        if _holds_files(base) and not (base / CONFIG_FILE).is_file():
            raise ValueError(f"resume: {base} is not a run directory (no {CONFIG_FILE}); "
                             f"it is left as it is (choose another output.name)")
        _make_dir(base)
        return base, latest_checkpoint(base) is not None, _lock(base)
    for i in range(10_000):
        candidate = base if i == 0 else base.with_name(f"{base.name}-{i}")
        if candidate.exists() and (not candidate.is_dir() or _holds_files(candidate)):
            continue
        _make_dir(candidate)
        lock = RunLock(candidate)
        try:
            lock.acquire()
        except RunLockedError:
            continue  # another run started with the same name a moment ago
        if _holds_files(candidate):
            lock.release()  # filled by another run between our look and our lock
            continue
        return candidate, False, lock
    raise ValueError(f"output.name: {base} and 10,000 numbered siblings are all taken")


def _is_leftover(entry: Path) -> bool:
    """A lock, or a temporary file or directory of an atomic write that a kill cut short."""
    # TMP_PREFIX starts a temporary directory (".tmp-tokenizer-PID"), ".NAME.tmp-PID" a file.
    return entry.name == LOCK_FILE or (entry.name.startswith(".") and TMP_PREFIX in entry.name)


def _holds_files(path: Path) -> bool:
    """Whether a directory holds anything but leftovers (a stale lock is taken over, a
    killed writer's temporaries are removed)."""
    return path.is_dir() and any(not _is_leftover(p) for p in path.iterdir())


def _remove_temporaries(run_dir: Path) -> None:
    """The temporaries a killed start-up left (config, tokenizer): safe to remove once this
    process holds the lock, as no other writer is inside."""
    for entry in run_dir.iterdir():
        if entry.name != LOCK_FILE and _is_leftover(entry):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _lock(run_dir: Path) -> RunLock:
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory: {run_dir} is a file, not a directory")
    _make_dir(run_dir)
    return RunLock(run_dir).acquire()


def _check_output_parent(base: Path) -> None:
    """The run's parent must be (or become) a writable directory: say so now, in one line,
    rather than as a traceback after the data is made."""
    for parent in [base.parent, *base.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"output.dir: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"output.dir: {parent} is not writable")
            return


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"output: {path} is a file, not a directory") from None
    except OSError as err:
        raise ValueError(f"output: cannot create {path} ({err.strerror or err})") from None


def record_run(run_dir: Path, resume: bool, config: RunSettings, kind: str, say=print) -> None:
    """A fresh run saves its config and its kind. A run directory that has a config already
    (a resume, with or without a checkpoint) keeps it: only the changes ``resume_changes``
    allows are taken (announced, and recorded in ``config.yaml``); any other is refused."""
    saved_config = run_dir / CONFIG_FILE
    if saved_config.is_file():
        saved = read_config_file(saved_config)
        if not saved:
            raise ValueError(f"{saved_config}: empty or unreadable; the run's config cannot be recovered from it")
        changes = resume_changes(saved, to_dict(config), where="resume")
        if changes:
            say(f"resume: taking the new {'; '.join(changes)}")
            save_config(config, saved_config)
        if not (run_dir / RUN_INFO_FILE).is_file():
            write_run_info(run_dir, kind)
        return
    if resume:
        raise ValueError(f"resume: {run_dir} has checkpoints but no {CONFIG_FILE}; it cannot be resumed safely")
    # The config first, atomically: a kill before it leaves a directory with nothing in it (a
    # fresh start of the same command takes it); a kill after it leaves a run whose kind is
    # read off its config (``read_run_info``) until run.json is written.
    save_config(config, saved_config)
    write_run_info(run_dir, kind)


def check_machine(config: RunSettings, info: DistInfo) -> torch.device:
    """The device the run will use, after the checks that need no data: a device this machine
    has, a precision it supports, a batch the processes can share. One line each, before any
    directory is made."""
    tc = config.train
    if info.distributed:
        device = info.device
    else:
        device = resolve_device(tc.device)
        check_device_available(device)
    if tc.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"train.precision: fp16 needs a CUDA GPU (loss scaling); on {device.type} use bf16 or fp32")
    if tc.batch_size % info.world_size:
        raise ValueError(f"train.batch_size: {tc.batch_size} is not divisible by the {info.world_size} processes")
    return device


class _FreshRunGuard:
    """Removes a fresh run's directory when its set-up fails (batch larger than the data, a
    bad file found while opening it): the error then leaves nothing behind, and the next run
    gets the same name instead of "-1". Disarmed once training starts; never armed on a
    resume (a resumed directory is never removed)."""

    def __init__(self, run_dir: Path, armed: bool):
        self.run_dir, self.armed = run_dir, armed

    def disarm(self) -> None:
        self.armed = False

    def __call__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and self.armed and not list_checkpoints(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return False  # the error goes on


def start_run(config: RunSettings, run_dir: str | os.PathLike | None, info: DistInfo, kind: str,
              exit_stack: contextlib.ExitStack):
    """What every process of a run does first: threads, device, and the run directory.

    Rank 0 picks, locks and prepares the directory (a fresh run's "-1" suffix must not be
    decided by each rank after another one has already written into it) and records the run
    (``record_run``); the others receive the choice, or rank 0's error. The lock is released
    when ``exit_stack`` closes (the run's end, or its crash). Returns
    ``(run_dir, resume, device, say, training_starts)``: ``say`` prints on rank 0 only, and
    ``training_starts()`` is called once set-up is done (until then a fresh run that fails
    leaves no directory behind).
    """
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    say = print if info.is_main else (lambda *args, **kwargs: None)
    device = check_machine(config, info)
    choice: tuple = (None, False, None)
    guard = None
    if info.is_main:
        try:
            given = run_dir is not None
            run_dir, resume, lock = prepare_run_dir(config, run_dir)
            exit_stack.callback(lock.release)
            _remove_temporaries(run_dir)
            fresh = not resume and not given and not (run_dir / CONFIG_FILE).is_file()
            guard = _FreshRunGuard(run_dir, armed=fresh)
            exit_stack.push(guard)  # runs before the lock is released (last in, first out)
            if lock.took_over:
                say(f"note: took over the lock of {run_dir} left by process {lock.took_over.get('pid', '?')}, "
                    "which is no longer running")
            record_run(run_dir, resume, config, kind, say)
            choice = (run_dir, resume, None)
        except ValueError as err:
            choice = (None, False, str(err))
            if not info.distributed:
                raise
    run_dir, resume, error = broadcast_object(choice if info.is_main else None, info)
    if error is not None:
        raise ValueError(error)
    return run_dir, resume, device, say, (guard.disarm if info.is_main else (lambda: None))


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


def record_skips(results: dict, *datasets, say=print) -> None:
    """``results["skipped"]``: every sample the run's data left out (``{source: {reason:
    count}}``, empty when none), also said in one line per source at the end of the run."""
    from topoclip.data.datasets import skip_totals

    results["skipped"] = skip_totals(*datasets)
    for source, counts in results["skipped"].items():
        say(f"skipped in {source}: " + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(counts.items())))
