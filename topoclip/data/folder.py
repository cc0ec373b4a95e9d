"""Zero-shot classification set from an image folder: one sub-folder per class.

Class order is the sorted folder names; class names come from the folder names ('_' -> ' ')
or from a classnames file (one name per line, in the sorted folder order) or list. Corrupt
images are handled as in ``topoclip.data.pairs`` (found on access and skipped to the next
readable one, or all checked up front with ``verify=True``; ``strict`` raises).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from topoclip.data.datasets import ClassificationSet, LazyImageFiles, SkipStats
from topoclip.data.text_files import read_text
from topoclip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
)


def _read_classnames(classnames, folders: list[str], root: str) -> list[str]:
    if classnames is None:
        return [name.replace("_", " ") for name in folders]
    if isinstance(classnames, (str, os.PathLike)):
        file = Path(classnames)
        if not file.is_file():
            raise ValueError(f"classnames file {os.fspath(file)!r} does not exist")
        names = [line.strip() for line in read_text(file).splitlines() if line.strip()]
        what = f"classnames file {os.fspath(file)!r}"
    else:
        names = [str(n) for n in classnames]
        what = "classnames"
    if len(names) != len(folders):
        raise ValueError(f"{what} has {len(names)} names but {root!r} has {len(folders)} class folders")
    return names


class ImageFolderClassification(ClassificationSet, LazyImageFiles):
    """``ds[i] -> (image FloatTensor[3,H,W], label)`` with ``classnames`` and ``templates``."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        classnames: Sequence[str] | str | os.PathLike | None = None,
        templates: Sequence[str] | None = None,
        name: str | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        strict: bool = False,
        verify: bool = False,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        root_path = Path(root)
        if not root_path.is_dir():
            raise ValueError(f"image folder {os.fspath(root_path)!r} does not exist")
        source = os.fspath(root_path)
        folders = sorted(e.name for e in os.scandir(root_path) if e.is_dir() and not e.name.startswith("."))
        if not folders:
            raise ValueError(f"{source}: no class sub-folders")
        super().__init__(
            name or root_path.resolve().name,
            _read_classnames(classnames, folders, source),
            list(templates) if templates is not None else list(DEFAULT_TEMPLATES),
        )
        exts = tuple(e.lower() for e in extensions)
        stats = SkipStats(source)
        paths: list[str] = []
        labels: list[int] = []
        for label, folder in enumerate(folders):
            found = 0
            for dirpath, dirnames, filenames in os.walk(root_path / folder, followlinks=True):
                dirnames.sort()  # deterministic order across file systems
                for fname in sorted(filenames):
                    file = os.path.join(dirpath, fname)
                    if not fname.lower().endswith(exts):
                        logger.debug("%s: ignoring non-image file %s", source, file)
                        continue
                    if not stats.accept_image(file, strict=strict, verify=verify, must_exist=False):
                        continue
                    paths.append(file)
                    labels.append(label)
                    found += 1
            if found == 0:
                # A class without images has no zero-shot accuracy and silently shifts every
                # later label's meaning for a classnames file: an error, naming the folder.
                raise ValueError(f"{source}: class folder {folder!r} has no usable images ({', '.join(exts)})")
        stats.summarize(len(paths), "images")
        if not paths:
            raise ValueError(f"{source}: no usable images in any class folder")
        self.root = source
        self.class_folders = folders
        self.image_paths = paths
        self.labels = torch.tensor(labels, dtype=torch.long)
        self._init_files(source, paths, transform or ImageTransform(image_size, mean, std), strict, stats)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        # An evaluation item: dropped, not replaced, when unreadable (``drop_unreadable``).
        return self._load_or_drop(index), int(self.labels[index])
