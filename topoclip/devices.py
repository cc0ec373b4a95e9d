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


def check_device_available(device: torch.device, field: str = "train.device") -> None:
    """A ValueError naming ``field`` unless this machine has ``device`` (a CUDA GPU of that
    index, MPS): said in one line before a run makes anything, not as a driver traceback."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}: {device} asked for, but this machine has no CUDA GPU (use {field}=auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{field}: {device}, but this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{field}: {device} asked for, but MPS is not available here")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU with bf16 support,
    or a CPU with AMX or AVX512-BF16 (5-8x its fp32 GEMM rate on AMX; without them bf16 is
    emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(callable(getattr(cpu, name, None)) and getattr(cpu, name)() for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as used on ``device``: "auto" is bf16 autocast of the towers where the
    hardware has native bf16 (``native_bf16``), else fp32; the others as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision
