"""The Trainer on a tiny stand-in dual encoder: exact resume, skipped non-finite steps, logs,
temperature handling. (The real towers and data run end to end in test_train_e2e.py.)"""

import json
import math

import pytest
import torch
from torch import nn

import topoclip
from topoclip.config import config_from_dict
from topoclip.engine import ContrastiveTask, TrainingSettings
from topoclip.engine.trainer import Trainer, seed_everything
from topoclip.runs.checkpoint import latest_checkpoint, list_checkpoints


class TinyDual(nn.Module):
    """A DualEncoder stand-in: an MLP on pixels, a mean of word embeddings; dropout on both
    so that exact resume also needs the RNG state."""

    def __init__(self, topology, vocab=40, width=24, scale_init=10.0, learnable=True, scale_max=100.0):
        super().__init__()
        self.topology = topology
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, width), nn.GELU(), nn.Dropout(0.2))
        self.image_head = nn.Linear(width, topology.dim)
        self.words = nn.Embedding(vocab, width)
        self.text_drop = nn.Dropout(0.2)
        self.text_head = nn.Linear(width, topology.dim)
        self.logit_scale = topoclip.LogitScale(init=scale_init, learnable=learnable, max=scale_max)

    def encode_image(self, images):
        return self.topology.project(self.image_head(self.image(images)))

    def encode_text(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.words(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.topology.project(self.text_head(self.text_drop(pooled)))

    def forward(self, images, input_ids, attention_mask):
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)


class PairSet(torch.utils.data.Dataset):
    def __init__(self, n=30, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 6, (n,), generator=g)
        self.images = torch.randn(n, 3, 4, 4, generator=g) + self.labels.view(n, 1, 1, 1).float()
        self.captions = [f"w{int(c)} w{int(c) + 6} x{i % 3}" for i, c in enumerate(self.labels)]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.images[i], self.captions[i]


def collate(items):
    ids = torch.zeros(len(items), 5, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (_, caption) in enumerate(items):
        words = caption.split()
        ids[row, 0] = 1
        for j, word in enumerate(words):
            ids[row, j + 1] = 2 + (int(word[1:]) + (20 if word[0] == "x" else 0)) % 38
        mask[row, : len(words) + 1] = 1
    return {"images": torch.stack([img for img, _ in items]), "input_ids": ids, "attention_mask": mask}


TOPO_CFG = {"sphere": ["topology.name=sphere", "topology.dim=8"], "oblique-inner": ["topology.m=2", "topology.dim=8"]}


def make_config(tmp_path, *overrides, topology="oblique-inner"):
    return config_from_dict(
        {},
        [
            "train.steps=7",
            "train.batch_size=8",
            "train.checkpoint_every=3",
            "train.keep_last=5",
            "optim.lr=0.01",
            "optim.warmup_steps=2",
            "logging.progress=false",
            f"output.dir={tmp_path}",
            *TOPO_CFG[topology],
            *overrides,
        ],
    )


def make_trainer(cfg, run_dir, model_seed=0, loss_fn=None, **model_kw):
    seed_everything(model_seed)
    topo = cfg.topology.build()
    model = TinyDual(topo, **model_kw)
    return Trainer(ContrastiveTask(model, loss_fn or topoclip.ContrastiveLoss(topo)), PairSet(), collate, TrainingSettings.of(cfg), run_dir)


class CrashAt:
    """A loss that raises at a given call, like a process killed mid-run."""

    def __init__(self, topo, call):
        self.inner, self.call, self.calls = topoclip.ContrastiveLoss(topo), call, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.call:
            raise KeyboardInterrupt("killed")
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("topology", ["sphere", "oblique-inner"])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, topology):
    cfg = make_config(tmp_path, topology=topology)
    # 30 pairs / batch 8 = 3 batches per epoch: 7 steps cross two epoch boundaries.
    full = make_trainer(cfg, tmp_path / "full")
    full.fit()
    assert full.step == 7

    crashed = make_trainer(cfg, tmp_path / "resumed", loss_fn=CrashAt(cfg.topology.build(), call=5))
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000003"

    # A new "process": different init and RNG state, then resume.
    torch.manual_seed(999)
    resumed = make_trainer(cfg, tmp_path / "resumed", model_seed=123)
    assert resumed.resume()
    assert resumed.step == 3
    resumed.fit()
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    # The log has each step once, also those the crashed run wrote past its checkpoint.
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_checkpoint_every_and_at_end(tmp_path):
    cfg = make_config(tmp_path, "train.keep_last=2")
    trainer = make_trainer(cfg, tmp_path / "run")
    result = trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000006", "step_00000007"]
    assert result.checkpoint.name == "step_00000007"


class NanAt:
    def __init__(self, topo, call):
        self.inner, self.call, self.calls = topoclip.ContrastiveLoss(topo), call, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss, info = self.inner(*args, **kwargs)
        return (loss * math.nan if self.calls == self.call else loss), info


def test_non_finite_loss_skips_the_update(tmp_path):
    cfg = make_config(tmp_path, "train.steps=4", "train.checkpoint_every=0")
    trainer = make_trainer(cfg, tmp_path / "run", loss_fn=NanAt(cfg.topology.build(), call=3))
    snapshots = []
    original = trainer.train_step

    def recording_step(batch):
        out = original(batch)
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return out

    trainer.train_step = recording_step
    result = trainer.fit()
    assert result.skipped_steps == 1 and trainer.skipped_steps == 1
    for key in snapshots[1]:
        assert torch.equal(snapshots[1][key], snapshots[2][key]), key  # step 3 changed nothing
    assert not torch.equal(snapshots[2]["image_head.weight"], snapshots[3]["image_head.weight"])
    # Adam's own step counter did not advance on the skipped step.
    state = trainer.optimizer.state[trainer.model.image_head.weight]
    assert int(state["step"]) == 3
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, False, True, False]
    assert records[2]["loss"] == "nan" and records[-1]["skipped_total"] == 1


