"""Symmetric InfoNCE (the CLIP loss) over any topology.

    logits_ij = scale * similarity(u_i, v_j)
    loss = ( CE(logits, diag) over rows  +  CE(logits, diag) over columns ) / 2

Single process, the b x b logits matrix is reduced by a fused autograd function that keeps
one b x b buffer and needs one GEMM forward and two backward (the arithmetic floor):
OpenCLIP's formulation computes the matrix twice (image->text and its transpose) and lets
autograd store a second copy for the scale, which costs about twice the floor on a CPU.

With torch.distributed initialised, features are gathered from every rank. ``local_loss``
+ ``gather_with_grad`` is the mode that scales (each rank computes b_local x B logits and
gradients flow back through the gather), with OpenCLIP's semantics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..geometry import Topology

__all__ = ["ContrastiveLoss", "symmetric_cross_entropy", "gather_features"]


class _SymmetricCrossEntropy(torch.autograd.Function):
    """mean over i of [lse_j(L_ij) + lse_j(L_ji)] / 2 - L_ii, for a square logits matrix L.

    The gradient is  (softmax_rows(L) + softmax_cols(L) - 2 I) / (2 b); it is written straight
    into one freshly allocated b x b buffer from the saved row and column log-sum-exps.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:  # type: ignore[override]
        lse_rows = torch.logsumexp(logits, dim=1)
        lse_cols = torch.logsumexp(logits, dim=0)
        loss = 0.5 * (lse_rows.mean() + lse_cols.mean()) - logits.diagonal().mean()
        ctx.save_for_backward(logits, lse_rows, lse_cols)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> Tensor:  # type: ignore[override]
        logits, lse_rows, lse_cols = ctx.saved_tensors
        b = logits.shape[0]
        grad = torch.sub(logits, lse_rows.unsqueeze(1)).exp_()
        grad.add_(torch.sub(logits, lse_cols.unsqueeze(0)).exp_())
        grad.diagonal().sub_(2.0)
        return grad.mul_(grad_loss / (2 * b))


def symmetric_cross_entropy(logits: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy of a square logits matrix whose diagonal holds the positives."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"symmetric_cross_entropy needs a square matrix, got {tuple(logits.shape)}")
    return _SymmetricCrossEntropy.apply(logits)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Written here rather than taken from torch.distributed.nn, whose all_gather is deprecated;
    all_reduce (not reduce_scatter) keeps it working on gloo as well as nccl.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = _world()
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def gather_features(x: Tensor, with_grad: bool = True) -> Tensor:
    """Concatenate x from every rank along the batch axis (rank order).

    with_grad: gradients flow back to every rank's features (torch.distributed.nn's
    all_gather). Without it the other ranks' features are constants and only the local
    slice carries a gradient (cheaper, but the gradient is then only the local share).
    """
    rank, world = _world()
    if world == 1:
        return x
    if with_grad:
        return _AllGatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach())
    parts[rank] = x
    return torch.cat(parts, dim=0)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE of scaled similarities under a topology.

    Args:
        topology: the embedding topology whose similarity scores the pairs.
        local_loss: in distributed runs, compute only the local rows (b_local x B logits per
            rank) instead of the full B x B matrix on every rank.
        gather_with_grad: in distributed runs, let gradients flow through the gather.

    Call as ``loss_fn(u, v, scale)`` with u, v manifold points ``[b, d]`` or ``[b, m, n]`` and
    ``scale`` the logit scale (a 0-dim tensor, e.g. ``LogitScale()()``).
    ``return_details=True`` also returns a dict of floats: mean positive / negative
    similarity (unscaled) and in-batch retrieval accuracy, averaged over both directions.
    """

    def __init__(self, topology: Topology, local_loss: bool = False, gather_with_grad: bool = True):
        super().__init__()
        self.topology = topology
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(self, u: Tensor, v: Tensor, scale: Tensor | float, return_details: bool = False):
        if u.shape[0] != v.shape[0]:
            raise ValueError(f"ContrastiveLoss: u has {u.shape[0]} points but v has {v.shape[0]}")
        if not torch.is_tensor(scale):
            scale = torch.tensor(float(scale), device=u.device)
        rank, world = _world()
        topo = self.topology
        if world > 1:
            u_all = gather_features(u, self.gather_with_grad)
            v_all = gather_features(v, self.gather_with_grad)
        else:
            u_all, v_all = u, v

        if world > 1 and self.local_loss:
            b = u.shape[0]
            labels = torch.arange(b, device=u.device) + rank * b
            logits_i2t = topo.scaled_similarity(u, v_all, scale)
            logits_t2i = topo.scaled_similarity(v, u_all, scale)
            loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
            if not return_details:
                return loss
            return loss, _details_rectangular(logits_i2t, logits_t2i, labels, scale)

        logits = topo.scaled_similarity(u_all, v_all, scale)
        loss = symmetric_cross_entropy(logits)
        if not return_details:
            return loss
        return loss, _details_square(logits, scale)


@torch.no_grad()
def _details_square(logits: Tensor, scale: Tensor) -> dict[str, float]:
    b = logits.shape[0]
    diag = logits.diagonal()
    labels = torch.arange(b, device=logits.device)
    pos = diag.mean() / scale
    neg = (logits.sum() - diag.sum()) / max(b * (b - 1), 1) / scale
    acc_i2t = (logits.argmax(dim=1) == labels).float().mean()
    acc_t2i = (logits.argmax(dim=0) == labels).float().mean()
    return {
        "pos_sim": float(pos),
        "neg_sim": float(neg),
        "accuracy": float(0.5 * (acc_i2t + acc_t2i)),
    }


@torch.no_grad()
def _details_rectangular(l_i2t: Tensor, l_t2i: Tensor, labels: Tensor, scale: Tensor) -> dict[str, float]:
    b, n = l_i2t.shape
    rows = torch.arange(b, device=l_i2t.device)
    pos = l_i2t[rows, labels].mean() / scale
    neg = (l_i2t.sum() - l_i2t[rows, labels].sum()) / max(b * (n - 1), 1) / scale
    acc = 0.5 * ((l_i2t.argmax(1) == labels).float().mean() + (l_t2i.argmax(1) == labels).float().mean())
    return {"pos_sim": float(pos), "neg_sim": float(neg), "accuracy": float(acc)}
