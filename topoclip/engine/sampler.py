"""A resumable batch order: one seeded permutation per epoch, full batches only.

Exact resume needs the data order to be a function of (seed, epoch) alone and the position
inside the epoch to be restorable. ``torch.utils.data.RandomSampler`` draws from a generator
whose state advances with every iterator, so a resumed run would see a different order;
here the permutation of epoch e is ``randperm(n, generator=seeded(seed, e))`` and a run that
stopped after b batches of epoch e restarts at batch b of the same permutation.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochBatchSampler", "RankBatchSampler", "epoch_seed"]

# Large odd multiplier: seeds of neighbouring epochs/seeds do not collide for any sane run.
_EPOCH_STRIDE = 1_000_003


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * _EPOCH_STRIDE + epoch) % (2**63 - 1)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices for one epoch of a shuffled dataset, starting at ``start_batch``.

    The last incomplete batch is dropped: contrastive losses depend on the batch size (it is
    the number of negatives), so a short last batch would be a different objective.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int = 0, start_batch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_items < batch_size:
            raise ValueError(f"the training set has {num_items} items, fewer than one batch of {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.start_batch = start_batch
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} outside 0..{self.batches_per_epoch}")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation()
        for b in range(self.start_batch, self.batches_per_epoch):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class RankBatchSampler(Sampler[list[int]]):
    """One rank's rows of every global batch of ``batches``.

    All ranks draw the same global batches (same seed and epoch); each keeps its contiguous
    slice, so W ranks together see exactly the batches of a 1-process run.
    """

    def __init__(self, batches: EpochBatchSampler, rows: slice):
        self.batches = batches
        self.rows = rows

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.rows]

    def __len__(self) -> int:
        return len(self.batches)
