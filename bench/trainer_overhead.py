"""Step time of the Trainer vs a bare training loop over the same modules, side by side.

    python bench/trainer_overhead.py [--steps 20] [--rounds 3] [key=value config overrides]

Both loops build the same model from the same seed, draw batches of the same data through a
DataLoader, and do forward -> ContrastiveLoss -> backward -> clip -> AdamW -> schedule ->
clamp. The Trainer adds what the bare loop lacks: the resumable sampler, loss details
(pos/neg similarity, accuracy), the JSONL line, TensorBoard scalars and the progress bar
every step. Rounds alternate (trainer, bare, trainer, ...) so that a machine whose load
changes affects both alike; the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import topoclip  # noqa: E402
from topoclip.config import load_config  # noqa: E402
from topoclip.data import build_tokenizer, make_collate, make_shapes  # noqa: E402
from topoclip.engine import ContrastiveTask, TrainingSettings  # noqa: E402
from topoclip.engine.optim import build_optimizer, build_scheduler  # noqa: E402
from topoclip.engine.trainer import Trainer, seed_everything  # noqa: E402
from topoclip.models import build_model  # noqa: E402


def fresh_model(cfg, tokenizer):
    seed_everything(cfg.train.seed)
    return build_model(cfg.model, cfg.topology.build(), vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)


def bare_loop(cfg, model, dataset, collate, steps: int) -> list[float]:
    oc = cfg.optim
    optimizer = build_optimizer(model, oc.lr, oc.weight_decay, tuple(oc.betas), oc.eps)
    scheduler = build_scheduler(optimizer, oc.warmup_steps, steps)
    loss_fn = topoclip.ContrastiveLoss(model.topology)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(
        dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, collate_fn=collate, generator=generator
    )
    times = []
    model.train()
    tick = time.perf_counter()
    for step, batch in enumerate(loader):
        if step == steps:
            break
        u, v = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        loss = loss_fn(u, v, model.logit_scale())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        model.logit_scale.clamp_()
        now = time.perf_counter()
        times.append(now - tick)
        tick = now
    return times


def trainer_loop(cfg, model, dataset, collate, run_dir: Path) -> list[float]:
    trainer = Trainer(ContrastiveTask(model, topoclip.ContrastiveLoss(model.topology)), dataset, collate, TrainingSettings.of(cfg), run_dir)
    return trainer.fit().step_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed segment")
    parser.add_argument("--rounds", type=int, default=3, help="alternating trainer/bare rounds")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each segment left out of the timing")
    parser.add_argument("overrides", nargs="*", help="config overrides (default config: configs/default.yaml)")
    args = parser.parse_args()

    defaults = ["train.batch_size=128", "train.checkpoint_every=0", "optim.warmup_steps=5", "eval.enabled=false"]
    cfg = load_config(REPO / "configs" / "default.yaml", defaults + [f"train.steps={args.steps}"] + args.overrides)
    data = make_shapes(cfg.data.shapes)
    tokenizer = build_tokenizer(data.captions("train"), cfg.data.vocab_size, cfg.model.text.context_length)
    collate = make_collate(tokenizer)
    print(
        f"{cfg.topology.name} k={cfg.model.num_tokens}, batch {cfg.train.batch_size}, {args.steps} steps x "
        f"{args.rounds} rounds, {torch.get_num_threads()} threads"
    )
    print(f"{'round':>5} {'trainer s/step':>15} {'bare s/step':>12} {'ratio':>7}")
    trainer_means, bare_means = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            t = trainer_loop(cfg, fresh_model(cfg, tokenizer), data.train, collate, Path(tmp) / f"run{r}")
            b = bare_loop(cfg, fresh_model(cfg, tokenizer), data.train, collate, args.steps)
            tm, bm = statistics.mean(t[args.warmup :]), statistics.mean(b[args.warmup :])
            trainer_means.append(tm)
            bare_means.append(bm)
            print(f"{r:>5} {tm:>15.4f} {bm:>12.4f} {tm / bm:>7.3f}", flush=True)
    ratio = statistics.median(trainer_means) / statistics.median(bare_means)
    print(f"median: trainer {statistics.median(trainer_means):.4f} s/step, bare {statistics.median(bare_means):.4f} s/step")
    print(f"trainer / bare = {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%)")


if __name__ == "__main__":
    main()
