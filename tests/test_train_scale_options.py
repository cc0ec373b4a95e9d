"""Scaling options of a run: gradient checkpointing (same gradients), loss tiling options,
the fp16 loss scaler's state across a resume, torch.compile, and their config checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import topoclip
from topoclip.config import config_from_dict
from topoclip.engine import ContrastiveTask, TrainingSettings
from topoclip.engine.trainer import Trainer, enable_grad_checkpointing, seed_everything
from topoclip.models import ModelConfig, build_model
from topoclip.recipes.common import build_loss

VOCAB, LENGTH = 30, 8


def tiny_dual_encoder(cfg):
    seed_everything(0)
    model_cfg = ModelConfig.from_dict({
        "num_tokens": 1,
        "image": {"img_size": 16, "patch_size": 8, "depth": 2, "width": 32, "heads": 2},
        "text": {"width": 32, "depth": 2, "heads": 2, "context_length": LENGTH},
    })
    return build_model(model_cfg, cfg.topology.build(), vocab_size=VOCAB)


def batch(seed, b=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (b, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    mask[: b // 2, 5:] = 0  # some padding, so the attention mask matters
    return torch.randn(b, 3, 16, 16, generator=g), ids, mask


class PairSet(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 4, 4, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], f"w{i % 5}"


def collate(items):
    ids = torch.tensor([[1, 2 + int(c[1:])] for _, c in items])
    return {"images": torch.stack([i for i, _ in items]), "input_ids": ids, "attention_mask": torch.ones_like(ids)}


class Points(nn.Module):
    """A model with no towers at all: nothing in it can checkpoint activations."""

    def __init__(self, topo):
        super().__init__()
        self.topology = topo
        self.image = nn.Linear(48, topo.dim)
        self.words = nn.Embedding(10, topo.dim)
        self.logit_scale = topoclip.LogitScale(init=10.0)

    def forward(self, images, input_ids, attention_mask):
        return self.topology.project(self.image(images.flatten(1))), self.topology.project(self.words(input_ids).mean(1))


def small_config(tmp_path, *overrides):
    return config_from_dict({}, [
        "train.steps=4", "train.batch_size=8", "train.checkpoint_every=0", "optim.warmup_steps=1",
        "logging.progress=false", "logging.tensorboard=false", "topology.name=sphere", "topology.dim=8",
        f"output.dir={tmp_path}", *overrides,
    ])


def test_grad_checkpointing_recomputes_the_towers_and_gives_the_same_gradients(tmp_path):
    cfg = small_config(tmp_path)
    plain, ckpt = tiny_dual_encoder(cfg), tiny_dual_encoder(cfg)
    assert enable_grad_checkpointing(ckpt) == 2  # the image and the text tower
    loss_fn = topoclip.ContrastiveLoss(plain.topology)
    calls = {"vit": 0, "bert": 0}
    ckpt.image.model.blocks[0].attn.register_forward_hook(lambda *a: calls.__setitem__("vit", calls["vit"] + 1))
    ckpt.text.model.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.__setitem__("bert", calls["bert"] + 1))
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_ckpt = torch.optim.SGD(ckpt.parameters(), lr=0.1)
    for step in range(2):  # a couple of steps: the second starts from updated weights
        for model, opt in ((plain, opt_plain), (ckpt, opt_ckpt)):
            opt.zero_grad()
            loss_fn(*model(*batch(step)), model.logit_scale()).backward()
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)
        opt_plain.step()
        opt_ckpt.step()
    assert calls == {"vit": 4, "bert": 4}  # forward + recomputation in backward, per step


def test_grad_checkpointing_needs_a_tower_that_supports_it(tmp_path):
    cfg = small_config(tmp_path, "train.grad_checkpointing=true")
    with pytest.raises(ValueError, match="train.grad_checkpointing"):
        topo = cfg.topology.build()
        Trainer(ContrastiveTask(Points(topo), topoclip.ContrastiveLoss(topo)), PairSet(), collate, TrainingSettings.of(cfg), tmp_path / "r")


def test_loss_section_and_local_loss_reach_the_loss(tmp_path):
    cfg = small_config(tmp_path, "loss.tile_threshold=0", "loss.tile_size=3", "train.local_loss=true")
    loss_fn = build_loss(cfg, cfg.topology.build())
    assert (loss_fn.tile_threshold, loss_fn.tile_size, loss_fn.local_loss) == (0, 3, True)
    default = build_loss(small_config(tmp_path), cfg.topology.build())
    assert (default.tile_threshold, default.tile_size, default.local_loss) == (16384, 1024, False)
    u, v = (cfg.topology.build().project(torch.randn(10, 8, generator=torch.Generator().manual_seed(s))) for s in (1, 2))
    scale = torch.tensor(10.0)
    torch.testing.assert_close(loss_fn(u, v, scale), default(u, v, scale))  # tiled in 3x3 tiles: same value


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.tile_size=0", "loss.tile_size: must be >= 1"),
        ("loss.tile_threshold=-1", "loss.tile_threshold: must be >= 0 or null"),
        ("train.grad_checkpointing=maybe", "train.grad_checkpointing: expected true or false"),
        ("train.compile=2", "train.compile: expected true or false"),
        ("train.local_loss=yes please", "train.local_loss: expected true or false"),
    ],
)
def test_option_errors_name_the_field(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, override)


def test_loss_scaler_state_is_checkpointed_and_restored(tmp_path):
    """fp16 runs keep a dynamic loss scale; a resume must continue with the scale it had
    reached. (fp16 itself needs CUDA; the scaler's bookkeeping is the same on the CPU.)"""
    cfg = small_config(tmp_path, "train.checkpoint_every=2", "train.keep_last=5")
    topo = cfg.topology.build()

    def trainer():
        seed_everything(0)
        t = Trainer(ContrastiveTask(Points(topo), topoclip.ContrastiveLoss(topo)), PairSet(), collate, TrainingSettings.of(cfg), tmp_path / "run")
        t.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        return t

    first = trainer()
    first.fit()
    reached = first.grad_scaler.state_dict()
    assert reached["scale"] == 2.0**14  # doubled after each of the 4 finite steps
    second = trainer()
    assert second.resume()
    assert second.grad_scaler.state_dict() == reached
    assert math.isfinite(second.grad_scaler.get_scale())


@pytest.mark.slow  # compiling takes tens of seconds on a CPU
def test_compile_builds_and_runs_a_step(tmp_path):
    cfg = small_config(tmp_path, "train.compile=true", "train.steps=1")
    topo = cfg.topology.build()
    seed_everything(0)
    trainer = Trainer(ContrastiveTask(Points(topo), topoclip.ContrastiveLoss(topo)), PairSet(), collate, TrainingSettings.of(cfg), tmp_path / "run")
    try:
        result = trainer.fit()
    except Exception as err:  # no working C++ toolchain / inductor backend here
        if "torch._dynamo" in type(err).__module__ or "inductor" in str(err).lower():
            pytest.skip(f"torch.compile unavailable: {type(err).__name__}")
        raise
    assert result.steps == 1 and math.isfinite(result.final_loss)
