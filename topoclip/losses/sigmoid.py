"""The pairwise sigmoid loss (SigLIP: Zhai et al., *Sigmoid Loss for Language Image
Pre-Training*, ICCV 2023) over any topology.

    logits_ij = scale * similarity(u_i, v_j) + bias
    loss = - sum_ij log sigmoid(z_ij logits_ij) / b,    z_ij = +1 if i = j else -1

With -log sigmoid(-x) = softplus(x) and -log sigmoid(x) = softplus(x) - x this is

    loss = ( sum_ij softplus(logits_ij) - sum_i logits_ii ) / b

so the b x b part is a plain sum of softplus, which the chunked path sweeps tile by tile in
O(b * chunk) memory (the backward recomputes each tile: d loss / d logits_ij = sigmoid(logits_ij)
/ b), and the positives are the paired similarity, O(b d), exact for coincident points on every
topology. SigLIP's initialisation is scale 10, bias -10 (``SIGLIP_INIT``).

Distributed: each rank scores its own image points against the text points of every rank
(gathered features, O(B d); the B x B matrix is never formed) and divides by its local batch,
as OpenCLIP's ``SigLipLoss`` does; DDP's gradient average then equals the loss of the whole
batch on one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..geometry import BlockScratch, Topology
from .contrastive import _world, gather_features
from .settings import SIGLIP_INIT  # re-exported

__all__ = ["SIGLIP_INIT", "SigmoidLoss", "sigmoid_loss"]



def _sum_dtype(x: Tensor) -> torch.dtype:
    """fp32 at least (half-precision logits would lose the sum), fp64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


