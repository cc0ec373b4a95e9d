"""What a resumed run may change in its config, and what it may not.

A run continues bit-exactly only with the model, data, topology, loss, optimizer, schedule and
random seeds it was started with: a new learning rate would not reach the scheduler (its base
rates come from the checkpoint) yet be recorded, a new width fails deep inside PyTorch's
``load_state_dict``, a new topology would mix two spaces in one run. Those changes are refused,
all of them in one message. The run's length, its checkpointing, evaluation, logging and the
machine it runs on (device, threads, workers, the exact memory-saving switches) may change;
they are reported and recorded, so that the run directory says what was used.

The rule is an allow-list: a field added to the config later is refused until it is known to
be harmless.
"""

from __future__ import annotations

from typing import Any

from topoclip.dataclass_io import config_differences, flatten

__all__ = ["MAY_CHANGE_ON_RESUME", "resume_changes", "ResumeRefused"]

# Dotted fields (or whole sections) a resume may change.
MAY_CHANGE_ON_RESUME: tuple[str, ...] = (
    "train.steps",
    "train.epochs",
    "train.resume",
    "train.checkpoint_every",
    "train.keep_last",
    "train.device",
    "train.threads",
    "train.num_workers",
    # Exactly equivalent ways of computing the same step (gradient cache, recomputation).
    "train.grad_cache_chunk",
    "train.grad_checkpointing",
    "train.compile",
    "train.max_consecutive_skips",
    "eval",
    "logging",
    "output",
)


class ResumeRefused(ValueError):
    """A resume asked to change what a run cannot change midway."""


def _allowed(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in MAY_CHANGE_ON_RESUME)


def resume_changes(saved: dict[str, Any], new: dict[str, Any], where: str = "") -> list[str]:
    """The harmless fields in which ``new`` differs from the run's ``saved`` config (each as
    ``key: old -> new``); a ``ResumeRefused`` listing every other changed field."""
    changed = config_differences(saved, new)
    refused = [k for k in changed if not _allowed(k)]
    flat_old, flat_new = flatten(saved), flatten(new)
    if refused:
        shown = ", ".join(f"{k} ({flat_old.get(k)!r} -> {flat_new.get(k)!r})" for k in refused)
        prefix = f"{where}: " if where else ""
        raise ResumeRefused(
            f"{prefix}a resumed run keeps its model, data, topology, loss, optimizer, schedule and seeds; "
            f"refused: {shown} (start a new run for these)"
        )
    return [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in changed if k != "train.resume"]
