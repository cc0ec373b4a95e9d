"""Log map, exp map, parallel transport and translation on every topology, against plain
formulas of the unit sphere (per block on Ob(n, m)) and the flat space."""

import math

import pytest
import torch

import topoclip

TOPOLOGIES = [("sphere", {}), ("oblique-inner", {"m": 3}), ("oblique-geodesic", {"m": 3}), ("euclidean", {})]


def _topo(name, options):
    return topoclip.topology(name, dim=12, **options)


def _points(topo, n=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return topo.project(torch.randn(n, 12, generator=g, dtype=dtype))


def _sphere_log(x, y):
    """Reference: log_x(y) = theta / sin(theta) (y - cos(theta) x), one pair of unit vectors."""
    cos = max(-1.0, min(1.0, sum(a * b for a, b in zip(x, y))))
    theta = math.acos(cos)
    if theta < 1e-12:
        return [0.0] * len(x)
    return [theta / math.sin(theta) * (b - cos * a) for a, b in zip(x, y)]


def _sphere_exp(x, v):
    norm = math.sqrt(sum(c * c for c in v))
    if norm < 1e-15:
        return list(x)
    return [math.cos(norm) * a + math.sin(norm) * c / norm for a, c in zip(x, v)]


def _per_block(fn, topo, *rows):
    n = topo.block_dim
    out = []
    for k in range(topo.num_blocks):
        out += fn(*(r[k * n:(k + 1) * n] for r in rows))
    return out


@pytest.mark.parametrize("name, options", TOPOLOGIES)
def test_log_and_exp_match_the_reference_formulas_and_invert_each_other(name, options):
    topo = _topo(name, options)
    x, y = _points(topo, seed=1), _points(topo, seed=2)
    log = topo.log_map(x, y)
    for i in range(x.shape[0]):
        xi, yi = x[i].tolist(), y[i].tolist()
        if name == "euclidean":
            want_log, want_exp = [b - a for a, b in zip(xi, yi)], yi
        else:
            want_log = _per_block(_sphere_log, topo, xi, yi)
            want_exp = _per_block(_sphere_exp, topo, xi, log[i].tolist())
        torch.testing.assert_close(log[i], torch.tensor(want_log, dtype=torch.float64))
        torch.testing.assert_close(topo.exp_map(x, log)[i], torch.tensor(want_exp, dtype=torch.float64))
    torch.testing.assert_close(topo.exp_map(x, log), y)  # exp_x(log_x(y)) = y
    if name != "euclidean":  # the log is tangent: orthogonal to x in every block
        assert (topo.blocks(x) * topo.blocks(log)).sum(-1).abs().max() < 1e-12


@pytest.mark.parametrize("name, options", TOPOLOGIES)
def test_transport_keeps_lengths_and_tangency_and_translate_from_a_is_the_geodesic(name, options):
    topo = _topo(name, options)
    a, b, c = _points(topo, seed=3), _points(topo, seed=4), _points(topo, seed=5)
    v = topo.log_map(a, c)
    moved = topo.transport(a, b, v)
    torch.testing.assert_close(topo.blocks(moved).norm(dim=-1), topo.blocks(v).norm(dim=-1))
    if name != "euclidean":
        assert (topo.blocks(b) * topo.blocks(moved)).sum(-1).abs().max() < 1e-12
        # transporting the direction a -> b gives the direction continuing past b
        torch.testing.assert_close(topo.transport(a, b, topo.log_map(a, b)), -topo.log_map(b, a))
    for lam in (0.0, 0.3, 1.0):
        torch.testing.assert_close(topo.translate(a, a, b, lam), topo.interpolate(a, b, lam))
    out = topo.translate(c, a, b, 0.7)
    if name == "euclidean":
        torch.testing.assert_close(out, c + 0.7 * (b - a))
    else:  # on the manifold, and the identity when a = b
        torch.testing.assert_close(topo.blocks(out).norm(dim=-1), torch.ones(5, topo.num_blocks, dtype=torch.float64))
        torch.testing.assert_close(topo.translate(c, a, a, 0.7), c)


@pytest.mark.parametrize("name, options", TOPOLOGIES[:2])
def test_the_maps_are_finite_at_identical_and_antipodal_points_and_in_half_precision(name, options):
    topo = _topo(name, options)
    x = _points(topo, dtype=torch.float32)
    for y in (x, -x):
        for out in (topo.log_map(x, y), topo.translate(x, x, y, 0.5), topo.transport(x, y, topo.log_map(x, y.flip(0)))):
            assert torch.isfinite(out).all()
    half = topo.translate(x.half(), x.flip(0).half(), x.roll(1, 0).half(), 1.0)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


@pytest.mark.parametrize("name, options", TOPOLOGIES[1:2] + TOPOLOGIES[3:])
def test_translate_gradcheck_in_float64(name, options):
    topo = _topo(name, options)
    x, a, b = (_points(topo, n=3, seed=s).requires_grad_() for s in (6, 7, 8))
    assert torch.autograd.gradcheck(lambda x, a, b: topo.translate(x, a, b, 0.6), (x, a, b))


# ----------------------------------------------------------------------- the hyperboloid
# Reference maps of the hyperboloid <X, X>_L = -1/c in full coordinates X = (x_0, x_s), in plain
# Python; topoclip stores points and tangent vectors by their space parts.

def _full(xs, c):
    return [math.sqrt(1.0 / c + sum(a * a for a in xs)), *xs]


def _minkowski(x, y):
    return -x[0] * y[0] + sum(a * b for a, b in zip(x[1:], y[1:]))


def _lorentz_log(xs, ys, c):
    x, y = _full(xs, c), _full(ys, c)
    inner = _minkowski(x, y)
    dist = math.acosh(max(1.0, -c * inner)) / math.sqrt(c)
    w = [b + c * inner * a for a, b in zip(x, y)]
    norm = math.sqrt(max(0.0, _minkowski(w, w)))
    return [dist * e / norm for e in w][1:] if norm > 0 else [0.0] * len(xs)


def _lorentz_exp(xs, vs, c):
    x = _full(xs, c)
    v = [sum(a * b for a, b in zip(xs, vs)) / x[0], *vs]  # tangent: <x, v>_L = 0
    r = math.sqrt(c * max(0.0, _minkowski(v, v)))
    if r == 0:
        return list(xs)
    return [math.cosh(r) * a + math.sinh(r) / r * e for a, e in zip(x, v)][1:]


def _lorentz_transport(as_, bs, vs, c):
    a, b = _full(as_, c), _full(bs, c)
    v = [sum(p * q for p, q in zip(as_, vs)) / a[0], *vs]
    coef = _minkowski(b, v) / (1.0 / c - _minkowski(a, b))
    return [e + coef * (p + q) for e, p, q in zip(v, a, b)][1:]


@pytest.mark.parametrize("c", [1.0, 0.3, 2.5])
def test_lorentz_maps_match_the_hyperboloids_formulas(c):
    topo = topoclip.geometry.Lorentz(6, curvature=c)
    g = torch.Generator().manual_seed(0)
    x, y, z = (topo.project(0.6 * torch.randn(5, 6, generator=g, dtype=torch.float64)) for _ in range(3))
    log, moved = topo.log_map(x, y), topo.transport(x, y, topo.log_map(x, z))
    for i in range(5):
        xi, yi, zi = x[i].tolist(), y[i].tolist(), z[i].tolist()
        torch.testing.assert_close(log[i], torch.tensor(_lorentz_log(xi, yi, c), dtype=torch.float64))
        torch.testing.assert_close(topo.exp_map(x, log)[i], torch.tensor(_lorentz_exp(xi, log[i].tolist(), c), dtype=torch.float64))
        want = _lorentz_transport(xi, yi, _lorentz_log(xi, zi, c), c)
        torch.testing.assert_close(moved[i], torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(topo.exp_map(x, log), y)  # exp_x(log_x(y)) = y
    torch.testing.assert_close(topo.transport(x, y, log), -topo.log_map(y, x))
    for lam in (0.0, 0.3, 1.0):
        torch.testing.assert_close(topo.translate(x, x, y, lam), topo.interpolate(x, y, lam))
    torch.testing.assert_close(topo.translate(z, x, x, 0.7), z)


def test_lorentz_maps_are_finite_at_identical_points_the_origin_and_in_half_precision_and_gradcheck():
    topo = topoclip.geometry.Lorentz(6)
    g = torch.Generator().manual_seed(1)
    x = topo.project(torch.randn(4, 6, generator=g))
    origin = torch.zeros(4, 6)
    for a, b in ((x, x), (origin, x), (x, origin), (origin, origin)):
        for out in (topo.log_map(a, b), topo.translate(a, a, b, 0.5), topo.transport(a, b, topo.log_map(a, b.flip(0)))):
            assert torch.isfinite(out).all()
    assert topo.log_map(x, x).abs().max() == 0
    half = topo.translate(x.half(), x.flip(0).half(), x.roll(1, 0).half(), 1.0)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    p, a, b = (topo.project(0.5 * torch.randn(3, 6, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda p, a, b: topo.translate(p, a, b, 0.6), (p, a, b))
