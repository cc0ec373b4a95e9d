"""The Trainer on 2 gloo processes = the Trainer on 1 process with the same global batch.

Each rank keeps its half of every global batch, the model runs under DDP (logit scale
included), the loss gathers features with gradients; plain steps, local loss + gradient cache
under no_sync, a resume in which every rank loads the checkpoint, and evaluation every step on
rank 0, and the sigmoid loss with its learnable bias all end with the 1-process parameters.
"""

from __future__ import annotations

import os

import pytest
import torch

import topoclip
from topoclip.config import config_from_dict
from topoclip.engine import ContrastiveTask, TrainingSettings
from topoclip.engine.distributed import DistInfo, init_distributed
from topoclip.engine.trainer import BestRule, Trainer, seed_everything
from topoclip.losses import SigmoidLoss
from topoclip.models import ModelConfig, build_model
from topoclip.runs import read_jsonl
from topoclip.runs.checkpoint import list_checkpoints

VOCAB, LENGTH, STEPS = 30, 8, 3


class PairSet(torch.utils.data.Dataset):
    """20 random 16x16 images with three-word captions: 2 batches of 8 per epoch, so 3 steps
    cross an epoch boundary."""

    def __init__(self, n=20):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.words = torch.randint(2, VOCAB, (n, 3), generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], " ".join(str(int(w)) for w in self.words[i])


def collate(items):
    ids = torch.zeros(len(items), LENGTH, dtype=torch.long)
    ids[:, 0] = 1  # [CLS]
    for row, (_, caption) in enumerate(items):
        ids[row, 1:4] = torch.tensor([int(w) for w in caption.split()])
    mask = (ids > 0).long()
    return {"images": torch.stack([img for img, _ in items]), "input_ids": ids, "attention_mask": mask}


def make_config(out_dir, *overrides):
    return config_from_dict(
        {},
        [
            f"train.steps={STEPS}",
            "train.batch_size=8",
            "train.checkpoint_every=0",
            # Adam turns rounding noise in a zero gradient (attention key biases) into steps of
            # about lr * noise / eps; a small lr keeps that far below the tolerance.
            "optim.lr=1e-3",
            "optim.warmup_steps=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            "topology.name=oblique-inner",
            "topology.n=8",
            "topology.m=4",
            f"output.dir={out_dir}",
            *overrides,
        ],
    )


class NaNOnLastRank:
    """The contrastive loss, but NaN on the last rank at one call: every rank must skip that
    step together (a rank that went on to backward alone would wait forever in the all-reduce)."""

    def __init__(self, inner, info: DistInfo, call: int):
        self.inner, self.info, self.call, self.calls = inner, info, call, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss, details = self.inner(*args, **kwargs)
        if self.calls == self.call and self.info.rank == self.info.world_size - 1:
            loss = loss * float("nan")
        return loss, details


def make_trainer(cfg, run_dir, info: DistInfo, local_loss=False, nan_at=None, sigmoid=False, **trainer_options):
    seed_everything(0)
    model_cfg = ModelConfig.from_dict({
        "num_tokens": 1,
        "image": {"img_size": 16, "patch_size": 8, "depth": 1, "width": 32, "heads": 2},
        "text": {"width": 32, "depth": 1, "heads": 2, "context_length": LENGTH},
        **({"logit_bias": -10.0, "logit_scale": {"init": 10.0}} if sigmoid else {}),
    })
    model = build_model(model_cfg, cfg.topology.build(), vocab_size=VOCAB)
    if sigmoid:  # the bias comes out of the DDP forward: its gradient is averaged too
        loss_fn = SigmoidLoss(model.topology, tile_threshold=0, tile_size=3)
    else:
        loss_fn = topoclip.ContrastiveLoss(model.topology, local_loss=local_loss)
    if nan_at is not None:
        loss_fn = NaNOnLastRank(loss_fn, info, nan_at)
    return Trainer(ContrastiveTask(model, loss_fn), PairSet(), collate, TrainingSettings.of(cfg), run_dir, device="cpu", dist_info=info,
                   **trainer_options)