def _tiles(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


class _TiledSoftplusSum(torch.autograd.Function):
    """sum_ij softplus(scale * similarity(u_i, v_j) + bias), one column tile at a time."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, bias: Tensor, topology: Topology, tile: int) -> Tensor:  # type: ignore[override]
        dtype = _sum_dtype(u)
        total = torch.zeros((), dtype=dtype, device=u.device)
        with torch.no_grad():
            for j0, j1 in _tiles(v.shape[0], tile):
                logits = topology.scaled_similarity(u, v[j0:j1], scale).to(dtype) + bias.to(dtype)
                total += F.softplus(logits).sum()
        ctx.save_for_backward(u, v, scale, bias)
        ctx.topology, ctx.tile = topology, tile
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, v, scale, bias = ctx.saved_tensors
        topology, tile = ctx.topology, ctx.tile
        needs = ctx.needs_input_grad[:4]
        grads = [torch.zeros_like(t) if need else None for t, need in zip((u, v, scale, bias), needs)]
        for j0, j1 in _tiles(v.shape[0], tile):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(need) for t, need in zip((u, v[j0:j1], scale, bias), needs)]
                dtype = _sum_dtype(u)
                logits = topology.scaled_similarity(leaves[0], leaves[1], leaves[2]).to(dtype) + leaves[3].to(dtype)
                # d softplus(x) / dx = sigmoid(x): the tile's gradient without a second pass.
                g_logits = torch.sigmoid(logits.detach()) * grad
                wanted = [(i, leaf) for i, leaf in enumerate(leaves) if leaf.requires_grad]
                got = torch.autograd.grad(logits, [leaf for _, leaf in wanted], g_logits, allow_unused=True)
            for (i, _), g in zip(wanted, got):
                if g is None:
                    continue
                if i == 1:
                    grads[1][j0:j1] += g
                else:
                    grads[i] += g
        return grads[0], grads[1], grads[2], grads[3], None, None


class _BlockedSoftplusSum(torch.autograd.Function):
    """sum_ij softplus(scale * S_ij + bias) for a topology with a blocked kernel (Euclidean, the
    oblique geodesic, Lorentz), one block of rows of S at a time, formed by the kernel and
    summed while in cache.

    d loss / d logits_ij = sigmoid(logits_ij + bias) depends on that logit alone (no row or
    column normalisation, unlike the softmax), so when gradients will be wanted
    (``with_grads``) each block's gradient is formed and handed to the kernel's GEMMs right
    after its logits, in the same sweep: no b x b matrix is kept, and the geodesic's cosines
    are reused instead of recomputed (the GEMMs of the three-GEMM floor, no more). The
    backward then scales the gradients of the sum by the incoming gradient. Without
    gradients only the sum is formed.
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, bias: Tensor, kernel, with_grads: bool, column_tile: int | None,
                *inputs: Tensor) -> Tensor:  # type: ignore[override]
        from .contrastive import _row_blocks

        state = kernel.prepare(u, v, *inputs)
        total = torch.zeros((), dtype=u.dtype, device=u.device)
        work = BlockScratch()
        if with_grads:
            grad_u, grad_v = torch.zeros_like(u), torch.zeros_like(v)
            input_grads = [torch.zeros_like(t) for t in inputs]
            grad_scale = torch.zeros((), dtype=u.dtype, device=u.device)
            grad_bias = torch.zeros((), dtype=u.dtype, device=u.device)
        # column tiles (the tiled loss): each with the kernel's state and gradient buffers of its
        # columns alone; the whole matrix is one tile otherwise
        for j0, j1 in _tiles(v.shape[0], column_tile or v.shape[0]):
            columns = state if (j0, j1) == (0, v.shape[0]) else kernel.columns(state, slice(j0, j1))
            grads = kernel.grad_buffers(columns) if with_grads else None
            for i, j in _row_blocks(u.shape[0], j1 - j0):
                blk = work.get("logits", u, (j - i, j1 - j0))
                kernel.logits_block(columns, slice(i, j), scale, blk, keep=with_grads)
                z = torch.add(blk, bias, out=work.get("z", blk))
                total += F.softplus(z).sum()
                if with_grads:
                    g = z.sigmoid_()  # d softplus(x)/dx = sigmoid(x)
                    grad_bias += g.sum()
                    grad_scale += torch.vdot(g.reshape(-1), blk.reshape(-1))  # sum g S, S = logits / scale
                    kernel.backward_block(columns, slice(i, j), blk, scale, g, grads, reuse=True)
            if with_grads:
                gu, gv, *gi = kernel.gradients(columns, grads)
                grad_u += gu
                grad_v[j0:j1] += gv
                for acc, part in zip(input_grads, gi):
                    acc += part.reshape(acc.shape)
        if with_grads:
            ctx.save_for_backward(grad_u, grad_v, (grad_scale / scale).reshape(scale.shape), grad_bias.reshape(bias.shape),
                                  *input_grads)
        else:
            ctx.mark_non_differentiable(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grads = [g * grad for g in ctx.saved_tensors]
        return (*grads[:4], None, None, None, *grads[4:])


def sigmoid_loss(topology: Topology, u: Tensor, v: Tensor, scale: Tensor | float, bias: Tensor | float,
                 tile: int | None = None, v_all: Tensor | None = None) -> Tensor:
    """The sigmoid loss of image points ``u`` against text points ``v_all`` (default ``v``,
    which ``v_all`` must contain), the positives being the pairs ``(u_i, v_i)``. ``tile``:
    columns per tile of the chunked path (None: the whole matrix at once). Normalised by
    ``u``'s batch."""
    if u.shape[0] != v.shape[0]:
        raise ValueError(f"sigmoid loss: u has {u.shape[0]} points but v has {v.shape[0]}")
    if tile is not None and tile < 1:
        raise ValueError(f"sigmoid loss: tile must be >= 1, got {tile}")
    device = u.device
    scale = scale if torch.is_tensor(scale) else torch.tensor(float(scale), device=device)
    bias = bias if torch.is_tensor(bias) else torch.tensor(float(bias), device=device)
    keys = v if v_all is None else v_all
    dtype = _sum_dtype(u)
    kernel = topology.blocked_kernel
    if kernel is not None and (tile is None or hasattr(kernel, "columns")) and bool(scale > 0):
        u_flat, keys_flat = topology.pair_2d(u, keys)
        inputs = kernel.inputs(u_flat)
        scale_, bias_ = scale.to(u_flat.dtype), bias.to(u_flat.dtype)
        with_grads = torch.is_grad_enabled() and any(t.requires_grad for t in (u_flat, keys_flat, scale_, bias_, *inputs))
        negatives = _BlockedSoftplusSum.apply(u_flat, keys_flat, scale_, bias_, kernel, with_grads, tile, *inputs).to(dtype)
    elif tile is None:
        logits = topology.scaled_similarity(u, keys, scale).to(dtype) + bias.to(dtype)
        negatives = F.softplus(logits).sum()
    else:
        negatives = _TiledSoftplusSum.apply(u, keys, scale, bias, topology, tile)
    # The positives' logits from the paired similarity: exact where the points coincide.
    positives = (scale.to(dtype) * topology.paired_similarity(u, v).to(dtype) + bias.to(dtype)).sum()
    return (negatives - positives) / u.shape[0]


class SigmoidLoss(nn.Module):
    """The sigmoid loss under a topology; call as ``loss_fn(u, v, scale, bias)``.

    Args:
        topology: the embedding topology whose similarity scores the pairs.
        tile_threshold: from this global batch size on, sweep the matrix in tiles of
            ``tile_size`` columns (O(b * tile) memory). None: never; 0: always.
        tile_size: columns per tile.
    """

    def __init__(self, topology: Topology, tile_threshold: int | None = 16384, tile_size: int = 1024):
        super().__init__()
        if tile_size < 1:
            raise ValueError(f"SigmoidLoss: tile_size must be >= 1, got {tile_size}")
        self.topology, self.tile_threshold, self.tile_size = topology, tile_threshold, tile_size

    def forward(self, u: Tensor, v: Tensor, scale: Tensor | float, bias: Tensor | float,
                return_details: bool = False):
        _, world = _world()
        v_all = gather_features(v, with_grad=True) if world > 1 else v
        tiled = self.tile_threshold is not None and v_all.shape[0] >= self.tile_threshold
        loss = sigmoid_loss(self.topology, u, v, scale, bias, self.tile_size if tiled else None, v_all)
        if not return_details:
            return loss
        with torch.no_grad():
            pos = self.topology.paired_similarity(u, v).mean()
        return loss, {"pos_sim": float(pos), "bias": float(bias.detach()) if torch.is_tensor(bias) else float(bias)}
