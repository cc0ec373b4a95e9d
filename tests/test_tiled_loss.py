"""Tiled loss = plain loss (values and gradients, including the scale's) for every topology."""

from __future__ import annotations

import pytest
import torch

import topoclip
from topoclip.losses.tiled import tiled_contrastive_loss, tiled_cross_entropy

SPECS = {
    "sphere": dict(dim=12),
    "euclidean": dict(dim=12),
    "oblique-inner": dict(n=4, m=3),
    "oblique-geodesic": dict(n=4, m=3),
    "lorentz": dict(dim=12),
}


def run(loss_fn, topo, x, y, log_scale, multi_token=False):
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    w = log_scale.clone().requires_grad_()
    u, v = topo.project(x), topo.project(y)
    if multi_token:
        u, v = topo.blocks(u), topo.blocks(v)
    loss = loss_fn(u, v, w.exp())
    loss.backward()
    return loss.detach(), x.grad, y.grad, w.grad


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("tile", [1, 4, 7, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_tiled_equals_plain(name, tile, dtype, tol):
    topo = topoclip.topology(name, **SPECS[name])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 12, generator=g, dtype=dtype), torch.randn(13, 12, generator=g, dtype=dtype)
    x[5] = y[5]  # an identical pair: the geodesic's and Euclidean's singular point
    log_scale = torch.tensor(2.3, dtype=dtype)
    plain = run(topoclip.ContrastiveLoss(topo, tile_threshold=None), topo, x, y, log_scale)
    tiled = run(topoclip.ContrastiveLoss(topo, tile_threshold=0, tile_size=tile), topo, x, y, log_scale)
    for p, t in zip(plain, tiled):
        torch.testing.assert_close(t, p, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["oblique-inner", "oblique-geodesic"])
def test_tiled_multi_token_layout(name):
    topo = topoclip.topology(name, **SPECS[name])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 12, generator=g, dtype=torch.float64), torch.randn(9, 12, generator=g, dtype=torch.float64)
    log_scale = torch.tensor(1.0, dtype=torch.float64)
    plain = run(topoclip.ContrastiveLoss(topo, tile_threshold=None), topo, x, y, log_scale, multi_token=True)
    tiled = run(topoclip.ContrastiveLoss(topo, tile_threshold=0, tile_size=4), topo, x, y, log_scale, multi_token=True)
    for p, t in zip(plain, tiled):
        torch.testing.assert_close(t, p)


@pytest.mark.parametrize("name", ["oblique-geodesic", "sphere", "oblique-inner", "euclidean", "lorentz"])
def test_tiled_gradcheck(name):
    """Through the topology's autograd (geodesic) and the written-out GEMM path of the
    inner-product topologies, scale included, in float64; 7 rows in tiles of 3."""
    topo = topoclip.topology(name, **SPECS[name])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    def f(a, b, s):
        return tiled_contrastive_loss(topo, topo.project(a), topo.project(b), s.exp(), tile=3)
    assert torch.autograd.gradcheck(f, (x, y, w))


def test_tiled_cross_entropy_equals_row_cross_entropy():
    topo = topoclip.topology("euclidean", dim=12)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(11, 12, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 4, 5, 6, 7])
    want = torch.nn.functional.cross_entropy(2.0 * topo.similarity(q, k), labels)
    got = tiled_cross_entropy(topo, q, k, labels, torch.tensor(2.0, dtype=torch.float64), tile=3)
    torch.testing.assert_close(got, want)
    gw = torch.autograd.grad(want, (q, k))
    gg = torch.autograd.grad(got, (q, k))
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)


def test_tiled_peak_memory_does_not_hold_the_matrix():
    """Saved tensors of the tiled graph are O(b d): no b x b tensor is kept for backward."""
    topo = topoclip.topology("sphere", dim=8)
    b = 512
    u = topo.project(torch.randn(b, 8)).requires_grad_()
    v = topo.project(torch.randn(b, 8)).requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = tiled_contrastive_loss(topo, u, v, torch.tensor(10.0), tile=64)
    assert max(sizes) < b * b / 8
    loss.backward()
    assert torch.isfinite(u.grad).all()


@pytest.mark.parametrize("columns", [True, False])
def test_tiled_inner_product_path_equals_autograd_path(columns):
    """The fused inner-product function and the generic one (each tile recomputed through the
    topology's autograd) give the same three means and the same gradients, with positives off
    the diagonal (the local-loss layout)."""
    from topoclip.losses.tiled import _TiledInnerProductLogSumExp, _TiledLogSumExp

    topo = topoclip.topology("oblique-inner", **SPECS["oblique-inner"])
    g = torch.Generator().manual_seed(5)
    u = topo.project(torch.randn(6, 12, generator=g, dtype=torch.float64))
    v = topo.project(torch.randn(11, 12, generator=g, dtype=torch.float64))
    labels = torch.tensor([2, 3, 4, 5, 6, 7])
    weights = torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)
    results = []
    for fn in (_TiledInnerProductLogSumExp, _TiledLogSumExp):
        a, b = u.clone().requires_grad_(), v.clone().requires_grad_()
        s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        out = fn.apply(a, b, s, labels, topo, 4, columns)
        (out * weights).sum().backward()
        results.append((out.detach(), a.grad, b.grad, s.grad))
    for fused, generic in zip(*results):
        torch.testing.assert_close(fused, generic, atol=1e-12, rtol=1e-12)


