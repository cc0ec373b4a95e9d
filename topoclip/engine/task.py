"""What the engine trains: a ``Task`` holds the model and its loss.

The engine runs every recipe through the same two calls, so that it can also split a batch
for the gradient cache (encode chunk by chunk, one loss over the whole batch):

    encoded = task.encode(batch)          # (image points, text points, *shared), with autograd
    loss, details = task.loss(*encoded)   # details: floats to log (the loss's own diagnostics)

``shared`` outputs do not depend on the batch rows (the logit scale). ``encode`` runs inside
the (DistributedDataParallel-wrapped) forward, so every parameter it touches gets a gradient
that is averaged across ranks; ``loss`` sees points gathered over the ranks by the loss itself.
``forward(batch)`` is the two together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Task", "ContrastiveTask"]


class Task(nn.Module):
    """A model and how a batch becomes a loss (see the module docstring).

    ``model`` is what checkpoints save and resume loads; ``loss_state()`` /
    ``load_loss_state()`` carry whatever state the loss keeps of its own (a mixup loss's
    lambda generator); ``set_epoch`` lets a loss depend on the epoch; ``after_step`` runs after
    every optimizer update (e.g. to clamp a parameter to its bounds).
    """

    model: nn.Module

    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def loss(self, *encoded: Tensor) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        return self.loss(*self.encode(batch))

    def loss_state(self) -> dict[str, Any]:
        return {}

    def load_loss_state(self, state: dict[str, Any]) -> None:
        pass

    def set_epoch(self, epoch: int) -> None:
        pass

    def after_step(self) -> None:
        pass

    def current_scale(self) -> float:
        """The logit scale to report before the first step (nan when the task has none)."""
        return float("nan")


class ContrastiveTask(Task):
    """A dual encoder (``model(images, input_ids, attention_mask) -> (u, v)`` and
    ``model.logit_scale()``) under a loss ``loss_fn(u, v, scale, return_details=True)``:
    the contrastive loss for pretraining and FT, the mixup losses for m²-Mix and its family.

    Batches are dicts with ``images``, ``input_ids`` and ``attention_mask``.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        from topoclip.losses.sigmoid import SigmoidLoss

        inner = loss_fn
        while hasattr(inner, "inner") or hasattr(inner, "clip_loss"):  # entailment / mixup wrappers
            inner = getattr(inner, "inner", None) or inner.clip_loss
        if isinstance(inner, SigmoidLoss) and getattr(model, "logit_bias", None) is None:
            raise ValueError("loss.kind=sigmoid: the model has no logit bias (give it one: model.logit_bias in "
                             "a training config, topoclip.models.ensure_logit_bias for a model of your own)")
        self.model = model
        self.loss_fn = loss_fn

    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """(u, v, scale), and the logit bias when the model has one (the sigmoid loss): both
        come out of the (DDP) forward, so their gradients are averaged over the ranks."""
        u, v = self.model(batch["images"], batch["input_ids"], batch["attention_mask"])
        extra = []
        if getattr(self.model, "logit_bias", None) is not None:
            extra.append(self.model.logit_bias())
        if isinstance(getattr(self.model, "curvature", None), nn.Module):
            extra.append(self.model.curvature())
        return (u, v, self.model.logit_scale(), *extra)

    def loss(self, u: Tensor, v: Tensor, scale: Tensor, *extra: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The loss of encoded outputs: ``extra`` are the logit bias (when the model has one)
        and the curvature (a learned one), in that order, as ``encode`` returned them."""
        extra = list(extra)
        curvature = extra.pop() if isinstance(getattr(self.model, "curvature", None), nn.Module) else None
        if curvature is None:
            loss, details = self.loss_fn(u, v, scale, *extra, return_details=True)
        else:
            with self.model.topology.curvature_of(curvature):
                loss, details = self.loss_fn(u, v, scale, *extra, return_details=True)
            details = {**details, "curvature": float(curvature.detach())}
        return loss, {**details, "scale": float(scale.detach())}

    def loss_state(self) -> dict[str, Any]:
        return self.loss_fn.state_dict() if isinstance(self.loss_fn, nn.Module) else {}

    def load_loss_state(self, state: dict[str, Any]) -> None:
        if state and isinstance(self.loss_fn, nn.Module):
            self.loss_fn.load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loss_fn, "set_epoch"):
            self.loss_fn.set_epoch(epoch)  # epoch-dependent losses (mixup weight decay)

    @torch.no_grad()
    def after_step(self) -> None:
        self.model.logit_scale.clamp_()
        if isinstance(getattr(self.model, "curvature", None), nn.Module):
            self.model.curvature.clamp_()

    def current_scale(self) -> float:
        return self.model.logit_scale.value
