"""Dataset types shared by the embedded data, the real-data loaders and the evaluation code.

- pair sets (training): ``ds[i] -> (image FloatTensor[3,H,W], caption str)``
- ``ClassificationSet``: ``ds[i] -> (image, label int)`` plus ``name``, ``classnames``, ``templates``
- ``RetrievalSet``: ``ds[i] -> image`` plus ``name``, ``captions``, ``caption_to_image``

Images come out normalised and of fixed size. The ``Tensor*`` classes keep images in memory
as uint8 (4x smaller than float) and normalise on access.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from topoclip.data.transforms import CLIP_MEAN, CLIP_STD, CorruptImageError, check_mean_std, load_image, normalize_uint8, verify_image

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Abstract types
# ---------------------------------------------------------------------------------------------
class PairDataset(Dataset):
    """Training pairs: ``ds[i] -> (image FloatTensor[3,H,W], caption str)``."""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_str_list(values: Sequence[str], field: str, owner: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{owner}.{field} must be a list of strings, got {type(values).__name__}")
    values = list(values)
    if not values:
        raise ValueError(f"{owner}.{field} must not be empty")
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{owner}.{field} must hold non-empty strings, got {v!r}")
    return values


class ClassificationSet(Dataset):
    """Zero-shot classification set: ``ds[i] -> (image FloatTensor[3,H,W], label int)``.

    ``classnames[label]`` names the class; every template holds one ``{}`` for the class name.
    """

    def __init__(self, name: str, classnames: Sequence[str], templates: Sequence[str]) -> None:
        owner = type(self).__name__
        if not isinstance(name, str) or not name:
            raise ValueError(f"{owner}.name must be a non-empty string, got {name!r}")
        self.name = name
        self.classnames = _check_str_list(classnames, "classnames", owner)
        if len(set(self.classnames)) != len(self.classnames):
            dupes = sorted(k for k, c in Counter(self.classnames).items() if c > 1)
            raise ValueError(f"{owner}.classnames has duplicates: {dupes}")
        self.templates = _check_str_list(templates, "templates", owner)
        for t in self.templates:
            # str.format would also accept "{0}" or "{name}"; insisting on "{}" keeps every
            # consumer's template.format(classname) call valid.
            if "{}" not in t:
                raise ValueError(f"{owner}.templates: each template needs a '{{}}' for the class name, got {t!r}")

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError


class RetrievalSet(Dataset):
    """Retrieval set: ``ds[i] -> image``; ``captions[j]`` describes image ``caption_to_image[j]``."""

    def __init__(self, name: str, captions: Sequence[str], caption_to_image: torch.Tensor, num_images: int) -> None:
        owner = type(self).__name__
        if not isinstance(name, str) or not name:
            raise ValueError(f"{owner}.name must be a non-empty string, got {name!r}")
        self.name = name
        self.captions = _check_str_list(captions, "captions", owner)
        c2i = torch.as_tensor(caption_to_image)
        if c2i.dtype.is_floating_point or c2i.dtype == torch.bool or c2i.dim() != 1:
            raise ValueError(f"{owner}.caption_to_image must be a 1-d integer tensor, got {c2i.dtype} {tuple(c2i.shape)}")
        if c2i.numel() != len(self.captions):
            raise ValueError(
                f"{owner}.caption_to_image has {c2i.numel()} entries for {len(self.captions)} captions"
            )
        if c2i.numel() and (int(c2i.min()) < 0 or int(c2i.max()) >= num_images):
            raise ValueError(f"{owner}.caption_to_image has indices outside [0, {num_images})")
        self.caption_to_image = c2i.to(torch.long)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# In-memory implementations
# ---------------------------------------------------------------------------------------------
def _check_images(images: torch.Tensor, owner: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{owner}.images must be a tensor [N, 3, H, W], got {shape}")
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise ValueError(f"{owner}.images must be uint8 (normalised on access) or float (used as is), got {images.dtype}")
    return images


class _TensorImages:
    """uint8 images normalised on access; float images are taken as already normalised."""

    def _init_images(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
        owner = type(self).__name__
        self.images = _check_images(images, owner)
        check_mean_std(mean, std, owner)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def _image(self, index) -> torch.Tensor:
        x = self.images[index]
        return normalize_uint8(x, self.mean, self.std) if x.dtype == torch.uint8 else x


class TensorPairSet(PairDataset, _TensorImages):
    """Pairs held in memory: images ``[N,3,H,W]`` (uint8 or float) and ``N`` captions."""

    def __init__(
        self,
        images: torch.Tensor,
        captions: Sequence[str],
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        self._init_images(images, mean, std)
        self.captions = list(captions)
        if len(self.captions) != self.images.shape[0]:
            raise ValueError(f"TensorPairSet: {self.images.shape[0]} images but {len(self.captions)} captions")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self._image(index), self.captions[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, str]]:
        # DataLoader calls this for a whole batch: one vectorised normalisation instead of
        # batch_size small ones.
        images = self._image(torch.as_tensor(indices, dtype=torch.long))
        return [(img, self.captions[i]) for img, i in zip(images.unbind(0), indices)]


class TensorClassificationSet(ClassificationSet, _TensorImages):
    """Classification set held in memory: images ``[N,3,H,W]`` and integer ``labels`` ``[N]``."""

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        classnames: Sequence[str],
        templates: Sequence[str],
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__(name, classnames, templates)
        self._init_images(images, mean, std)
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() != self.images.shape[0] or labels.dtype.is_floating_point:
            raise ValueError(f"{name}: labels must be {self.images.shape[0]} integers, got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classnames)):
            raise ValueError(f"{name}: labels must lie in [0, {len(self.classnames)})")
        self.labels = labels.to(torch.long)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._image(index), int(self.labels[index])


class TensorRetrievalSet(RetrievalSet, _TensorImages):
    """Retrieval set held in memory: images ``[N,3,H,W]``, captions and ``caption_to_image``."""

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        captions: Sequence[str],
        caption_to_image: torch.Tensor | Sequence[int],
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        self._init_images(images, mean, std)
        super().__init__(name, captions, torch.as_tensor(caption_to_image), num_images=self.images.shape[0])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._image(index)


# ---------------------------------------------------------------------------------------------
# Skip bookkeeping for file-backed sets
# ---------------------------------------------------------------------------------------------
class SkipStats:
    """Counts of skipped items by reason ("missing", "corrupt", "empty_caption", ...).

    Each skip is logged at DEBUG with the file; ``summarize`` logs one WARNING with the counts.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, item: str, detail: str = "") -> None:
        self.counts[reason] += 1
        logger.debug("%s: skipped %s (%s)%s", self.source, item, reason, f": {detail}" if detail else "")

    def accept_text(self, problem: str | None, where: str, *, strict: bool) -> bool:
        """True when a row's text decoded (``problem`` None); else the row is counted as
        "bad_encoding" and False returned, or, with ``strict``, ``problem`` is the error."""
        if problem is None:
            return True
        if strict:
            raise ValueError(problem)
        self.skip("bad_encoding", where, problem)
        return False

    def accept_image(self, file: str, where: str = "", *, strict: bool, verify: bool, must_exist: bool = True) -> bool:
        """True when ``file`` can be used: it exists and, with ``verify``, PIL can decode it.

        Otherwise the file is counted as "missing" or "corrupt" and False is returned, or, with
        ``strict``, a ValueError names it. ``where`` (e.g. "pairs.tsv:12") locates it.
        """
        label = f"{where} ({file})" if where else file
        if must_exist and not os.path.isfile(file):
            if strict:
                raise ValueError(f"{where or self.source}: missing image file {file!r}")
            self.skip("missing", label)
            return False
        if verify:
            try:
                verify_image(file)
            except CorruptImageError as err:
                if strict:
                    raise ValueError(f"{where or self.source}: {err}") from err
                self.skip("corrupt", label, str(err))
                return False
        return True

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def summarize(self, kept: int, kept_what: str = "items") -> None:
        if self.counts:
            parts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(self.counts.items()))
            logger.warning("%s: skipped %s; kept %d %s", self.source, parts, kept, kept_what)

    def __repr__(self) -> str:
        return f"SkipStats({self.source!r}, {dict(self.counts)})"


