"""The Lorentz model of hyperbolic space: reference formulas in plain Python, points on the
hyperboloid, float64 gradchecks, finiteness at coincident points, the origin and large
norms, the geodesic, and the losses on it."""

import math

import pytest
import torch

import topoclip
from topoclip.geometry import Lorentz


def _ref_time(x, c):
    return math.sqrt(1.0 / c + sum(a * a for a in x))


def _ref_distance(x, y, c):
    inner = sum(a * b for a, b in zip(x, y)) - _ref_time(x, c) * _ref_time(y, c)
    return math.acosh(max(1.0, -c * inner)) / math.sqrt(c)


def _ref_exp0(v, c):
    norm = math.sqrt(sum(a * a for a in v))
    if norm == 0:
        return list(v)
    r = math.sqrt(c) * norm
    return [math.sinh(r) / r * a for a in v]


def _points(topo, n, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return topo.project(scale * torch.randn(n, topo.dim, generator=g, dtype=dtype))


@pytest.mark.parametrize("c", [1.0, 0.3, 2.5])
def test_project_similarity_and_paired_match_the_reference_formulas(c):
    topo = Lorentz(6, curvature=c)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = topo.project(raw)
    for i in range(4):
        torch.testing.assert_close(x[i], torch.tensor(_ref_exp0(raw[i].tolist(), c), dtype=torch.float64))
    # on the hyperboloid: <x, x>_L = -1/c
    full = (x * x).sum(-1) - topo.time(x) ** 2
    torch.testing.assert_close(full, torch.full((4,), -1.0 / c, dtype=torch.float64), atol=1e-6, rtol=0)
    y = _points(topo, 4, 1)
    sim = topo.similarity(x, y)
    for i in range(4):
        for j in range(4):
            assert float(sim[i, j]) == pytest.approx(-_ref_distance(x[i].tolist(), y[j].tolist(), c), rel=1e-9, abs=1e-9)
    torch.testing.assert_close(topo.paired_similarity(x, y), torch.diagonal(sim))


def test_the_paired_distance_keeps_full_precision_for_near_identical_points():
    topo = Lorentz(8)
    x = _points(topo, 3, 2, dtype=torch.float32)
    y = x + 1e-4 * torch.randn(3, 8)  # space parts 1e-4 apart
    got = -topo.paired_similarity(x, y)
    want = -topo.paired_similarity(x.double(), y.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)  # the GEMM form would be off by far more


def test_geodesic_goes_from_a_to_b_at_constant_speed_and_stays_on_the_hyperboloid():
    topo = Lorentz(5, curvature=0.7)
    a, b = _points(topo, 6, 3, scale=1.5), _points(topo, 6, 4, scale=1.5)
    torch.testing.assert_close(topo.interpolate(a, b, 0.0), a)
    torch.testing.assert_close(topo.interpolate(a, b, 1.0), b)
    d = -topo.paired_similarity(a, b)
    for t in (0.25, 0.6):
        w = topo.interpolate(a, b, t)
        torch.testing.assert_close(-topo.paired_similarity(a, w), t * d)
        torch.testing.assert_close(-topo.paired_similarity(w, b), (1 - t) * d)
    torch.testing.assert_close(topo.interpolate(a, a, 0.4), a)  # finite and fixed at a = b


def test_finite_at_coincident_points_the_origin_and_large_norms():
    topo = Lorentz(8)
    origin = torch.zeros(2, 8, requires_grad=True)
    far = topo.project(torch.full((2, 8), 50.0)).detach().requires_grad_()  # radius clamped
    assert torch.isfinite(far).all()
    for x in (origin, far):
        for out in (topo.similarity(x, x), topo.paired_similarity(x, x), topo.interpolate(x, x.flip(0), 0.5)):
            assert torch.isfinite(out).all()
            out.sum().backward(retain_graph=True)
            assert torch.isfinite(x.grad).all()
            x.grad = None
    assert float(topo.paired_similarity(far, far).abs().max()) == 0.0


def test_gradcheck_in_float64():
    topo = Lorentz(4, curvature=1.3)
    a, b = _points(topo, 3, 5).requires_grad_(), _points(topo, 3, 6).requires_grad_()
    assert torch.autograd.gradcheck(topo.similarity, (a, b))
    assert torch.autograd.gradcheck(topo.paired_similarity, (a, b))
    assert torch.autograd.gradcheck(lambda a, b: topo.interpolate(a, b, 0.3), (a, b))
    raw = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(topo.project, (raw,))


def test_a_learnable_curvature_gets_gradients_through_the_distance():
    log_c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    topo = Lorentz(4, curvature=lambda: log_c.exp())
    a, b = _points(Lorentz(4), 3, 7), _points(Lorentz(4), 3, 8)
    assert torch.autograd.gradcheck(lambda lc: Lorentz(4, curvature=lambda: lc.exp()).paired_similarity(a, b), (log_c,))
    topo.similarity(a, b).sum().backward()
    assert log_c.grad is not None and torch.isfinite(log_c.grad)


def test_tiled_losses_equal_plain_on_lorentz():
    from tests.helpers import assert_tiled_losses_equal_plain

    topo = topoclip.topology("lorentz", dim=8)
    u, v = _points(topo, 13, 9, dtype=torch.float32), _points(topo, 13, 10, dtype=torch.float32)
    assert_tiled_losses_equal_plain(topo, u, v)


def test_the_curvature_module_is_clamped_to_a_decade_either_side():
    from topoclip.temperature import Curvature

    c = Curvature(2.0)
    assert c.value == pytest.approx(2.0)
    with torch.no_grad():
        c.log_c.fill_(10.0)
    assert c.value == pytest.approx(20.0)  # forward clamps
    c.clamp_()
    assert float(c.log_c) == pytest.approx(math.log(20.0))
    with pytest.raises(ValueError, match="curvature"):
        Curvature(0.0)


def test_a_run_learns_its_curvature_saves_and_reopens_it(tmp_path):
    import json

    from tests.helpers import QUIET_RUN, TINY_TOWERS
    from topoclip.config import load_config
    from topoclip.recipes import pretrain

    cfg = load_config(None, [*TINY_TOWERS, *QUIET_RUN, "topology.name=lorentz", "topology.dim=32", "topology.curvature=0.5",
                             "data.shapes.num_train=128", "data.shapes.num_val=8", "data.shapes.num_test=16",
                             "train.batch_size=32", "train.steps=8", "optim.lr=5e-3", "eval.enabled=false",
                             f"output.dir={tmp_path}", "output.name=h"])
    pretrain.run(cfg)
    log = [json.loads(line) for line in (tmp_path / "h" / "log.jsonl").read_text().splitlines()]
    assert log[0]["curvature"] == pytest.approx(0.5, rel=0.05) and log[-1]["curvature"] != log[0]["curvature"]
    opened = topoclip.load_run(tmp_path / "h")
    assert opened.topology.curvature is opened.model.curvature  # the topology reads the model's
    assert opened.model.curvature.value == pytest.approx(log[-1]["curvature"], rel=1e-3)
    assert 0.05 <= opened.model.curvature.value <= 5.0
    fixed = load_config(None, ["topology.name=lorentz", "topology.dim=32", "topology.learn_curvature=false"])
    assert fixed.topology.build().learn_curvature is False
    with pytest.raises(ValueError, match="only the lorentz topology has a curvature"):
        load_config(None, ["topology.curvature=2"])


def test_uniformity_and_alignment_use_the_geodesic_distance_in_hyperbolic_space():
    from topoclip.eval.geometry_metrics import alignment, geometry_report, uniformity

    topo = Lorentz(4)
    a, b = _points(topo, 5, 12), _points(topo, 5, 13)
    d = -topo.paired_similarity(a, b)
    assert alignment(a, b, topology=topo) == pytest.approx(float((d ** 2).mean()))
    x = torch.cat([a, b])
    sq = topo.similarity(x, x) ** 2
    off = ~torch.eye(10, dtype=torch.bool)
    want = float(torch.logsumexp(-2.0 * sq[off], 0) - math.log(90))
    assert uniformity(a, b, topology=topo) == pytest.approx(want)
    assert alignment(a, b) != pytest.approx(alignment(a, b, topology=topo))  # not the Euclidean one
    assert set(geometry_report(a, b, topo)) == {"alignment", "uniformity", "relative_alignment", "modality_gap"}


def test_a_model_on_the_hyperboloid_scales_its_features_by_a_learnable_alpha():
    from topoclip.models import ModelConfig, build_model
    from topoclip.models.dual_encoder import TokenProjection

    head = TokenProjection(32, 1, topoclip.topology("lorentz", dim=16))
    assert float(head.log_alpha.exp()) == pytest.approx(16 ** -0.5)
    tokens = torch.randn(3, 1, 32)
    want = head.topology.project(head.linear(tokens[:, 0]) * 16 ** -0.5)
    torch.testing.assert_close(head(tokens), want)
    with torch.no_grad():
        head.log_alpha.fill_(2.0)  # alpha is capped at 1
    torch.testing.assert_close(head(tokens), head.topology.project(head.linear(tokens[:, 0])))
    assert TokenProjection(32, 1, topoclip.topology("sphere", dim=16)).log_alpha is None
    cfg = ModelConfig.from_dict({"image": {"img_size": 16, "patch_size": 8, "depth": 1, "width": 32, "heads": 2},
                                 "text": {"width": 32, "depth": 1, "heads": 2, "context_length": 8}})
    model = build_model(cfg, topoclip.topology("lorentz", dim=16), vocab_size=30)
    assert {"image_proj.log_alpha", "text_proj.log_alpha"} <= set(dict(model.named_parameters()))
    assert {"image_proj.log_alpha", "text_proj.log_alpha"} <= model.no_weight_decay_names()
