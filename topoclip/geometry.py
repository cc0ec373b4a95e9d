"""Embedding topologies: where image and text points live and how they are compared.

This is the only module that knows what a distance is. Every other part of topoclip
(losses, mixup, zero-shot, retrieval, metrics) asks a :class:`Topology` instead of assuming
cosine similarity.

Four topologies, one interface:

==================  =========================================  =====================
name                similarity(u, v)                           range
==================  =========================================  =====================
sphere              u . v on S^(d-1)                           [-1, 1]
euclidean           -||u - v||_2 on R^d                        (-inf, 0]
oblique-inner       sum_k u_k . v_k on Ob(n, m) = (S^(n-1))^m  [-m, m]
oblique-geodesic    -sqrt(sum_k arccos^2(u_k . v_k)) on Ob     [-pi*sqrt(m), 0]
==================  =========================================  =====================

Points are accepted in a flat layout ``[b, d]`` (single token; oblique reshapes into m blocks
of n) or a block layout ``[b, m, n]`` (multi-token); ``project`` keeps the layout it is given.
Half-precision inputs are computed and returned in float32: norms, arccos and the
log-sum-exp downstream are where fp16/bf16 lose the digits that matter.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Sequence

import torch
from torch import Tensor

from topoclip import fused_cpu
from topoclip.topology_names import add_topology_name, available_topologies, is_blockwise  # re-exported

__all__ = [
    "Topology",
    "Sphere",
    "Euclidean",
    "Oblique",
    "Lorentz",
    "Product",
    "product_topology",
    "topology",
    "register_topology",
    "available_topologies",
    "is_blockwise",
]

# Below this norm a block is treated as zero: it has no direction to normalise.
_ZERO_NORM = 1e-12


def _compute_dtype(x: Tensor) -> Tensor:
    """Promote half precision to float32; keep float32/float64 as they are."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if not x.is_floating_point():
        raise TypeError(f"expected a floating point tensor, got {x.dtype}")
    return x


# sin(theta) floor near the antipode, where the geodesic is not differentiable (every
# direction shortens it): caps theta/sin(theta) at about pi/1e-3 so gradients stay finite.
_SIN_FLOOR = 1e-3


def _theta_over_sin(theta: Tensor) -> Tensor:
    """theta / sin(theta) = 1 / sinc(theta/pi): exact and smooth at theta = 0 (value 1)."""
    return torch.sinc(theta / math.pi).clamp_min_(_SIN_FLOOR / math.pi).reciprocal_()


def _theta_over_sin_of_cos(cos: Tensor, out: Tensor) -> Tensor:
    """theta / sin(theta) from cos(theta) in [-1, 1] (``cos`` is overwritten), written to ``out``.

    arccos(c) / sqrt(1 - c^2) with the sine floored at ``_SIN_FLOOR`` (the antipode's cap, as
    in ``_theta_over_sin``), then at least 1: theta >= sin(theta), and where the floor cuts
    in near theta = 0 the true value is 1 to within theta^2 / 6 < 2e-7. About four times
    cheaper on the CPU than 1 / sinc, which PyTorch does not vectorise.
    """
    torch.arccos(cos, out=out)
    # 1 - c^2 in one pass (a fused multiply-add) rather than three
    one = torch.ones((), dtype=cos.dtype, device=cos.device)
    sin_sq = torch.addcmul(one, cos, cos, value=-1.0, out=cos).clamp_min_(_SIN_FLOOR * _SIN_FLOOR)
    return out.mul_(sin_sq.rsqrt_()).clamp_min_(1.0)


def _inverse_or_zero(x: Tensor) -> Tensor:
    """1/x where x > 0, else 0: the zero subgradient of a distance at coincident points."""
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).reciprocal(), 0.0)


class _GeodesicSimilarity(torch.autograd.Function):
    """S = -sqrt(sum_k arccos^2(u_k v_k^T)) for block-major points u [m, b_u, n], v [m, b_v, n].

    Autograd through arccos and sqrt multiplies an infinite derivative (1/sin(theta) at
    theta = 0, 1/D at D = 0) by a zero one and gives NaN; clamping the cosine instead gives a
    zero gradient for near-duplicates. The composite's derivative is finite, so it is written
    out:   dS/dc_k = (1/D) * theta_k / sin(theta_k),   theta/sin(theta) -> 1 as theta -> 0.
    At D = 0 (all blocks coincide) the cone-shaped maximum gets the zero subgradient.

    Memory: the m cosine matrices are never held at once. The forward accumulates
    sum_k theta_k^2 block by block; the backward recomputes each block's cosines (one more
    GEMM-equivalent) instead of saving m b_u x b_v matrices: O(b_u b_v) rather than O(b^2 m).
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        acc = torch.zeros(u.shape[1], v.shape[1], dtype=u.dtype, device=u.device)
        for k in range(u.shape[0]):
            theta = torch.mm(u[k], v[k].T).clamp_(-1.0, 1.0).arccos_()
            acc.addcmul_(theta, theta)
        dist = acc.sqrt_()
        ctx.save_for_backward(u, v, dist)
        return dist.neg()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, v, dist = ctx.saved_tensors
        weight = grad * _inverse_or_zero(dist)
        grad_u = torch.empty_like(u)
        grad_v = torch.empty_like(v)
        for k in range(u.shape[0]):
            theta = torch.mm(u[k], v[k].T).clamp_(-1.0, 1.0).arccos_()
            g = _theta_over_sin(theta).mul_(weight)
            torch.mm(g, v[k], out=grad_u[k])
            torch.mm(g.T, u[k], out=grad_v[k])
        return grad_u, grad_v


class _EuclideanSimilarity(torch.autograd.Function):
    """S = -||u_i - v_j|| from ||u||^2 + ||v||^2 - 2 u.v: one GEMM, one b_u x b_v buffer.

    Backward:  dS_ij/du_i = (v_j - u_i)/D_ij  =>  grad_u = W v - u * rowsum(W),
               grad_v = W^T u - v * colsum(W),  W = grad / D  (0 where D = 0: the cone's
               zero subgradient; autograd through sqrt would give NaN there).
    """

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        sq = (u * u).sum(-1, keepdim=True) + (v * v).sum(-1).unsqueeze(0)
        dist = torch.addmm(sq, u, v.T, beta=1.0, alpha=-2.0).clamp_min_(0.0).sqrt_()
        ctx.save_for_backward(u, v, dist)
        return dist.neg()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, v, dist = ctx.saved_tensors
        w = grad * _inverse_or_zero(dist)
        grad_u = torch.addcmul(w @ v, u, w.sum(1, keepdim=True), value=-1.0)
        grad_v = torch.addcmul(w.T @ u, v, w.sum(0).unsqueeze(1), value=-1.0)
        return grad_u, grad_v


class _SafeSqrt(torch.autograd.Function):
    """sqrt with derivative 1/(2 sqrt(x)) for x > 0 and the zero subgradient at x = 0.

    Used for the Euclidean distance computed from squared norms: at u = v the distance has a
    cone-shaped minimum, and torch's sqrt backward would give inf * 0 = NaN there.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = x.clamp_min(0.0).sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, grad_y / (2.0 * y).clamp_min(torch.finfo(y.dtype).tiny), 0.0)


# --------------------------------------------------------------- blocked similarity kernels
# A loss that sweeps the b x b similarity matrix block of rows by block of rows (to keep each
# block's temporaries in cache, see losses.contrastive) asks the topology for its kernel: how
# to form one block of similarities, and how to turn one block of d loss / d similarity into
# gradients of the points, without any b x b matrix but the one the loss keeps.


