"""Exact contrastive loss in O(b d + tile^2) memory, for every topology.

The symmetric InfoNCE needs, besides the positives, only the row-wise and column-wise
log-sum-exp of the b_u x b_v logits. The forward sweeps the matrix tile by tile and keeps
running (max, sum) pairs per row and per column; nothing b x b is ever stored. The backward
recomputes each tile's logits with autograd enabled and back-propagates

    d loss / d L_ij = g_r / b_u * softmax_rows(L)_ij + g_c / b_v * softmax_cols(L)_ij

through the topology's own similarity, so any topology (including user-registered ones)
works and gets its own exact gradient. Inner-product topologies (sphere, oblique-inner) skip
autograd: their tiles are GEMMs written into two reused buffers and consumed at once by the
gradient GEMMs. Cost: the forward similarity once more in the backward, about 8 b^2 d FLOPs
for inner-product topologies (4/3 of the three-GEMM floor). Topologies with a blocked kernel
(Euclidean, the oblique geodesic, Lorentz) skip autograd as well: the kernel forms each tile
and its gradient (geometry's kernels, with their fused CPU passes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import Topology
from .contrastive import _shift_margin

__all__ = ["tiled_logsumexp", "tiled_contrastive_loss", "tiled_cross_entropy"]


def _tiles(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _online_update(run_max: Tensor, run_sum: Tensor, tile: Tensor, dim: int, work: Tensor) -> Tensor:
    """Merge a tile into running log-sum-exp state along ``dim`` (in place); returns the new
    max. ``work`` is a scratch buffer of the tile's size, reused so that no tile-sized
    temporary is allocated per tile."""
    new_max = torch.maximum(run_max, tile.amax(dim))
    # On the first tile run_max is -inf and run_sum 0; exp(-inf - finite) = 0 keeps it exact.
    run_sum.mul_(torch.exp(run_max - new_max))
    torch.sub(tile, new_max.unsqueeze(dim), out=work)
    run_sum.add_(work.exp_().sum(dim))
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


def _view(buffer: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous rows x cols view of the front of a flat buffer (edge tiles are smaller)."""
    return buffer[: rows * cols].view(rows, cols)


def _merge(run_max: Tensor, run_sum: Tensor, shift: Tensor, part: Tensor) -> Tensor:
    """Merge partial sums ``part`` of exp(L - shift) into running (max, sum) state (in place
    for the sum); returns the new max."""
    new_max = torch.maximum(run_max, shift)
    run_sum.mul_(torch.exp(run_max - new_max)).add_(part.mul_(torch.exp(shift - new_max)))
    return new_max


def _one_exp_update(logits: Tensor, row_max: Tensor, row_sum: Tensor, col_max: Tensor, col_sum: Tensor,
                    work: Tensor) -> tuple[Tensor, Tensor] | None:
    """Both running log-sum-exps from one exp pass of the tile, shifted by its largest logit,
    when no row's or column's largest logit lies more than ``_shift_margin`` below it (else
    None: the caller takes two passes). The new (row max, column max)."""
    row_tile_max, col_tile_max = logits.amax(1), logits.amax(0)
    shift = row_tile_max.max()
    if not bool(shift - torch.minimum(row_tile_max.min(), col_tile_max.min()) <= _shift_margin(logits.dtype)):
        return None
    e = torch.sub(logits, shift, out=work).exp_()
    return _merge(row_max, row_sum, shift, e.sum(1)), _merge(col_max, col_sum, shift, e.sum(0))


