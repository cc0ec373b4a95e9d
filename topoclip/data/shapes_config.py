"""What the embedded captioned-shapes data is made of — its vocabulary, caption templates,
zero-shot tasks — and its settings (``ShapesConfig``).

Kept free of torch so that reading and validating a config costs no heavy import; the
rendering lives in ``topoclip.data.shapes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from topoclip.data.image_stats import CLIP_MEAN, CLIP_STD, check_mean_std
from topoclip.dataclass_io import check_types

# ---------------------------------------------------------------------------------------------
# Vocabulary and geometry
# ---------------------------------------------------------------------------------------------
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    # Chosen so every colour has a channel >= 210 (stands out from the dark background) and
    # any two differ by >= ~80 in some channel (robust to the colour jitter and pixel noise).
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 70, 210),
    "orange": (245, 135, 25),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Grey level range of the background, drawn per image. "light" is a distribution shift for
# fine-tuning experiments: every colour still differs from it by >= ~50 in some channel.
BACKGROUNDS: dict[str, tuple[int, int]] = {"dark": (25, 65), "light": (150, 190)}

# ---------------------------------------------------------------------------------------------
# Caption templates
# ---------------------------------------------------------------------------------------------
# {o}/{o1}/{o2}: complete object phrase "size colour shape position"; {c} colour, {s} shape,
# {z} size, {p} position phrase. A position phrase always follows its shape/object noun.
SINGLE_FULL = (
    "a {o}",
    "there is a {o}",
    "a picture of a {o}",
    "an image showing a {o}",
    "a photo of a {o}",
    "this is a {o}",
)
SINGLE_PARTIAL = (
    "a {c} {s}",
    "a picture of a {c} {s}",
    "a {z} {c} {s}",
    "a {c} {s} {p}",
    "there is a {c} {s}",
    "a photo of a {s}",
    "a {s} shape",
    "a {c} object",
    "a photo of a {c} object",
    "something {c}",
    "a {z} {c} object",
    "a {c} object {p}",
)
PAIR_FULL = (
    "a {o1} and a {o2}",
    "there is a {o1} and a {o2}",
    "a picture of a {o1} and a {o2}",
    "two shapes: a {o1} and a {o2}",
    "an image showing a {o1} and a {o2}",
    "a {o2} and a {o1}",
)
PAIR_PARTIAL = (
    "a {c1} {s1} and a {c2} {s2}",
    "two shapes: a {c1} {s1} and a {c2} {s2}",
    "a {c1} {s1} next to a {c2} {s2}",
    "a {z1} {c1} {s1} and a {z2} {c2} {s2}",
    "a picture of a {c1} {s1} and a {c2} {s2}",
)

# Zero-shot tasks: classnames and prompt templates (no trailing period: the training captions
# have none, so the prompts stay in the tokenizer's vocabulary).
ZEROSHOT_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shape": (SHAPES, ("a photo of a {}", "a {} shape", "a picture of a {}", "there is a {}", "a {}")),
    "colour": (COLOUR_NAMES, ("a {} object", "a photo of a {} object", "something {}", "a picture of something {}")),
    "size": (SIZES, ("a {} object", "a photo of a {} object", "a {} shape")),
    "position": (
        tuple(POSITION_PHRASES[p] for p in POSITIONS),
        ("a shape {}", "an object {}", "something {}", "a picture of a shape {}"),
    ),
}

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
DEFAULT_HELDOUT = (("triangle", "blue"), ("circle", "yellow"), ("cross", "red"))


@dataclass
class ShapesConfig:
    """Settings of the embedded captioned-shapes data; validated on construction."""

    seed: int = 0
    image_size: int = 32
    num_train: int = 20000
    num_val: int = 1000
    num_test: int = 1000
    two_object_prob: float = 0.3
    noise: float = 0.0  # fraction of training pairs whose caption is swapped with another's
    full_caption_prob: float = 0.5  # chance a training caption names every attribute
    heldout_combos: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT  # (shape, colour) pairs kept out of train
    retrieval_captions_per_image: int = 3
    zeroshot_tasks: tuple[str, ...] = ("shape", "colour", "size", "position")
    pixel_noise: float = 6.0  # std of per-pixel Gaussian noise, in 0..255 units
    background: str = "dark"  # "dark" or "light" (a rendering shift, see BACKGROUNDS)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        check_types(self, "ShapesConfig")
        if self.seed < 0:
            raise ValueError(f"ShapesConfig.seed must be >= 0, got {self.seed}")
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"ShapesConfig.image_size must be in [16, 512], got {self.image_size}")
        if self.num_train < 2:
            raise ValueError(f"ShapesConfig.num_train must be >= 2, got {self.num_train}")
        for name in ("num_val", "num_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"ShapesConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("two_object_prob", "noise", "full_caption_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ShapesConfig.{name} must be a number in [0, 1], got {v!r}")
        if not math.isfinite(self.pixel_noise) or self.pixel_noise < 0:
            raise ValueError(f"ShapesConfig.pixel_noise must be a number >= 0, got {self.pixel_noise!r}")
        if not 1 <= self.retrieval_captions_per_image <= min(len(SINGLE_FULL), len(PAIR_FULL)):
            raise ValueError(
                f"ShapesConfig.retrieval_captions_per_image must be in [1, {min(len(SINGLE_FULL), len(PAIR_FULL))}]"
                f" (the number of complete phrasings), got {self.retrieval_captions_per_image}"
            )
        if self.background not in BACKGROUNDS:
            raise ValueError(f"ShapesConfig.background must be one of {list(BACKGROUNDS)}, got {self.background!r}")
        self.heldout_combos = self._check_heldout(self.heldout_combos)
        tasks = self.zeroshot_tasks
        if not tasks:
            raise ValueError(f"ShapesConfig.zeroshot_tasks must be a non-empty list of task names, got {tasks!r}")
        unknown = [t for t in tasks if t not in ZEROSHOT_TASKS]
        if unknown or len(set(tasks)) != len(tasks):
            raise ValueError(
                f"ShapesConfig.zeroshot_tasks must be distinct names from {list(ZEROSHOT_TASKS)}, got {list(tasks)}"
            )
        check_mean_std(self.mean, self.std, "ShapesConfig")

    @staticmethod
    def _check_heldout(combos: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        out = []
        for shape, colour in combos:
            if shape not in SHAPES:
                raise ValueError(f"ShapesConfig.heldout_combos: unknown shape {shape!r} (known: {list(SHAPES)})")
            if colour not in COLOURS:
                raise ValueError(f"ShapesConfig.heldout_combos: unknown colour {colour!r} (known: {list(COLOURS)})")
            out.append((shape, colour))
        if len(set(out)) != len(out):
            raise ValueError(f"ShapesConfig.heldout_combos has duplicates: {out}")
        # Every shape and colour must still be seen in training, otherwise its zero-shot
        # class is unlearnable rather than a test of generalisation.
        for shape in SHAPES:
            if all((shape, c) in out for c in COLOUR_NAMES):
                raise ValueError(f"ShapesConfig.heldout_combos holds out every colour of shape {shape!r}")
        for colour in COLOUR_NAMES:
            if all((s, colour) in out for s in SHAPES):
                raise ValueError(f"ShapesConfig.heldout_combos holds out every shape of colour {colour!r}")
        return tuple(out)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
