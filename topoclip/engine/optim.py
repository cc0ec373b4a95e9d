"""AdamW with CLIP's weight-decay exclusions, and a cosine schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "NO_DECAY_NAME_PARTS",
    "no_weight_decay_names",
    "param_groups",
    "build_optimizer",
    "cosine_warmup_factor",
    "build_scheduler",
]

# Parameters that are not weight matrices: decaying them towards 0 pulls the temperature,
# the [CLS]/prefix tokens and the position table to meaningless values instead of
# regularising anything. 1-d tensors (biases, norm gains) are caught by their shape.
NO_DECAY_NAME_PARTS = (
    "logit_scale",
    "cls_token",
    "reg_token",
    "dist_token",
    "prefix_token",
    "pos_embed",
    "position_embedding",
)


def _declared_no_decay(model: nn.Module) -> set[str]:
    """Names the model declares (``no_weight_decay_names()``, as DualEncoder does) or its
    submodules declare via timm's ``no_weight_decay()`` convention."""
    names: set[str] = set()
    declare_all = getattr(model, "no_weight_decay_names", None)
    if callable(declare_all):
        names |= set(declare_all())
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if not callable(declare):
            continue
        try:
            declared = declare()
        except TypeError:
            continue
        for name in declared or ():
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Trainable parameter names that get weight decay 0.

    Biases and norm weights (ndim < 2), the logit scale, [CLS]/register/prefix tokens and
    position embeddings (by name), plus whatever the model lists in ``no_weight_decay_names()``
    or a submodule in ``no_weight_decay()``.
    """
    declared = _declared_no_decay(model)
    names = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        by_name = any(part in name for part in NO_DECAY_NAME_PARTS)
        if param.ndim < 2 or by_name or name in declared:
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float, scale_lr: float | None = None) -> list[dict]:
    """AdamW groups: ``decay`` (weight matrices) and ``no_decay`` (see above); with
    ``scale_lr``, the logit scale gets a group of its own with that peak lr.

    Why a separate lr: Adam moves a parameter by about lr per step whatever its gradient, so
    at lr 1e-3 a few hundred steps change the log-scale by a few tenths at most: too little
    for a short run to show where the temperature wants to go (CLIP's runs take ~10^5 steps).
    """
    skip = no_weight_decay_names(model)
    decay, no_decay, scale = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if scale_lr is not None and "logit_scale" in name:
            scale.append(param)
        else:
            (no_decay if name in skip else decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "logit_scale", "params": scale, "weight_decay": 0.0, "lr": scale_lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    scale_lr: float | None = None,
) -> torch.optim.AdamW:
    # foreach: one fused kernel launch per group instead of one per tensor (CPU and GPU).
    return torch.optim.AdamW(param_groups(model, weight_decay, scale_lr), lr=lr, betas=betas, eps=eps, foreach=True)


def cosine_warmup_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the update at (0-based) ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` (the first update already moves, as in
    OpenCLIP), then a half cosine from 1 down to ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    name: str = "cosine",
    min_ratio: float = 0.0,
) -> LambdaLR:
    """A LambdaLR stepped once per training step (after ``optimizer.step()``).

    ``constant`` keeps the warm-up and then holds the peak lr.
    """
    if name == "cosine":

        def factor(step: int) -> float:
            return cosine_warmup_factor(step, warmup_steps, total_steps, min_ratio)

    elif name == "constant":

        def factor(step: int) -> float:
            return (step + 1) / warmup_steps if step < warmup_steps else 1.0

    else:
        raise ValueError(f"schedule.name: unknown schedule {name!r} (known: cosine, constant)")
    return LambdaLR(optimizer, factor)

