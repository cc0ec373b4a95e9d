"""webdataset shards: write, read back every sample exactly once across ranks and workers."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from topoclip.data.shards import ShardStats, expand_urls, shard_pairs, tensor_pairs_to_samples, write_shards

pytest.importorskip("webdataset")


def make_images(n: int) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return images, [f"caption number {i}" for i in range(n)]


def read_all(dataset, workers: int) -> list[tuple[torch.Tensor, str]]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return list(loader)


@pytest.fixture()
def shards(tmp_path):
    images, captions = make_images(40)
    paths = write_shards(tensor_pairs_to_samples(images, captions), tmp_path / "shards", maxcount=5)
    return paths, images, captions


def test_round_trip_is_lossless(shards):
    paths, images, captions = shards
    assert len(paths) == 8 and all(p.endswith(".tar") for p in paths)
    raw_pixels = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1)  # noqa: E731
    ds = shard_pairs(paths, image_size=8, shuffle_buffer=0, transform=raw_pixels)
    got = read_all(ds, 0)
    assert [c for _, c in got] == captions
    for (img, _), want in zip(got, images):
        assert torch.equal(img, want)


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 1), (2, 2)])
def test_every_sample_once_per_epoch_across_ranks_and_workers(shards, world, workers):
    paths, _, captions = shards
    seen = collections.Counter()
    for rank in range(world):
        ds = shard_pairs(paths, image_size=8, shuffle_buffer=10, seed=1, rank=rank, world=world)
        for _, caption in read_all(ds, workers):
            seen[caption] += 1
    assert seen == collections.Counter(captions)


def test_shuffle_changes_order_not_content(shards):
    paths, _, captions = shards
    got = [c for _, c in read_all(shard_pairs(paths, image_size=8, shuffle_buffer=20, seed=3), 0)]
    assert sorted(got) == sorted(captions) and got != captions


def test_resampled_epoch_length(shards):
    paths, _, _ = shards
    ds = shard_pairs(paths, image_size=8, resampled=True, epoch_length=13)
    assert len(read_all(ds, 0)) == 13
    with pytest.raises(ValueError, match="epoch_length"):
        shard_pairs(paths, resampled=True)


def test_broken_samples_are_skipped_and_counted_or_raise_when_strict(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(good, format="PNG")
    samples = [(good.getvalue(), "png", "red"), (b"not a png", "png", "broken"), (good.getvalue(), "png", "  "), (good.getvalue(), "png", "red again")]
    paths = write_shards(iter(samples), tmp_path, maxcount=10)
    stats = ShardStats()
    got = [c for _, c in read_all(shard_pairs(paths, image_size=8, shuffle_buffer=0, stats=stats), 0)]
    assert got == ["red", "red again"]
    assert stats.skipped == 2
    with pytest.raises(Exception, match="unreadable image"):
        read_all(shard_pairs(paths, image_size=8, shuffle_buffer=0, strict=True), 0)


def test_expand_urls(tmp_path, shards):
    paths, _, _ = shards
    folder = str(tmp_path / "shards")
    assert expand_urls(folder) == paths
    assert expand_urls(folder + "/shard-{000000..000002}.tar") == paths[:3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar"):
        expand_urls(str(tmp_path / "empty"))


def test_write_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        write_shards(iter([(b"x", "bmp", "c")]), tmp_path)
