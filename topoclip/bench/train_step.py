"""Training step time: topoclip's Trainer vs OpenCLIP's own step, on the same OpenCLIP model.

One random-init open_clip model (fp32) is copied twice. OpenCLIP's step is its
``train_one_epoch`` for one batch without accumulation: lr assignment, zero_grad,
``model(images, texts)`` -> ``ClipLoss`` -> backward -> AdamW step -> logit-scale clamp, with
open_clip's parameter groups (no weight decay on gains, biases and the scale) and default AdamW.
topoclip's step is ``Trainer.train_step`` on an ``OpenClipDualEncoder`` wrapping the other copy
on the sphere (loss details, gradient-norm computation, foreach AdamW, schedule and clamp
included). The same batch of random images and token ids feeds both; steps alternate (A/B,
the order flipping each round) so that load changes hit both alike; the ratio of medians is
reported (below 1: topoclip's step is the faster).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["BENCH_ARCHS", "run_train_step_bench", "format_result"]

# Small architectures registered with open_clip on demand (no download; random init). Any of
# open_clip's built-in names (e.g. ViT-B-32) works too.
BENCH_ARCHS = {
    "topoclip-bench-small": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 16, "head_width": 64},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
    },
    "topoclip-bench-tiny": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    },
}
LR, WEIGHT_DECAY, BETAS, EPS = 5e-4, 0.2, (0.9, 0.98), 1e-6  # open_clip's defaults for ViTs


def _create_openclip(name: str):
    import open_clip

    if name in BENCH_ARCHS and open_clip.get_model_config(name) is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(BENCH_ARCHS[name]))
            open_clip.add_model_config(path)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"--model: unknown open_clip architecture {name!r}")
    torch.manual_seed(0)
    model = open_clip.create_model(name, precision="fp32", output_dict=True)
    return model, cfg


def _openclip_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """open_clip's main.py: no weight decay on gains, biases and the logit scale."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WEIGHT_DECAY}],
        lr=LR, betas=BETAS, eps=EPS,
    )


def _openclip_step(model, loss_fn, optimizer, images, texts) -> None:
    """open_clip_train.train.train_one_epoch for one batch (accum_freq=1, no autocast, fp32)."""
    for group in optimizer.param_groups:  # scheduler(step): a cosine lr assignment
        group["lr"] = LR
    model.train()
    optimizer.zero_grad()
    model_out = model(images, texts)
    losses = loss_fn(**model_out, output_dict=True)
    total_loss = sum(losses.values())
    total_loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def _topoclip_trainer(model, batch: int, embed_dim: int, run_dir: str, device: str = "cpu"):
    import topoclip
    from topoclip.config import load_config
    from topoclip.engine import ContrastiveTask, Trainer, TrainingSettings
    from topoclip.models import OpenClipDualEncoder

    from .max_batch import _SizedPlaceholder

    cfg = load_config(None, [
        "topology.name=sphere", f"topology.dim={embed_dim}", "topology.n=null", "topology.m=null",
        f"train.batch_size={batch}", "train.precision=fp32", "train.grad_cache_chunk=null", "train.steps=1000",
        f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", f"optim.eps={EPS}", "optim.warmup_steps=0",
        "optim.grad_clip=null", "train.checkpoint_every=0", "eval.enabled=false", f"train.device={device}",
    ])
    encoder = OpenClipDualEncoder(model, topology=topoclip.topology("sphere", dim=embed_dim))
    loss_fn = topoclip.ContrastiveLoss(encoder.topology)
    return Trainer(ContrastiveTask(encoder, loss_fn), _SizedPlaceholder(batch), None, TrainingSettings.of(cfg), run_dir)


def run_train_step_bench(batch: int = 256, model: str = "topoclip-bench-small", steps: int = 5, warmup: int = 1,
                         log: Callable[[str], None] | None = None, device: str = "cpu") -> dict:
    """Alternate the two steps ``warmup + steps`` times; returns the medians (s) and their ratio."""
    if batch < 2 or steps < 1 or warmup < 0:
        raise ValueError(f"need --batch >= 2, --steps >= 1, warm-up >= 0 (got {batch}, {steps}, {warmup})")
    from open_clip.loss import ClipLoss

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    clip, cfg = _create_openclip(model)
    embed_dim = cfg["embed_dim"]
    size = cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    text = cfg["text_cfg"]
    length, vocab = text.get("context_length", 77), text.get("vocab_size", 49408)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    texts = torch.randint(1, vocab - 1, (batch, length), generator=g).to(device)
    data = {"images": images, "input_ids": texts, "attention_mask": torch.ones_like(texts)}
    clip = clip.to(device)
    cuda = torch.device(device).type == "cuda"

    ours_model = copy.deepcopy(clip)
    clip_loss, optimizer = ClipLoss(cache_labels=True), _openclip_optimizer(clip)
    times = {"openclip": [], "topoclip": []}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = _topoclip_trainer(ours_model, batch, embed_dim, run_dir, device)
        run = {
            "openclip": lambda: _openclip_step(clip, clip_loss, optimizer, images, texts),
            "topoclip": lambda: trainer.train_step(data),
        }
        for r in range(warmup + steps):
            order = ("openclip", "topoclip") if r % 2 == 0 else ("topoclip", "openclip")
            for name in order:
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                run[name]()
                if cuda:
                    torch.cuda.synchronize(device)
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
            if r >= warmup:
                log(f"  step {r - warmup}: openclip {times['openclip'][-1]:.3f} s, topoclip {times['topoclip'][-1]:.3f} s")
    oc, ours = statistics.median(times["openclip"]), statistics.median(times["topoclip"])
    return {"model": model, "batch": batch, "steps": steps, "openclip": oc, "topoclip": ours, "ratio": ours / oc,
            "threads": torch.get_num_threads()}


def format_result(res: dict) -> str:
    return "\n".join([
        "| model | batch | OpenCLIP step (s) | topoclip step (s) | topoclip / OpenCLIP |",
        "|---|---:|---:|---:|---:|",
        f"| {res['model']} | {res['batch']} | {res['openclip']:.3f} | {res['topoclip']:.3f} | {res['ratio']:.3f} |",
        "",
        f"median of {res['steps']} alternating steps, fp32, {res['threads']} threads",
    ])
