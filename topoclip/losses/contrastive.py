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

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..geometry import BlockScratch, Topology, _column_chunks

__all__ = ["ContrastiveLoss", "symmetric_cross_entropy", "gather_features", "exact_positives"]


# Row blocks of about 2**21 logits (8 MiB in fp32): every b x b pass reads the big matrix once
# instead of allocating b x b temporaries. Measured at b = 8,192 (2 cores): 2**18 makes the
# blocked losses 20-30% slower (the GEMMs of 32 rows are inefficient), 2**20 and 2**21 are
# within 3% (the geodesic a little faster at 2**21).
_BLOCK_ELEMENTS = 1 << 21


def _row_blocks(rows: int, cols: int, elements: int | None = None):
    step = max(1, (elements or _BLOCK_ELEMENTS) // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _shift_margin(dtype: torch.dtype) -> float:
    """How far below a block's shift every row's and column's largest logit may lie for one
    exp pass with a single shift to be exact: half of exp's range above its smallest normal
    number (43 in fp32, 354 in fp64). A term that then underflows is below
    exp(-margin) ~ 1e-19 (fp32) of its row's or column's own largest term, far under rounding."""
    return -0.5 * math.log(torch.finfo(dtype).tiny)


def _row_and_column_lse(logits: Tensor, fill=None, block_elements: int | None = None) -> tuple[Tensor, Tensor]:
    """Row-wise and column-wise log-sum-exp in one blocked pass (running max for columns).

    Each block is normally exponentiated once, shifted by its largest logit, and both its row
    and its column sums come from that one pass. A block in which some row's or column's
    largest logit lies more than ``_shift_margin`` below it (a very large scale with a wide
    similarity range) takes two passes instead, each shifted by its own maxima.
    ``fill(i, j, block)``, when given, first writes rows i:j of the logits into ``block`` (a
    view of ``logits``): the block is formed and reduced while it is in cache.
    """
    rows, cols = logits.shape
    margin = _shift_margin(logits.dtype)
    lse_rows = torch.empty(rows, dtype=logits.dtype, device=logits.device)
    col_max = torch.full((cols,), -torch.inf, dtype=logits.dtype, device=logits.device)
    col_sum = torch.zeros(cols, dtype=logits.dtype, device=logits.device)
    work = BlockScratch()
    for i, j in _row_blocks(rows, cols, block_elements):
        blk = logits[i:j]
        if fill is not None:
            fill(i, j, blk)
        row_max, blk_col_max = blk.amax(dim=1), blk.amax(dim=0)
        shift = row_max.max()
        if bool((shift - torch.minimum(row_max.min(), blk_col_max.min())) <= margin):
            e = torch.sub(blk, shift, out=work.get("e", blk)).exp_()
            lse_rows[i:j] = e.sum(dim=1).log_().add_(shift)
            blk_col_max, blk_col_sum = shift.expand(cols), e.sum(dim=0)
        else:  # two passes, each shifted by its own maxima, into the reused buffer
            e = work.get("e", blk)
            row_shift = torch.where(torch.isinf(row_max), 0.0, row_max)
            lse_rows[i:j] = torch.sub(blk, row_shift.unsqueeze(1), out=e).exp_().sum(dim=1).log_().add_(row_shift)
            col_shift = torch.where(torch.isinf(blk_col_max), 0.0, blk_col_max)
            blk_col_sum = torch.sub(blk, col_shift, out=e).exp_().sum(dim=0)
        # Merge the block's column sums (shifted by blk_col_max) into the running ones.
        new_max = torch.maximum(col_max, blk_col_max)
        # exp(-inf - -inf) would be NaN on the first block; col_sum is 0 there anyway.
        col_sum.mul_(torch.exp(torch.where(torch.isinf(col_max), 0.0, col_max - new_max)))
        col_sum.add_(blk_col_sum.mul_(torch.exp(blk_col_max - new_max)))
        col_max = new_max
    return lse_rows, col_sum.log_().add_(col_max)


def _softmax_sum_block(logits_blk: Tensor, lse_rows_blk: Tensor, lse_cols: Tensor, first_row: int,
                       work: BlockScratch | None = None, out: Tensor | None = None) -> Tensor:
    """softmax_rows + softmax_cols - 2 I for a block of rows: the loss gradient times 2b.

    Every logit lies at or below its row's log-sum-exp, so with shift = the block's largest
    row lse, exp(L - shift) never overflows and exp(L - lse_r) + exp(L - lse_c) =
    exp(L - shift) * (exp(shift - lse_r) + exp(shift - lse_c)): one exp pass instead of two,
    whenever no row or column lse lies more than ``_shift_margin`` below the shift (otherwise
    the two-pass form). The second factor is formed a cache-sized chunk of columns at a time,
    so that the only block-sized tensor is ``out``.
    """
    work = work if work is not None else BlockScratch()
    out = out if out is not None else work.get("p", logits_blk)
    rows = logits_blk.shape[0]
    shift = lse_rows_blk.max()
    lowest = torch.minimum(lse_rows_blk.min(), lse_cols.min())
    one_exp = bool(shift - lowest <= _shift_margin(logits_blk.dtype))
    if one_exp:
        p = torch.sub(logits_blk, shift, out=out).exp_()
        row_factor, col_factor = torch.sub(shift, lse_rows_blk).exp_().unsqueeze(1), torch.sub(shift, lse_cols).exp_()
    else:
        p = torch.sub(logits_blk, lse_rows_blk.unsqueeze(1), out=out).exp_()
    for c0, c1 in _chunks_of_columns(rows, logits_blk.shape[1]):
        tmp = work.get("chunk", logits_blk, (rows, c1 - c0))
        if one_exp:
            p[:, c0:c1].mul_(torch.add(row_factor, col_factor[c0:c1], out=tmp))
        else:
            p[:, c0:c1].add_(torch.sub(logits_blk[:, c0:c1], lse_cols[c0:c1], out=tmp).exp_())
    p[:, first_row:first_row + rows].diagonal().sub_(2.0)
    return p


# Column chunks of a block's element-wise passes: about 2**18 elements (1 MiB in fp32), which
# stay in a core's cache between the two operations on them.
_CHUNK_ELEMENTS = 1 << 18


def _chunks_of_columns(rows: int, cols: int):
    """Column chunks of about ``_CHUNK_ELEMENTS`` elements of a block of ``rows`` rows."""
    return _column_chunks(cols, max(1, _CHUNK_ELEMENTS // max(rows, 1)))


def _symmetric_loss(logits: Tensor, lse_rows: Tensor, lse_cols: Tensor) -> Tensor:
    return 0.5 * (lse_rows.mean() + lse_cols.mean()) - logits.diagonal().mean()


class _SymmetricCrossEntropy(torch.autograd.Function):
    """mean over i of [lse_j(L_ij) + lse_j(L_ji)] / 2 - L_ii, for a square logits matrix L.

    The gradient  (softmax_rows(L) + softmax_cols(L) - 2 I) / (2 b)  is written block by
    block into one b x b buffer from the saved row and column log-sum-exps.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:  # type: ignore[override]
        lse_rows, lse_cols = _row_and_column_lse(logits)
        ctx.save_for_backward(logits, lse_rows, lse_cols)
        return _symmetric_loss(logits, lse_rows, lse_cols)

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> Tensor:  # type: ignore[override]
        logits, lse_rows, lse_cols = ctx.saved_tensors
        coef = grad_loss / (2 * logits.shape[0])
        grad = torch.empty_like(logits)
        work = BlockScratch()
        for i, j in _row_blocks(*logits.shape):
            _softmax_sum_block(logits[i:j], lse_rows[i:j], lse_cols, i, work, out=grad[i:j]).mul_(coef)
        return grad


class _InnerProductInfoNCE(torch.autograd.Function):
    """The symmetric loss of logits = scale * u v^T, fused with its GEMMs.

    For inner-product topologies (sphere, oblique-inner) the backward never materialises the
    b x b gradient: each block of rows of it is formed in cache and immediately consumed by
    the two GEMMs (grad_u = G v, grad_v += G^T u). Total work is the three-GEMM floor plus
    one exp pass forward and one backward (see _row_and_column_lse, _softmax_sum_block);
    memory is the saved logits plus one block.
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        logits = (u * scale) @ v.T
        lse_rows, lse_cols = _row_and_column_lse(logits)
        ctx.save_for_backward(u, v, scale, logits, lse_rows, lse_cols)
        # The logits are returned too (without gradient) so that diagnostics need no recompute;
        # their gradient is never materialised (a b x b zero fill: 0.46 s at b = 8,192).
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)
        return _symmetric_loss(logits, lse_rows, lse_cols), logits

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, _grad_logits: Tensor | None = None):  # type: ignore[override]
        if grad_loss is None:  # the loss was not used (only the logits): nothing flows back
            return None, None, None
        u, v, scale, logits, lse_rows, lse_cols = ctx.saved_tensors
        coef = grad_loss / (2 * logits.shape[0])
        grad_u = torch.empty_like(u)
        grad_v = torch.zeros_like(v)
        work = BlockScratch()
        for i, j in _row_blocks(*logits.shape):
            p = _softmax_sum_block(logits[i:j], lse_rows[i:j], lse_cols, i, work)
            torch.mm(p, v, out=grad_u[i:j])
            grad_v.addmm_(p.T, u[i:j])
        # d loss / d logits = coef * P with logits = scale * u v^T, so d/du = coef * scale * P v,
        # d/dv = coef * scale * P^T u and d/dscale = coef * sum(P * u v^T) = coef * <u, P v>:
        # the scale's gradient from the b x d product already at hand, not another b^2 pass.
        grad_scale = coef * torch.vdot(u.reshape(-1), grad_u.reshape(-1))
        grad_u.mul_(coef * scale)
        grad_v.mul_(coef * scale)
        return grad_u, grad_v, grad_scale.reshape(scale.shape)


class _BlockedSimilarityInfoNCE(torch.autograd.Function):
    """The symmetric loss of logits = scale * S for a topology with a blocked kernel (Euclidean,
    the oblique geodesic), fused as the inner-product path is: each block of rows of S is
    formed by the kernel, scaled, given its exact positives and reduced to the log-sum-exps
    while in cache; the backward forms each block of d loss / d S in cache and hands it to the
    kernel's GEMMs. Memory: the saved logits plus one block (no b x b similarity, distance or
    gradient matrix besides). ``positives`` is paired_similarity(u, v), differentiable: the
    diagonal's gradient flows through the exact paired form, the rest through the kernel.
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, scale: Tensor, positives: Tensor, kernel, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        state = kernel.prepare(u, v, *inputs)
        logits = torch.empty(u.shape[0], v.shape[0], dtype=u.dtype, device=u.device)
        scaled_positives = positives * scale
        gram = getattr(kernel, "gram", None)
        gram_ready = gram is not None and gram(state, logits)  # the whole u v^T in one GEMM

        def fill(i: int, j: int, block: Tensor) -> None:
            if gram_ready:
                kernel.logits_block(state, slice(i, j), scale, block, gram_ready=True)
            else:
                kernel.logits_block(state, slice(i, j), scale, block)
            block[:, i:j].diagonal().copy_(scaled_positives[i:j])

        # a kernel may ask for larger blocks than the element-wise passes alone would want
        block_elements = getattr(kernel, "block_elements", None)
        lse_rows, lse_cols = _row_and_column_lse(logits, fill, block_elements)
        ctx.kernel = kernel
        ctx.input_shapes = [t.shape for t in inputs]
        ctx.save_for_backward(scale, logits, lse_rows, lse_cols, *state)
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)  # see _InnerProductInfoNCE
        return _symmetric_loss(logits, lse_rows, lse_cols), logits

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, _grad_logits: Tensor | None = None):  # type: ignore[override]
        if grad_loss is None:  # the loss was not used (only the logits): nothing flows back
            return (None,) * (5 + len(ctx.input_shapes))
        scale, logits, lse_rows, lse_cols, *state = ctx.saved_tensors
        kernel = ctx.kernel
        coef = grad_loss / (2 * logits.shape[0])
        grads = kernel.grad_buffers(state)
        grad_positives = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
        grad_scale = torch.zeros((), dtype=logits.dtype, device=logits.device)
        work = BlockScratch()
        # the backward's row blocks may be smaller than the forward's: each holds a block of the
        # softmax beside the kernel's chunks
        block_elements = getattr(kernel, "backward_block_elements", getattr(kernel, "block_elements", None))
        for i, j in _row_blocks(*logits.shape, block_elements):
            blk = logits[i:j]
            p = _softmax_sum_block(blk, lse_rows[i:j], lse_cols, i, work)
            # d loss / d scale = coef * sum(P * S), S = logits / scale (the positives included)
            grad_scale += torch.vdot(p.reshape(-1), blk.reshape(-1))
            diagonal = p[:, i:j].diagonal()
            grad_positives[i:j] = diagonal * (coef * scale)
            diagonal.zero_()  # the positives' gradient went through the paired form
            kernel.backward_block(state, slice(i, j), blk, scale, p.mul_(coef), grads)
        grad_u, grad_v, *input_grads = kernel.gradients(state, grads)
        return (grad_u, grad_v, (coef * grad_scale / scale).reshape(scale.shape), grad_positives, None,
                *(g.reshape(shape) for g, shape in zip(input_grads, ctx.input_shapes)))


def symmetric_cross_entropy(logits: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy of a square logits matrix whose diagonal holds the positives."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"symmetric_cross_entropy needs a square matrix, got {tuple(logits.shape)}")
    return _SymmetricCrossEntropy.apply(logits)


def exact_positives(topology: Topology, logits: Tensor, u: Tensor, v: Tensor, scale: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Overwrite logits[rows, cols] (the positive pairs) with scale * paired_similarity(u, v).

    The all-pairs Euclidean and geodesic similarities are built from a GEMM and lose digits
    near coincident points (fp32 resolves a distance of ~0 only to ~sqrt(eps) |u|); the paired
    form is exact there, and positives are exactly where points coincide. Every loss path
    (plain, tiled, local) takes its positives this way, so they agree to rounding.
    Inner-product topologies are exact already and are left alone.
    """
    if topology.inner_product:
        return logits
    positive = scale * topology.paired_similarity(u, v)
    return logits.index_put_((rows, cols), positive.to(logits.dtype))


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
        tile_threshold: from this global batch size on, use the exact tiled loss
            (``topoclip.losses.tiled``: O(b d + tile^2) memory instead of O(b^2), about 1/3
            more arithmetic). None: never tile; 0: always tile.
        tile_size: tile edge for the tiled loss.

    Call as ``loss_fn(u, v, scale)`` with u the image points and v the text points (the order
    used everywhere in topoclip), ``[b, d]`` or ``[b, m, n]``, and
    ``scale`` the logit scale (a 0-dim tensor, e.g. ``LogitScale()()``).
    ``return_details=True`` also returns a dict of floats: mean positive / negative
    similarity (unscaled) and in-batch retrieval accuracy, averaged over both directions
    (the tiled loss reports the positive similarity only: the others would need the matrix).
    """

    def __init__(
        self,
        topology: Topology,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        tile_threshold: int | None = 16384,
        tile_size: int = 1024,
    ):
        super().__init__()
        if tile_size < 1:
            raise ValueError(f"ContrastiveLoss: tile_size must be >= 1, got {tile_size}")
        self.topology = topology
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.tile_threshold = tile_threshold
        self.tile_size = tile_size

    def _tiled(self, global_batch: int) -> bool:
        return self.tile_threshold is not None and global_batch >= self.tile_threshold

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

        if self._tiled(u_all.shape[0]):
            return self._tiled_forward(u, v, u_all, v_all, scale, rank, world, return_details)

        if world > 1 and self.local_loss:
            b = u.shape[0]
            labels = torch.arange(b, device=u.device) + rank * b
            rows = torch.arange(b, device=u.device)
            logits_i2t = exact_positives(topo, topo.scaled_similarity(u, v_all, scale), u, v, scale, rows, labels)
            logits_t2i = exact_positives(topo, topo.scaled_similarity(v, u_all, scale), v, u, scale, rows, labels)
            loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
            if not return_details:
                return loss
            return loss, _details_rectangular(logits_i2t, logits_t2i, labels, scale)

        if topo.inner_product:
            u_flat, v_flat = topo.pair_2d(u_all, v_all)
            loss, logits = _InnerProductInfoNCE.apply(u_flat, v_flat, scale.to(u_flat.dtype))
        elif (kernel := topo.blocked_kernel) is not None and bool(scale > 0):
            u_flat, v_flat = topo.pair_2d(u_all, v_all)
            positives = topo.paired_similarity(u_flat, v_flat)
            loss, logits = _BlockedSimilarityInfoNCE.apply(u_flat, v_flat, scale.to(u_flat.dtype), positives, kernel,
                                                           *kernel.inputs(u_flat))
        else:
            diag = torch.arange(u_all.shape[0], device=u.device)
            logits = exact_positives(topo, topo.scaled_similarity(u_all, v_all, scale), u_all, v_all, scale, diag, diag)
            loss = symmetric_cross_entropy(logits)
        if not return_details:
            return loss
        return loss, _details_square(logits, scale)

    def _tiled_forward(self, u, v, u_all, v_all, scale, rank, world, return_details):
        from .tiled import tiled_contrastive_loss, tiled_cross_entropy

        topo, tile = self.topology, self.tile_size
        if world > 1 and self.local_loss:
            labels = torch.arange(u.shape[0], device=u.device) + rank * u.shape[0]
            loss = 0.5 * (
                tiled_cross_entropy(topo, u, v_all, labels, scale, tile)
                + tiled_cross_entropy(topo, v, u_all, labels, scale, tile)
            )
        else:
            loss = tiled_contrastive_loss(topo, u_all, v_all, scale, tile)
        if not return_details:
            return loss
        with torch.no_grad():
            pos = topo.paired_similarity(u, v).mean()
        return loss, {"pos_sim": float(pos)}


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
