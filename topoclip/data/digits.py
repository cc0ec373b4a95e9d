"""Real images to try topoclip on: scikit-learn's 1,797 handwritten digits (8x8 grey,
``sklearn.datasets.load_digits``, shipped inside the package: nothing is downloaded), written
as the files your own data would be:

    DIR/images/0000.png ...        the digits, 8x8 greyscale PNGs
    DIR/train.tsv, DIR/test.tsv    (filepath, title, label): a caption per image, for training
                                   and retrieval ("a handwritten digit seven", ...)
    DIR/train/<k_name>/, DIR/test/<k_name>/   class folders, for zero-shot and the linear probe
    DIR/classnames.txt             zero ... nine, in the folders' order
    DIR/templates.json             the zero-shot prompts, in CLIP_benchmark's {c} form
    DIR/suite.yaml                 zero-shot, retrieval (caption- and class-level) and linear
                                   probe on the test split
    DIR/shifted/<shift>/<k_name>/  the test split under distribution shifts (inverted, noisy)
    DIR/shifted-suite.yaml         zero-shot on the test split and on each shifted copy: the
                                   evaluation of few-shot adaptation

The split is stratified and seeded; captions use one of several phrasings per image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

__all__ = ["NAMES", "CAPTION_TEMPLATES", "PROMPT_TEMPLATES", "SHIFTS", "write_digits"]

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("a handwritten digit {}", "the number {} written by hand", "a scan of a handwritten {}",
                     "digit {}, handwritten", "a small grey image of the digit {}")
PROMPT_TEMPLATES = ("a handwritten digit {c}.", "the number {c}.", "a photo of the digit {c}.")


SHIFTS = ("inverted", "noisy")


def _shifted(pixels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Distribution shifts of one digit (values in [0, 1]): ink and paper swapped; Gaussian
    pixel noise of std 0.25."""
    noisy = np.clip(pixels + rng.normal(0.0, 0.25, size=pixels.shape), 0.0, 1.0)
    return {"inverted": 1.0 - pixels, "noisy": noisy}


def write_digits(out: str | os.PathLike, test_fraction: float = 0.3, seed: int = 0) -> dict[str, int]:
    """Write the files above into ``out``; returns the image counts per split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("topoclip data digits needs scikit-learn: pip install scikit-learn") from None
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction: must lie in (0, 1), got {test_fraction}")
    digits = load_digits()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(digits.target), dtype=bool)
    for label in range(10):  # stratified: the same fraction of every digit in the test split
        members = np.flatnonzero(digits.target == label)
        test[rng.permutation(members)[: round(test_fraction * len(members))]] = True
    phrasing = rng.integers(len(CAPTION_TEMPLATES), size=len(digits.target))
    rows = {"train": ["filepath\ttitle\tlabel"], "test": ["filepath\ttitle\tlabel"]}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        name = f"images/{i:04d}.png"
        image = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
        image.save(out / name)
        split = "test" if test[i] else "train"
        folder = out / split / f"{label}_{NAMES[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
        if split == "test":
            for shift, shifted in _shifted(pixels / 16.0, rng).items():
                target = out / "shifted" / shift / folder.name
                target.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.round(shifted * 255).astype(np.uint8), mode="L").save(target / f"{i:04d}.png")
        rows[split].append(f"{name}\t{CAPTION_TEMPLATES[phrasing[i]].format(NAMES[label])}\t{NAMES[label]}")
    for split, lines in rows.items():
        (out / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (out / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (out / "templates.json").write_text(json.dumps(list(PROMPT_TEMPLATES), indent=1) + "\n")
    suite = [
        {"name": "digits", "task": "zeroshot", "data": {"folder": "test", "classnames": "classnames.txt", "templates": "templates.json"}},
        {"name": "digits-captions", "task": "retrieval", "data": {"csv": "test.tsv"}},
        {"name": "digits-classes", "task": "retrieval", "data": {"csv": "test.tsv", "label_key": "label", "class_level": True}},
        {"name": "digits-probe", "task": "linear_probe", "data": {"train": "train", "test": "test", "classnames": "classnames.txt"}},
    ]
    (out / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    # Few-shot adaptation: zero-shot on the whole test split and on its shifted copies.
    prompts = {"classnames": "classnames.txt", "templates": "templates.json"}
    shifted = [{"name": "digits", "task": "zeroshot", "data": {"folder": "test", **prompts}}]
    shifted += [{"name": f"digits-{shift}", "task": "zeroshot", "data": {"folder": f"shifted/{shift}", **prompts}}
                for shift in SHIFTS]
    (out / "shifted-suite.yaml").write_text(yaml.safe_dump(shifted, sort_keys=False))
    return {"train": int((~test).sum()), "test": int(test.sum())}
