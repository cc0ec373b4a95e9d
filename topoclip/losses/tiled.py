"""Exact contrastive loss in O(b d + tile^2) memory, for every topology.

The symmetric InfoNCE needs, besides the positives, only the row-wise and column-wise
log-sum-exp of the b_u x b_v logits. The forward sweeps the matrix tile by tile and keeps
running (max, sum) pairs per row and per column; nothing b x b is ever stored. The backward
recomputes each tile's logits with autograd enabled and back-propagates

    d loss / d L_ij = g_r / b_u * softmax_rows(L)_ij + g_c / b_v * softmax_cols(L)_ij

through the topology's own similarity, so any topology (including user-registered ones)
works and gets its own exact gradient. Cost: the forward similarity once more in the backward,
about 8 b^2 d FLOPs for inner-product topologies (4/3 of the three-GEMM floor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import Topology

__all__ = ["tiled_logsumexp", "tiled_contrastive_loss", "tiled_cross_entropy"]


def _tiles(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _online_update(run_max: Tensor, run_sum: Tensor, tile_max: Tensor, tile: Tensor, dim: int) -> Tensor:
    """Merge a tile into running log-sum-exp state (in place); returns the new max."""
    new_max = torch.maximum(run_max, tile_max)
    # On the first tile run_max is -inf and run_sum 0; exp(-inf - finite) = 0 keeps it exact.
    run_sum.mul_(torch.exp(run_max - new_max))
    shifted = tile - (new_max.unsqueeze(1) if dim == 1 else new_max.unsqueeze(0))
    run_sum.add_(shifted.exp_().sum(dim))
    return new_max


def _tile_logits(topology, u, v, scale, labels, i0, i1, j0, j1) -> Tensor:
    """scale * similarity of a tile, with the positives (row r, column labels[r]) that fall in
    it taken from the exact paired similarity (see contrastive.exact_positives)."""
    logits = topology.scaled_similarity(u[i0:i1], v[j0:j1], scale)
    if topology.inner_product:
        return logits
    hit = (labels[i0:i1] >= j0) & (labels[i0:i1] < j1)
    if not bool(hit.any()):
        return logits
    rows = hit.nonzero().squeeze(1)
    cols = labels[i0:i1][rows] - j0
    positive = scale * topology.paired_similarity(u[i0:i1][rows], v[j0:j1][cols])
    return logits.index_put((rows, cols), positive.to(logits.dtype))


class _TiledLogSumExp(torch.autograd.Function):
    """(mean_i lse_j L_ij, mean_j lse_i L_ij, mean_i L_i,labels[i]) of L = scale * similarity(u, v),
    tile by tile. The positives' mean is part of the same function so that the backward builds
    one gradient per input: a separate autograd branch for it would add two more b x d
    gradient buffers and their sums at the peak."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, labels: Tensor, topology: Topology, tile: int, columns: bool) -> Tensor:  # type: ignore[override]
        nu, nv = u.shape[0], v.shape[0]
        kw = dict(dtype=torch.promote_types(u.dtype, torch.float32), device=u.device)
        row_max = torch.full((nu,), -torch.inf, **kw)
        row_sum = torch.zeros(nu, **kw)
        col_max = torch.full((nv,), -torch.inf, **kw)
        col_sum = torch.zeros(nv, **kw)
        for i0, i1 in _tiles(nu, tile):
            for j0, j1 in _tiles(nv, tile):
                logits = _tile_logits(topology, u, v, scale, labels, i0, i1, j0, j1)
                row_max[i0:i1] = _online_update(row_max[i0:i1], row_sum[i0:i1], logits.amax(1), logits, 1)
                if columns:
                    col_max[j0:j1] = _online_update(col_max[j0:j1], col_sum[j0:j1], logits.amax(0), logits, 0)
        lse_rows = row_sum.log_().add_(row_max)
        lse_cols = col_sum.log_().add_(col_max) if columns else col_sum
        # The positives exactly (paired form), in chunks so no b x d product is kept.
        positive_sum = torch.zeros((), **kw)
        for i0, i1 in _tiles(nu, tile):
            positive_sum += topology.paired_similarity(u[i0:i1], v[labels[i0:i1]]).sum()
        ctx.topology, ctx.tile, ctx.columns = topology, tile, columns
        ctx.save_for_backward(u, v, scale, labels, lse_rows, lse_cols)
        mean_cols = lse_cols.mean() if columns else lse_rows.new_zeros(())
        return torch.stack([lse_rows.mean(), mean_cols, scale * positive_sum / nu])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, v, scale, labels, lse_rows, lse_cols = ctx.saved_tensors
        topology, tile, columns = ctx.topology, ctx.tile, ctx.columns
        nu, nv = u.shape[0], v.shape[0]
        g_rows, g_cols, g_pos = grad[0] / nu, grad[1] / nv, grad[2] / nu
        grad_u = torch.zeros_like(u)
        grad_v = torch.zeros_like(v)
        grad_scale = torch.zeros_like(scale)
        for i0, i1 in _tiles(nu, tile):
            for j0, j1 in _tiles(nv, tile):
                with torch.enable_grad():
                    ui = u[i0:i1].detach().requires_grad_(True)
                    vj = v[j0:j1].detach().requires_grad_(True)
                    s = scale.detach().requires_grad_(True)
                    logits = _tile_logits(topology, ui, vj, s, labels[i0:i1] - j0, 0, i1 - i0, 0, j1 - j0)
                with torch.no_grad():
                    g = torch.sub(logits, lse_rows[i0:i1].unsqueeze(1)).exp_().mul_(g_rows)
                    if columns:
                        g.add_(torch.sub(logits, lse_cols[j0:j1].unsqueeze(0)).exp_().mul_(g_cols))
                    # The positives' term: d/dL of mean_i L_i,labels[i] is 1/b at each positive.
                    hit = (labels[i0:i1] >= j0) & (labels[i0:i1] < j1)
                    if bool(hit.any()):
                        rows = hit.nonzero().squeeze(1)
                        g[rows, labels[i0:i1][rows] - j0] += g_pos
                gu, gv, gs = torch.autograd.grad(logits, (ui, vj, s), g)
                grad_u[i0:i1] += gu
                grad_v[j0:j1] += gv
                grad_scale += gs
        return grad_u, grad_v, grad_scale, None, None, None, None