def _sweep_lse(nu: int, nv: int, tile: int, columns: bool, tile_logits, kw: dict) -> tuple[Tensor, Tensor]:
    """Row (and column) log-sum-exp of the nu x nv logits, one tile at a time.
    ``tile_logits(i0, i1, j0, j1)`` returns the logits of rows i0:i1 and columns j0:j1. With
    columns, each tile is exponentiated once for both (see contrastive._row_and_column_lse)."""
    row_max = torch.full((nu,), -torch.inf, **kw)
    row_sum = torch.zeros(nu, **kw)
    col_max = torch.full((nv,), -torch.inf, **kw)
    col_sum = torch.zeros(nv, **kw)
    work = torch.empty(min(tile, nu) * min(tile, nv), **kw)
    for i0, i1 in _tiles(nu, tile):
        for j0, j1 in _tiles(nv, tile):
            logits = tile_logits(i0, i1, j0, j1)
            w = _view(work, i1 - i0, j1 - j0)
            if columns:
                merged = _one_exp_update(logits, row_max[i0:i1], row_sum[i0:i1], col_max[j0:j1], col_sum[j0:j1], w)
                if merged is not None:
                    row_max[i0:i1], col_max[j0:j1] = merged
                    continue
            row_max[i0:i1] = _online_update(row_max[i0:i1], row_sum[i0:i1], logits, 1, w)
            if columns:
                col_max[j0:j1] = _online_update(col_max[j0:j1], col_sum[j0:j1], logits, 0, w)
    lse_rows = row_sum.log_().add_(row_max)
    lse_cols = col_sum.log_().add_(col_max) if columns else col_sum
    return lse_rows, lse_cols


def _positive_sum(topology: Topology, u: Tensor, v: Tensor, labels: Tensor, tile: int, kw: dict) -> Tensor:
    """sum_i similarity(u_i, v_labels[i]) by the exact paired form, in chunks so that no
    b x d product is kept."""
    total = torch.zeros((), **kw)
    for i0, i1 in _tiles(u.shape[0], tile):
        total += topology.paired_similarity(u[i0:i1], v[labels[i0:i1]]).sum()
    return total


def _softmax_gradient(logits: Tensor, lse_rows: Tensor, lse_cols: Tensor | None, g_rows: Tensor,
                      g_cols: Tensor, out: Tensor, logits_scratch: bool) -> Tensor:
    """d loss / d logits of one tile without the positives: g_r softmax_rows + g_c softmax_cols,
    into ``out``. With ``logits_scratch`` the column term is formed in place in ``logits``.

    Both terms normally come from one exp pass: every logit lies at or below its row's lse, so
    with shift = the tile's largest row lse, exp(L - shift) (g_r e^(shift - lse_r) +
    g_c e^(shift - lse_c)) cannot overflow, and is exact unless some lse lies more than
    ``_shift_margin`` below the shift (then the two-pass form)."""
    if lse_cols is not None:
        shift = lse_rows.max()
        if bool(shift - torch.minimum(lse_rows.min(), lse_cols.min()) <= _shift_margin(logits.dtype)):
            e = torch.sub(logits, shift, out=logits if logits_scratch else None).exp_()
            row_weight = torch.sub(shift, lse_rows).exp_().mul_(g_rows).unsqueeze(1)
            col_weight = torch.sub(shift, lse_cols).exp_().mul_(g_cols).unsqueeze(0)
            return torch.mul(e, row_weight, out=out).addcmul_(e, col_weight)
    torch.sub(logits, lse_rows.unsqueeze(1), out=out).exp_().mul_(g_rows)
    if lse_cols is not None:
        col = logits if logits_scratch else torch.empty_like(logits)
        torch.sub(logits, lse_cols.unsqueeze(0), out=col)
        out.add_(col.exp_().mul_(g_cols))
    return out


def _add_positives(g: Tensor, labels: Tensor, j0: int, j1: int, g_pos: Tensor) -> None:
    """The positives' term: d/dL of mean_i L_i,labels[i] is 1/b at each positive in the tile."""
    hit = (labels >= j0) & (labels < j1)
    if bool(hit.any()):
        rows = hit.nonzero().squeeze(1)
        g[rows, labels[rows] - j0] += g_pos


