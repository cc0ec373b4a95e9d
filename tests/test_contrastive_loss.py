"""ContrastiveLoss: reference formula, OpenCLIP equivalence, gradients, distributed gather."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import topoclip
from topoclip.losses import symmetric_cross_entropy

SPECS = {
    "sphere": dict(dim=16),
    "euclidean": dict(dim=16),
    "oblique-inner": dict(n=4, m=4),
    "oblique-geodesic": dict(n=4, m=4),
}


def rand(b, d=16, seed=0, dtype=torch.float64):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_loss(S: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Seed 002 eqs. 6-8 written out: mean of row-wise and column-wise -log softmax at the diagonal."""
    b = S.shape[0]
    logits = scale * S
    total = 0.0
    for i in range(b):
        total = total - torch.log(torch.exp(logits[i, i]) / torch.exp(logits[i]).sum())
        total = total - torch.log(torch.exp(logits[i, i]) / torch.exp(logits[:, i]).sum())
    return total / (2 * b)


@pytest.mark.parametrize("name", list(SPECS))
def test_loss_equals_reference_formula(name):
    topo = topoclip.topology(name, **SPECS[name])
    u, v = topo.project(rand(6, seed=1)), topo.project(rand(6, seed=2))
    scale = torch.tensor(3.0, dtype=torch.float64)
    got = topoclip.ContrastiveLoss(topo)(u, v, scale)
    want = reference_loss(topo.similarity(u, v), scale)
    torch.testing.assert_close(got, want.to(got.dtype))


@pytest.mark.parametrize("name", list(SPECS))
def test_blocked_passes_equal_reference(monkeypatch, name):
    """Force many small row blocks (and a ragged last one) through forward and backward."""
    import topoclip.losses.contrastive as contrastive

    topo = topoclip.topology(name, **SPECS[name])
    x, y = rand(11, seed=13).requires_grad_(), rand(11, seed=14).requires_grad_()
    log_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss_fn = topoclip.ContrastiveLoss(topo)

    def run():
        loss = loss_fn(topo.project(x), topo.project(y), log_scale.exp())
        grads = torch.autograd.grad(loss, (x, y, log_scale))
        return loss.detach(), grads

    want = reference_loss(topo.similarity(topo.project(x), topo.project(y)), log_scale.exp())
    want_grads = torch.autograd.grad(want, (x, y, log_scale))
    monkeypatch.setattr(contrastive, "_BLOCK_ELEMENTS", 3 * 11)
    got, got_grads = run()
    torch.testing.assert_close(got, want.detach())
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_symmetric_cross_entropy_equals_two_cross_entropies_and_gradcheck():
    L = rand(7, 7, seed=3).requires_grad_()
    labels = torch.arange(7)
    want = 0.5 * (F.cross_entropy(L, labels) + F.cross_entropy(L.T, labels))
    torch.testing.assert_close(symmetric_cross_entropy(L), want)
    assert torch.autograd.gradcheck(symmetric_cross_entropy, (L,))
    with pytest.raises(ValueError, match="square"):
        symmetric_cross_entropy(rand(3, 4))


@pytest.mark.parametrize("name", list(SPECS))
def test_loss_gradcheck_including_scale(name):
    topo = topoclip.topology(name, **SPECS[name])
    x, y = rand(5, seed=4).requires_grad_(), rand(5, seed=5).requires_grad_()
    log_scale = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    loss_fn = topoclip.ContrastiveLoss(topo)
    assert torch.autograd.gradcheck(
        lambda a, b, w: loss_fn(topo.project(a), topo.project(b), w.exp()), (x, y, log_scale)
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_sphere_equals_openclip_clip_loss(dtype, tol):
    from open_clip.loss import ClipLoss

    x, y = rand(64, 32, seed=6, dtype=dtype), rand(64, 32, seed=7, dtype=dtype)
    results = []
    for impl in ("topoclip", "openclip"):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        log_scale = torch.tensor(2.659, dtype=dtype, requires_grad=True)
        u, v = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        if impl == "topoclip":
            topo = topoclip.topology("sphere", dim=32)
            loss = topoclip.ContrastiveLoss(topo)(topo.project(a), topo.project(b), log_scale.exp())
        else:
            loss = ClipLoss()(u, v, log_scale.exp())
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad, log_scale.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, atol=tol, rtol=tol)


