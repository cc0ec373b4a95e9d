"""Embedded default data: procedurally drawn captioned shapes, generated in memory from a seed.

Each image shows one or two objects on a noisy dark background. An object has a shape, a
colour, a size and a position; captions describe them in several phrasings, some complete
("a small red circle on the left"), some partial ("a picture of a red circle", "a red
object"). The partial ones make the captions' information vary the way web captions do, and
they contain the words the zero-shot prompts use ("a {} shape", "a {} object").

- ``noise``: the fraction of training pairs whose caption is swapped with another training
  pair's (semantic ambiguity). Val/test captions are always clean.
- ``heldout_combos``: (shape, colour) combinations never drawn in train (for any object) but
  drawn in val/test, to measure compositional generalisation.
- Zero-shot tasks (shape, colour, size, position) use the single-object images of a split.
- The retrieval set uses images whose full description is unique in the split, each with
  several *complete* captions in different phrasings, so that every caption identifies one
  image and I->T / T->I recall are well posed.

Rendering is vectorised over the batch: every pixel of every image is tested against the
analytic shape inequalities on a coordinate grid at once. Measured on the project's 2-core
CPU machine: ~100k 32x32 images/s (see tests/test_data_shapes.py::test_generation_speed_report).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from topoclip.data.datasets import TensorClassificationSet, TensorPairSet, TensorRetrievalSet
from topoclip.data.shapes_config import (  # re-exported: the vocabulary and settings live there, torch-free
    BACKGROUNDS,
    COLOUR_NAMES,
    COLOURS,
    DEFAULT_HELDOUT,  # noqa: F401 (re-exported)
    PAIR_FULL,
    PAIR_PARTIAL,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SINGLE_FULL,
    SINGLE_PARTIAL,
    SIZES,
    ZEROSHOT_TASKS,
    ShapesConfig,
)

# Object centre as a fraction of the image side, (x, y); y grows downwards.
_POSITION_XY = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
# Radius as a fraction of the image side. Two large objects on opposite sides plus jitter
# still do not touch: 2 * 1.1 * 0.19 * 1.06 < 0.5 - 2 * 0.025 (1.1 = the diamond's reach).
_SIZE_RADIUS = {"small": 0.125, "large": 0.19}
_RADIUS_JITTER = 0.06  # relative
_CENTER_JITTER = 0.025  # fraction of the image side
_COLOUR_JITTER = 12  # per channel, in 0..255
_RENDER_CHUNK_PIXELS = 1 << 22  # pixels rendered at once (4096 images at 32x32): bounds peak memory


def _shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Pixels inside ``shape`` given offsets from the centre in units of the radius."""
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) <= 0.82  # area close to the circle's
    if shape == "diamond":
        return dx.abs() + dy.abs() <= 1.1
    if shape == "triangle":  # apex up at dy=-1, base at dy=0.75
        return (dy <= 0.75) & (dx.abs() <= (dy + 1.0) * 0.6)
    if shape == "cross":  # plus sign
        ax, ay = dx.abs(), dy.abs()
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    if shape == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    raise ValueError(f"unknown shape {shape!r}")


_TASK_ATTRIBUTE = {"shape": "shape", "colour": "colour", "size": "size", "position": "position"}

_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def _fix_articles(text: str) -> str:
    return _ARTICLE.sub("an ", text)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
