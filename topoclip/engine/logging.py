"""Per-step training logs: a JSON-lines file and TensorBoard scalars.

Both are cheap enough to write every step (one short line; TensorBoard queues events and
writes them from its own thread). On resume, entries after the resumed step (written by the
killed run after its last checkpoint) are dropped, so each step appears once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from topoclip.atomic import atomic_write_text
from topoclip.runs.layout import EVAL_LOG_FILE, LOG_FILE, TENSORBOARD_DIR, read_jsonl

__all__ = ["RunLogger"]

def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write them as strings so the file stays standard JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class RunLogger:
    """Writes ``log.jsonl`` and TensorBoard events under ``run_dir``.

    ``resume_step``: the step training continues after; later entries are discarded.
    """

    def __init__(self, run_dir: str | os.PathLike, jsonl: bool = True, tensorboard: bool = True, resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = None
        self._eval_jsonl = None
        self._writer = None
        if jsonl:
            self._jsonl = self._open(LOG_FILE, resume_step)
            self._eval_jsonl = self._open(EVAL_LOG_FILE, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events the killed run wrote after its last checkpoint.
            self._writer = SummaryWriter(
                str(self.run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step > 0 else None
            )

    def _open(self, name: str, resume_step: int):
        path = self.run_dir / name
        if resume_step > 0:
            _truncate_after(path, resume_step)
        else:
            path.unlink(missing_ok=True)
        # Line-buffered: a killed run keeps every completed line.
        return open(path, "a", buffering=1)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation during training: one line of ``eval.jsonl``, TensorBoard ``eval/*``."""
        if self._eval_jsonl is not None:
            self._eval_jsonl.write(json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"eval/{key}", value, step)

    def log(self, record: dict[str, Any], prefix: str = "train") -> None:
        """One JSONL line; every numeric entry but ``step`` also as a TensorBoard scalar."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self._writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        for handle in (self._jsonl, self._eval_jsonl):
            if handle is not None:
                handle.close()
        self._jsonl = self._eval_jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
