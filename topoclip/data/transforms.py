"""Image loading and the eval-style image transform (RGB -> resize -> center crop -> normalise).

Everything that turns a file or a uint8 array into the normalised float tensor the towers
expect lives here, so the embedded data and the real-data loaders normalise identically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from topoclip.data.image_stats import CLIP_MEAN, CLIP_STD, check_mean_std  # re-exported

# Errors PIL raises for unreadable files vary by format and failure point; SyntaxError and
# struct errors (ValueError) come from some plugin parsers on garbage input.
_PIL_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded; the message names the file."""


def normalize_uint8(
    images: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """uint8 images ``[..., 3, H, W]`` in 0..255 -> float32 ``(x/255 - mean) / std``."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    # Folding 1/255 into the scale saves one full pass over the batch.
    return (images.to(torch.float32) - m * 255.0) / (s * 255.0)


# Modes whose samples are wider than 8 bits, and the value that is full white in each.
# PIL's convert("RGB") clips them at 255 instead of scaling: a 16-bit grey at 46% (30,000)
# would come out pure white. "I" is how PIL opens 16-bit PNGs and TIFFs; "F" is float data,
# taken as 0..1 when it fits there, else as 0..255.
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, scaling high-bit-depth samples (16-bit grey, 32-bit integer,
    float) to 0..255 rather than clipping them; palette, grey, CMYK and alpha modes go through
    PIL's own conversion (alpha is dropped, as CLIP's preprocessing does)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES or image.mode == "F":
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
        else:
            top = _WIDE_MODES[image.mode]
        scaled = np.clip(np.nan_to_num(values / top * 255.0), 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` fully decoded as RGB; CorruptImageError (naming the file) if it cannot be read."""
    try:
        with Image.open(path) as img:
            # load() forces a full decode, so truncated files fail here and not later inside a
            # DataLoader worker with a less helpful traceback.
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise
    except _PIL_ERRORS as err:
        raise CorruptImageError(f"cannot read image {os.fspath(path)!r}: {err}") from err


def verify_image(path: str | os.PathLike) -> None:
    """CorruptImageError (naming the file) unless ``path`` decodes completely.

    A full decode, not PIL's ``Image.verify``: that checks the header and chunk checksums only,
    and a JPEG cut short passes it, then fails (or, with truncated-image loading on, turns
    grey) when a loader or an evaluation reads its pixels."""
    load_image(path)


class ImageTransform:
    """PIL image -> RGB -> resize (shorter side) -> center crop -> float tensor -> normalise.

    A plain class rather than a closure so it pickles into DataLoader worker processes.
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        interpolation: str = "bicubic",
    ) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        check_mean_std(mean, std)
        from torchvision.transforms import InterpolationMode  # on first use: a config stays light

        try:
            self.interpolation = InterpolationMode(interpolation)
        except ValueError:
            choices = [m.value for m in InterpolationMode]
            raise ValueError(f"interpolation must be one of {choices}, got {interpolation!r}") from None
        self.image_size = image_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        import torchvision.transforms.functional as TF  # after the first call, a dict lookup

        image = TF.resize(image, self.image_size, interpolation=self.interpolation, antialias=True)
        image = TF.center_crop(image, [self.image_size, self.image_size])
        return normalize_uint8(TF.pil_to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation.value!r})"
        )