class LazyImageFiles:
    """Mixin for sets whose images are decoded on access.

    A file that turns out unreadable on access (corrupt, or deleted since construction) is
    skipped by moving on to the next readable item, so a long training run does not die on one
    bad file; it is counted in ``skip_stats`` and remembered so it is not retried. With
    ``strict`` it raises ValueError naming the file instead. Counts made inside DataLoader
    worker processes stay in those processes.
    """

    def _init_files(
        self,
        source: str,
        paths: Sequence[str],
        transform: Callable,
        strict: bool,
        skip_stats: SkipStats,
    ) -> None:
        self._source = source
        self._paths = list(paths)
        self.transform = transform
        self.strict = strict
        self.skip_stats = skip_stats
        self._bad: set[int] = set()

    def _unreadable(self, index: int, err: Exception, note: str) -> None:
        """Count the image at ``index`` as skipped (once; the first one logged with ``note``),
        or, with ``strict``, raise a ValueError naming it."""
        path = self._paths[index]
        if self.strict:
            raise ValueError(f"{self._source}: unreadable image {path!r}: {err}") from err
        if index in self._bad:
            return
        reason = "missing" if isinstance(err, FileNotFoundError) else "corrupt"
        if not self._bad:
            logger.warning("%s: unreadable image %s (%s); %s (counts in .skip_stats)", self._source, path, reason, note)
        self._bad.add(index)
        self.skip_stats.skip(reason, os.fspath(path), str(err))

    def _load_or_drop(self, index: int) -> torch.Tensor | None:
        """The image at ``index``, or None when it cannot be read (counted; ``strict`` raises).

        For evaluation sets: a substitute image would be scored twice and the bad one's label
        not at all, so the item is dropped instead (``drop_unreadable`` collates without it)."""
        try:
            return self.transform(load_image(self._paths[index]))
        except (CorruptImageError, FileNotFoundError) as err:
            self._unreadable(index, err, "leaving it and any further ones out of the evaluation")
            return None

    def _load_first_readable(self, index: int) -> tuple[int, torch.Tensor]:
        n = len(self._paths)
        if not -n <= index < n:
            raise IndexError(f"{self._source}: index {index} out of range for {n} items")
        index %= n
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                image = load_image(self._paths[j])
            except (CorruptImageError, FileNotFoundError) as err:
                self._unreadable(j, err, "skipping it and any further ones")
                continue
            return j, self.transform(image)
        raise RuntimeError(f"{self._source}: none of the {n} images is readable")


