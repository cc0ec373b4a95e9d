"""ShardStream, the trainer's view of shards: whole per-rank batches, every sample exactly
once per epoch across ranks and DataLoader workers, a new order each epoch."""

from __future__ import annotations

import collections
from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from topoclip.data.shards import ShardStream, shard_captions, tensor_pairs_to_samples, write_shards

pytest.importorskip("webdataset")

N, PER_SHARD, WORLD, WORKERS, BATCH = 32, 4, 2, 2, 8  # 8 shards: 2 per (rank, worker)


class RawPixels:
    """The decoded image as uint8 [3, H, W]: compares bit for bit with what was written."""

    def __call__(self, image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, 8, 8), generator=g, dtype=torch.uint8)
    captions = [f"caption number {i}" for i in range(N)]
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(tensor_pairs_to_samples(images, captions), out, maxcount=PER_SHARD)
    return paths, images, captions


def read_epoch(paths, epoch, rank, **kw):
    stream = ShardStream(
        paths, epoch_length=N, batch_size=BATCH, transform=RawPixels(), shuffle_buffer=8, seed=1, rank=rank, world=WORLD, **kw
    )
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=stream.local_batch_size, num_workers=WORKERS, drop_last=True)
    # What the trainer does: exactly batches_per_epoch batches per rank per epoch.
    return list(islice(loader, stream.batches_per_epoch)), stream


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(shards):
    paths, images, captions = shards
    orders = []
    for epoch in (0, 1):
        seen = collections.Counter()
        order = []
        for rank in range(WORLD):
            batches, stream = read_epoch(paths, epoch, rank)
            assert stream.local_batch_size == BATCH // WORLD and stream.batches_per_epoch == N // BATCH
            assert len(batches) == N // BATCH  # every rank takes the same number of steps
            for pixels, caps in batches:
                assert pixels.shape == (BATCH // WORLD, 3, 8, 8)
                for img, cap in zip(pixels, caps):
                    i = int(cap.rsplit(" ", 1)[1])
                    assert torch.equal(img, images[i])  # image and caption travel together, losslessly
                    seen[cap] += 1
                    order.append(cap)
        assert seen == collections.Counter(captions), f"epoch {epoch}"
        orders.append(order)
    assert orders[0] != orders[1]  # set_epoch reshuffles (each DataLoader worker gets a fresh copy)


def test_same_epoch_same_order(shards):
    paths, _, _ = shards
    a = [c for _, caps in read_epoch(paths, 3, 1)[0] for c in caps]
    b = [c for _, caps in read_epoch(paths, 3, 1)[0] for c in caps]
    assert a == b


def test_resampled_stream_gives_every_rank_whole_batches(shards):
    paths, _, _ = shards
    for rank in range(WORLD):
        batches, stream = read_epoch(paths, 0, rank, resampled=True)
        assert len(batches) == stream.batches_per_epoch == N // BATCH
        assert all(len(caps) == BATCH // WORLD for _, caps in batches)


def test_stream_validates_its_sizes(shards):
    paths, _, _ = shards
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        ShardStream(paths, epoch_length=N, batch_size=9, rank=0, world=2)
    with pytest.raises(ValueError, match="less than one batch"):
        ShardStream(paths, epoch_length=4, batch_size=8, rank=0, world=1)


def test_shard_captions_reads_captions_in_order_with_a_limit(shards):
    paths, _, captions = shards
    assert shard_captions(paths) == captions
    assert shard_captions(paths, limit=5) == captions[:5]