def _fused_gram(out: Tensor, u: Tensor, v: Tensor, rows: slice, ready: bool, *others: Tensor) -> bool:
    """For a kernel whose block is a function of the Gram block u[rows] v^T: whether the fused
    CPU pass will finish ``out`` (the Gram block then in it: formed here unless ``ready``)."""
    if not (ready or fused_cpu.usable(out, u, v, *others)):
        return False
    if not ready:
        torch.mm(u[rows], v.T, out=out)
    return True


class EuclideanKernel:
    """S = -||u_i - v_j|| from ||u||^2 + ||v||^2 - 2 u.v, one GEMM per block.

    The protocol (also GeodesicKernel's): ``prepare(u, v)`` once; ``logits_block`` writes
    rows ``rows`` of scale * S into ``out``; ``grad_buffers`` / ``backward_block`` /
    ``gradients`` accumulate d loss / d points from blocks of d loss / d logits (the block's
    logits at hand: the distance is -logits / scale, so nothing b x b is kept or recomputed
    for it). ``scale`` is a positive 0-dim tensor. ``inputs(u)``: tensors the similarity
    depends on besides the points (a learned curvature), passed to ``prepare`` and given
    gradients by ``gradients`` after the points'. ``keep=True`` asks ``logits_block`` to keep
    what it formed for this block so that the next ``backward_block(..., reuse=True)``, for
    the same rows, need not form it again (the geodesic's cosines; the others recompute
    nothing anyway). ``columns(state, cols)`` is the state of the columns ``cols`` alone (the
    tiled losses sweep column tiles). ``gram(state, out)``, where a kernel has it, writes the whole u v^T into
    the b_u x b_v ``out`` in one GEMM when its ``logits_block(..., gram_ready=True)`` can
    finish each block from it (returns whether it did): one large GEMM runs faster than its
    row blocks (measured at b = 8,192, d = 512 on 2 cores: 0.47 s against 0.60 s).
    """

    def inputs(self, like: Tensor) -> tuple[Tensor, ...]:
        return ()

    def prepare(self, u: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        return u, v, (u * u).sum(-1), (v * v).sum(-1)

    def columns(self, state, cols: slice) -> tuple[Tensor, ...]:
        u, v, nu, nv = state
        return u, v[cols], nu, nv[cols]

    def gram(self, state, out: Tensor) -> bool:
        return _fused_gram(out, state[0], state[1], slice(None), False, *state[2:])

    def logits_block(self, state, rows: slice, scale: Tensor, out: Tensor, keep: bool = False,
                     gram_ready: bool = False) -> None:
        u, v, nu, nv = state
        if _fused_gram(out, u, v, rows, gram_ready, nu, nv):  # the GEMM, then the rest in one pass
            fused_cpu.euclidean_logits(out, nu[rows], nv, float(scale))
            return
        # ||u||^2 + ||v||^2 first, then -2 u.v: the order of the unfused similarity, so both
        # round a coincident pair's distance alike
        torch.add(nu[rows].unsqueeze(1), nv.unsqueeze(0), out=out)
        out.addmm_(u[rows], v.T, alpha=-2.0).clamp_min_(0.0).sqrt_().mul_(-scale)

    def grad_buffers(self, state) -> tuple[Tensor, Tensor, Tensor]:
        v = state[1]
        return torch.empty_like(state[0]), torch.zeros_like(v), torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)

    def backward_block(self, state, rows: slice, logits: Tensor, scale: Tensor, grad_logits: Tensor,
                       grads: tuple[Tensor, Tensor, Tensor], reuse: bool = False) -> None:
        # dS_ij/du_i = (v_j - u_i) / D_ij: with W = scale grad / D (0 where D = 0, the cone's
        # zero subgradient), grad_u = W v - u rowsum(W), grad_v += W^T u - v colsum(W); the
        # column sums are gathered over the blocks and applied once in ``gradients``.
        u, v = state[0], state[1]
        grad_u, grad_v, column_sums = grads
        if fused_cpu.usable(grad_logits, logits):
            w, row_sums = grad_logits, torch.empty(logits.shape[0], dtype=logits.dtype)
            fused_cpu.distance_weights(w, logits, -float(scale) ** 2, row_sums)
        else:
            w = _scale_over_distance(grad_logits, logits, scale)
            row_sums = w.sum(1)
        ub = u[rows]
        torch.mm(w, v, out=grad_u[rows])
        grad_u[rows].addcmul_(ub, row_sums.unsqueeze(1), value=-1.0)
        grad_v.addmm_(w.T, ub)
        column_sums += w.sum(0)

    def gradients(self, state, grads: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        grad_u, grad_v, column_sums = grads
        return grad_u, grad_v.addcmul_(state[1], column_sums.unsqueeze(1), value=-1.0)


class GeodesicKernel:
    """S = -sqrt(sum_k arccos^2(u_k . v_k)) on Ob(n, m): m GEMMs per block, the cosines
    recomputed in backward (never m b x b matrices). The points and their gradients are read
    and written in place as [b, m, n] views: sphere k is the strided matrix x[:, k] (row
    stride d), which BLAS multiplies and accumulates into directly, so the kernel holds no
    block-major copy of the points or of the gradients (2 x 2 x b x d floats less)."""

    # Row blocks of the softmax loss: 2**23 logits (1,024 rows at b = 8,192), whose column
    # chunks are 1,024 x 1,024 GEMMs of K = n; 256 rows (2**21) ran 10-15% slower (median of
    # 4 alternating rounds each, b = 8,192, 2 cores). The sigmoid loss, which keeps m cosine
    # blocks per block, stays at the default size.
    block_elements = 1 << 23
    # The backward's row blocks (each holds one block of the softmax beside the kernel's
    # chunks): 2**22 (512 rows at b = 8,192) ran 14% faster than 2**21 (median ratio 0.86
    # [0.73, 1.18] over 12 alternating rounds) and 8% faster than 2**23 (0.92 [0.72, 1.14], 10
    # rounds; b = 8,192, 2 AMD EPYC cores), with half the latter's memory.
    backward_block_elements = 1 << 22

    def __init__(self, num_blocks: int):
        self.m = num_blocks
        self._scratch = BlockScratch()

    def inputs(self, like: Tensor) -> tuple[Tensor, ...]:
        return ()

    def _spheres(self, x: Tensor) -> Tensor:
        """``x`` [b, d] as [b, m, n] without a copy (a strided view of a dense row)."""
        spheres = x.reshape(x.shape[0], self.m, -1)
        return spheres if spheres.stride(-1) == 1 else spheres.contiguous()

    def prepare(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self._spheres(u), self._spheres(v)

    def columns(self, state, cols: slice) -> tuple[Tensor, Tensor]:
        return state[0], state[1][cols]

    def logits_block(self, state, rows: slice, scale: Tensor, out: Tensor, keep: bool = False) -> None:
        ub, vb = state
        for c0, c1 in _column_chunks(out.shape[1]):
            self._logits_chunk(ub[rows], vb[c0:c1], scale, out, c0, c1, keep)

    def _logits_chunk(self, ub: Tensor, vb: Tensor, scale: Tensor, out: Tensor, c0: int, c1: int, keep: bool) -> None:
        # The m cosine blocks of rows x (c1 - c0) are formed into a cache-sized buffer (or, with
        # keep, into this chunk of the kept cosines) and reduced to the distance in it.
        acc = self._scratch.get("acc", out, (out.shape[0], c1 - c0))
        if keep:
            kept = self._kept(out, c0, c1)
        cos = self._scratch.get("cos", acc)
        fused = fused_cpu.usable(cos, acc)
        for k in range(self.m):
            if keep:
                cos = kept[k]
            torch.mm(ub[:, k], vb[:, k].T, out=cos)
            if fused:  # the chain below in one pass, the cosines left as they are
                mode = fused_cpu.LAST if k == self.m - 1 else fused_cpu.FIRST if k == 0 else fused_cpu.ADD
                fused_cpu.theta_squared(cos, acc, mode, float(scale))
                continue
            theta = torch.clamp(cos, -1.0, 1.0, out=self._scratch.get("theta", acc)).arccos_()
            if k == 0:
                torch.mul(theta, theta, out=acc)
            else:
                acc.addcmul_(theta, theta)
            if k == self.m - 1:
                acc.sqrt_().mul_(-scale)
        out[:, c0:c1] = acc

    def _kept(self, block: Tensor, c0: int, c1: int) -> Tensor:
        """The kept cosines of columns c0:c1 of a block, [m, rows, c1 - c0], contiguous: chunk
        after chunk in one buffer of m x the block."""
        rows, cols = block.shape
        flat = self._scratch.get("kept", block, (self.m * rows * cols,))
        return flat[self.m * rows * c0: self.m * rows * c1].view(self.m, rows, c1 - c0)

    def grad_buffers(self, state) -> tuple[Tensor, Tensor]:
        return (torch.zeros(state[0].shape, dtype=state[0].dtype, device=state[0].device),
                torch.zeros(state[1].shape, dtype=state[1].dtype, device=state[1].device))

    def backward_block(self, state, rows: slice, logits: Tensor, scale: Tensor, grad_logits: Tensor,
                       grads: tuple[Tensor, Tensor], reuse: bool = False) -> None:
        # dS/dc_k = theta_k / (sin(theta_k) D): W = scale grad / D (0 at D = 0), then per
        # sphere g = W theta / sin(theta), grad_u_k = g v_k, grad_v_k += g^T u_k.
        ub, vb = state
        grad_u, grad_v = grads
        if fused_cpu.usable(grad_logits, logits):
            w = grad_logits
            fused_cpu.distance_weights(w, logits, -float(scale) ** 2, self._scratch.get("row_sums", w, w.shape[:1]))
        else:
            w = _scale_over_distance(grad_logits, logits, scale)
        for c0, c1 in _column_chunks(w.shape[1]):
            # this chunk of W, contiguous: the fused pass below reads it m times
            w_chunk = self._scratch.get("w", w, (w.shape[0], c1 - c0))
            w_chunk.copy_(w[:, c0:c1])
            cos, g = self._scratch.get("cos", w_chunk), self._scratch.get("g", w_chunk)
            fused = fused_cpu.usable(cos, w_chunk, g)
            for k in range(self.m):
                if reuse:  # the cosines the forward of this block kept
                    cos = self._kept(w, c0, c1)[k]
                else:
                    torch.mm(ub[rows, k], vb[c0:c1, k].T, out=cos)
                if fused:
                    fused_cpu.weighted_theta_over_sin(cos, w_chunk, g, _SIN_FLOOR)
                else:
                    _theta_over_sin_of_cos(torch.clamp(cos, -1.0, 1.0, out=self._scratch.get("theta", g)), out=g).mul_(w_chunk)
                grad_u[rows, k].addmm_(g, vb[c0:c1, k])
                grad_v[c0:c1, k].addmm_(g.T, ub[rows, k])

    def gradients(self, state, grads: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return tuple(g.view(g.shape[0], -1) for g in grads)


class LorentzKernel:
    """S = -acosh(-c <u, v>_L) / sqrt(c) on the hyperboloid, one GEMM per block; the curvature
    is an input with its own gradient (a learned one trains through the fused loss).

    With theta = sqrt(c) d = acosh(1 + z), z = c (t_u t_v - u.v) - 1, t = sqrt(1/c + |x|^2):
    dS/dz = -1 / (sqrt(c) sinh theta), dz/du_i = c (t_v u_i / t_u - v_j), and
    dS/dc = -S / (2c) + dS/dz (cosh theta / c - (t_v / t_u + t_u / t_v) / (2c)).
    """

    def __init__(self, topology: "Lorentz"):
        self.topology = topology

    def inputs(self, like: Tensor) -> tuple[Tensor, ...]:
        return (self.topology.c(like),)

    def prepare(self, u: Tensor, v: Tensor, c: Tensor) -> tuple:
        c = c.detach()
        inverse = 1.0 / c
        return u, v, c, torch.sqrt(inverse + (u * u).sum(-1)), torch.sqrt(inverse + (v * v).sum(-1))

    def columns(self, state, cols: slice) -> tuple:
        u, v, c, t_u, t_v = state
        return u, v[cols], c, t_u, t_v[cols]

    def gram(self, state, out: Tensor) -> bool:
        u, v, c, t_u, t_v = state
        return _fused_gram(out, u, v, slice(None), False, t_u, t_v)

    def logits_block(self, state, rows: slice, scale: Tensor, out: Tensor, keep: bool = False,
                     gram_ready: bool = False) -> None:
        u, v, c, t_u, t_v = state
        if _fused_gram(out, u, v, rows, gram_ready, t_u, t_v):  # the GEMM, then the rest in one pass
            fused_cpu.lorentz_logits(out, t_u[rows], t_v, float(c), float(-scale / torch.sqrt(c)))
            return
        # -c <u, v>_L = c t_u t_v - c u.v, floored at 1 (rounding may dip below), then acosh
        torch.outer(c * t_u[rows], t_v, out=out)
        out.addmm_(u[rows], v.T, alpha=-float(c)).clamp_min_(1.0).acosh_().mul_(-scale / torch.sqrt(c))

    def grad_buffers(self, state) -> tuple[Tensor, ...]:
        u, v = state[0], state[1]
        zero = torch.zeros((), dtype=u.dtype, device=u.device)
        return torch.empty_like(u), torch.zeros_like(v), torch.zeros(v.shape[0], dtype=v.dtype, device=v.device), zero

    def backward_block(self, state, rows: slice, logits: Tensor, scale: Tensor, grad_logits: Tensor,
                       grads: tuple[Tensor, ...], reuse: bool = False) -> None:
        u, v, c, t_u, t_v = state
        grad_u, grad_v, column_sums, grad_c = grads
        root = torch.sqrt(c)
        if fused_cpu.usable(grad_logits, logits):  # the element-wise part below in one pass
            sum_g_logits, sum_a_cosh = fused_cpu.lorentz_weights(grad_logits, logits, float(-root / scale),
                                                                 float(-scale / root))
            a = grad_logits
            grad_c += float(sum_a_cosh) / c - float(sum_g_logits) / (2.0 * c)
        else:
            theta = logits * (-root / scale)
            g = grad_logits.mul_(scale)  # d loss / d S (0 on the diagonal: the positives' own path)
            grad_c -= torch.vdot(g.reshape(-1), logits.reshape(-1)) / (2.0 * c * scale)  # -S / (2c)
            # A = d loss / d z, 0 where theta = 0 (coincident points: the zero subgradient)
            a = g.div_(torch.sinh(theta)).mul_(-1.0 / root).masked_fill_(theta == 0, 0.0)
            grad_c += torch.vdot(a.reshape(-1), theta.cosh_().reshape(-1)) / c
        ub, tub = u[rows], t_u[rows]
        row_sums = a @ t_v  # sum_j A_ij t_vj
        column_sums.addmv_(a.T, tub)  # sum_i A_ij t_ui
        grad_c -= (row_sums / tub).sum() / (2.0 * c)
        torch.mm(a, v, out=grad_u[rows])
        grad_u[rows].mul_(-c).addcmul_(ub, (row_sums / tub).unsqueeze(1), value=float(c))
        grad_v.addmm_(a.T, ub, alpha=-float(c))

    def gradients(self, state, grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        grad_u, grad_v, column_sums, grad_c = grads
        u, v, c, t_u, t_v = state
        grad_v.addcmul_(v, (column_sums / t_v).unsqueeze(1), value=float(c))
        grad_c = grad_c - (column_sums / t_v).sum() / (2.0 * c)
        return grad_u, grad_v, grad_c


# The geodesic kernel works on chunks of this many columns: its m cosine blocks of a chunk stay
# in cache between the GEMM and the fused pass (measured at b = 8,192 on 2 cores: 256 rows
# against all 8,192 columns at once ran 1.4x slower than 1,024 x 1,024 tiles).
_GEODESIC_COLUMNS = 1024


def _column_chunks(cols: int, step: int | None = None):
    """(start, stop) of consecutive column chunks of ``step`` columns (default: the geodesic's)."""
    step = step or _GEODESIC_COLUMNS
    for start in range(0, cols, step):
        yield start, min(cols, start + step)


def _scale_over_distance(grad_logits: Tensor, logits: Tensor, scale: Tensor) -> Tensor:
    """scale * grad / D in place, from logits = -scale D: -scale^2 grad / logits, with 0 where
    D = 0 (coincident points: the distance's zero subgradient, as in the similarity functions
    above). The division by 0 gives ±inf or NaN exactly there; they are zeroed in place
    (a mask of logits == 0 would be one more block-sized temporary)."""
    return grad_logits.div_(logits).mul_(-scale * scale).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


class BlockScratch:
    """Block-sized work tensors reused across the blocks of a b x b pass (and, in a kernel,
    across calls): a fresh multi-MiB tensor per block is returned to the OS and page-faults on
    first touch, which costs more than the arithmetic on it (profiled inside the loss at
    b = 8,192: 4.8 ms per 128 x 8,192 product into fresh tensors, 0.6 ms per 256 x 8,192 one
    into a reused buffer). ``get(name, like)``
    is a tensor of ``like``'s shape, grown when a larger one is asked for. Each thread has its
    own buffers: a kernel (and so its scratch) is shared by every caller of its topology."""

    def __init__(self):
        self._local = threading.local()

    def get(self, name: str, like: Tensor, shape: Sequence[int] | None = None) -> Tensor:
        """A tensor of ``like``'s dtype and device, of ``like``'s shape or ``shape``."""
        shape = tuple(like.shape if shape is None else shape)
        numel = math.prod(shape)
        buffers = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(name)
        if buffer is None or buffer.dtype != like.dtype or buffer.device != like.device or buffer.numel() < numel:
            buffer = buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


def _broadcast_t(t: Tensor | float, like: Tensor, batch_ndim: int) -> Tensor:
    """Turn t (scalar or [b]) into a tensor that broadcasts against ``like``'s batch axes."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"interpolation weight t must be a scalar or have shape [{like.shape[0]}], "
            f"got {tuple(t.shape)}"
        )
    return t.view(-1, *([1] * (like.ndim - 1)))


def _fallback_tangent(a: Tensor) -> Tensor:
    """A unit vector orthogonal to each unit vector a (last axis).

    Slerp between antipodal points has no unique great circle; any one will do, but it must be
    deterministic and finite. We take the coordinate axis where |a| is smallest (never parallel
    to a) and remove its component along a.
    """
    axis = a.abs().argmin(dim=-1, keepdim=True)
    e = torch.zeros_like(a).scatter_(-1, axis, 1.0)
    w = e - (a * e).sum(-1, keepdim=True) * a
    return w / torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(_ZERO_NORM)


def _slerp_last_axis(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Geodesic between unit vectors a and b along the last axis: t=0 -> a, t=1 -> b.

    Written as  cos(t theta) a + sin(t theta) w,  w the unit tangent at a towards b, with
    theta = atan2(||b - (a.b) a||, a.b) (accurate at both ends, unlike arccos). Two branches
    keep every step finite:
      * theta < pi/2: sin(t theta)/sin(theta) = t * sinc(t theta)/sinc(theta), exact and smooth
        as theta -> 0 where the path becomes linear interpolation;
      * theta >= pi/2: the tangent is normalised directly; at the antipode (tangent = 0) a
        deterministic orthogonal direction is used.
    """
    cos = (a * b).sum(-1, keepdim=True)
    tangent = b - cos * a
    sin = torch.linalg.vector_norm(tangent, dim=-1, keepdim=True)
    theta = torch.atan2(sin, cos)
    t_theta = t * theta

    # Near branch (theta < pi/2): clamp theta so the unused branch never divides by sinc(pi).
    theta_near = theta.clamp(max=math.pi / 2)
    near_coef = t * torch.sinc(t * theta_near / math.pi) / torch.sinc(theta_near / math.pi)
    near = near_coef * tangent

    # Far branch (theta >= pi/2): unit tangent, or the fallback at the antipode.
    degenerate = sin <= 1e-6
    unit_tangent = torch.where(degenerate, _fallback_tangent(a), tangent / sin.clamp_min(1e-6))
    far = torch.sin(t_theta) * unit_tangent

    return torch.cos(t_theta) * a + torch.where(theta < math.pi / 2, near, far)


class Topology:
    """An embedding space and its (negative) distance.

    Subclasses implement :meth:`project`, :meth:`_similarity`, :meth:`_paired` and
    :meth:`_interpolate` on inputs already in the compute dtype and in a canonical layout.
    """

    name: str = "topology"
    # True when similarity(u, v) is the plain dot product of the flattened points, so that
    # losses may fuse it with their own GEMMs.
    inner_product: bool = False
    # True for product spaces of m blocks of n coordinates (the oblique manifold): their size
    # is given as (n, m), and a multi-token model puts one [CLS] token on each block.
    blockwise: bool = False
    # How to form the similarity matrix a block of rows at a time and back-propagate through
    # it (EuclideanKernel, GeodesicKernel): losses then fuse the sweep with their own; None:
    # losses take similarity() whole.
    blocked_kernel: object | None = None

    def __init__(self, dim: int, num_blocks: int = 1):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{self.name}: dim must be a positive integer, got {dim!r}")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"{self.name}: m (number of blocks) must be >= 1, got {num_blocks!r}")
        if dim % num_blocks:
            raise ValueError(f"{self.name}: dim {dim} is not divisible by m={num_blocks}")
        self.dim = dim
        self.num_blocks = num_blocks
        self.block_dim = dim // num_blocks

    # ----------------------------------------------------------------- layout helpers
    def _flat(self, x: Tensor, what: str = "input") -> Tensor:
        """[..., d] or [..., m, n] -> [..., d] (a view when possible)."""
        if x.shape[-1] == self.dim:
            return x
        if x.ndim >= 2 and x.shape[-2] * x.shape[-1] == self.dim:
            return x.reshape(*x.shape[:-2], self.dim)
        raise ValueError(
            f"{self.name}: {what} has shape {tuple(x.shape)}; expected [..., {self.dim}] or "
            f"[..., {self.num_blocks}, {self.block_dim}] (dim = n*m = {self.dim})"
        )

    def blocks(self, x: Tensor) -> Tensor:
        """View points as [..., m, n] (one row per unit sphere / token)."""
        flat = self._flat(x)
        return flat.reshape(*flat.shape[:-1], self.num_blocks, self.block_dim)

    def pair_2d(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Two collections of points as ``[b, d]`` matrices in one compute dtype (fp32 for
        half-precision inputs): the view every all-pairs computation (losses, retrieval) starts
        from."""
        u = _compute_dtype(self._flat(u, "u"))
        v = _compute_dtype(self._flat(v, "v"))
        if u.ndim != 2 or v.ndim != 2:
            raise ValueError(
                f"{self.name}: similarity expects collections of points [b, d] or [b, m, n], "
                f"got u {tuple(u.shape)} and v {tuple(v.shape)}"
            )
        dtype = torch.promote_types(u.dtype, v.dtype)
        return u.to(dtype), v.to(dtype)

    # ----------------------------------------------------------------- public API
    def project(self, x: Tensor) -> Tensor:
        """Map Euclidean features onto the manifold, keeping the input's layout."""
        raise NotImplementedError

    def similarity(self, u: Tensor, v: Tensor) -> Tensor:
        """All-pairs similarity, ``[b_u, b_v]``; higher means closer (= -distance)."""
        u, v = self.pair_2d(u, v)
        return self._similarity(u, v)

    def paired_similarity(self, u: Tensor, v: Tensor) -> Tensor:
        """Similarity of row i of u with row i of v, ``[b]``."""
        u, v = self.pair_2d(u, v)
        if u.shape[0] != v.shape[0]:
            raise ValueError(
                f"{self.name}: paired_similarity needs equally many points, got {u.shape[0]} "
                f"and {v.shape[0]}"
            )
        return self._paired(u, v)

    def scaled_similarity(self, u: Tensor, v: Tensor, scale: Tensor) -> Tensor:
        """``scale * similarity(u, v)``; inner-product topologies fold the scale into u.

        Folding saves one pass over the b x b matrix forward and backward, and gives the
        scale's gradient in O(b d) instead of O(b^2).
        """
        return scale * self.similarity(u, v)

    def interpolate(self, a: Tensor, b: Tensor, t: Tensor | float) -> Tensor:
        """Point at fraction t along the geodesic from a (t=0) to b (t=1); t scalar or [b]."""
        if a.shape != b.shape:
            raise ValueError(f"{self.name}: interpolate needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        out_shape = a.shape
        a = _compute_dtype(self._flat(a, "a"))
        b = _compute_dtype(self._flat(b, "b"))
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
        t = _broadcast_t(t, a, 1)
        return self._interpolate(a, b, t).reshape(out_shape)

    # ---------------------------------------------------------- tangent spaces
    # Moves on the manifold (embedding arithmetic: "this image, but blue instead of red").
    # Every point argument is [b, d] (or broadcastable rows); computed in fp32 at least.
    def log_map(self, x: Tensor, y: Tensor) -> Tensor:
        """The tangent vector at x pointing to y, of length the geodesic distance."""
        x, y = self._rows(x, y)
        return self._log(x, y)

    def exp_map(self, x: Tensor, v: Tensor) -> Tensor:
        """The point reached from x along the tangent vector v (exp_x(log_x(y)) = y)."""
        x, v = self._rows(x, v)
        return self._exp(x, v)

    def transport(self, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        """Parallel transport of the tangent vector v at a to b, along the geodesic a -> b."""
        a, b, v = self._rows(a, b, v)
        return self._transport(a, b, v)

    def translate(self, x: Tensor, a: Tensor, b: Tensor, lam: float | Tensor = 1.0) -> Tensor:
        """x moved by lam times the displacement from a to b: exp_x(lam P_{a->x} log_a(b)).

        In Euclidean space this is x + lam (b - a); on the sphere and per block on Ob(n, m)
        the move stays on the manifold. With x = a it is the geodesic point interpolate(a, b, lam).
        """
        x, a, b = self._rows(x, a, b)
        lam = _broadcast_t(lam, x, 1)
        return self._exp(x, lam * self._transport(a, x, self._log(a, b)))

    def _rows(self, *tensors: Tensor) -> list[Tensor]:
        flat = [_compute_dtype(self._flat(t, f"arg{i}")) for i, t in enumerate(tensors)]
        dtype = flat[0].dtype
        for t in flat[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        return [t.to(dtype) for t in flat]

    # A topology without these maps says so rather than falling back to flat-space arithmetic,
    # which would leave its manifold without a word.
    def _log(self, *args: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name}: tangent-space moves (log/exp maps, transport) are not implemented")

    _exp = _transport = _log

    @property
    def similarity_range(self) -> tuple[float, float]:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """A short display name for tables and plots, e.g. ``Sphere(128)``, ``Ob(16,8) inner``."""
        return f"{self.name}({self.dim})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, m={self.num_blocks}, n={self.block_dim})"

    # ----------------------------------------------------------------- to implement
    def _similarity(self, u: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _paired(self, u: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _interpolate(self, a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError


class Euclidean(Topology):
    """R^d with similarity -||u - v||_2.

    The b_u x b_v distance matrix is built from ||u||^2 + ||v||^2 - 2 u.v: one GEMM and
    O(b_u b_v) memory (differences u_i - v_j would need O(b_u b_v d)).
    """

    name = "euclidean"
    blocked_kernel = EuclideanKernel()

    def project(self, x: Tensor) -> Tensor:
        x = _compute_dtype(x)
        self._flat(x)  # validates the shape
        return x

    # Flat space: the tangent space is the space itself.
    def _log(self, x: Tensor, y: Tensor) -> Tensor:
        return y - x

    def _exp(self, x: Tensor, v: Tensor) -> Tensor:
        return x + v

    def _transport(self, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        return v

    def _similarity(self, u: Tensor, v: Tensor) -> Tensor:
        return _EuclideanSimilarity.apply(u, v)

    def _paired(self, u: Tensor, v: Tensor) -> Tensor:
        # Differences are exact here (O(b d) memory is fine for pairs); the safe sqrt keeps the
        # gradient finite at u = v.
        diff = u - v
        return -_SafeSqrt.apply((diff * diff).sum(-1))

    def _interpolate(self, a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        return a + t * (b - a)

    @property
    def similarity_range(self) -> tuple[float, float]:
        return (-math.inf, 0.0)

    @property
    def label(self) -> str:
        return f"Euclidean({self.dim})"


class Oblique(Topology):
    """Ob(n, m): m unit spheres S^(n-1), one per block of n coordinates (or per [CLS] token).

    ``distance="inner"`` scores by sum_k u_k . v_k = tr(u^T v), a single GEMM on the flattened
    points, range [-m, m]. ``distance="geodesic"`` scores by minus the product-manifold geodesic
    distance sqrt(sum_k arccos^2(u_k . v_k)), range [-pi sqrt(m), 0]; it needs the m per-block
    cosine matrices, O(b_u b_v m) memory.
    """

    def __init__(self, n: int, m: int, distance: str = "inner"):
        if distance not in ("inner", "geodesic"):
            raise ValueError(f"oblique distance must be 'inner' or 'geodesic', got {distance!r}")
        self.distance = distance
        self.name = f"oblique-{distance}"
        self.blockwise = True
        self.inner_product = distance == "inner"
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"{self.name}: n (block dimension) must be an integer >= 2, got {n!r}")
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"{self.name}: m (number of blocks) must be an integer >= 1, got {m!r}")
        super().__init__(n * m, m)
        if distance == "geodesic":
            self.blocked_kernel = GeodesicKernel(m)

    def project(self, x: Tensor) -> Tensor:
        x = _compute_dtype(x)
        blocks = self.blocks(x)
        norm = torch.linalg.vector_norm(blocks, dim=-1, keepdim=True)
        unit = blocks / norm.clamp_min(_ZERO_NORM)
        # A zero block has no direction; map it to a fixed point so the output stays on the
        # manifold (a zero vector would make arccos/slerp meaningless downstream).
        default = torch.full_like(blocks, 1.0 / math.sqrt(self.block_dim))
        unit = torch.where(norm > _ZERO_NORM, unit, default)
        return unit.reshape(x.shape)

    def scaled_similarity(self, u: Tensor, v: Tensor, scale: Tensor) -> Tensor:
        if self.distance == "geodesic":
            return super().scaled_similarity(u, v, scale)
        u, v = self.pair_2d(u, v)
        return (scale.to(u.dtype) * u) @ v.T

    def _block_major(self, x: Tensor) -> Tensor:
        """[b, d] -> [m, b, n] contiguous, so each block's cosines are one plain GEMM."""
        return x.reshape(x.shape[0], self.num_blocks, self.block_dim).transpose(0, 1).contiguous()

    def _similarity(self, u: Tensor, v: Tensor) -> Tensor:
        if self.distance == "inner":
            return u @ v.T
        return _GeodesicSimilarity.apply(self._block_major(u), self._block_major(v))

    def _paired(self, u: Tensor, v: Tensor) -> Tensor:
        if self.distance == "inner":
            return (u * v).sum(-1)
        # Pairs can afford the O(b d) differences, which give the angle to full precision
        # (from a cosine, fp32 resolves angles near 0 only to ~sqrt(eps) = 3e-4); every norm
        # here has the zero subgradient at 0, so coincident and antipodal blocks stay finite.
        ub, vb = self.blocks(u), self.blocks(v)
        diff = torch.linalg.vector_norm(ub - vb, dim=-1)
        total = torch.linalg.vector_norm(ub + vb, dim=-1)
        return -torch.linalg.vector_norm(2.0 * torch.atan2(diff, total), dim=-1)

    def _interpolate(self, a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        # The geodesic of a product manifold is the product of the factors' geodesics: slerp
        # each unit block with the same t.
        t = t.unsqueeze(-1) if t.ndim else t
        return _slerp_last_axis(self.blocks(a), self.blocks(b), t).reshape(a.shape)

    # Per block on the unit sphere S^(n-1) (a product manifold's maps are the factors' maps).
    def _log(self, x: Tensor, y: Tensor) -> Tensor:
        xb, yb = self.blocks(x), self.blocks(y)
        cos = (xb * yb).sum(-1, keepdim=True)
        tangent = yb - cos * xb
        sin = torch.linalg.vector_norm(tangent, dim=-1, keepdim=True)
        theta = torch.atan2(sin, cos)
        # theta / sin theta -> 1 as theta -> 0; at the antipode the direction is undefined and
        # the tangent (0) is kept: a finite, deterministic choice.
        ratio = torch.where(sin > 1e-7, theta / sin.clamp_min(1e-7), torch.ones_like(sin))
        return (ratio * tangent).reshape(x.shape)

    def _exp(self, x: Tensor, v: Tensor) -> Tensor:
        xb, vb = self.blocks(x), self.blocks(v)
        # A tangent vector has no component along x; removing any keeps rounding off the path.
        vb = vb - (xb * vb).sum(-1, keepdim=True) * xb
        norm = torch.linalg.vector_norm(vb, dim=-1, keepdim=True)
        # sin(|v|)/|v| = sinc(|v|/pi): smooth through |v| = 0, where exp_x(v) = x.
        out = torch.cos(norm) * xb + torch.sinc(norm / math.pi) * vb
        return self.project(out.reshape(x.shape))

    def _transport(self, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        ab, bb, vb = self.blocks(a), self.blocks(b), self.blocks(v)
        # P(v) = v - <b, v> / (1 + <a, b>) (a + b): the rotation of the great circle a -> b.
        # At b = -a there is no unique geodesic; the clamp keeps the result finite there.
        denom = (1.0 + (ab * bb).sum(-1, keepdim=True)).clamp_min(1e-6)
        out = vb - (bb * vb).sum(-1, keepdim=True) / denom * (ab + bb)
        return out.reshape(v.shape)

    @property
    def label(self) -> str:
        return f"Ob({self.block_dim},{self.num_blocks}) {self.distance}"

    @property
    def similarity_range(self) -> tuple[float, float]:
        if self.distance == "inner":
            return (-float(self.num_blocks), float(self.num_blocks))
        return (-math.pi * math.sqrt(self.num_blocks), 0.0)

    def __repr__(self) -> str:
        return f"Oblique(n={self.block_dim}, m={self.num_blocks}, distance={self.distance!r})"


class Sphere(Oblique):
    """The unit sphere S^(d-1) with cosine similarity: Ob(d, 1) with the inner product."""

    def __init__(self, dim: int):
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"sphere: dim must be an integer >= 2, got {dim!r}")
        super().__init__(dim, 1, "inner")
        self.name = "sphere"
        self.blockwise = False

    @property
    def label(self) -> str:
        return f"Sphere({self.dim})"

    def __repr__(self) -> str:
        return f"Sphere(dim={self.dim})"


# Largest sqrt(c) |x| the exp map at the origin takes (MERU's cap, asinh(2^15) ~ 11.1): space
# and time components stay below ~2^15 / sqrt(c), so pairwise products are far from overflow
# in fp32 and their gradients too.
_LORENTZ_MAX_RADIUS = math.asinh(2.0**15)


def _sinh_ratio(t: Tensor, theta: Tensor) -> Tensor:
    """sinh(t theta) / sinh(theta) for theta >= 0, t in [0, 1]: t at theta = 0, no overflow
    for large theta (there it is e^((t-1) theta) (1 - e^(-2 t theta)) / (1 - e^(-2 theta)))."""
    small = theta < 1e-3
    safe = torch.where(small, torch.ones_like(theta), theta)
    big = theta > 20.0
    moderate = torch.sinh(t * safe.clamp(max=20.0)) / torch.sinh(safe.clamp(max=20.0))
    large = torch.exp((t - 1.0) * safe) * (-torch.expm1(-2.0 * t * safe)) / (-torch.expm1(-2.0 * safe))
    series = t * (1.0 + (t * t - 1.0) * theta * theta / 6.0)  # sinh(tx)/sinh(x) to O(x^2)
    return torch.where(small, series, torch.where(big, large, moderate))


class Lorentz(Topology):
    """The hyperboloid of curvature -c in R^(d+1), {x : <x, x>_L = -1/c, x_0 > 0}, with
    <x, y>_L = x_s . y_s - x_0 y_0. Points are stored by their d space components x_s; the
    time component x_0 = sqrt(1/c + |x_s|^2) is derived (as in MERU, Desai et al., ICML 2023).

    similarity = -d(x, y) = -acosh(-c <x, y>_L) / sqrt(c). ``project`` is the exponential map
    at the origin of the tangent vector (0, x). ``curvature`` is a float or a callable
    returning a 0-dim tensor (a model's learnable curvature), read at every call.
    """

    name = "lorentz"

    @property
    def blocked_kernel(self) -> LorentzKernel:  # reads the curvature at each loss call
        return LorentzKernel(self)

    # project is exp_0: models scale their features before it (see models.TokenProjection)
    scales_tangent_input = True
    # the Euclidean distance of stored points means little here: geometry metrics use -similarity
    metrics_by_own_distance = True

    def __init__(self, dim: int, curvature: float | Callable[[], Tensor] = 1.0, learn_curvature: bool = False):
        super().__init__(dim, 1)
        if not callable(curvature) and not (isinstance(curvature, (int, float)) and curvature > 0):
            raise ValueError(f"lorentz: curvature must be a positive number or a callable, got {curvature!r}")
        self.curvature = curvature
        # Whether a model built on this topology should own a learnable curvature (starting at
        # ``curvature``) and hand it to the topology: see models.build_model.
        self.learn_curvature = bool(learn_curvature)

    @contextlib.contextmanager
    def curvature_of(self, c: Tensor):
        """Within the block, the curvature is the tensor ``c``: a loss computed on the outputs
        of a (DDP) forward uses the curvature that came out of it, so its gradient travels the
        same way as the logit scale's."""
        saved = self.curvature
        self.curvature = lambda: c
        try:
            yield self
        finally:
            self.curvature = saved

    def c(self, like: Tensor) -> Tensor:
        if callable(self.curvature):
            return self.curvature().to(device=like.device, dtype=like.dtype)
        return torch.tensor(float(self.curvature), device=like.device, dtype=like.dtype)

    def time(self, x: Tensor) -> Tensor:
        """x_0 of space components x ``[..., d]``: sqrt(1/c + |x|^2)."""
        x = _compute_dtype(x)
        return torch.sqrt(1.0 / self.c(x) + (x * x).sum(-1))

    def project(self, x: Tensor) -> Tensor:
        x = _compute_dtype(self._flat(x))
        c = self.c(x)
        root = torch.sqrt(c)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        # exp_0((0, x)) has space part sinh(sqrt(c) |x|) x / (sqrt(c) |x|), with the radius
        # capped before sinh can overflow (the tangent vector shortened to the cap); the
        # ratio is 1 at x = 0 (its series there).
        radius = root * norm
        coef = torch.where(radius < 1e-4, 1.0 + radius * radius / 6.0,
                           torch.sinh(radius.clamp(max=_LORENTZ_MAX_RADIUS)) / radius.clamp_min(1e-4))
        return coef * x

    def _similarity(self, u: Tensor, v: Tensor) -> Tensor:
        c = self.c(u)
        # -c <u, v>_L - 1 >= 0; from a GEMM it loses digits near coincident points, which only
        # positives are (they take the paired form below).
        z = (c * (self.time(u)[:, None] * self.time(v)[None, :] - u @ v.T) - 1.0).clamp_min(0.0)
        return -_acosh1p(z) / torch.sqrt(c)

    def _paired(self, u: Tensor, v: Tensor) -> Tensor:
        c = self.c(u)
        # -c <u, v>_L - 1 = c/2 * |u - v|_L^2, the difference's Lorentzian square, with
        # u_0 - v_0 = (|u|^2 - |v|^2) / (u_0 + v_0) = (u - v).(u + v) / (u_0 + v_0): exact
        # for near-identical points, where acosh of a rounded 1 + z would lose them.
        diff = u - v
        dt = (diff * (u + v)).sum(-1) / (self.time(u) + self.time(v))
        z = (0.5 * c * ((diff * diff).sum(-1) - dt * dt)).clamp_min(0.0)
        return -_acosh1p(z) / torch.sqrt(c)

    def _interpolate(self, a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        # The geodesic on the hyperboloid: (sinh((1-t) theta) a + sinh(t theta) b) / sinh(theta),
        # theta = sqrt(c) d(a, b), in full coordinates; its space part is the same combination
        # of the space parts (the time part follows). Linear interpolation at theta = 0.
        t = t.unsqueeze(-1) if t.ndim else t
        theta = (-self._paired(a, b) * torch.sqrt(self.c(a))).unsqueeze(-1)
        return _sinh_ratio(1.0 - t, theta) * a + _sinh_ratio(t * torch.ones_like(theta), theta) * b

    # Tangent vectors at x are stored, like points, by their space components v_s: the time
    # component follows from tangency, <x, v>_L = 0, i.e. v_0 = x_s . v_s / x_0. With
    # theta = sqrt(c) d(x, y) and cosh(theta) = -c <x, y>_L = 1 + z (z from the precise paired
    # form), the maps are those of the hyperboloid (e.g. Ungar; Nickel & Kiela, ICML 2018).
    def _theta_and_z(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        theta = (-self._paired(x, y) * torch.sqrt(self.c(x))).unsqueeze(-1)
        return theta, torch.cosh(theta) - 1.0

    def _log(self, x: Tensor, y: Tensor) -> Tensor:
        # log_x(y) = theta / sinh(theta) (y + c <x, y>_L x) = theta / sinh(theta) (y - (1 + z) x),
        # its space part written as (y - x) - z x so that near-identical points keep their digits.
        theta, z = self._theta_and_z(x, y)
        ratio = torch.where(theta < 1e-4, 1.0 - theta * theta / 6.0, theta / torch.sinh(theta).clamp_min(1e-30))
        return ratio * ((y - x) - z * x)

    def _exp(self, x: Tensor, v: Tensor) -> Tensor:
        # exp_x(v) = cosh(r) x + sinh(r) / r v, r = sqrt(c) |v|_L; the radius capped as in project.
        c = self.c(x)
        v0 = (x * v).sum(-1, keepdim=True) / self.time(x).unsqueeze(-1)
        r = torch.sqrt(c) * _SafeSqrt.apply(((v * v).sum(-1, keepdim=True) - v0 * v0).clamp_min(0.0))
        capped = r.clamp(max=_LORENTZ_MAX_RADIUS)
        coef = torch.where(r < 1e-4, 1.0 + r * r / 6.0, torch.sinh(capped) / r.clamp_min(1e-4))
        return torch.cosh(capped) * x + coef * v

    def _transport(self, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        # P(v) = v + <b, v>_L / (1/c - <a, b>_L) (a + b), where 1/c - <a, b>_L = (2 + z) / c.
        c = self.c(a)
        _, z = self._theta_and_z(a, b)
        v0 = (a * v).sum(-1, keepdim=True) / self.time(a).unsqueeze(-1)
        b_dot_v = (b * v).sum(-1, keepdim=True) - self.time(b).unsqueeze(-1) * v0
        return v + c * b_dot_v / (2.0 + z) * (a + b)

    @property
    def label(self) -> str:
        c = "learned c" if callable(self.curvature) or self.learn_curvature else f"c={self.curvature:g}"
        return f"Lorentz({self.dim}, {c})"

    @property
    def similarity_range(self) -> tuple[float, float]:
        return (-math.inf, 0.0)

    def __repr__(self) -> str:
        return f"Lorentz(dim={self.dim}, curvature={self.curvature!r})"


class Product(Topology):
    """A product of topologies: points are the factors' points side by side, and similarity is
    the sum of the factors' similarities (e.g. sphere x lorentz x euclidean, in the spirit of
    mixed-curvature product spaces, Gu et al., ICLR 2019). A product's geodesic is the product
    of the factors' geodesics, so ``interpolate`` and the tangent-space maps act per factor.

    Attributes follow the factors: the product is ``inner_product`` when every factor is (the
    sum of dot products is the dot product of the concatenation, so losses may fuse it); it
    scales its tangent input (MERU's learnable alpha) and scores geometry metrics by its own
    distance when any factor does. Its hyperbolic factors share one curvature: ``curvature``
    reads and sets theirs, and a model learns it when any of them asks to.
    """

    name = "product"

    def __init__(self, factors: Sequence[Topology]):
        factors = list(factors)
        if len(factors) < 2 or not all(isinstance(f, Topology) for f in factors):
            raise ValueError(f"product: needs two or more Topology factors, got {factors!r}")
        super().__init__(sum(f.dim for f in factors), 1)
        self.factors = factors
        self.inner_product = all(f.inner_product for f in factors)
        self.scales_tangent_input = any(getattr(f, "scales_tangent_input", False) for f in factors)
        self.metrics_by_own_distance = any(getattr(f, "metrics_by_own_distance", False) for f in factors)
        self._curved = [f for f in factors if isinstance(f, Lorentz)]
        self.learn_curvature = any(f.learn_curvature for f in self._curved)

    @property
    def curvature(self):
        return self._curved[0].curvature if self._curved else None

    @curvature.setter
    def curvature(self, value) -> None:
        for f in self._curved:
            f.curvature = value

    @contextlib.contextmanager
    def curvature_of(self, c: Tensor):
        """As :meth:`Lorentz.curvature_of`, for every hyperbolic factor."""
        with contextlib.ExitStack() as stack:
            for f in self._curved:
                stack.enter_context(f.curvature_of(c))
            yield self

    def split(self, x: Tensor) -> list[Tensor]:
        """Points ``[..., d]`` -> each factor's part ``[..., d_i]``."""
        return list(torch.split(self._flat(x), [f.dim for f in self.factors], dim=-1))

    def _each(self, method: str, *tensors: Tensor) -> Tensor:
        parts = zip(*(self.split(t) for t in tensors))
        return torch.cat([getattr(f, method)(*p) for f, p in zip(self.factors, parts)], dim=-1)

    def project(self, x: Tensor) -> Tensor:
        return torch.cat([f.project(p) for f, p in zip(self.factors, self.split(_compute_dtype(x)))], dim=-1)

    def _similarity(self, u: Tensor, v: Tensor) -> Tensor:
        return sum(f.similarity(a, b) for f, a, b in zip(self.factors, self.split(u), self.split(v)))

    def _paired(self, u: Tensor, v: Tensor) -> Tensor:
        return sum(f.paired_similarity(a, b) for f, a, b in zip(self.factors, self.split(u), self.split(v)))

    def _interpolate(self, a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        return torch.cat([f.interpolate(p, q, t) for f, p, q in zip(self.factors, self.split(a), self.split(b))], dim=-1)

    def _log(self, x: Tensor, y: Tensor) -> Tensor:
        return self._each("log_map", x, y)

    def _exp(self, x: Tensor, v: Tensor) -> Tensor:
        return self._each("exp_map", x, v)

    def _transport(self, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        return self._each("transport", a, b, v)

    @property
    def similarity_range(self) -> tuple[float, float]:
        ranges = [f.similarity_range for f in self.factors]
        return (sum(r[0] for r in ranges), sum(r[1] for r in ranges))

    @property
    def label(self) -> str:
        return " x ".join(f.label for f in self.factors)

    def __repr__(self) -> str:
        return f"Product({self.factors!r})"


def product_topology(spec: str, curvature: float = 1.0, learn_curvature: bool = False) -> Product:
    """A product from a spec such as ``"sphere:64+lorentz:32+euclidean:32"``: factors joined by
    ``+``, each ``name:dim`` (a blockwise kind: ``name:NxM``, e.g. ``oblique-inner:16x4``).
    Hyperbolic factors start at ``curvature`` and share it (learned when ``learn_curvature``)."""
    factors: list[Topology] = []
    for part in str(spec).split("+"):
        name, _, size = part.strip().partition(":")
        if not name or not size:
            raise ValueError(f"product: factor {part!r} of {spec!r} is not name:dim (or name:NxM for a blockwise kind)")
        try:
            numbers = [int(s) for s in size.lower().split("x")]
        except ValueError:
            raise ValueError(f"product: factor {part!r} of {spec!r}: its size {size!r} is not dim or NxM") from None
        if name == "product":
            raise ValueError(f"product: factor {part!r}: a product nests no product (list its factors instead)")
        if name == "lorentz" and len(numbers) == 1:
            factors.append(Lorentz(numbers[0], curvature=curvature, learn_curvature=learn_curvature))
        elif is_blockwise(name):
            if len(numbers) != 2:
                raise ValueError(f"product: factor {part!r}: {name} is sized NxM (n per block, m blocks), e.g. {name}:16x4")
            factors.append(topology(name, n=numbers[0], m=numbers[1]))
        elif len(numbers) == 1:
            factors.append(topology(name, dim=numbers[0]))
        else:
            raise ValueError(f"product: factor {part!r}: {name} has no blocks; give {name}:DIM")
    return Product(factors)


def _acosh1p(z: Tensor) -> Tensor:
    """acosh(1 + z) = log1p(z + sqrt(z (z + 2))) for z >= 0, with the zero subgradient at
    z = 0 (the distance of coincident points) instead of an infinite one; log(2 (1 + z)) for
    large z, where z (z + 2) would overflow (the difference is below 1 / (4 z^2))."""
    large = z > 1e6
    small_z = torch.where(large, torch.zeros_like(z), z)
    return torch.where(large, math.log(2.0) + torch.log1p(z), torch.log1p(small_z + _SafeSqrt.apply(small_z * (small_z + 2.0))))


# ------------------------------------------------------------------------- registry
#
# Every builder takes the same keywords, ``dim``, ``n`` and ``m`` (None when not given), so a
# caller (a config, a benchmark, a loader) never has to know which kind takes which.


def _flat_builder(cls: type, name: str) -> Callable[..., Topology]:
    def build(dim: int | None = None, n: int | None = None, m: int | None = None) -> Topology:
        if dim is None:
            raise ValueError(f"{name}: dim is required")
        if n is not None or m not in (None, 1):
            raise ValueError(f"{name} has no blocks: give dim only (got n={n}, m={m})")
        return cls(dim)

    return build


def _oblique_builder(distance: str) -> Callable[..., Topology]:
    def build(dim: int | None = None, n: int | None = None, m: int | None = None) -> Topology:
        name = f"oblique-{distance}"
        if m is None:
            raise ValueError(f"{name}: m (number of unit spheres) is required")
        if n is None:
            if dim is None:
                raise ValueError(f"{name}: give n (block dimension), or dim divisible by m")
            if not isinstance(m, int) or m < 1:
                raise ValueError(f"{name}: m must be an integer >= 1, got {m!r}")
            if dim % m:
                raise ValueError(f"{name}: dim={dim} is not divisible by m={m}")
            n = dim // m
        elif dim is not None and n * m != dim:
            raise ValueError(f"{name}: n*m = {n}*{m} = {n * m} does not equal dim={dim}")
        return Oblique(n, m, distance)

    return build


def _product_without_factors(dim: int | None = None, n: int | None = None, m: int | None = None) -> Topology:
    raise ValueError("product: a product is given by its factors, not by dim/n/m: "
                     "product_topology('sphere:64+lorentz:64') (topology.factors in a config)")


_REGISTRY: dict[str, Callable[..., Topology]] = {
    "sphere": _flat_builder(lambda dim: Sphere(dim), "sphere"),
    "euclidean": _flat_builder(lambda dim: Euclidean(dim), "euclidean"),
    "oblique-inner": _oblique_builder("inner"),
    "oblique-geodesic": _oblique_builder("geodesic"),
    "lorentz": _flat_builder(lambda dim: Lorentz(dim), "lorentz"),
    "product": _product_without_factors,
}


def register_topology(name: str, builder: Callable[..., Topology], blockwise: bool = False) -> None:
    """Make ``topology(name, dim=..., n=..., m=...)`` build a user-defined topology.

    ``builder(dim=None, n=None, m=None)`` takes the same keywords as every other kind;
    ``blockwise`` says that its size is given as m blocks of n (see ``is_blockwise``).
    """
    add_topology_name(name, blockwise)  # raises if the name is taken
    _REGISTRY[name] = builder


def topology(name: str, dim: int | None = None, n: int | None = None, m: int | None = None) -> Topology:
    """Build a topology by name; every kind takes the same keywords.

    ``topology("sphere", dim=128)``, ``topology("euclidean", dim=128)``,
    ``topology("oblique-inner", n=16, m=8)`` (or ``dim=128, m=8``). A flat kind given blocks,
    or a blockwise kind without ``m``, is a ValueError that says what it takes.
    """
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown topology {name!r}; available: {', '.join(available_topologies())}"
        ) from None
    return builder(dim=dim, n=n, m=m)
