"""Training pairs from a CSV/TSV file of (image path, caption) rows, as OpenCLIP's csv data.

When each problem is caught (the WHY of the split):
- empty captions and missing files are found at construction: both are cheap (a string check,
  a stat), and finding them up front makes ``len(ds)`` and the skip counts exact;
- corrupt files need the image read, which for a large set is slow, so by default they are
  found on access: the bad item is skipped by returning the next readable one (counted in
  ``skip_stats``, see ``LazyImageFiles``). ``verify=True`` instead checks every file with
  PIL's ``Image.verify`` at construction, which suits small or evaluation sets.
``strict=True`` turns any of these into a ValueError naming the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from topoclip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from topoclip.data.types import LazyImageFiles, PairDataset, SkipStats


class CsvPairs(PairDataset, LazyImageFiles):
    """``ds[i] -> (image FloatTensor[3,H,W], caption)`` from a CSV/TSV with a header row.

    Relative image paths are resolved against ``image_root`` (default: the CSV's folder).
    Defaults follow OpenCLIP: tab separator, columns ``filepath`` and ``title``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        *,
        sep: str = "\t",
        image_key: str = "filepath",
        caption_key: str = "title",
        strict: bool = False,
        verify: bool = False,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        encoding: str = "utf-8",
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"pairs file {os.fspath(path)!r} does not exist")
        if not isinstance(sep, str) or len(sep) != 1:
            raise ValueError(f"sep must be a single character, got {sep!r}")
        root = Path(image_root) if image_root is not None else path.parent
        if not root.is_dir():
            raise ValueError(f"image_root {os.fspath(root)!r} is not a directory")
        source = os.fspath(path)
        stats = SkipStats(source)
        paths: list[str] = []
        captions: list[str] = []
        with open(path, newline="", encoding=encoding) as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            for key, field in ((image_key, "image_key"), (caption_key, "caption_key")):
                if key not in columns:
                    raise ValueError(f"{source}: no column {key!r} ({field}); columns are {columns}")
            for row in reader:
                where = f"{source}:{reader.line_num}"
                caption = (row.get(caption_key) or "").strip()
                rel = (row.get(image_key) or "").strip()
                file = os.fspath(root / rel) if rel else ""
                if not caption:
                    if strict:
                        raise ValueError(f"{where}: empty caption for image {file!r}")
                    stats.skip("empty_caption", f"{where} ({file})")
                    continue
                if not stats.accept_image(file, where, strict=strict, verify=verify):
                    continue
                paths.append(file)
                captions.append(caption)
        stats.summarize(len(paths), "pairs")
        if not paths:
            raise ValueError(f"{source}: no usable (image, caption) rows (skipped: {stats.as_dict()})")
        self.path = source
        self.captions = captions
        self.image_paths = paths
        self._init_files(source, paths, transform or ImageTransform(image_size, mean, std), strict, stats)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        j, image = self._load_first_readable(index)
        return image, self.captions[j]
