"""The largest global batch for which one exact training step fits in a memory budget.

Each trial is one full training step of the default model (``configs/default.yaml`` or the
given config) on random images and token ids of the model's shapes, with the tiled loss forced
(``loss.tile_threshold=0``) and the gradient cache (``train.grad_cache_chunk``), in its own
child process whose resident peak is watched (``child.py``): a trial fails when the peak passes
the limit, when the child dies (MemoryError, the kernel's OOM killer) or when it times out.
The search doubles the batch from ``start`` until a trial fails (or ``max_batch``), then
optionally bisects between the last success and the first failure.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from typing import Callable

import torch

from .child import ChildOutcome, available_memory_bytes, run_child

__all__ = ["trial", "search_max_batch", "run_max_batch", "format_trials"]


class _SizedPlaceholder(torch.utils.data.Dataset):
    """The Trainer wants a training set at least one batch long; train_step never reads it."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        raise IndexError("placeholder dataset: the benchmark feeds batches to train_step directly")


def trial(batch: int, chunk: int, tile_size: int = 1024, config: str | None = None, overrides: list[str] = (),
          device: str = "cpu") -> dict:
    """One exact training step at global batch ``batch`` (run in a child); returns its time and
    loss, and on a CUDA device its peak allocated memory (``peak_cuda``)."""
    from topoclip.config import load_config
    from topoclip.engine import ContrastiveTask, Trainer, TrainingSettings, seed_everything
    from topoclip.models import build_model
    from topoclip.recipes.common import build_loss

    settings = [
        f"train.batch_size={batch}", f"train.grad_cache_chunk={chunk}", "train.steps=1", f"train.device={device}",
        "optim.warmup_steps=0", "loss.tile_threshold=0", f"loss.tile_size={tile_size}", "eval.enabled=false",
        "train.checkpoint_every=0",
    ]
    cfg = load_config(config, settings + list(overrides))
    seed_everything(cfg.train.seed)
    topology = cfg.topology.build()
    model = build_model(cfg.model, topology, vocab_size=cfg.data.vocab_size, pad_token_id=0)
    size = cfg.model.image.img_size or cfg.data.shapes.image_size
    length = cfg.model.text.context_length
    g = torch.Generator().manual_seed(0)
    data = {
        "images": torch.randn(batch, 3, size, size, generator=g),
        "input_ids": torch.randint(1, cfg.data.vocab_size, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }
    cuda = torch.device(device).type == "cuda"
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(ContrastiveTask(model, build_loss(cfg, topology)), _SizedPlaceholder(batch), None, TrainingSettings.of(cfg), run_dir)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        metrics = trainer.train_step(data)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    if metrics["skipped"] or not math.isfinite(metrics["loss"]):
        raise RuntimeError(f"the step at batch {batch} was skipped (loss {metrics['loss']})")
    out = {"step_time": seconds, "loss": metrics["loss"]}
    if cuda:
        out["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    return out


def search_max_batch(fits: Callable[[int], bool], start: int, max_batch: int, bisect: int = 0,
                     granularity: int = 1) -> tuple[int | None, int | None]:
    """(largest batch that fits, smallest batch found not to fit; None where unknown).

    Doubles from ``start`` while trials succeed (halves while they fail), then runs up to
    ``bisect`` bisection trials between the two, on multiples of ``granularity``.
    """
    if start < 1 or max_batch < start or granularity < 1 or bisect < 0:
        raise ValueError(f"need 1 <= start <= max_batch, granularity >= 1, bisect >= 0 "
                         f"(got start={start}, max_batch={max_batch}, granularity={granularity}, bisect={bisect})")
    lo = hi = None
    b = start
    if fits(b):
        lo = b
        while b * 2 <= max_batch:
            b *= 2
            if not fits(b):
                hi = b
                break
            lo = b
    else:
        hi = b
        while b // 2 >= 1:
            b //= 2
            if fits(b):
                lo = b
                break
            hi = b
    for _ in range(bisect):
        if lo is None or hi is None:
            break
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def run_max_batch(limit_gib: float = 24.0, chunk: int = 256, start: int = 8192, max_batch: int = 131072,
                  bisect: int = 0, tile_size: int = 1024, timeout: float | None = None, config: str | None = None,
                  overrides: list[str] = (), log: Callable[[str], None] | None = None,
                  run: Callable[..., ChildOutcome] = run_child) -> dict:
    """Search the largest batch; returns {limit_gib, chunk, largest, smallest_failing, trials}."""
    if limit_gib <= 0 or chunk < 1:
        raise ValueError(f"--limit-gib must be > 0 and --chunk >= 1 (got {limit_gib}, {chunk})")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    limit = int(limit_gib * 2**30)
    free = available_memory_bytes()
    if free is not None and free < limit:
        log(f"warning: only {free / 2**30:.1f} GiB are free, below the {limit_gib:g} GiB limit: a trial between "
            "the two is stopped by the system (counted as not fitting), so the result is a lower bound")
    trials: list[dict] = []

    def fits(batch: int) -> bool:
        params = dict(batch=batch, chunk=chunk, tile_size=tile_size, config=config, overrides=list(overrides))
        out = run("max-batch", params, limit_bytes=limit, timeout=timeout)
        row = {"batch": batch, "ok": out.ok, "peak": out.peak_rss, "seconds": out.seconds,
               "step_time": out.result.get("step_time"), "error": out.error}
        trials.append(row)
        step = f"step {row['step_time']:.1f} s" if out.ok else f"failed: {out.error}"
        log(f"  batch {batch:8d}: peak {out.peak_rss / 2**30:6.2f} GiB, {step}")
        return out.ok

    lo, hi = search_max_batch(fits, start, max_batch, bisect, granularity=chunk if start % chunk == 0 else 1)
    return {"limit_gib": limit_gib, "chunk": chunk, "largest": lo, "smallest_failing": hi, "trials": trials}


def format_trials(result: dict) -> str:
    """Markdown table of the trials, then the answer."""
    lines = ["| global batch | fits | peak GiB | step time (s) | note |", "|---:|---|---:|---:|---|"]
    for t in result["trials"]:
        step = f"{t['step_time']:.1f}" if t["step_time"] is not None else "-"
        lines.append(f"| {t['batch']} | {'yes' if t['ok'] else 'no'} | {t['peak'] / 2**30:.2f} | {step} | {t['error']} |")
    largest = result["largest"]
    bound = f" (first failure at {result['smallest_failing']})" if result["smallest_failing"] else " (search cap reached)"
    answer = f"largest exact step within {result['limit_gib']:g} GiB (chunk {result['chunk']}): "
    lines += ["", answer + (f"{largest}{bound}" if largest else "none")]
    return "\n".join(lines)
