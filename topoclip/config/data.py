"""The data sections of a run's config: where the training pairs come from.

``data.source`` picks one of ``shapes`` (the embedded generator), ``shards`` (webdataset tar
files), ``csv`` (a CSV/TSV of image paths and captions), ``folder`` (an image-folder
classification set, each image captioned from its class name through prompt templates) or
``karpathy`` (a COCO/Flickr30k-style JSON, every caption a pair). The file-based sources keep
a seeded ``holdout`` part out of training: it is the run's own evaluation set when no suite is
given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from topoclip.data.text_files import check_encoding

__all__ = ["SOURCES", "ShardsConfig", "CsvDataConfig", "FolderDataConfig", "KarpathyDataConfig", "check_source"]

SOURCES = ("shapes", "shards", "csv", "folder", "karpathy")


@dataclass
class ShardsConfig:
    """Training pairs streamed from webdataset tar shards (``topoclip data convert`` writes them).

    ``urls``: a directory of .tar files, a brace pattern ``dir/shard-{000000..000099}.tar``
    or ``::``-joined patterns (``pipe:``/http URLs work). ``epoch_length``: samples per epoch
    over all processes (an epoch is epoch_length // train.batch_size steps). Each shard goes to
    one (rank, DataLoader worker); without ``resample`` every sample is read once per epoch when
    the shards split evenly. ``resample`` draws shards with replacement (any shard count works).
    ``tokenizer_captions``: captions read from the shards to train the tokenizer when
    ``data.tokenizer`` is null.
    """

    urls: Optional[str] = None
    epoch_length: Optional[int] = None
    shuffle_buffer: int = 1000
    resample: bool = False
    strict: bool = False
    tokenizer_captions: int = 100_000
    encoding: str = "utf-8"  # of the .txt captions; one that does not decode is skipped (strict: an error)

    def __post_init__(self):
        check_encoding(self.encoding, "data.shards.encoding")
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ValueError(f"data.shards.epoch_length: must be >= 1, got {self.epoch_length}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shards.shuffle_buffer: must be >= 0 (0 = no shuffling), got {self.shuffle_buffer}")
        if self.tokenizer_captions < 1:
            raise ValueError(f"data.shards.tokenizer_captions: must be >= 1, got {self.tokenizer_captions}")


@dataclass
class CsvDataConfig:
    """Your own (image, caption) pairs in a CSV/TSV with a header row (OpenCLIP's layout). A
    random ``holdout`` fraction of the distinct images (with all their captions) is kept out of
    training and is the target distribution's retrieval test set."""

    path: Optional[str] = None
    image_root: Optional[str] = None  # relative image paths start here (default: the CSV's folder)
    sep: str = "\t"
    image_key: str = "filepath"
    caption_key: str = "title"
    holdout: float = 0.05
    verify: bool = False  # decode every image up front (else corrupt files are skipped on access)
    strict: bool = False  # a bad row or image is an error naming the file (else a counted skip)
    encoding: str = "utf-8"  # of the CSV; a row that does not decode is skipped (strict: an error naming its line)

    def __post_init__(self):
        check_encoding(self.encoding, "data.csv.encoding")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"data.csv.holdout: must lie in (0, 1), got {self.holdout}")
        if len(self.sep) != 1:
            raise ValueError(f"data.csv.sep: must be one character, got {self.sep!r}")


@dataclass
class FolderDataConfig:
    """An image folder (one sub-folder per class) used as (image, caption) pairs: each image is
    captioned ``template.format(classname)``, one template per image chosen with the run's
    seed (the protocol of *Geodesic Multi-Modal Mixup for Robust Fine-Tuning*, §5.4: "a photo
    of a {classname}").

    ``classnames``: a text file (one name per line, in the sorted folder order) or a JSON list;
    null: the folder names. ``templates``: a JSON list or text file of templates with ``{}`` or
    ``{c}`` (CLIP_benchmark's form); null: five "a photo of a {}." variants.
    ``shots_per_class``: train on k images per class (a seeded choice; the rest are held out);
    null: a seeded ``holdout`` fraction of each class is held out.
    """

    root: Optional[str] = None
    classnames: Optional[str] = None
    templates: Optional[str] = None
    shots_per_class: Optional[int] = None
    holdout: float = 0.2
    verify: bool = False
    strict: bool = False

    def __post_init__(self):
        if self.shots_per_class is not None and self.shots_per_class < 1:
            raise ValueError(f"data.folder.shots_per_class: must be >= 1 or null, got {self.shots_per_class}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"data.folder.holdout: must lie in (0, 1), got {self.holdout}")


@dataclass
class KarpathyDataConfig:
    """A Karpathy-split JSON (COCO / Flickr30k): every caption of a ``split`` image is a
    training pair; ``eval_split`` (default ``test``) is the held-out retrieval set, or, when
    null, a seeded ``holdout`` fraction of the training images."""

    path: Optional[str] = None
    image_root: Optional[str] = None
    split: str = "train"
    eval_split: Optional[str] = "test"
    holdout: float = 0.05
    verify: bool = False
    strict: bool = False

    def __post_init__(self):
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"data.karpathy.holdout: must lie in (0, 1), got {self.holdout}")


def check_source(source: str, csv: CsvDataConfig, folder: FolderDataConfig, karpathy: KarpathyDataConfig,
                 shards: ShardsConfig | None = None) -> None:
    """What each source needs, checked before any work."""
    if source not in SOURCES:
        raise ValueError(f"data.source: must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "csv" and csv.path is None:
        raise ValueError("data.csv.path: data.source=csv needs the pairs file (CSV/TSV with a header row)")
    if source == "folder" and folder.root is None:
        raise ValueError("data.folder.root: data.source=folder needs the image folder (one sub-folder per class)")
    if source == "karpathy" and (karpathy.path is None or karpathy.image_root is None):
        raise ValueError("data.karpathy.path: data.source=karpathy needs the JSON (data.karpathy.path) and its images (data.karpathy.image_root)")
    if source == "shards":
        if shards is None:
            raise ValueError("data.source: shards are not a fine-tuning source")
        if not shards.urls:
            raise ValueError("data.shards.urls: needed with data.source=shards (a directory, pattern or list of shards)")
