"""Gradient cache: one exact optimizer step over a global batch, encoded in chunks.

Contrastive losses couple every pair in the batch, so plain gradient accumulation changes
the loss (each micro-batch sees only its own negatives; OpenCLIP's accum_freq also counts the
logit scale's gradient once per micro-batch). The gradient cache keeps the full-batch loss:

  1. encode every chunk without autograd and keep only the embeddings (O(B d) memory);
  2. compute the loss on all B embeddings and back-propagate it to the embeddings (and to the
     logit scale, once);
  3. re-encode each chunk with autograd and back-propagate the cached embedding gradient.

Random state (dropout, stochastic depth) is recorded before each chunk's first pass and
replayed for its second, so both passes compute the same function. The parameter gradients
equal those of one full-batch step up to rounding.

Under DistributedDataParallel every re-encoding but the last runs under ``no_sync`` and the
last one's backward all-reduces the accumulated gradients. A parameter the loss uses directly
(the logit scale) would get its gradient outside that backward and never be synchronised, so
``encode`` may return it as a third output: it is then handed to the loss as a leaf, and its
gradient is back-propagated together with the last chunk.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["split_batch", "RandomState", "gradcache_backward"]


def split_batch(batch: dict[str, Tensor], chunk_size: int) -> list[dict[str, Tensor]]:
    """Split a dict of equally long tensors into chunks of at most chunk_size rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sizes = {k: v.shape[0] for k, v in batch.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"batch tensors have different lengths: {sizes}")
    return [{k: v[i:i + chunk_size] for k, v in batch.items()} for i in range(0, n, chunk_size)]


class RandomState:
    """The CPU and CUDA generator states, captured now and restorable later."""

    def __init__(self, devices: Iterable[torch.device] = ()):
        self.cpu = torch.get_rng_state()
        self.cuda = {d.index: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)


def gradcache_backward(
    encode: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]],
    chunks: list[dict[str, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor | tuple[Tensor, dict]],
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
):
    """Run steps 1-3 above and leave the full-batch gradients in the parameters' ``.grad``.

    Args:
        encode: chunk -> (image points, text points[, *shared]), with autograd when it is
            enabled. ``shared`` outputs do not depend on the chunk (the logit scale).
        chunks: the global batch split into chunks (``split_batch``).
        loss_fn: (all image points, all text points, *shared) -> loss, or (loss, details); it
            may also involve parameters of its own, which get their gradient here.
        no_sync: a context manager factory (``ddp_model.no_sync``) that suppresses gradient
            all-reduce; used for every re-encoding but the last.
    Returns what ``loss_fn`` returned, detached.
    """
    devices = set()
    states, image_parts, text_parts = [], [], []
    shared: list[Tensor] = []
    with torch.no_grad():
        for k, chunk in enumerate(chunks):
            devices.update(t.device for t in chunk.values() if torch.is_tensor(t))
            states.append(RandomState(devices))
            u, v, *extra = encode(chunk)
            image_parts.append(u)
            text_parts.append(v)
            if k == 0:
                shared = extra
    image_all = torch.cat(image_parts).requires_grad_(True)
    text_all = torch.cat(text_parts).requires_grad_(True)
    shared_leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in shared]
    result = loss_fn(image_all, text_all, *shared_leaves)
    loss = result[0] if isinstance(result, tuple) else result
    loss.backward()
    image_grads = image_all.grad.split([p.shape[0] for p in image_parts])
    text_grads = text_all.grad.split([p.shape[0] for p in text_parts])

    after = RandomState(devices)  # the state a plain step would leave behind
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            states[k].restore()
            u, v, *extra = encode(chunk)
            outputs, grads = [u, v], [image_grads[k].to(u.dtype), text_grads[k].to(v.dtype)]
            if last:
                for out, leaf in zip(extra, shared_leaves):
                    if leaf.grad is not None and out.requires_grad:
                        outputs.append(out)
                        grads.append(leaf.grad.to(out.dtype))
            torch.autograd.backward(outputs, grads)
    after.restore()
    if isinstance(result, tuple):
        return result[0].detach(), result[1]
    return loss.detach()
