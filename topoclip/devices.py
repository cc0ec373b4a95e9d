"""Which device a piece of work runs on: the one place that reads ``"auto"``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["resolve_device"]


def resolve_device(device: torch.device | str | None = "auto", model: nn.Module | None = None) -> torch.device:
    """The device meant by ``device``.

    ``"auto"``: CUDA when available, else the CPU. ``None``: where ``model`` lives (its first
    parameter or buffer; the CPU for a model without any), or ``"auto"`` without a model.
    Anything else is passed to ``torch.device``.
    """
    if device is None and model is not None:
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
        return torch.device("cpu")
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
