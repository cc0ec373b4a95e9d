"""Geometry: every similarity against a straightforward formula, gradients, ranges, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import topoclip
from topoclip.geometry import Topology

N, M = 4, 3
D = N * M
SPECS = {
    "sphere": dict(dim=D),
    "euclidean": dict(dim=D),
    "oblique-inner": dict(n=N, m=M),
    "oblique-geodesic": dict(n=N, m=M),
}
NAMES = list(SPECS)
MANIFOLDS = ["sphere", "oblique-inner", "oblique-geodesic"]


def make(name: str) -> Topology:
    return topoclip.topology(name, **SPECS[name])


def rand(b: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(b, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def blocks_of(name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The unit-sphere factors of a point as the test sees them (independent of the library)."""
    if name == "sphere":
        return [x]
    return [x[k * N:(k + 1) * N] for k in range(M)]


def reference_similarity(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """Plain-Python formulas, one pair at a time."""
    if name == "euclidean":
        return -math.sqrt(sum((float(p) - float(q)) ** 2 for p, q in zip(a, b)))
    if name in ("sphere", "oblique-inner"):
        return sum(float(p) * float(q) for p, q in zip(a, b))
    total = 0.0
    for ak, bk in zip(blocks_of(name, a), blocks_of(name, b)):
        c = sum(float(p) * float(q) for p, q in zip(ak, bk))
        total += math.acos(max(-1.0, min(1.0, c))) ** 2
    return -math.sqrt(total)


def reference_project(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "euclidean":
        return x.clone()
    out = []
    for blk in blocks_of(name, x):
        out.append(blk / math.sqrt(sum(float(v) ** 2 for v in blk)))
    return torch.cat(out)


@pytest.mark.parametrize("name", NAMES)
def test_similarity_matches_reference_formula(name):
    topo = make(name)
    u, v = topo.project(rand(5, 1)), topo.project(rand(4, 2))
    got = topo.similarity(u, v)
    assert got.shape == (5, 4)
    want = torch.tensor([[reference_similarity(name, a, b) for b in v] for a in u], dtype=got.dtype)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(topo.paired_similarity(u, v[:1].expand(5, -1)), want[:, 0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_project_matches_reference_and_is_idempotent(name):
    topo = make(name)
    x = rand(6, 3)
    u = topo.project(x)
    want = torch.stack([reference_project(name, row) for row in x])
    torch.testing.assert_close(u, want)
    torch.testing.assert_close(topo.project(u), u)


@pytest.mark.parametrize("name", NAMES)
def test_block_layout_equals_flat_layout(name):
    topo = make(name)
    x = rand(5, 4)
    u_flat = topo.project(x)
    u_blk = topo.project(x.view(5, M, N))
    assert u_blk.shape == (5, M, N)
    torch.testing.assert_close(u_blk.reshape(5, D), u_flat)
    v = topo.project(rand(3, 5))
    torch.testing.assert_close(topo.similarity(u_blk, v.view(3, M, N)), topo.similarity(u_flat, v))


@pytest.mark.parametrize("name", NAMES)
def test_similarity_gradcheck_float64(name):
    topo = make(name)
    x, y = rand(4, 6).requires_grad_(), rand(3, 7).requires_grad_()
    # Through project, so that the geodesic sees unit blocks for every perturbation.
    assert torch.autograd.gradcheck(lambda a, b: topo.similarity(topo.project(a), topo.project(b)), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: topo.paired_similarity(topo.project(a), topo.project(b)), (x, rand(4, 9).requires_grad_()))
    if name != "oblique-geodesic":  # the other similarities are defined off the manifold too
        assert torch.autograd.gradcheck(topo.similarity, (x, y))


@pytest.mark.parametrize("name", NAMES)
def test_symmetry_and_self_similarity(name):
    topo = make(name)
    u, v = topo.project(rand(5, 8)), topo.project(rand(5, 9))
    torch.testing.assert_close(topo.similarity(u, v), topo.similarity(v, u).T)
    self_sim = topo.paired_similarity(u, u)
    if name == "euclidean" or name == "oblique-geodesic":
        torch.testing.assert_close(self_sim, torch.zeros(5, dtype=u.dtype), atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(self_sim, torch.full((5,), float(topo.num_blocks), dtype=u.dtype))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(NAMES), scale=st.floats(1e-3, 1e3))
def test_similarity_within_range(seed, name, scale):
    topo = make(name)
    u = topo.project(rand(6, seed) * scale)
    v = topo.project(rand(6, seed + 1) * scale)
    S = topo.similarity(u, v)
    lo, hi = topo.similarity_range
    assert torch.isfinite(S).all()
    assert (S >= lo - 1e-9).all() and (S <= hi + 1e-9).all()


def test_ranges():
    assert make("sphere").similarity_range == (-1.0, 1.0)
    assert make("euclidean").similarity_range == (-math.inf, 0.0)
    assert make("oblique-inner").similarity_range == (-3.0, 3.0)
    assert make("oblique-geodesic").similarity_range == pytest.approx((-math.pi * math.sqrt(3), 0.0))


@pytest.mark.parametrize("name", MANIFOLDS)
def test_range_endpoints_are_attained(name):
    topo = make(name)
    u = topo.project(rand(1, 11))
    lo, hi = topo.similarity_range
    torch.testing.assert_close(topo.similarity(u, u).squeeze(), torch.tensor(hi, dtype=u.dtype))
    torch.testing.assert_close(topo.similarity(u, -u).squeeze(), torch.tensor(lo, dtype=u.dtype))


# ----------------------------------------------------------------------- degenerate inputs

def _grads(topo, x, y):
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    S = topo.similarity(topo.project(x), topo.project(y))
    S.sum().backward()
    return S, x.grad, y.grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["identical", "antipodal", "near-duplicate", "zero"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_finite_at_degenerate_points(name, case, dtype):
    topo = make(name)
    x = rand(4, 12, dtype)
    if case == "identical":
        y = x.clone()
    elif case == "antipodal":
        y = -x
    elif case == "near-duplicate":
        y = x + 1e-7 * rand(4, 13, dtype)
    else:
        x = torch.zeros_like(x)
        y = torch.zeros_like(x)
    S, gx, gy = _grads(topo, x, y)
    assert torch.isfinite(S).all()
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    paired = topo.paired_similarity(topo.project(x), topo.project(y))
    assert torch.isfinite(paired).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_geodesic_gradient_is_the_limit_for_near_duplicates(dtype):
    """Single block, theta -> 0: -d(theta)/dx = (y - (x.y) x)/sin(theta) -> unit tangent.

    Clamping the cosine gives zero here and plain autograd gives NaN; the right answer is a
    unit-length tangent pointing from x towards y."""
    topo = topoclip.topology("oblique-geodesic", n=N, m=1)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=dtype, requires_grad=True)
    eps = 1e-6 if dtype == torch.float64 else 2e-3
    y = torch.tensor([[math.cos(eps), math.sin(eps), 0.0, 0.0]], dtype=dtype)
    want = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=dtype)
    topo.similarity(topo.project(x), topo.project(y)).sum().backward()
    # The matrix form takes angles from cosines: fp32 resolves them to ~sqrt(eps).
    torch.testing.assert_close(x.grad, want, atol=1e-3 if dtype == torch.float64 else 2e-2, rtol=0)
    x.grad = None
    topo.paired_similarity(topo.project(x), topo.project(y)).sum().backward()
    torch.testing.assert_close(x.grad, want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", ["euclidean", "oblique-geodesic"])
def test_gradient_is_zero_subgradient_at_exact_coincidence(name):
    topo = make(name)
    x = topo.project(rand(1, 14))
    _, gx, _ = _grads(topo, x, x)
    torch.testing.assert_close(gx, torch.zeros_like(gx))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(name, dtype):
    topo = make(name)
    x, y = rand(5, 15, torch.float32).to(dtype), rand(5, 16, torch.float32).to(dtype)
    u, v = topo.project(x), topo.project(y)
    assert u.dtype == torch.float32
    S = topo.similarity(u, v)
    assert S.dtype == torch.float32 and torch.isfinite(S).all()
    ref = topo.similarity(topo.project(x.double()), topo.project(y.double()))
    torch.testing.assert_close(S.double(), ref, atol=1e-3 if name != "euclidean" else 1e-2, rtol=1e-3)
    w = topo.interpolate(u.to(dtype), v.to(dtype), 0.3)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert torch.isfinite(topo.similarity(x, x)).all()


def test_zero_vector_projects_onto_the_manifold():
    for name in MANIFOLDS:
        topo = make(name)
        u = topo.project(torch.zeros(2, D))
        norms = torch.linalg.vector_norm(topo.blocks(u), dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


# ----------------------------------------------------------------------- interpolation

def reference_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    theta = math.acos(max(-1.0, min(1.0, float(a @ b))))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


@pytest.mark.parametrize("name", NAMES)
def test_interpolate_matches_reference_and_hits_endpoints(name):
    topo = make(name)
    a, b = topo.project(rand(3, 17)), topo.project(rand(3, 18))
    torch.testing.assert_close(topo.interpolate(a, b, 0.0), a)
    torch.testing.assert_close(topo.interpolate(a, b, 1.0), b)
    for t in (0.25, 0.7):
        got = topo.interpolate(a, b, t)
        if name == "euclidean":
            want = (1 - t) * a + t * b
        else:
            want = torch.stack([
                torch.cat([reference_slerp(ak, bk, t) for ak, bk in zip(blocks_of(name, ra), blocks_of(name, rb))])
                for ra, rb in zip(a, b)
            ])
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", MANIFOLDS)
def test_interpolate_geodesic_properties(name):
    """Stays on the manifold and moves at constant speed: d(a, w_t) = t d(a, b) per block."""
    topo = make(name)
    a, b = topo.project(rand(4, 19)), topo.project(rand(4, 20))
    t = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=a.dtype)
    w = topo.interpolate(a, b, t)
    norms = torch.linalg.vector_norm(topo.blocks(w), dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    def ang(p, q):
        return torch.arccos((topo.blocks(p) * topo.blocks(q)).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(ang(a, w), t[:, None] * ang(a, b), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_interpolate_gradcheck_float64(name):
    topo = make(name)
    a, b = topo.project(rand(3, 21)).requires_grad_(), topo.project(rand(3, 22)).requires_grad_()
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, s: topo.interpolate(x, y, s), (a, b, t))


@pytest.mark.parametrize("name", MANIFOLDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_interpolate_finite_at_identical_and_antipodal(name, dtype):
    topo = make(name)
    a = topo.project(rand(3, 23, torch.float64)).to(dtype)
    for b, label in ((a.clone(), "identical"), (-a, "antipodal")):
        a_ = a.clone().float().requires_grad_() if dtype == torch.float16 else a.clone().requires_grad_()
        b_ = b.clone().float().requires_grad_() if dtype == torch.float16 else b.clone().requires_grad_()
        for t in (0.0, 0.5, 1.0):
            w = topo.interpolate(a_, b_, t)
            assert torch.isfinite(w).all(), label
            norms = torch.linalg.vector_norm(topo.blocks(w), dim=-1)
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-3, rtol=0)
            w.sum().backward()
            assert torch.isfinite(a_.grad).all() and torch.isfinite(b_.grad).all(), label
            a_.grad = b_.grad = None
        torch.testing.assert_close(topo.interpolate(a_, b_, 1.0).detach(), b_.detach(), atol=1e-3, rtol=0)
        if label == "identical":
            torch.testing.assert_close(topo.interpolate(a_, b_, 0.5).detach(), a_.detach(), atol=1e-3, rtol=0)


def test_interpolate_rejects_bad_t_shape():
    topo = make("sphere")
    a = topo.project(rand(3, 24))
    with pytest.raises(ValueError, match="shape"):
        topo.interpolate(a, a, torch.ones(4))


# ----------------------------------------------------------------------- construction errors

@pytest.mark.parametrize(
    "name,kw,msg",
    [
        ("cosine", dict(dim=8), "unknown topology 'cosine'"),
        ("oblique-inner", dict(n=4, m=3, dim=13), "n\\*m"),
        ("oblique-geodesic", dict(n=4, m=0), "m"),
        ("oblique-inner", dict(dim=10, m=3), "not divisible"),
        ("oblique-inner", dict(n=4), "m .* required"),
        ("sphere", dict(dim=0), "dim"),
        ("sphere", dict(n=4, m=2), "sphere"),
    ],
)
def test_invalid_spec_raises_value_error_naming_the_problem(name, kw, msg):
    with pytest.raises(ValueError, match=msg):
        topoclip.topology(name, **kw)


def test_feature_dimension_mismatch_is_reported():
    topo = make("oblique-inner")
    with pytest.raises(ValueError, match="expected \\[..., 12\\] or \\[..., 3, 4\\]"):
        topo.project(torch.randn(2, 10))
    with pytest.raises(ValueError, match="equally many"):
        topo.paired_similarity(topo.project(rand(2)), topo.project(rand(3)))


def test_dim_and_m_build_the_same_oblique_as_n_and_m():
    a = topoclip.topology("oblique-inner", dim=12, m=3)
    assert (a.block_dim, a.num_blocks, a.dim) == (4, 3, 12)
