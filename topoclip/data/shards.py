"""Streaming (image, caption) pairs from webdataset tar shards, and writing such shards.

A shard is a tar of samples ``<key>.png|jpg`` + ``<key>.txt``, the layout img2dataset and
OpenCLIP use. Reading streams shards, so data sets far larger than memory or local disk
(``pipe:`` / http URLs) work the same as a local folder.

Splitting: every shard goes to exactly one (rank, worker): rank r of W takes shards
r, r+W, ...; within a rank, DataLoader workers split those again. Without resampling each
sample is read once per epoch across all ranks and workers, as long as there are at least
W * workers shards. With ``resampled=True`` shards are drawn with replacement forever and
``epoch_length`` (samples per worker) defines the epoch: every rank then sees the same number
of batches, which multi-process training needs to stay in step.

``ShardStream`` is what the trainer reads: an epoch of whole per-rank batches, the same count
on every rank, and a new shuffle order per epoch (``set_epoch``).
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from topoclip.atomic import atomic_write_json

from .text_files import decode_caption
from .transforms import ImageTransform

__all__ = [
    "SIZES_FILE",
    "dataset_size",
    "write_shards",
    "tensor_pairs_to_samples",
    "files_to_samples",
    "ShardStats",
    "shard_pairs",
    "ShardStream",
    "shard_captions",
    "expand_urls",
]

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
# Samples per shard, keyed by shard file name: OpenCLIP's convention, so its --train-num-samples
# lookup and topoclip's epoch_length default read the same file.
SIZES_FILE = "sizes.json"


def dataset_size(urls: str) -> int | None:
    """The number of samples of a local shard directory or pattern from its ``sizes.json``
    (written by ``write_shards``), or None when there is none."""
    import json

    first = urls.split("::")[0]
    folder = Path(first) if Path(first).is_dir() else Path(first).parent
    sizes = folder / SIZES_FILE
    if not sizes.is_file():
        return None
    counts = json.loads(sizes.read_text())
    names = {Path(u).name for u in expand_urls(urls)} if not Path(first).is_dir() else set(counts)
    return sum(int(n) for name, n in counts.items() if name in names)


def write_shards(
    samples: Iterable[tuple[bytes, str, str]],
    out_dir: str | os.PathLike,
    maxcount: int = 10000,
    prefix: str = "shard",
) -> list[str]:
    """Write (image bytes, image extension, caption) samples into ``out_dir/prefix-NNNNNN.tar``.

    Returns the shard paths. Writing goes through a temporary name per shard and a rename,
    so an interrupted conversion never leaves a truncated shard under a final name.
    """
    import webdataset as wds

    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def finish(path: str) -> None:
        final = path[: -len(".partial")]
        os.replace(path, final)
        written.append(final)

    pattern = os.fspath(out / f"{prefix}-%06d.tar.partial")
    count = 0
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, post=finish) as sink:
        for index, (image_bytes, ext, caption) in enumerate(samples):
            ext = ext.lower().lstrip(".")
            if ext not in IMAGE_KEYS:
                raise ValueError(f"sample {index}: image extension must be one of {IMAGE_KEYS}, got {ext!r}")
            sink.write({"__key__": f"{index:09d}", ext: image_bytes, "txt": caption.encode("utf-8")})
            count += 1
    # ShardWriter opens a new shard every maxcount samples: the counts follow from the total.
    sizes = {f"{prefix}-{i:06d}.tar": min(maxcount, count - i * maxcount) for i in range(math.ceil(count / maxcount))}
    atomic_write_json(out / SIZES_FILE, sizes)
    return sorted(written)


def tensor_pairs_to_samples(images: torch.Tensor, captions: Sequence[str]) -> Iterator[tuple[bytes, str, str]]:
    """uint8 images ``[N, 3, H, W]`` (e.g. the embedded shapes data) -> PNG samples (lossless)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    for image, caption in zip(images, captions):
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        yield buf.getvalue(), "png", caption