def test_log_lines_and_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(tmp_path, "train.steps=5")
    trainer = make_trainer(cfg, tmp_path / "run")
    trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for key in ("loss", "scale", "lr", "grad_norm", "samples_per_s", "pos_sim", "neg_sim", "acc"):
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for r in records), key
    # lr in the log is the one used for that update: warm-up 2 steps, then cosine to 0 at 5.
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.01)
    assert lrs[3] == pytest.approx(0.01 * (1 + math.cos(math.pi / 3)) / 2)  # 1/3 of the way down
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scale = events.Scalars("train/scale")
    assert [e.step for e in scale] == [1, 2, 3, 4, 5]
    assert [e.value for e in scale] == pytest.approx([r["scale"] for r in records], rel=1e-6)


def scale_hungry_loss(u, v, scale, return_details=False):
    """A loss that always wants a larger scale (its gradient w.r.t. the scale is -1)."""
    loss = -scale + 0.0 * (u.sum() + v.sum())
    return loss, {"pos_sim": 0.0, "neg_sim": 0.0, "accuracy": 0.0}


def test_temperature_max_is_enforced_after_each_step(tmp_path):
    cfg = make_config(tmp_path, "train.steps=3", "optim.lr=0.5", "optim.warmup_steps=0", "schedule.name=constant")
    trainer = make_trainer(cfg, tmp_path / "run", loss_fn=scale_hungry_loss, scale_init=99.0, scale_max=100.0)
    seen = []
    original = trainer.train_step

    def recording_step(batch):
        out = original(batch)
        seen.append(trainer.model.logit_scale.log_scale.item())
        return out

    trainer.train_step = recording_step
    trainer.fit()
    # Adam's first step alone would move log(99) by ~lr = 0.5, well past log(100).
    assert seen == pytest.approx([math.log(100.0)] * 3, abs=1e-6)


def test_fixed_temperature_stays_fixed(tmp_path):
    cfg = make_config(tmp_path, "train.steps=3")
    trainer = make_trainer(cfg, tmp_path / "run", scale_init=5.0, learnable=False)
    trainer.fit()
    assert trainer.model.logit_scale.value == pytest.approx(5.0)


def test_resume_rejects_a_different_dataset(tmp_path):
    cfg = make_config(tmp_path, "train.steps=3")
    make_trainer(cfg, tmp_path / "run").fit()
    other = make_config(tmp_path, "train.steps=3", "train.batch_size=6")
    with pytest.raises(ValueError, match="batches of 8"):
        make_trainer(other, tmp_path / "run").resume()


def test_gradient_cache_run_equals_full_batch_run(tmp_path):
    """train.grad_cache_chunk: the same steps, encoded 3 pairs at a time (dropout off, so the
    two runs compute the same function)."""

    def run(name, *overrides):
        trainer = make_trainer(make_config(tmp_path, *overrides), tmp_path / name)
        for module in trainer.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        trainer.fit()
        return trainer.model.state_dict()

    plain = run("plain")
    cached = run("cached", "train.grad_cache_chunk=3")
    for name, value in plain.items():
        torch.testing.assert_close(cached[name], value, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="train.grad_cache_chunk"):
        make_config(tmp_path, "train.grad_cache_chunk=0")


def test_bf16_autocast_trains_without_nan_and_fp16_needs_cuda(tmp_path):
    trainer = make_trainer(make_config(tmp_path, "train.precision=bf16"), tmp_path / "bf16")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit()
    assert result.skipped_steps == 0 and math.isfinite(result.final_loss)
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ids = torch.ones(4, 5, dtype=torch.long)
    u, v, _ = trainer._encode({"images": torch.randn(4, 3, 4, 4), "input_ids": ids, "attention_mask": ids})
    assert u.dtype == v.dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.precision"):
            make_trainer(make_config(tmp_path, "train.precision=fp16"), tmp_path / "fp16")
    with pytest.raises(ValueError, match="train.precision"):
        make_config(tmp_path, "train.precision=fp8")


class UniformLogits(nn.Module):
    """A loss stuck at ln(batch) with no gradient: what a collapsed run reports."""

    def forward(self, u, v, scale, return_details=False):
        loss = torch.log(torch.tensor(float(u.shape[0]))) + 0.0 * (u.sum() + v.sum() + scale)
        return (loss, {}) if return_details else loss


def test_a_collapsed_run_is_named_once_with_its_likely_causes(tmp_path, capsys):
    from topoclip.engine.trainer import COLLAPSE_STEPS

    cfg = make_config(tmp_path, f"train.steps={COLLAPSE_STEPS + 5}", "train.checkpoint_every=0")
    make_trainer(cfg, tmp_path / "c", loss_fn=UniformLogits()).fit()
    out = capsys.readouterr().out
    assert out.count("the run has collapsed") == 1 and "data sorted by class" in out and "ln(batch) = 2.079" in out
    make_trainer(make_config(tmp_path, "train.steps=20"), tmp_path / "fine").fit()  # a training run says nothing
    assert "collapsed" not in capsys.readouterr().out


def test_collapse_is_uniform_logits_with_a_vanishing_gradient():
    from topoclip.engine.trainer import is_collapsed_step

    assert is_collapsed_step(math.log(128), 0.001, 128) and is_collapsed_step(math.log(128), math.nan, 128)
    assert not is_collapsed_step(4.853, 0.37, 128)  # the default run near its start: loss ~ ln 128, still learning
    assert not is_collapsed_step(3.9, 0.001, 128)