class RankZeroEvaluator:
    """Embeds random images with the model and draws random numbers (both must leave the
    training untouched); on any rank but 0 it refuses to run."""

    def __init__(self, info: DistInfo):
        self.info, self.model, self.calls = info, None, 0

    def __call__(self):
        assert self.info.rank == 0, f"evaluation ran on rank {self.info.rank}"
        self.calls += 1
        with torch.no_grad():
            feats = self.model.encode_image(torch.randn(4, 3, 16, 16))
        return {"probe/score": float(feats.sum()) + float(torch.rand(()))}


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def runs(out_dir, info: DistInfo) -> dict[str, dict[str, torch.Tensor]]:
    """Every variant's final weights: plain; local loss + gradient cache (chunks of 2 rows);
    2 steps, then a resume from the step-2 checkpoint for the last step; a skipped step."""
    got = {}
    checkpointed = make_config(out_dir, "train.checkpoint_every=2", "train.keep_last=5")
    plain_dir = os.path.join(out_dir, "plain")
    plain = make_trainer(checkpointed, plain_dir, info)
    plain.fit()
    got["plain"] = weights(plain)

    cached = make_trainer(make_config(out_dir, "train.grad_cache_chunk=2"), os.path.join(out_dir, "cached"), info, local_loss=True)
    cached.fit()
    got["cached"] = weights(cached)

    resumed = make_trainer(checkpointed, os.path.join(out_dir, "resumed"), info)
    assert resumed.resume(list_checkpoints(plain_dir)[0])  # the step-2 checkpoint, on every rank
    assert resumed.step == 2
    resumed.fit()
    got["resumed"] = weights(resumed)

    # Evaluation every step on rank 0 (the best checkpoint kept too): the same trajectory.
    evaluator = RankZeroEvaluator(info)
    evaluated = make_trainer(checkpointed, os.path.join(out_dir, "evaluated"), info, evaluator=evaluator, eval_every=1,
                             best=BestRule("probe/score", higher_is_better=True))
    evaluator.model = evaluated.model
    evaluated.fit()
    assert evaluator.calls == (STEPS if info.rank == 0 else 0)
    got["evaluated"] = weights(evaluated)

    # Hyperbolic space with a learned curvature: the curvature comes out of the DDP forward
    # like the scale, so its gradient is averaged, with and without the gradient cache.
    hyperbolic = ["topology.name=lorentz", "topology.dim=16", "topology.n=null", "topology.m=null"]
    lorentz = make_trainer(make_config(out_dir, *hyperbolic), os.path.join(out_dir, "lorentz"), info)
    lorentz.fit()
    got["lorentz"] = weights(lorentz)
    cached_lorentz = make_trainer(make_config(out_dir, *hyperbolic, "train.grad_cache_chunk=2"),
                                  os.path.join(out_dir, "lorentz-cached"), info, local_loss=True)
    cached_lorentz.fit()
    got["lorentz-cached"] = weights(cached_lorentz)

    sigmoid = make_trainer(make_config(out_dir), os.path.join(out_dir, "sigmoid"), info, sigmoid=True)
    sigmoid.fit()
    got["sigmoid"] = weights(sigmoid)

    skipping = make_trainer(make_config(out_dir), os.path.join(out_dir, "skipped"), info, nan_at=2)
    assert skipping.fit().skipped_steps == 1
    got["skipped"] = weights(skipping)
    return got


def _worker(rank, world, init_file, out_dir):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        info = init_distributed("cpu")
        got = runs(out_dir, info)
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_trainer_equals_one_process_trainer(tmp_path):
    import torch.multiprocessing as mp

    two = tmp_path / "two"
    two.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(two)), nprocs=2)
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    one = runs(str(tmp_path / "one"), DistInfo())

    initial = weights(make_trainer(make_config(tmp_path), tmp_path / "init-run", DistInfo()))
    assert any(not torch.equal(initial[k], one["plain"][k]) for k in initial)  # the steps moved the weights
    worst = 0.0
    assert any(not torch.equal(one["skipped"][k], one["plain"][k]) for k in initial)
    assert one["sigmoid"]["logit_bias.bias"] != -10.0  # the sigmoid run trained its bias
    assert one["lorentz"]["curvature.log_c"] != 0.0  # and the hyperbolic one its curvature
    for variant, reference in (("plain", "plain"), ("cached", "plain"), ("resumed", "plain"), ("evaluated", "plain"),
                               ("skipped", "skipped"), ("sigmoid", "sigmoid"), ("lorentz", "lorentz"),
                               ("lorentz-cached", "lorentz")):
        for k, want in one[reference].items():
            worst = max(worst, (rank0[variant][k] - want).abs().max().item())
            torch.testing.assert_close(rank0[variant][k], want, atol=1e-5, rtol=0, msg=f"{variant}: {k}")
            # DDP keeps the ranks identical
            torch.testing.assert_close(rank1[variant][k], rank0[variant][k], atol=1e-7, rtol=0, msg=f"rank 1 {variant}: {k}")
    print(f"max |2-process - 1-process| parameter difference: {worst:.2e}")

    # Rank 0 alone logs and checkpoints: one log line per step, the checkpoints of steps 2 and 3.
    assert [r["step"] for r in read_jsonl(two / "plain" / "log.jsonl")] == [1, 2, 3]
    assert [p.name for p in list_checkpoints(two / "plain")] == ["step_00000002", "step_00000003"]
    # Rank 0 alone evaluated: one line a step, and the best of them kept as a checkpoint.
    assert [r["step"] for r in read_jsonl(two / "evaluated" / "eval.jsonl")] == [1, 2, 3]
    assert (two / "evaluated" / "checkpoints" / "best").is_dir()
    # The logged loss is the global batch's (the mean over ranks of the local losses).
    logged = [r["loss"] for r in read_jsonl(two / "cached" / "log.jsonl")]
    want = [r["loss"] for r in read_jsonl(tmp_path / "one" / "plain" / "log.jsonl")]
    assert logged == pytest.approx(want, abs=1e-5)


def test_batch_must_split_evenly_across_ranks(tmp_path):
    cfg = make_config(tmp_path, "train.batch_size=9")
    with pytest.raises(ValueError, match="train.batch_size=9 must be divisible"):
        make_trainer(cfg, tmp_path / "run", DistInfo(rank=0, world_size=2))
