"""Product topologies (e.g. sphere x lorentz x euclidean): similarity the sum of the factors',
points and geodesics factor by factor, against the factors computed apart and against Ob(n, m)
(a product of unit spheres with the inner product is the oblique manifold); gradchecks, the
losses (fused, tiled), a learned shared curvature, the config and a tiny run."""

import json

import pytest
import torch

import topoclip
from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.geometry import Euclidean, Lorentz, Oblique, Product, Sphere, Topology, product_topology

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "sphere:4+lorentz:3+euclidean:2+oblique-geodesic:3x2"


def _points(topo, n, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return topo.project(scale * torch.randn(n, topo.dim, generator=g, dtype=dtype))


def _parts(x, dims):
    return torch.split(x, dims, dim=-1)


def test_a_spec_builds_the_factors_side_by_side():
    topo = product_topology(SPEC, curvature=0.5)
    assert [type(f) for f in topo.factors] == [Sphere, Lorentz, Euclidean, Oblique]
    assert topo.dim == 4 + 3 + 2 + 6 and topo.curvature == 0.5 and topo.factors[3].num_blocks == 2
    assert topo.label == "Sphere(4) x Lorentz(3, c=0.5) x Euclidean(2) x Ob(3,2) geodesic"
    assert topo.metrics_by_own_distance and topo.scales_tangent_input and not topo.inner_product
    assert product_topology("sphere:8+oblique-inner:4x2").inner_product
    for bad, match in (("sphere:8", "two or more"), ("sphere+euclidean:4", "not name:dim"), ("sphere:a+euclidean:2", "size 'a'"),
                       ("oblique-inner:8+sphere:2", "sized NxM"), ("sphere:2x2+euclidean:2", "has no blocks"),
                       ("cone:3+sphere:2", "unknown topology 'cone'"), ("product:4+sphere:2", "nests no product")):
        with pytest.raises(ValueError, match=match):
            product_topology(bad)
    with pytest.raises(ValueError, match="given by its factors"):
        topoclip.topology("product", dim=8)


def test_points_similarities_and_geodesics_are_the_factors_own():
    topo = product_topology(SPEC)
    dims = [f.dim for f in topo.factors]
    raw = torch.randn(5, topo.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = topo.project(raw)
    for f, part, got in zip(topo.factors, _parts(raw, dims), _parts(u, dims)):
        torch.testing.assert_close(got, f.project(part))
    v = _points(topo, 5, 1)
    want = sum(f.similarity(a, b) for f, a, b in zip(topo.factors, _parts(u, dims), _parts(v, dims)))
    torch.testing.assert_close(topo.similarity(u, v), want)
    torch.testing.assert_close(topo.paired_similarity(u, v), torch.diagonal(want))
    for t in (0.0, 0.4, 1.0):
        mid = topo.interpolate(u, v, t)
        for f, a, b, got in zip(topo.factors, _parts(u, dims), _parts(v, dims), _parts(mid, dims)):
            torch.testing.assert_close(got, f.interpolate(a, b, t))
    torch.testing.assert_close(topo.interpolate(u, v, 0.0), u)
    torch.testing.assert_close(topo.interpolate(u, v, 1.0), v)
    assert torch.isfinite(topo.interpolate(u, u, 0.3)).all()
    lo, hi = topo.similarity_range
    assert lo == -float("inf") and hi == pytest.approx(1.0)  # the sphere's 1 plus three zeros


def test_a_product_of_unit_spheres_with_the_inner_product_is_the_oblique_manifold():
    product, oblique = Product([Sphere(4), Sphere(4), Sphere(4)]), Oblique(4, 3, "inner")
    u, v = _points(oblique, 6, 2, dtype=torch.float32), _points(oblique, 6, 3, dtype=torch.float32)
    torch.testing.assert_close(product.similarity(u, v), oblique.similarity(u, v))
    torch.testing.assert_close(product.interpolate(u, v, 0.3), oblique.interpolate(u, v, 0.3))
    scale = torch.tensor(5.0)
    fused = topoclip.ContrastiveLoss(product)(u, v, scale)  # inner_product: the fused path
    assert float(fused) == pytest.approx(float(topoclip.ContrastiveLoss(oblique)(u, v, scale)), rel=1e-6)


def test_gradcheck_in_float64_with_a_learned_curvature():
    log_c = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def build(lc):
        return Product([Sphere(3), Lorentz(3, curvature=lambda: lc.exp()), Euclidean(2)])

    topo = build(log_c)
    a, b = (_points(topo, 3, s, scale=0.7).detach().requires_grad_() for s in (4, 5))
    assert torch.autograd.gradcheck(lambda a, b, lc: build(lc).similarity(a, b), (a, b, log_c))
    assert torch.autograd.gradcheck(lambda a, b, lc: build(lc).paired_similarity(a, b), (a, b, log_c))
    assert torch.autograd.gradcheck(lambda a, b, lc: build(lc).interpolate(a, b, 0.3), (a, b, log_c))


def test_the_tangent_maps_act_per_factor_and_a_factor_without_them_says_so():
    topo = product_topology("sphere:4+lorentz:3+euclidean:2")
    x, y, z = (_points(topo, 4, s, scale=0.6) for s in (6, 7, 8))
    torch.testing.assert_close(topo.exp_map(x, topo.log_map(x, y)), y)
    dims = [f.dim for f in topo.factors]
    for f, a, b, c, got in zip(topo.factors, _parts(x, dims), _parts(y, dims), _parts(z, dims),
                               _parts(topo.translate(z, x, y, 0.7), dims)):
        torch.testing.assert_close(got, f.translate(c, a, b, 0.7))

    class Cone(Euclidean):  # a user's topology with no tangent-space maps of its own
        name = "cone"
        _log = _exp = _transport = Topology._log

    with pytest.raises(NotImplementedError, match="cone: tangent-space moves"):
        Product([Sphere(4), Cone(2)]).translate(x[:, :6], x[:, :6], y[:, :6])


def test_tiled_losses_equal_plain_and_the_hyperbolic_factors_share_a_curvature():
    from tests.helpers import assert_tiled_losses_equal_plain

    topo = product_topology("sphere:4+lorentz:4+lorentz:2")
    u, v = _points(topo, 13, 9, dtype=torch.float32), _points(topo, 13, 10, dtype=torch.float32)
    assert_tiled_losses_equal_plain(topo, u, v)
    c = torch.tensor(2.0)
    with topo.curvature_of(c):
        assert all(f.c(u) == 2.0 for f in topo.factors[1:])
        inside = topo.similarity(u, v)
    assert topo.curvature == 1.0 and not torch.allclose(inside, topo.similarity(u, v))


def test_a_config_names_the_factors_and_a_tiny_run_learns_saves_and_reopens(tmp_path):
    from topoclip.config import load_config
    from topoclip.recipes import pretrain

    spec = "sphere:16+lorentz:8+euclidean:8"
    cfg = load_config(None, [*TINY_TOWERS, *QUIET_RUN, "topology.name=product", f"topology.factors={spec}",
                             "topology.curvature=0.5", "data.shapes.num_train=256", "data.shapes.num_val=16",
                             "data.shapes.num_test=32", "train.batch_size=32", "train.steps=80", "optim.lr=2e-3",
                             "eval.enabled=true", "eval.robustness=false", f"output.dir={tmp_path}", "output.name=p"])
    assert cfg.topology.dim == 32
    results = pretrain.run(cfg)
    log = [json.loads(line) for line in (tmp_path / "p" / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert log[-1]["curvature"] != pytest.approx(0.5, abs=1e-6)  # learned, from its start
    assert "shape" in results["eval"]["zeroshot"]
    opened = topoclip.load_run(tmp_path / "p")
    assert opened.topology.label == "Sphere(16) x Lorentz(8, learned c) x Euclidean(8)"
    assert opened.topology.factors[1].curvature is opened.model.curvature
    for bad, match in ((["topology.name=product"], "needs its factors"),
                       (["topology.name=product", f"topology.factors={spec}", "topology.dim=64"], "factors' total 32"),
                       (["topology.name=product", "topology.factors=sphere:4+euclidean:4", "topology.curvature=2"],
                        "no hyperbolic"),
                       (["topology.name=product", "topology.factors=sphere:4"], "topology.factors: product: needs two"),
                       ([f"topology.factors={spec}"], "only a product has factors")):
        with pytest.raises(ValueError, match=match):
            load_config(None, bad)
