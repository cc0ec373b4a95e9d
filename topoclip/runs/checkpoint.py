"""Atomic, unpickle-free checkpoints.

A checkpoint is a directory ``<run>/checkpoints/step_<00000100>/`` holding

- ``model.safetensors``  the model weights (loadable without any pickle),
- ``state.pt``           optimizer, scheduler, RNG states, step, data position, counters;
                         plain tensors/numbers/lists only, read with ``torch.load(weights_only=True)``,
- ``config.json``        the experiment config the run was started with.

It is written to a hidden temporary directory next to it, every file and the directory are
fsync'ed, and then the directory is renamed into place (``os.replace``): a reader (or a run
resumed after SIGKILL) sees either the complete previous checkpoints or the new one, never a
half-written file. Temporary directories left by a killed writer are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from topoclip.atomic import TMP_PREFIX, atomic_write_dir

__all__ = [
    "CHECKPOINTS_DIR",
    "save_checkpoint",
    "save_best",
    "BEST_DIR",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_weights",
    "CorruptCheckpointError",
    "CheckpointWriteError",
    "load_training_state",
    "read_checkpoint_config",
    "capture_rng_state",
    "restore_rng_state",
    "remove_stale_temporaries",
]

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step can touch, as weights-only-loadable data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root`` (a run dir or its checkpoints dir), oldest first."""
    root = Path(root)
    if (root / CHECKPOINTS_DIR).is_dir():
        root = root / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_stale_temporaries(root: str | os.PathLike) -> None:
    """Delete half-written checkpoint directories left by a killed writer."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    training_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically and keep only the newest ``keep_last`` checkpoints.

    ``root`` is the checkpoints directory. If a checkpoint for ``step`` already exists it is
    kept as is (the state at a given step is the same).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if final.is_dir() and (final / STATE_FILE).is_file():
        return final
    _write_checkpoint_dir(root, final, model, {"step": step, **training_state}, config)
    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint_dir(root: Path, final: Path, model: nn.Module, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Write the three files into a hidden temporary directory, fsync, rename into place."""

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / WEIGHTS_FILE))
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    try:
        atomic_write_dir(final, write)
    # A full disk is an OSError from the file writes, a RuntimeError from torch.save's zip
    # writer and a SafetensorError from safetensors.
    except (OSError, RuntimeError, SafetensorError) as err:
        raise CheckpointWriteError(f"cannot write checkpoint {final}: {_reason(err)} "
                                   f"({_free_space(root)} free on its disk)") from None


def save_best(root: str | os.PathLike, model: nn.Module, best: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write the weights of the best evaluation so far to ``root/best`` (``root`` is the
    checkpoints directory), replacing the previous best; ``best`` (step, metric, value) is its
    state file. ``topoclip.load_run(run/checkpoints/best)`` opens it; resume never does."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / BEST_DIR
    _write_checkpoint_dir(root, final, model, {"best": dict(best), "step": int(best["step"])}, config)
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory meant by ``path``: a run dir (its latest checkpoint), a
    checkpoints dir, a checkpoint dir, or a file inside one."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint: {path} does not exist")
    if path.is_file():
        path = path.parent
    if (path / STATE_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"checkpoint: no checkpoint found in {path}")
    return latest


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (full disk, read-only directory); nothing half-written
    is left and the previous checkpoints are untouched."""


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    return f"{free / 2**20:.1f} MiB"


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (cut short, zero bytes, not the format)."""


# What a cut-short or foreign file raises inside torch.load / safetensors: zip and pickle
# errors, a short read, a bad header. SafetensorError derives from Exception only.
def _unreadable(path: Path, err: BaseException) -> CorruptCheckpointError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CorruptCheckpointError(f"checkpoint file {path} cannot be read ({type(err).__name__}: {reason})")


def load_weights(model: nn.Module, checkpoint_dir: str | os.PathLike, strict: bool = True) -> None:
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse the file is reported with its path
        if isinstance(err, RuntimeError) and "size mismatch" in str(err):
            raise ValueError(f"checkpoint {checkpoint_dir}: weights do not match the model ({str(err).splitlines()[0]})") from None
        raise _unreadable(path, err) from None
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {checkpoint_dir}: weights do not match the model "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )


def load_training_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_FILE
    try:
        # weights_only: a checkpoint from elsewhere cannot run code when it is loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as err:  # noqa: BLE001 - EOFError, zip/pickle errors, bad magic: all "cannot be read"
        raise _unreadable(path, err) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptCheckpointError(f"checkpoint file {path} holds no training state")
    return state


def read_checkpoint_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / CONFIG_FILE).read_text())