def test_details_match_their_definitions():
    topo = topoclip.topology("sphere", dim=16)
    u, v = topo.project(rand(5, seed=8)), topo.project(rand(5, seed=9))
    v[2] = u[2]  # pair 2 is certainly matched
    scale = torch.tensor(10.0, dtype=torch.float64)
    _, info = topoclip.ContrastiveLoss(topo)(u, v, scale, return_details=True)
    S = u @ v.T
    off = S[~torch.eye(5, dtype=torch.bool)]
    assert info["pos_sim"] == pytest.approx(float(S.diag().mean()))
    assert info["neg_sim"] == pytest.approx(float(off.mean()))
    acc = 0.5 * ((S.argmax(1) == torch.arange(5)).double().mean() + (S.argmax(0) == torch.arange(5)).double().mean())
    assert info["accuracy"] == pytest.approx(float(acc))


def test_mismatched_batch_raises():
    topo = topoclip.topology("sphere", dim=16)
    with pytest.raises(ValueError, match="5 points but v has 4"):
        topoclip.ContrastiveLoss(topo)(topo.project(rand(5)), topo.project(rand(4)), 1.0)


@pytest.mark.parametrize("name", list(SPECS))
def test_tiny_optimisation_lowers_the_loss(name):
    """Free embeddings of 32 pairs, Adam for 60 steps: the loss must fall substantially."""
    torch.manual_seed(0)
    topo = topoclip.topology(name, **SPECS[name])
    x = torch.nn.Parameter(torch.randn(32, 16))
    y = torch.nn.Parameter(torch.randn(32, 16))
    scale = topoclip.LogitScale(init=10.0)
    loss_fn = topoclip.ContrastiveLoss(topo)
    opt = torch.optim.Adam([x, y, *scale.parameters()], lr=0.05)
    first = None
    for _ in range(60):
        loss = loss_fn(topo.project(x), topo.project(y), scale())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        scale.clamp_()
    assert float(loss.detach()) < 0.5 * first


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_points_give_finite_loss_and_grads(dtype):
    for name, kw in SPECS.items():
        topo = topoclip.topology(name, **kw)
        x = rand(8, seed=10, dtype=torch.float32).to(dtype).requires_grad_()
        y = x.detach().clone().requires_grad_()  # identical pairs: the hardest case
        loss = topoclip.ContrastiveLoss(topo)(topo.project(x), topo.project(y), torch.tensor(100.0))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad.float()).all(), name


# ----------------------------------------------------------------------- distributed

