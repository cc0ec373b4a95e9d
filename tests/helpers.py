"""Test doubles and config overrides shared by several test files (``from tests.helpers import
...``; ``tests`` is a package, so pytest puts the checkout's root on the import path)."""

from __future__ import annotations

import torch
from torch import nn

import topoclip

# The smallest towers the default config accepts: one layer of width 32 with two heads each.
TINY_TOWERS = [
    "model.image.depth=1", "model.image.width=32", "model.image.heads=2",
    "model.text.depth=1", "model.text.width=32", "model.text.heads=2",
]
# Progress bars and TensorBoard only slow tests down.
QUIET_RUN = ["logging.progress=false", "logging.tensorboard=false"]


def tiny_run_yaml(steps: int, checkpoint_every: int, warmup_steps: int) -> str:
    """A config file for subprocess runs: the default config with 1-layer width-32 towers on
    96 training pairs in batches of 16, every checkpoint kept, no evaluation."""
    from pathlib import Path

    default = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    return f"""
base: {default}
data:
  shapes: {{num_train: 96, num_val: 8, num_test: 24}}
model:
  image: {{patch_size: 8, depth: 1, width: 32, heads: 2}}
  text: {{depth: 1, width: 32, heads: 2}}
train: {{steps: {steps}, batch_size: 16, checkpoint_every: {checkpoint_every}, keep_last: 20}}
optim: {{warmup_steps: {warmup_steps}}}
eval: {{enabled: false}}
logging: {{progress: false, tensorboard: false}}
"""


class FakeTokenizer:
    """Characters -> ids, padded to a fixed length: each distinct caption gets its own point."""

    def __init__(self, vocab_size=50, context_length=24):
        self.vocab_size, self.context_length = vocab_size, context_length
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, text in enumerate(texts):
            codes = [1 + ord(ch) % (self.vocab_size - 1) for ch in text][: self.context_length]
            ids[row, : len(codes)] = torch.tensor(codes)
            mask[row, : len(codes)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class FakeDualEncoder(nn.Module):
    """Fixed random linear maps + topology.project, with a fixed LogitScale.

    ``dropout`` > 0 makes training-mode outputs random (so a test can tell that evaluation ran
    in eval mode; ``modes_seen`` records the mode of every encode call); ``frozen`` is a
    submodule a test may keep in eval mode; ``collapse`` maps every image and every caption
    to one and the same point."""

    def __init__(self, topo, image_numel=48, vocab_size=50, scale=8.0, dropout=0.0, collapse=False):
        super().__init__()
        torch.manual_seed(0)
        self.topology, self.collapse = topo, collapse
        self.image_head = nn.Linear(image_numel, topo.dim)
        self.token_embedding = nn.Embedding(vocab_size, topo.dim)
        self.dropout = nn.Dropout(dropout)
        self.frozen = nn.BatchNorm1d(topo.dim)
        self.logit_scale = topoclip.LogitScale(init=scale, learnable=False)
        self.modes_seen = []

    def _out(self, x):
        self.modes_seen.append(self.training)
        x = self.dropout(x)
        return self.topology.project(torch.ones_like(x) if self.collapse else x)

    def encode_image(self, images):
        return self._out(self.image_head(images.flatten(1)))

    def encode_text(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        return self._out((self.token_embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1))


def assert_tiled_losses_equal_plain(topo, u, v, scale: float = 3.0, bias: float = -2.0, tile: int = 4) -> None:
    """The tiled softmax and sigmoid losses equal the plain ones on ``topo`` (float32 points)."""
    import pytest

    from topoclip.losses import SigmoidLoss
    from topoclip.losses.tiled import tiled_contrastive_loss

    scale = torch.tensor(scale)
    plain = topoclip.ContrastiveLoss(topo, tile_threshold=None)(u, v, scale)
    assert float(tiled_contrastive_loss(topo, u, v, scale, tile=tile)) == pytest.approx(float(plain), rel=1e-5)
    a = SigmoidLoss(topo, tile_threshold=None)(u, v, scale, bias)
    b = SigmoidLoss(topo, tile_threshold=0, tile_size=tile)(u, v, scale, bias)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def shared_tokenizer(directory, num_train: int = 96) -> None:
    """Save one tokenizer for several subprocess runs to share (``data.tokenizer=DIR``):
    training a WordPiece twice need not give the same vocabulary, and bit-identical runs need one."""
    from topoclip.data import build_tokenizer, make_shapes

    data = make_shapes(num_train=num_train, num_val=8, num_test=24)
    build_tokenizer(data.captions("train"), 1000, 24).save(directory)