def drop_unreadable(items: list):
    """Collate a batch without the items a set could not read (None, see ``_load_or_drop``);
    None when none is left."""
    from torch.utils.data import default_collate

    kept = [item for item in items if item is not None and not (isinstance(item, tuple) and item[0] is None)]
    return default_collate(kept) if kept else None


def skip_totals(*datasets) -> dict[str, dict[str, int]]:
    """``{source: {reason: count}}`` over the given datasets and what they wrap (subsets,
    held-out splits, pair views of a folder), each ``SkipStats`` counted once: the skips a run
    reports at its end and in its results. Counts made inside DataLoader worker processes
    stay there (``train.num_workers`` > 0 reports those of the main process only)."""
    seen: set[int] = set()
    totals: dict[str, dict[str, int]] = {}
    stack = list(datasets)
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        stats = getattr(item, "skip_stats", None)
        if isinstance(stats, SkipStats) and id(stats) not in seen:
            seen.add(id(stats))
            if stats.counts:
                merged = totals.setdefault(stats.source, {})
                for reason, n in stats.counts.items():
                    merged[reason] = merged.get(reason, 0) + n
        streamed = getattr(item, "stats", None)  # a shard stream's ShardStats (duck-typed: no import)
        if streamed is not None and id(streamed) not in seen and getattr(streamed, "skipped", 0):
            seen.add(id(streamed))
            source = " ".join(getattr(item, "urls", [])[:1]) + (" ..." if len(getattr(item, "urls", [])) > 1 else "")
            totals.setdefault(source or "shards", {})["unreadable"] = int(streamed.skipped)
        stack.extend(getattr(item, name, None) for name in ("dataset", "base", "pairs", "train_dataset"))
    return totals