def _worker(rank, world, init_file, name, local_loss, with_grad, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        topo = topoclip.topology(name, **SPECS[name])
        x, y = rand(8, seed=11), rand(8, seed=12)
        b = 8 // world
        xs = x[rank * b:(rank + 1) * b].clone().requires_grad_()
        ys = y[rank * b:(rank + 1) * b].clone().requires_grad_()
        log_scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        loss_fn = topoclip.ContrastiveLoss(topo, local_loss=local_loss, gather_with_grad=with_grad)
        loss = loss_fn(topo.project(xs), topo.project(ys), log_scale.exp())
        loss.backward()
        torch.save({"loss": loss.detach(), "gx": xs.grad, "gy": ys.grad, "gs": log_scale.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["sphere", "oblique-geodesic"])
@pytest.mark.parametrize("local_loss", [True, False])
def test_two_processes_equal_one_process(tmp_path, name, local_loss):
    """Gradients averaged over ranks (what DDP does) equal the single-process full-batch ones."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), name, local_loss, True, str(tmp_path)), nprocs=world)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]

    topo = topoclip.topology(name, **SPECS[name])
    x, y = rand(8, seed=11).requires_grad_(), rand(8, seed=12).requires_grad_()
    log_scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    loss = topoclip.ContrastiveLoss(topo)(topo.project(x), topo.project(y), log_scale.exp())
    loss.backward()

    mean_loss = sum(p["loss"] for p in parts) / world
    torch.testing.assert_close(mean_loss, loss.detach())
    torch.testing.assert_close(torch.cat([p["gx"] for p in parts]) / world, x.grad)
    torch.testing.assert_close(torch.cat([p["gy"] for p in parts]) / world, y.grad)
    torch.testing.assert_close(sum(p["gs"] for p in parts) / world, log_scale.grad)


def _logits_with_spread(spread: float, dtype) -> torch.Tensor:
    """11 x 11 logits whose rows lie at offsets 0 .. -spread from each other (plus noise), so
    that one shift per block is exact when spread is small and would underflow when large."""
    g = torch.Generator().manual_seed(7)
    offsets = torch.linspace(0.0, -spread, 11, dtype=torch.float64).unsqueeze(1)
    return (offsets + 3.0 * torch.randn(11, 11, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("chunk_elements", [1 << 18, 3 * 4], ids=["one-chunk", "chunks-of-4-columns"])
@pytest.mark.parametrize("spread", [5.0, 500.0], ids=["one-shift", "two-pass"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_blocked_lse_and_softmax_sum_both_branches(monkeypatch, spread, dtype, tol, chunk_elements):
    """The one-exp branch (a shared shift per block) and the two-pass branch it falls back to
    when a row or column lies far below the block's largest logit both equal logsumexp and
    softmax computed row by row and column by column; in fp64 a 500 spread is still one-shift
    (its margin is 354), so the two-pass branch is also forced through a tiny margin. The
    softmax block is finished a chunk of columns at a time: chunks of 4 columns (the last one
    shorter) give the same block as one chunk."""
    from topoclip.losses import contrastive

    L = _logits_with_spread(spread, dtype)
    monkeypatch.setattr(contrastive, "_BLOCK_ELEMENTS", 3 * 11)  # blocks of 3 rows
    monkeypatch.setattr(contrastive, "_CHUNK_ELEMENTS", chunk_elements)
    if spread > 100:
        monkeypatch.setattr(contrastive, "_shift_margin", lambda dtype: 20.0)
    lse_rows, lse_cols = contrastive._row_and_column_lse(L)
    torch.testing.assert_close(lse_rows, torch.logsumexp(L, dim=1), atol=tol, rtol=tol)
    torch.testing.assert_close(lse_cols, torch.logsumexp(L, dim=0), atol=tol, rtol=tol)
    want = torch.softmax(L, dim=1) + torch.softmax(L, dim=0) - 2 * torch.eye(11, dtype=dtype)
    for i, j in contrastive._row_blocks(11, 11):
        got = contrastive._softmax_sum_block(L[i:j], lse_rows[i:j], lse_cols, i)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want[i:j], atol=tol, rtol=tol)
    assert torch.isfinite(lse_rows).all() and torch.isfinite(lse_cols).all()


def test_inner_product_loss_at_a_huge_scale_matches_the_reference():
    """scale 1e4 on the sphere: logits span +-1e4, far past exp's range, so every block takes
    the two-pass branch; loss and gradients (the scale's too) still match the stable
    two-cross-entropy form (the written-out reference would overflow)."""
    topo = topoclip.topology("sphere", dim=16)
    x, y = rand(9, seed=11).requires_grad_(), rand(9, seed=12).requires_grad_()
    log_scale = torch.tensor(9.2103, dtype=torch.float64, requires_grad=True)
    loss = topoclip.ContrastiveLoss(topo)(topo.project(x), topo.project(y), log_scale.exp())
    L = log_scale.exp() * topo.similarity(topo.project(x), topo.project(y))
    labels = torch.arange(9)
    want = 0.5 * (F.cross_entropy(L, labels) + F.cross_entropy(L.T, labels))
    torch.testing.assert_close(loss, want)
    for g, w in zip(torch.autograd.grad(loss, (x, y, log_scale)), torch.autograd.grad(want, (x, y, log_scale))):
        torch.testing.assert_close(g, w)