class _TiledLogSumExp(torch.autograd.Function):
    """(mean_i lse_j L_ij, mean_j lse_i L_ij, mean_i L_i,labels[i]) of L = scale * similarity(u, v),
    tile by tile, for any topology: the backward recomputes each tile through the topology's
    own autograd. The positives' mean is part of the same function so that the backward builds
    one gradient per input: a separate autograd branch for it would add two more b x d
    gradient buffers and their sums at the peak."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, labels: Tensor, topology: Topology, tile: int, columns: bool) -> Tensor:  # type: ignore[override]
        nu, nv = u.shape[0], v.shape[0]
        kw = dict(dtype=torch.promote_types(u.dtype, torch.float32), device=u.device)
        lse_rows, lse_cols = _sweep_lse(
            nu, nv, tile, columns, lambda i0, i1, j0, j1: _tile_logits(topology, u, v, scale, labels, i0, i1, j0, j1), kw
        )
        positive_sum = _positive_sum(topology, u, v, labels, tile, kw)
        ctx.topology, ctx.tile, ctx.columns = topology, tile, columns
        ctx.save_for_backward(u, v, scale, labels, lse_rows, lse_cols)
        return _outputs(lse_rows, lse_cols, columns, scale * positive_sum / nu)

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
                    g = _softmax_gradient(logits, lse_rows[i0:i1], lse_cols[j0:j1] if columns else None,
                                          g_rows, g_cols, torch.empty_like(logits), logits_scratch=False)
                    _add_positives(g, labels[i0:i1], j0, j1, g_pos)
                gu, gv, gs = torch.autograd.grad(logits, (ui, vj, s), g)
                grad_u[i0:i1] += gu
                grad_v[j0:j1] += gv
                grad_scale += gs
        return grad_u, grad_v, grad_scale, None, None, None, None


class _TiledInnerProductLogSumExp(torch.autograd.Function):
    """The same three means for an inner-product topology (L = scale * u v^T on the flattened
    points), with the GEMMs written out instead of recomputed through autograd.

    Each tile is a GEMM into one reused buffer; its gradient is formed in a second buffer and
    consumed at once by two accumulating GEMMs (grad_u[rows] += P v_j, grad_v[cols] += P^T u_i),
    as in the plain fused loss (contrastive._InnerProductInfoNCE). The scale's gradient needs
    no extra pass: it is <u, P v>, and P v is grad_u's row block before it is scaled. Peak memory beyond the inputs and their gradients: two tiles
    and one tile x d block, with nothing allocated per tile (the autograd route allocates
    about a dozen tile-sized temporaries per tile, which the allocator then keeps).
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, labels: Tensor, topology: Topology, tile: int, columns: bool) -> Tensor:  # type: ignore[override]
        nu, nv = u.shape[0], v.shape[0]
        kw = dict(dtype=u.dtype, device=u.device)
        logits_buf = torch.empty(min(tile, nu) * min(tile, nv), **kw)
        scaled_u = torch.empty(min(tile, nu), u.shape[1], **kw)
        scaled_rows = [None]  # the row tile whose scale * u is in scaled_u (the sweep is row-major)

        def tile_logits(i0, i1, j0, j1):
            if scaled_rows[0] != i0:
                torch.mul(u[i0:i1], scale, out=scaled_u[: i1 - i0])
                scaled_rows[0] = i0
            return torch.mm(scaled_u[: i1 - i0], v[j0:j1].T, out=_view(logits_buf, i1 - i0, j1 - j0))

        lse_rows, lse_cols = _sweep_lse(nu, nv, tile, columns, tile_logits, kw)
        positive_sum = _positive_sum(topology, u, v, labels, tile, kw)
        ctx.tile, ctx.columns = tile, columns
        ctx.save_for_backward(u, v, scale, labels, lse_rows, lse_cols)
        return _outputs(lse_rows, lse_cols, columns, scale * positive_sum / nu)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, v, scale, labels, lse_rows, lse_cols = ctx.saved_tensors
        tile, columns = ctx.tile, ctx.columns
        nu, nv = u.shape[0], v.shape[0]
        g_rows, g_cols, g_pos = grad[0] / nu, grad[1] / nv, grad[2] / nu
        grad_u = torch.zeros_like(u)
        grad_v = torch.zeros_like(v)
        grad_scale = torch.zeros((), dtype=u.dtype, device=u.device)
        logits_buf = torch.empty(min(tile, nu) * min(tile, nv), dtype=u.dtype, device=u.device)
        grad_buf = torch.empty_like(logits_buf)
        scaled_u = torch.empty(min(tile, nu), u.shape[1], dtype=u.dtype, device=u.device)
        for i0, i1 in _tiles(nu, tile):
            ui = u[i0:i1]
            su = torch.mul(ui, scale, out=scaled_u[: i1 - i0])
            for j0, j1 in _tiles(nv, tile):
                vj = v[j0:j1]
                logits = torch.mm(su, vj.T, out=_view(logits_buf, i1 - i0, j1 - j0))
                g = _softmax_gradient(logits, lse_rows[i0:i1], lse_cols[j0:j1] if columns else None,
                                      g_rows, g_cols, _view(grad_buf, i1 - i0, j1 - j0), logits_scratch=True)
                _add_positives(g, labels[i0:i1], j0, j1, g_pos)
                grad_u[i0:i1].addmm_(g, vj)
                grad_v[j0:j1].addmm_(g.T, ui)
            # d/dscale of sum P * (scale u v^T) = <u, P v>, and P v is this row block of grad_u.
            grad_scale += torch.vdot(ui.reshape(-1), grad_u[i0:i1].reshape(-1))
            grad_u[i0:i1].mul_(scale)
        grad_v.mul_(scale)
        return grad_u, grad_v, grad_scale.reshape(scale.shape), None, None, None, None