def files_to_samples(
    paths: Sequence[str], captions: Sequence[str], skipped: list[str] | None = None
) -> Iterator[tuple[bytes, str, str]]:
    """Image files + captions -> samples carrying the original bytes (no re-encoding).

    Every image is decoded first: one that does not decode is reported with its path (a
    warning, and appended to ``skipped``) and left out, so no corrupt sample reaches a shard.
    A format shards cannot carry (not png/jpg/webp) is re-encoded as PNG."""
    for path, caption in zip(paths, captions):
        with open(path, "rb") as f:
            data = f.read()
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                kind = (image.format or "").lower()
                if kind not in ("png", "jpeg", "webp"):
                    buf = io.BytesIO()
                    image.save(buf, format="PNG")
                    data, kind = buf.getvalue(), "png"
        except Exception as err:  # PIL raises several types for broken files
            logger.warning("%s: does not decode (%s); left out of the shards", path, err)
            if skipped is not None:
                skipped.append(path)
            continue
        yield data, "jpg" if kind == "jpeg" else kind, caption


class ShardStats:
    """Counts of samples skipped while streaming (per process: each DataLoader worker counts
    its own, and logs a warning for each skip with the shard and key)."""

    def __init__(self) -> None:
        self.skipped = 0

    def handler(self, exn: Exception) -> bool:
        self.skipped += 1
        logger.warning("skipping unreadable shard sample (%d so far): %s", self.skipped, exn)
        return True  # continue