@dataclass
class ShapesAttributes:
    """Per-image generator labels; slot 1 is -1 (or 0 for floats) when an image has one object.

    Indices refer to SHAPES, COLOUR_NAMES, SIZES, POSITIONS. ``center`` is (x, y) in pixels
    (pixel i covers [i, i+1)), ``radius`` in pixels, ``rgb`` the drawn colour before noise.
    """

    num_objects: torch.Tensor  # [N] long, 1 or 2
    shape: torch.Tensor  # [N, 2] long
    colour: torch.Tensor  # [N, 2] long
    size: torch.Tensor  # [N, 2] long
    position: torch.Tensor  # [N, 2] long
    center: torch.Tensor  # [N, 2, 2] float (x, y)
    radius: torch.Tensor  # [N, 2] float
    rgb: torch.Tensor  # [N, 2, 3] long

    def __len__(self) -> int:
        return self.num_objects.shape[0]

    def objects(self, i: int) -> list[dict[str, str]]:
        """Attribute names of image i's objects, e.g. [{"shape": "circle", "colour": "red", ...}]."""
        return self._objects_of(
            int(self.num_objects[i]), self.shape[i].tolist(), self.colour[i].tolist(),
            self.size[i].tolist(), self.position[i].tolist(),
        )

    def all_objects(self) -> list[list[dict[str, str]]]:
        """``objects(i)`` for every image (one tensor->list conversion instead of N small ones)."""
        columns = (self.shape.tolist(), self.colour.tolist(), self.size.tolist(), self.position.tolist())
        return [self._objects_of(n, *(c[i] for c in columns)) for i, n in enumerate(self.num_objects.tolist())]

    @staticmethod
    def _objects_of(n, shape, colour, size, position) -> list[dict[str, str]]:
        return [
            {"shape": SHAPES[shape[k]], "colour": COLOUR_NAMES[colour[k]], "size": SIZES[size[k]], "position": POSITIONS[position[k]]}
            for k in range(n)
        ]


def _split_generator(seed: int, *stream: int) -> torch.Generator:
    # SeedSequence mixes (seed, split, stream) into well-separated states, so neighbouring
    # seeds or splits do not produce correlated data.
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _sample_attributes(
    n: int, cfg: ShapesConfig, allowed_combos: torch.Tensor, g: torch.Generator, force_first: torch.Tensor | None
) -> ShapesAttributes:
    num_colours = len(COLOUR_NAMES)
    num_objects = 1 + (torch.rand(n, generator=g) < cfg.two_object_prob).long()
    a = len(allowed_combos)
    first = torch.randint(a, (n,), generator=g)
    # Shifting by 1..a-1 makes the second object's combo uniform over the *other* combos, so
    # a caption like "a red circle and a red circle" never happens.
    second = (first + torch.randint(1, max(a, 2), (n,), generator=g)) % a
    combos = torch.stack([allowed_combos[first], allowed_combos[second]], 1)
    if force_first is not None:
        k = min(n, len(force_first))
        combos[:k, 0] = force_first[:k]
        clash = combos[:k, 1] == combos[:k, 0]
        combos[:k, 1] = torch.where(clash, (combos[:k, 1] + 1) % (len(SHAPES) * num_colours), combos[:k, 1])
    shape, colour = combos // num_colours, combos % num_colours
    size = torch.randint(len(SIZES), (n, 2), generator=g)

    single_pos = torch.randint(len(POSITIONS), (n,), generator=g)
    horizontal = torch.rand(n, generator=g) < 0.5
    side = torch.randint(2, (n,), generator=g)
    left, top = POSITIONS.index("left"), POSITIONS.index("top")  # right = left+1, bottom = top+1
    pair0 = torch.where(horizontal, left + side, top + side)
    pair1 = torch.where(horizontal, left + 1 - side, top + 1 - side)
    two = num_objects == 2
    position = torch.stack([torch.where(two, pair0, single_pos), pair1], 1)

    s = cfg.image_size
    xy = torch.tensor([_POSITION_XY[p] for p in POSITIONS], dtype=torch.float32)
    center = (xy[position] + (torch.rand(n, 2, 2, generator=g) * 2 - 1) * _CENTER_JITTER) * s
    base_r = torch.tensor([_SIZE_RADIUS[z] for z in SIZES], dtype=torch.float32)
    radius = base_r[size] * s * (1 + (torch.rand(n, 2, generator=g) * 2 - 1) * _RADIUS_JITTER)
    palette = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.long)
    jitter = torch.randint(-_COLOUR_JITTER, _COLOUR_JITTER + 1, (n, 2, 3), generator=g)
    rgb = (palette[colour] + jitter).clamp(0, 255)

    one = ~two
    for t in (shape, colour, size, position):
        t[one, 1] = -1
    center[one, 1] = 0.0
    radius[one, 1] = 0.0
    rgb[one, 1] = 0
    return ShapesAttributes(num_objects, shape, colour, size, position, center, radius, rgb)