def _place_positives(logits: Tensor, labels: Tensor, i0: int, i1: int, j0: int, j1: int, positives: Tensor):
    """Write the exact positive logits that fall in the tile (rows i0:i1, columns j0:j1) into it;
    returns (rows, cols) of those positives in the tile, or None."""
    hit = (labels[i0:i1] >= j0) & (labels[i0:i1] < j1)
    if not bool(hit.any()):
        return None
    rows = hit.nonzero().squeeze(1)
    cols = labels[i0:i1][rows] - j0
    logits[rows, cols] = positives[i0:i1][rows]
    return rows, cols


class _TiledKernelLogSumExp(torch.autograd.Function):
    """The same three means for a topology with a blocked kernel (Euclidean, the oblique
    geodesic, Lorentz): each tile's logits come from the kernel (its GEMMs and fused
    element-wise passes) instead of autograd, and so does its gradient.

    The backward sweeps column tile by column tile, each with its own gradient buffers (one
    more b x d buffer for the points of u), recomputes each tile with the kernel keeping what it
    formed (the geodesic's cosines: no third recompute) and hands the tile's gradient to the
    kernel. The positives' logits come from the exact paired form, ``positives`` =
    paired_similarity(u_r, v_labels[r]), an input (differentiable, so that autograd takes its
    gradient to the points and to a learned curvature): the tiles' gradient at the positives
    is collected for it instead of going through the kernel.
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, labels: Tensor, positives: Tensor, tile: int, columns: bool, kernel, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        nu, nv = u.shape[0], v.shape[0]
        kw = dict(dtype=u.dtype, device=u.device)
        state = kernel.prepare(u, v, *inputs)
        positives = positives * scale
        buffer = torch.empty(min(tile, nu) * min(tile, nv), **kw)
        column_states = {}

        def tile_logits(i0, i1, j0, j1):
            if j0 not in column_states:
                column_states[j0] = kernel.columns(state, slice(j0, j1))
            out = _view(buffer, i1 - i0, j1 - j0)
            kernel.logits_block(column_states[j0], slice(i0, i1), scale, out)
            _place_positives(out, labels, i0, i1, j0, j1, positives)
            return out

        lse_rows, lse_cols = _sweep_lse(nu, nv, tile, columns, tile_logits, kw)
        ctx.tile, ctx.columns, ctx.kernel = tile, columns, kernel
        ctx.save_for_backward(u, v, scale, labels, positives, lse_rows, lse_cols, *inputs)
        return _outputs(lse_rows, lse_cols, columns, positives.sum() / nu)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, v, scale, labels, positives, lse_rows, lse_cols, *inputs = ctx.saved_tensors
        tile, columns, kernel = ctx.tile, ctx.columns, ctx.kernel
        nu, nv = u.shape[0], v.shape[0]
        g_rows, g_cols, g_pos = grad[0] / nu, grad[1] / nv, grad[2] / nu
        state = kernel.prepare(u, v, *inputs)
        grad_u, grad_v = torch.zeros_like(u), torch.zeros_like(v)
        grad_inputs = [torch.zeros_like(t) for t in inputs]
        grad_scale = torch.zeros((), dtype=u.dtype, device=u.device)
        grad_positives = torch.zeros(nu, dtype=u.dtype, device=u.device)  # d loss / d positive logit
        logits_buf = torch.empty(min(tile, nu) * min(tile, nv), dtype=u.dtype, device=u.device)
        grad_buf = torch.empty_like(logits_buf)
        for j0, j1 in _tiles(nv, tile):
            column_state = kernel.columns(state, slice(j0, j1))
            grads = kernel.grad_buffers(column_state)
            for i0, i1 in _tiles(nu, tile):
                rows = slice(i0, i1)
                logits = _view(logits_buf, i1 - i0, j1 - j0)
                kernel.logits_block(column_state, rows, scale, logits, keep=True)
                hits = _place_positives(logits, labels, i0, i1, j0, j1, positives)
                g = _softmax_gradient(logits, lse_rows[rows], lse_cols[j0:j1] if columns else None,
                                      g_rows, g_cols, _view(grad_buf, i1 - i0, j1 - j0), logits_scratch=False)
                _add_positives(g, labels[rows], j0, j1, g_pos)
                grad_scale += torch.vdot(g.reshape(-1), logits.reshape(-1))  # sum g S, S = logits / scale
                if hits is not None:  # the positives' gradient goes through the paired form
                    grad_positives[i0:i1].index_add_(0, hits[0], g[hits])
                    g[hits] = 0.0
                kernel.backward_block(column_state, rows, logits, scale, g, grads, reuse=True)
            gu, gv, *gi = kernel.gradients(column_state, grads)
            grad_u += gu
            grad_v[j0:j1] += gv
            for total, part in zip(grad_inputs, gi):
                total += part.reshape(total.shape)
        return (grad_u, grad_v, (grad_scale / scale).reshape(scale.shape), None, grad_positives * scale, None, None,
                None, *grad_inputs)


def _outputs(lse_rows: Tensor, lse_cols: Tensor, columns: bool, mean_positive: Tensor) -> Tensor:
    mean_cols = lse_cols.mean() if columns else lse_rows.new_zeros(())
    return torch.stack([lse_rows.mean(), mean_cols, mean_positive])


def tiled_logsumexp(
    topology: Topology, u: Tensor, v: Tensor, scale: Tensor, labels: Tensor, tile: int = 1024, columns: bool = True
) -> Tensor:
    """[mean row lse, mean column lse, mean positive logit] of L = scale * similarity(u, v),
    never storing the matrix. ``labels[r]`` is the column of row r's positive, whose logit is
    taken exactly (paired form).
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    u, v = topology.pair_2d(u, v)
    scale = torch.as_tensor(scale, dtype=u.dtype, device=u.device)
    if topology.inner_product:
        return _TiledInnerProductLogSumExp.apply(u, v, scale.to(u.dtype), labels, topology, tile, columns)
    kernel = topology.blocked_kernel
    if kernel is not None and hasattr(kernel, "columns") and bool(scale > 0):
        positives = torch.cat([topology.paired_similarity(u[i0:i1], v[labels[i0:i1]]) for i0, i1 in _tiles(u.shape[0], tile)])
        return _TiledKernelLogSumExp.apply(u, v, scale.to(u.dtype), labels, positives.to(u.dtype), tile, columns, kernel,
                                           *kernel.inputs(u))
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