def tiled_logsumexp(
    topology: Topology, u: Tensor, v: Tensor, scale: Tensor, labels: Tensor, tile: int = 1024, columns: bool = True
) -> Tensor:
    """[mean row lse, mean column lse, mean positive logit] of L = scale * similarity(u, v),
    never storing the matrix. ``labels[r]`` is the column of row r's positive, whose logit is
    taken exactly (paired form).
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    u, v = topology._pair_2d(u, v)
    scale = torch.as_tensor(scale, dtype=u.dtype, device=u.device)
    return _TiledLogSumExp.apply(u, v, scale.to(u.dtype), labels, topology, tile, columns)


def tiled_contrastive_loss(topology: Topology, u: Tensor, v: Tensor, scale: Tensor, tile: int = 1024) -> Tensor:
    """The symmetric InfoNCE of matched pairs (u_i, v_i), exactly, in O(b d + tile^2) memory."""
    if u.shape[0] != v.shape[0]:
        raise ValueError(f"tiled_contrastive_loss: u has {u.shape[0]} points but v has {v.shape[0]}")
    lse = tiled_logsumexp(topology, u, v, scale, torch.arange(u.shape[0], device=u.device), tile)
    return 0.5 * (lse[0] + lse[1]) - lse[2]


def tiled_cross_entropy(topology: Topology, queries: Tensor, keys: Tensor, labels: Tensor, scale: Tensor, tile: int = 1024) -> Tensor:
    """Row-wise cross-entropy of scale * similarity(queries, keys) with one positive key per
    query (the local-loss case: b_local queries against B gathered keys)."""
    lse = tiled_logsumexp(topology, queries, keys, scale, labels, tile, columns=False)
    return lse[0] - lse[2]