def test_tiled_cross_entropy_inner_product_equals_row_cross_entropy():
    topo = topoclip.topology("sphere", dim=12)
    g = torch.Generator().manual_seed(6)
    q = topo.project(torch.randn(5, 12, generator=g, dtype=torch.float64)).requires_grad_()
    k = topo.project(torch.randn(11, 12, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([3, 4, 5, 6, 7])
    scale = torch.tensor(4.0, dtype=torch.float64)
    want = torch.nn.functional.cross_entropy(scale * q @ k.T, labels)
    got = tiled_cross_entropy(topo, q, k, labels, scale, tile=3)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["oblique-inner", "euclidean"])
@pytest.mark.parametrize("log_scale", [2.3, 8.0])  # 8.0: logits spread past one exp's range (two passes)
def test_one_exp_and_two_pass_tiles_both_equal_plain(monkeypatch, name, log_scale):
    """Each tile takes one exp pass for its rows and columns (forward) and for both softmax terms
    (backward) unless its logits spread too far for one shift; both branches are exact."""
    import topoclip.losses.tiled as tiled

    calls = {"one": 0, "two": 0}
    one_exp = tiled._one_exp_update

    def counting(*args):
        out = one_exp(*args)
        calls["one" if out is not None else "two"] += 1
        return out

    monkeypatch.setattr(tiled, "_one_exp_update", counting)
    topo = topoclip.topology(name, **SPECS[name])
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(13, 12, generator=g, dtype=torch.float64), torch.randn(13, 12, generator=g, dtype=torch.float64)
    w = torch.tensor(log_scale, dtype=torch.float64)
    plain = run(topoclip.ContrastiveLoss(topo, tile_threshold=None), topo, x, y, w)
    tiled_run = run(topoclip.ContrastiveLoss(topo, tile_threshold=0, tile_size=4), topo, x, y, w)
    for p, t in zip(plain, tiled_run):
        torch.testing.assert_close(t, p, atol=1e-10, rtol=1e-10)
    assert calls["one"] > 0 and (calls["two"] > 0) == (log_scale > 5)


@pytest.mark.parametrize("name", ["euclidean", "oblique-geodesic", "lorentz"])
@pytest.mark.parametrize("columns", [True, False])
def test_tiled_kernel_path_equals_autograd_path(name, columns):
    """The tiles formed by the topology's blocked kernel (and its fused CPU passes) and by its
    autograd give the same three means and gradients, with positives off the diagonal,
    duplicate points and a coincident positive. (A negative that coincides with an image has
    a distance of rounding noise from a GEMM, its direction noise in any implementation:
    test_fused_distance_loss checks it stays finite.)"""
    from topoclip.losses.tiled import _TiledKernelLogSumExp, _TiledLogSumExp

    topo = topoclip.topology(name, **SPECS[name])
    g = torch.Generator().manual_seed(6)
    u = topo.project(0.5 * torch.randn(6, 12, generator=g, dtype=torch.float64))
    v = topo.project(0.5 * torch.randn(11, 12, generator=g, dtype=torch.float64))
    u[1] = u[0]          # duplicate images
    v[4] = u[2]          # row 2's positive (label 4) coincides with it
    labels = torch.tensor([2, 3, 4, 5, 6, 7])
    weights = torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)
    kernel = topo.blocked_kernel
    results = []
    for fn in (_TiledKernelLogSumExp, _TiledLogSumExp):
        a, b = u.clone().requires_grad_(), v.clone().requires_grad_()
        s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        if fn is _TiledKernelLogSumExp:
            out = fn.apply(a, b, s, labels, topo.paired_similarity(a, b[labels]), 4, columns, kernel, *kernel.inputs(a))
        else:
            out = fn.apply(a, b, s, labels, topo, 4, columns)
        (out * weights).sum().backward()
        results.append((out.detach(), a.grad, b.grad, s.grad))
    for fused, generic in zip(*results):
        assert torch.isfinite(fused).all()
        torch.testing.assert_close(fused, generic, atol=1e-10, rtol=1e-10)


def test_tiled_kernel_path_gradchecks_with_a_learned_curvature():
    from topoclip.geometry import Lorentz

    g = torch.Generator().manual_seed(7)
    u = Lorentz(4).project(0.5 * torch.randn(7, 4, generator=g, dtype=torch.float64)).requires_grad_()
    v = Lorentz(4).project(0.5 * torch.randn(7, 4, generator=g, dtype=torch.float64)).requires_grad_()
    args = (u, v, torch.tensor(0.5, dtype=torch.float64, requires_grad=True), torch.tensor(0.3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(
        lambda u, v, s, c: tiled_contrastive_loss(Lorentz(4, curvature=lambda: c.exp()), u, v, s.exp(), tile=3), args)
