"""Gradient cache: chunked encoding gives the full-batch step's gradients, dropout included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import topoclip
from topoclip.engine.gradcache import gradcache_backward, split_batch


class TinyDual(nn.Module):
    """Two small MLP towers with dropout onto a topology; logit scale inside the model."""

    def __init__(self, topo):
        super().__init__()
        self.topology = topo
        self.img = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, topo.dim))
        self.txt = nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * 4, topo.dim))
        self.logit_scale = topoclip.LogitScale(init=10.0)

    def forward(self, images, input_ids):
        return self.topology.project(self.img(images)), self.topology.project(self.txt(input_ids))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,kw", [("sphere", dict(dim=12)), ("oblique-geodesic", dict(n=4, m=3)), ("euclidean", dict(dim=12))])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_gradcache_equals_full_batch_step(name, kw, chunk):
    topo = topoclip.topology(name, **kw)
    torch.manual_seed(0)
    model = TinyDual(topo).double()
    batch = {"images": torch.randn(16, 10, dtype=torch.float64), "input_ids": torch.randint(0, 50, (16, 4))}
    loss_fn = topoclip.ContrastiveLoss(topo)

    torch.manual_seed(123)
    chunks = split_batch(batch, chunk)
    # The reference is one autograd graph over the whole batch whose towers run chunk by
    # chunk, so that it draws its dropout masks in the same order as the gradient cache
    # (a single full-batch forward draws them in another order: a different, equally valid
    # sample). The test without dropout below compares against the one-shot forward.
    u_parts, v_parts = [], []
    for c in chunks:
        a, b = model(**c)
        u_parts.append(a)
        v_parts.append(b)
    ref = loss_fn(torch.cat(u_parts), torch.cat(v_parts), model.logit_scale())
    ref.backward()
    want = grads(model)
    state_after_ref = torch.get_rng_state()
    model.zero_grad()

    torch.manual_seed(123)
    got_loss = gradcache_backward(lambda c: model(**c), chunks, lambda a, b: loss_fn(a, b, model.logit_scale()))
    got = grads(model)
    torch.testing.assert_close(got_loss, ref.detach())
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-8, msg=k)
    # the logit scale's gradient is counted once, not once per chunk
    torch.testing.assert_close(got["logit_scale.log_scale"], want["logit_scale.log_scale"])
    # the generator ends where a plain step would leave it
    assert torch.equal(torch.get_rng_state(), state_after_ref)


def test_gradcache_without_dropout_equals_one_shot_full_batch():
    topo = topoclip.topology("oblique-inner", n=4, m=3)
    torch.manual_seed(1)
    model = TinyDual(topo).double().eval()  # no dropout: chunking cannot matter at all
    batch = {"images": torch.randn(12, 10, dtype=torch.float64), "input_ids": torch.randint(0, 50, (12, 4))}
    loss_fn = topoclip.ContrastiveLoss(topo)
    loss_fn(*model(**batch), model.logit_scale()).backward()
    want = grads(model)
    model.zero_grad()
    gradcache_backward(lambda c: model(**c), split_batch(batch, 5), lambda a, b: loss_fn(a, b, model.logit_scale()))
    for k, g in grads(model).items():
        torch.testing.assert_close(g, want[k])


def test_split_batch_validates():
    with pytest.raises(ValueError, match="different lengths"):
        split_batch({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        split_batch({"a": torch.zeros(3)}, 0)
    assert [c["a"].tolist() for c in split_batch({"a": torch.arange(5)}, 2)] == [[0, 1], [2, 3], [4]]
