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

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from topoclip.data.datasets import LazyImageFiles, PairDataset, RetrievalSet, SkipStats
from topoclip.data.text_files import csv_rows
from topoclip.data.transforms import CLIP_MEAN, CLIP_STD, CorruptImageError, ImageTransform, load_image


def separator_hint(columns: Sequence[str], sep: str) -> str:
    """When a header was split with the wrong separator, say which one the file looks like."""
    header = "".join(columns)
    for other, name in ((",", "comma"), ("\t", "tab"), (";", "semicolon")):
        if other != sep and other in header:
            return f" -- the file looks {name}-separated: set the separator to {other!r} (data.csv.sep, --sep)"
    return ""


class FilePairs(PairDataset, LazyImageFiles):
    """``ds[i] -> (image FloatTensor[3,H,W], caption)`` for lists of image files and captions,
    decoded on access (an unreadable file is a counted skip, or an error with ``strict``).

    Every file-based training source is one: a CSV's rows, an image folder's images with
    their class captions, a Karpathy JSON's captions. ``image_paths`` / ``captions`` / ``path``
    (the source's name) are public, so ``holdout_split`` works on any of them.
    """

    def __init__(self, source: str, image_paths: Sequence[str], captions: Sequence[str], transform: Callable,
                 strict: bool = False, skip_stats: SkipStats | None = None) -> None:
        if len(image_paths) != len(captions):
            raise ValueError(f"{source}: {len(image_paths)} images but {len(captions)} captions")
        if not image_paths:
            raise ValueError(f"{source}: no (image, caption) pairs")
        self.path = source
        self.image_paths = list(image_paths)
        self.captions = list(captions)
        self._init_files(source, self.image_paths, transform, strict, skip_stats or SkipStats(source))

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        j, image = self._load_first_readable(index)
        return image, self.captions[j]


class CsvPairs(FilePairs):
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
        if path.is_dir():
            raise ValueError(f"pairs file {os.fspath(path)!r} is a directory; give the CSV/TSV file inside it")
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
        columns, rows = csv_rows(path, sep, encoding)
        for key, field in ((image_key, "image_key"), (caption_key, "caption_key")):
            if key not in columns:
                raise ValueError(f"{source}: no column {key!r} ({field}); columns are {columns}{separator_hint(columns, sep)}")
        for line, row, problem in rows:
            where = f"{source}:{line}"
            if not stats.accept_text(problem, where, strict=strict):
                continue
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
        super().__init__(source, paths, captions, transform or ImageTransform(image_size, mean, std), strict, stats)


class PairsRetrieval(RetrievalSet):
    """The images of some rows of a :class:`FilePairs` as a retrieval set: each distinct image
    file once, every row's caption pointing at its image (so an image with several rows has
    several ground-truth captions)."""

    def __init__(self, pairs: FilePairs, rows: Sequence[int], name: str = "pairs-holdout") -> None:
        index_of: dict[str, int] = {}
        self._rows: list[int] = []  # one row per distinct image: where to load it from
        caption_to_image = []
        # Every held-out image is decoded now (held-out sets are small): one that cannot be is
        # dropped with its captions and counted (``strict``: an error naming it), rather than
        # ending the run's evaluation after training.
        readable: dict[str, bool] = {}
        for path in dict.fromkeys(pairs.image_paths[r] for r in rows):
            readable[path] = pairs.skip_stats.accept_image(path, f"{pairs.path} (held out)", strict=pairs.strict, verify=True)
        rows = [r for r in rows if readable[pairs.image_paths[r]]]
        if not rows:
            raise ValueError(f"{pairs.path}: none of the held-out images can be read")
        for row in rows:
            path = pairs.image_paths[row]
            if path not in index_of:
                index_of[path] = len(self._rows)
                self._rows.append(row)
            caption_to_image.append(index_of[path])
        super().__init__(name, [pairs.captions[r] for r in rows], torch.tensor(caption_to_image, dtype=torch.long), len(self._rows))
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        # Loaded directly, not through CsvPairs' skip-to-the-next-readable: in an evaluation set
        # a substitute image would silently score the wrong captions.
        path = self.pairs.image_paths[self._rows[index]]
        try:
            return self.pairs.transform(load_image(path))
        except (CorruptImageError, FileNotFoundError) as err:
            raise ValueError(f"{self.pairs.path}: unreadable held-out image {path!r}: {err}") from err


def holdout_split(pairs: FilePairs, fraction: float, seed: int = 0) -> tuple[torch.utils.data.Subset, PairsRetrieval]:
    """Split ``pairs`` by image file: a random ``fraction`` of the distinct images (at least
    one) and all their rows become a retrieval set; the other rows stay for training. Splitting
    by file keeps an image's other captions from leaking into training."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must lie in (0, 1), got {fraction}")
    files = sorted(set(pairs.image_paths))
    if len(files) < 2:
        raise ValueError(f"{pairs.path}: a held-out split needs at least 2 distinct images, got {len(files)}")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    count = min(len(files) - 1, max(1, round(fraction * len(files))))
    held = {files[i] for i in order[:count]}
    train_rows = [i for i, p in enumerate(pairs.image_paths) if p not in held]
    test_rows = [i for i, p in enumerate(pairs.image_paths) if p in held]
    return torch.utils.data.Subset(pairs, train_rows), PairsRetrieval(pairs, test_rows)