@contextmanager
def _single_thread():
    # The renderer is a chain of short memory-bound ops. On a small shared machine, intra-op
    # threads waiting at each op's barrier for a descheduled sibling made it ~5x slower
    # (measured: 27k vs 5k images/s on 2 busy cores); one thread costs little when idle.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _render(
    attrs: ShapesAttributes, image_size: int, pixel_noise: float, g: torch.Generator, background: str = "dark"
) -> torch.Tensor:
    """uint8 images [N, 3, S, S] drawn from ``attrs``, vectorised over each chunk of images."""
    with _single_thread():
        return _render_chunks(attrs, image_size, pixel_noise, g, BACKGROUNDS[background])


def _render_chunks(
    attrs: ShapesAttributes, image_size: int, pixel_noise: float, g: torch.Generator, background: tuple[int, int]
) -> torch.Tensor:
    n, s = len(attrs), image_size
    chunk = max(1, _RENDER_CHUNK_PIXELS // (s * s))
    out = torch.empty(n, 3, s, s, dtype=torch.uint8)
    coords = torch.arange(s, dtype=torch.float32) + 0.5  # pixel centres
    gy, gx = coords.view(1, s, 1), coords.view(1, 1, s)
    lo, hi = background
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        b = sl.stop - sl.start
        grey = torch.randint(lo, hi + 1, (b, 1, 1, 1), generator=g).float()
        img = grey.expand(b, 3, s, s).clone()
        for k in range(2):
            active = attrs.num_objects[sl] > k
            cx = attrs.center[sl, k, 0].view(b, 1, 1)
            cy = attrs.center[sl, k, 1].view(b, 1, 1)
            r = attrs.radius[sl, k].clamp_min(1e-6).view(b, 1, 1)
            dx, dy = (gx - cx) / r, (gy - cy) / r
            mask = torch.zeros(b, s, s, dtype=torch.bool)
            shape_k = attrs.shape[sl, k]
            for si, name in enumerate(SHAPES):
                idx = torch.nonzero(active & (shape_k == si)).squeeze(1)
                if idx.numel():
                    mask[idx] = _shape_mask(name, dx[idx], dy[idx])
            colour = attrs.rgb[sl, k].float().view(b, 3, 1, 1)
            img = torch.where(mask.unsqueeze(1), colour, img)
        if pixel_noise > 0:
            # One noise value per pixel shared by the channels (luminance noise): drawing
            # normals dominates the cost, so this is ~3x faster than per-channel noise.
            img += torch.randn(b, 1, s, s, generator=g) * pixel_noise
        out[sl] = img.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _object_phrase(o: dict[str, str]) -> str:
    return f"{o['size']} {o['colour']} {o['shape']} {POSITION_PHRASES[o['position']]}"


def describe(objects: list[dict[str, str]], template: str = "a photo of a {o}") -> str:
    """A caption of one object's attributes in the generator's phrasing (``{o}`` the full
    phrase, ``{c}`` colour, ``{s}`` shape, ``{z}`` size, ``{p}`` position)."""
    return _fill(template, objects)


def _fill(template: str, objs: list[dict[str, str]]) -> str:
    if len(objs) == 1:
        o = objs[0]
        text = template.format(o=_object_phrase(o), c=o["colour"], s=o["shape"], z=o["size"], p=POSITION_PHRASES[o["position"]])
    else:
        o1, o2 = objs
        text = template.format(
            o1=_object_phrase(o1), o2=_object_phrase(o2),
            c1=o1["colour"], s1=o1["shape"], z1=o1["size"],
            c2=o2["colour"], s2=o2["shape"], z2=o2["size"],
        )
    return _fix_articles(text)


def _captions(attrs: ShapesAttributes, full_prob: float, g: torch.Generator) -> list[str]:
    n = len(attrs)
    use_full = (torch.rand(n, generator=g) < full_prob).tolist()
    pick = torch.rand(n, generator=g).tolist()  # uniform in [0, 1) -> template index
    out = []
    for i, objs in enumerate(attrs.all_objects()):
        if len(objs) == 1:
            pool = SINGLE_FULL if use_full[i] else SINGLE_PARTIAL
        else:
            pool = PAIR_FULL if use_full[i] else PAIR_PARTIAL
        out.append(_fill(pool[int(pick[i] * len(pool))], objs))
    return out


def _swap_captions(n: int, noise: float, g: torch.Generator) -> torch.Tensor:
    """``source[i]``: the pair whose caption pair i gets; exactly round(noise*n) pairs differ.

    The chosen pairs are cycled (each takes the next one's caption), so none keeps its own.
    A single swap is impossible, so round(noise*n) == 1 is raised to 2.
    """
    source = torch.arange(n)
    k = int(round(noise * n))
    if k == 1:
        k = 2
    if k >= 2:
        chosen = torch.randperm(n, generator=g)[:k]
        source[chosen] = chosen.roll(-1)
    return source


class ShapesSplit(TensorPairSet):
    """One split of pairs: ``ds[i] -> (normalised image, caption)``.

    Extra attributes: ``split``, ``attributes`` (ShapesAttributes), ``clean_captions`` (the
    caption each image was drawn with), ``caption_source`` (``captions[i] ==
    clean_captions[caption_source[i]]``; differs from ``i`` exactly for the noisy pairs).
    """

    def __init__(self, split, images, captions, clean_captions, caption_source, attributes, mean, std) -> None:
        super().__init__(images, captions, mean, std)
        self.split = split
        self.clean_captions = clean_captions
        self.caption_source = caption_source
        self.attributes = attributes


_SPLITS = ("train", "val", "test")


class ShapesData:
    """The generated splits plus the evaluation sets built from them (see ``make_shapes``)."""

    def __init__(self, cfg: ShapesConfig) -> None:
        self.config = cfg
        num_colours = len(COLOUR_NAMES)
        all_combos = torch.arange(len(SHAPES) * num_colours)
        heldout = torch.tensor(
            [SHAPES.index(s) * num_colours + COLOUR_NAMES.index(c) for s, c in cfg.heldout_combos], dtype=torch.long
        )
        train_combos = all_combos[~torch.isin(all_combos, heldout)]
        sizes = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
        self._splits: dict[str, ShapesSplit] = {}
        with _single_thread():
            self._generate(cfg, sizes, all_combos, train_combos, heldout)

    def _generate(self, cfg, sizes, all_combos, train_combos, heldout) -> None:
        for split_id, split in enumerate(_SPLITS):
            g = _split_generator(cfg.seed, split_id)
            n = sizes[split]
            if split == "train":
                attrs = _sample_attributes(n, cfg, train_combos, g, None)
            else:
                # Every held-out combo is guaranteed to occur in val/test (as the first
                # object of the first images), not just likely to.
                attrs = _sample_attributes(n, cfg, all_combos, g, heldout)
            images = _render(attrs, cfg.image_size, cfg.pixel_noise, g, cfg.background)
            clean = _captions(attrs, cfg.full_caption_prob, g)
            if split == "train":
                source = _swap_captions(n, cfg.noise, g)
                captions = [clean[j] for j in source.tolist()]
            else:
                source, captions = torch.arange(n), list(clean)
            self._splits[split] = ShapesSplit(split, images, captions, clean, source, attrs, cfg.mean, cfg.std)

    @property
    def train(self) -> ShapesSplit:
        return self._splits["train"]

    @property
    def val(self) -> ShapesSplit:
        return self._splits["val"]

    @property
    def test(self) -> ShapesSplit:
        return self._splits["test"]

    def split(self, name: str) -> ShapesSplit:
        if name not in self._splits:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {name!r}")
        return self._splits[name]

    def captions(self, split: str = "train") -> list[str]:
        """The split's captions as used for training (e.g. to build the tokenizer)."""
        return list(self.split(split).captions)

    def zeroshot_tasks(self, split: str = "test", tasks=None) -> list[TensorClassificationSet]:
        """One ClassificationSet per task, over the split's single-object images."""
        ds = self.split(split)
        tasks = self.config.zeroshot_tasks if tasks is None else tuple(tasks)
        single = torch.nonzero(ds.attributes.num_objects == 1).squeeze(1)
        if single.numel() == 0:
            raise ValueError(f"split {split!r} has no single-object images to build zero-shot tasks from")
        out = []
        for task in tasks:
            if task not in ZEROSHOT_TASKS:
                raise ValueError(f"unknown zero-shot task {task!r}; known: {list(ZEROSHOT_TASKS)}")
            classnames, templates = ZEROSHOT_TASKS[task]
            labels = getattr(ds.attributes, _TASK_ATTRIBUTE[task])[single, 0]
            out.append(
                TensorClassificationSet(
                    task, ds.images[single], labels, list(classnames), list(templates), ds.mean, ds.std
                )
            )
        return out

    def retrieval_set(self, split: str = "test") -> TensorRetrievalSet:
        """Images with a unique full description, each with several complete captions."""
        ds = self.split(split)
        attrs = ds.attributes
        seen, keep, keep_objs = set(), [], []
        for i, objs in enumerate(attrs.all_objects()):
            signature = tuple(sorted(tuple(o.values()) for o in objs))
            if signature not in seen:
                seen.add(signature)
                keep.append(i)
                keep_objs.append(objs)
        k = self.config.retrieval_captions_per_image
        g = _split_generator(self.config.seed, _SPLITS.index(split), 1000)
        captions, caption_to_image = [], []
        order = torch.rand(len(keep), len(SINGLE_FULL), generator=g).argsort(1)  # random distinct phrasings
        for row, objs in enumerate(keep_objs):
            pool = SINGLE_FULL if len(objs) == 1 else PAIR_FULL
            for t in [t for t in order[row].tolist() if t < len(pool)][:k]:
                captions.append(_fill(pool[t % len(pool)], objs))
                caption_to_image.append(row)
        keep_t = torch.tensor(keep, dtype=torch.long)
        rs = TensorRetrievalSet(f"shapes-{split}", ds.images[keep_t], captions, caption_to_image, ds.mean, ds.std)
        rs.source_indices = keep_t  # position in the split of each retrieval image
        return rs

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ShapesData(train={c.num_train}, val={c.num_val}, test={c.num_test}, image_size={c.image_size}, "
            f"noise={c.noise}, seed={c.seed})"
        )


def make_shapes(cfg: ShapesConfig | dict | None = None, **overrides) -> ShapesData:
    """Generate the captioned-shapes data: ``.train/.val/.test``, ``.zeroshot_tasks()``, ``.retrieval_set()``.

    ``cfg`` is a ShapesConfig, a dict of its fields, or None (defaults); keyword overrides win.
    """
    if isinstance(cfg, dict):
        overrides = {**cfg, **overrides}
        cfg = None
    unknown = set(overrides) - set(ShapesConfig.field_names())
    if unknown:
        raise ValueError(f"unknown ShapesConfig field(s): {sorted(unknown)}")
    if cfg is None:
        cfg = ShapesConfig(**overrides)
    elif overrides:
        cfg = ShapesConfig(**{**{f: getattr(cfg, f) for f in ShapesConfig.field_names()}, **overrides})
    if not isinstance(cfg, ShapesConfig):
        raise ValueError(f"cfg must be a ShapesConfig, got {type(cfg).__name__}")
    return ShapesData(cfg)
