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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` fully decoded as RGB; CorruptImageError (naming the file) if it cannot be read."""
    try:
        with Image.open(path) as img:
            # convert() forces a full decode, so truncated files fail here and not later
            # inside a DataLoader worker with a less helpful traceback.
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except _PIL_ERRORS as err:
        raise CorruptImageError(f"cannot read image {os.fspath(path)!r}: {err}") from err


def verify_image(path: str | os.PathLike) -> None:
    """Cheap integrity check with PIL's ``Image.verify`` (no full decode); CorruptImageError if bad."""
    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        raise
    except _PIL_ERRORS as err:
        raise CorruptImageError(f"cannot read image {os.fspath(path)!r}: {err}") from err


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
        if image.mode != "RGB":
            image = image.convert("RGB")
        import torchvision.transforms.functional as TF  # after the first call, a dict lookup

        image = TF.resize(image, self.image_size, interpolation=self.interpolation, antialias=True)
        image = TF.center_crop(image, [self.image_size, self.image_size])
        return normalize_uint8(TF.pil_to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation.value!r})"
        )
