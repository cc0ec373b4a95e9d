"""Retrieval set from a Karpathy-split JSON (the COCO / Flickr30k format).

The file looks like ``{"images": [{"filename": ..., "filepath": ...?, "split": "test",
"sentences": [{"raw": "a caption"}, ...]}, ...]}``; an image's path is
``image_root / filepath / filename`` (``filepath`` optional).

Unlike the training loaders, a retrieval set cannot replace an unreadable image by another
on access: ``caption_to_image`` would then point at the wrong picture. So images are checked
at construction (``verify=True``, the default; evaluation sets are small enough), and an
image that is missing or corrupt is dropped together with its captions. With
``verify=False`` files are trusted and an unreadable one raises on access. Empty captions are
skipped, and an image left without captions is dropped. ``strict`` raises instead of skipping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from topoclip.data.datasets import RetrievalSet, SkipStats
from topoclip.data.text_files import read_text
from topoclip.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, load_image


def _caption_text(sentence) -> str:
    if isinstance(sentence, str):
        return sentence.strip()
    if isinstance(sentence, dict):
        raw = sentence.get("raw")
        if isinstance(raw, str):
            return raw.strip()
        tokens = sentence.get("tokens")
        if isinstance(tokens, list):
            return " ".join(str(t) for t in tokens).strip()
    return ""


class KarpathyRetrieval(RetrievalSet):
    """``ds[i] -> image``; ``captions[j]`` describes image ``caption_to_image[j]``.

    ``split`` is one split name or several (e.g. ``["train", "restval"]``).
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_root: str | os.PathLike,
        split: str | Sequence[str] = "test",
        transform: Callable | None = None,
        *,
        name: str | None = None,
        strict: bool = False,
        verify: bool = True,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        json_path = Path(json_path)
        source = os.fspath(json_path)
        if not json_path.is_file():
            raise ValueError(f"Karpathy JSON {source!r} does not exist")
        root = Path(image_root)
        if not root.is_dir():
            raise ValueError(f"image_root {os.fspath(root)!r} is not a directory")
        try:
            data = json.loads(read_text(json_path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{source!r} is not valid JSON: {err}") from err
        entries = data.get("images") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{source!r}: expected an object with an 'images' list")
        splits = {split} if isinstance(split, str) else set(split)
        available = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
        if not splits & set(available):
            raise ValueError(f"{source!r}: no images in split {sorted(splits)}; splits present: {available}")

        stats = SkipStats(source)
        paths: list[str] = []
        captions: list[str] = []
        caption_to_image: list[int] = []
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("split") not in splits:
                continue
            filename = entry.get("filename")
            if not isinstance(filename, str) or not filename:
                if strict:
                    raise ValueError(f"{source!r}: images[{k}] has no 'filename'")
                stats.skip("malformed", f"images[{k}]")
                continue
            file = os.fspath(root / entry.get("filepath", "") / filename)
            texts = [_caption_text(s) for s in entry.get("sentences") or []]
            good = [t for t in texts if t]
            for _ in range(len(texts) - len(good)):
                if strict:
                    raise ValueError(f"{source!r}: empty caption for image {file!r}")
                stats.skip("empty_caption", file)
            if not good:
                if strict:
                    raise ValueError(f"{source!r}: image {file!r} has no captions")
                stats.skip("no_caption", file)
                continue
            if not stats.accept_image(file, strict=strict, verify=verify):
                continue
            caption_to_image.extend([len(paths)] * len(good))
            captions.extend(good)
            paths.append(file)
        stats.summarize(len(paths), "images")
        if not paths:
            raise ValueError(f"{source!r}: no usable images in split {sorted(splits)} (skipped: {stats.as_dict()})")
        default_name = f"{json_path.stem}-{'+'.join(sorted(splits))}"
        super().__init__(name or default_name, captions, torch.tensor(caption_to_image, dtype=torch.long), len(paths))
        self.image_paths = paths
        self.skip_stats = stats
        self.transform = transform or ImageTransform(image_size, mean, std)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        # load_image raises CorruptImageError (a ValueError naming the file): see module doc.
        return self.transform(load_image(self.image_paths[index]))