class _Decode:
    """A picklable sample decoder: image bytes -> normalised tensor, txt -> caption."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], encoding: str = "utf-8"):
        self.transform = transform
        self.encoding = encoding

    def __call__(self, sample: dict) -> tuple[torch.Tensor, str]:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        if key is None or "txt" not in sample:
            raise ValueError(f"{where}: sample needs an image ({'/'.join(IMAGE_KEYS)}) and a txt caption")
        caption = decode_caption(sample["txt"], where, self.encoding).strip()
        if not caption:
            raise ValueError(f"{where}: empty caption")
        try:
            image = Image.open(io.BytesIO(sample[key]))
            image.load()
        except Exception as err:  # PIL raises several types for broken data
            raise ValueError(f"{where}: unreadable image ({err})") from None
        return self.transform(image), caption


class _SplitByRank:
    """Node splitter with an explicit (rank, world), or torch.distributed's when not given."""

    def __init__(self, rank: int | None, world: int | None):
        self.rank, self.world = rank, world

    def __call__(self, urls):
        rank, world = self.rank, self.world
        if rank is None or world is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                rank, world = 0, 1
        for i, url in enumerate(urls):
            if i % world == rank:
                yield url


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A directory (all its .tar files), a brace pattern ``shard-{000000..000009}.tar``, a
    list, or ``::``-joined patterns -> list of shard URLs."""
    import braceexpand

    if isinstance(urls, (list, tuple)):
        return [u for item in urls for u in expand_urls(item)]
    if os.path.isdir(urls):
        found = sorted(os.fspath(p) for p in Path(urls).glob("*.tar"))
        if not found:
            raise ValueError(f"no .tar shards in directory {urls!r}")
        return found
    return [u for part in urls.split("::") for u in braceexpand.braceexpand(part)]


def shard_pairs(
    urls: str | Sequence[str],
    *,
    image_size: int = 224,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    epoch_length: int | None = None,
    seed: int = 0,
    rank: int | None = None,
    world: int | None = None,
    strict: bool = False,
    stats: ShardStats | None = None,
    encoding: str = "utf-8",
):
    """An IterableDataset of (image FloatTensor[3,H,W], caption) streamed from shards.

    ``shuffle_buffer`` 0 keeps shard order (and disables shard shuffling): with it, a
    single-process, single-worker pass is deterministic. Broken samples are skipped, counted
    in ``stats`` and logged; ``strict=True`` raises instead, naming the shard and key.
    """
    import webdataset as wds

    url_list = expand_urls(urls)
    if resampled and epoch_length is None:
        raise ValueError("resampled shards never end: give epoch_length (samples per worker)")
    stats = stats if stats is not None else ShardStats()
    handler = wds.reraise_exception if strict else stats.handler
    dataset = wds.WebDataset(
        url_list,
        resampled=resampled,
        shardshuffle=(100 if shuffle_buffer and not resampled else False),
        nodesplitter=_SplitByRank(rank, world),
        workersplitter=wds.split_by_worker,
        handler=handler,
        seed=seed,
        empty_check=False,  # a rank/worker may get no shard when shards < ranks * workers
    )
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    dataset = dataset.map(_Decode(transform or ImageTransform(image_size), encoding), handler=handler)
    if epoch_length is not None:
        dataset = dataset.with_epoch(epoch_length)
    dataset.stats = stats
    return dataset


def _dist_rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return rank, world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """(image, caption) training pairs from shards, one epoch of whole batches at a time.

    An epoch is ``epoch_length // batch_size`` global batches of ``batch_size`` pairs; each of
    the ``world`` ranks contributes ``batch_size // world`` pairs per batch from its own
    shards, which its DataLoader workers split again. Every (rank, worker) reads the same
    number of samples, ``ceil(batches / workers)`` per-rank batches, so all ranks stay in
    step; a worker whose shards run short starts them over. Without resampling, when the
    shards divide evenly into those counts, each sample is read exactly once per epoch.

    ``set_epoch(e)`` reseeds the shard and buffer shuffles: DataLoader workers get a fresh
    copy of the dataset every epoch, so an epoch counter kept inside the pipeline would
    repeat the first epoch's order. Use with ``DataLoader(batch_size=per_rank_batch)``.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        epoch_length: int,
        batch_size: int,
        image_size: int = 224,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world: int | None = None,
        strict: bool = False,
        encoding: str = "utf-8",
    ):
        self.urls = expand_urls(urls)
        self.encoding = encoding
        self.rank, self.world = _dist_rank_world(rank, world)
        if batch_size < 1 or batch_size % self.world:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the number of ranks {self.world}")
        if epoch_length < batch_size:
            raise ValueError(f"epoch_length={epoch_length} is less than one batch of {batch_size}")
        self.epoch_length = epoch_length
        self.batch_size = batch_size
        self.local_batch_size = batch_size // self.world
        self.batches_per_epoch = epoch_length // batch_size
        self.transform = transform or ImageTransform(image_size)
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.seed = seed
        self.strict = strict
        self.epoch = 0
        self.stats = ShardStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def samples_per_worker(self, workers: int) -> int:
        return math.ceil(self.batches_per_epoch / max(1, workers)) * self.local_batch_size

    def __iter__(self):
        info = get_worker_info()
        dataset = shard_pairs(
            self.urls,
            transform=self.transform,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
            epoch_length=self.samples_per_worker(info.num_workers if info is not None else 1),
            # A large odd stride keeps the seeds of neighbouring (seed, epoch) apart.
            seed=(self.seed * 1_000_003 + self.epoch) % (2**31 - 1),
            rank=self.rank,
            world=self.world,
            strict=self.strict,
            stats=self.stats,
            encoding=self.encoding,
        )
        return iter(dataset)


def shard_captions(urls: str | Sequence[str], limit: int | None = None, *, encoding: str = "utf-8",
                   strict: bool = False) -> list[str]:
    """The captions of the shards, in shard order, reading only the .txt members (images are
    not decoded): enough to train a tokenizer. ``limit`` stops after that many. A caption not
    in ``encoding`` is skipped and counted (``strict``: an error naming its shard and key)."""
    import webdataset as wds

    stats = ShardStats()
    captions: list[str] = []
    dataset = wds.WebDataset(
        expand_urls(urls),
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        handler=stats.handler,
        select_files=lambda name: name.endswith(".txt"),
        empty_check=False,
    )
    for sample in dataset:
        if "txt" in sample:
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            try:
                caption = decode_caption(sample["txt"], where, encoding).strip()
            except ValueError as err:
                if strict:
                    raise
                stats.handler(err)  # counted and logged like any unreadable sample
                continue
            if caption:
                captions.append(caption)
                if limit is not None and len(captions) >= limit:
                    break
    if not captions:
        raise ValueError(f"no captions found in the shards {urls!r}")
    return captions
