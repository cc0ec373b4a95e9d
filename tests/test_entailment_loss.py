"""MERU's entailment cone on the hyperboloid: aperture and exterior angle against plain
formulas, zero loss inside the cone, finite gradients at the origin and for coincident
points, and the term in a training run."""

import json
import math

import pytest
import torch

from topoclip.geometry import Lorentz
from topoclip.losses.entailment import entailment_loss, exterior_angle, half_aperture


def _time(x, c):
    return math.sqrt(1 / c + sum(a * a for a in x))


def _ref_aperture(t, c, k=0.1):
    return math.asin(min(1.0, 2 * k / (math.sqrt(c) * math.sqrt(sum(a * a for a in t)))))


def _ref_angle(t, v, c):
    t0, v0 = _time(t, c), _time(v, c)
    ci = c * (sum(a * b for a, b in zip(t, v)) - t0 * v0)
    cos = (v0 + ci * t0) / (math.sqrt(sum(a * a for a in t)) * math.sqrt(ci * ci - 1))
    return math.acos(max(-1.0, min(1.0, cos)))


@pytest.mark.parametrize("c", [1.0, 0.4])
def test_aperture_and_angle_match_the_formulas(c):
    topo = Lorentz(5, curvature=c)
    g = torch.Generator().manual_seed(0)
    t = topo.project(torch.randn(4, 5, generator=g, dtype=torch.float64))
    v = topo.project(torch.randn(4, 5, generator=g, dtype=torch.float64))
    ap, ang = half_aperture(topo, t), exterior_angle(topo, t, v)
    for i in range(4):
        assert float(ap[i]) == pytest.approx(_ref_aperture(t[i].tolist(), c), rel=1e-6)
        assert float(ang[i]) == pytest.approx(_ref_angle(t[i].tolist(), v[i].tolist(), c), rel=1e-5, abs=1e-6)


def test_an_image_further_out_along_the_caption_s_ray_is_inside_the_cone():
    topo = Lorentz(4)
    direction = torch.tensor([[1.0, 2.0, -1.0, 0.5]], dtype=torch.float64)
    text, image = topo.project(0.5 * direction), topo.project(1.5 * direction)  # same ray, further out
    # 0 up to the clamp that keeps acos off 1 (acos(1 - 1e-6) = 1.4e-3)
    assert float(exterior_angle(topo, text, image)) == pytest.approx(0.0, abs=2e-3)
    assert float(entailment_loss(topo, text, image)) == 0.0
    behind = topo.project(-1.5 * direction)  # on the other side of the origin: far outside
    assert float(entailment_loss(topo, text, behind)) > 1.0


def test_finite_gradients_at_the_origin_and_for_coincident_points():
    topo = Lorentz(4)
    for t in (torch.zeros(3, 4), topo.project(torch.randn(3, 4))):
        t = t.clone().requires_grad_()
        v = t.detach().clone().requires_grad_()
        loss = entailment_loss(topo, t, v)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(t.grad).all() and torch.isfinite(v.grad).all()


def test_the_entailment_term_in_a_run_and_its_config_rules(tmp_path):
    from tests.helpers import QUIET_RUN, TINY_TOWERS
    from topoclip.config import load_config
    from topoclip.recipes import pretrain

    with pytest.raises(ValueError, match="loss.entailment: the entailment cone lives in hyperbolic space"):
        load_config(None, ["loss.entailment=0.2"])
    cfg = load_config(None, [*TINY_TOWERS, *QUIET_RUN, "topology.name=lorentz", "topology.dim=32", "loss.entailment=0.2",
                             "data.shapes.num_train=64", "data.shapes.num_val=8", "data.shapes.num_test=16",
                             "train.batch_size=16", "train.steps=4", "eval.enabled=false", f"output.dir={tmp_path}",
                             "output.name=m"])
    pretrain.run(cfg)
    log = [json.loads(line) for line in (tmp_path / "m" / "log.jsonl").read_text().splitlines()]
    assert all("loss_entailment" in r and r["loss_entailment"] >= 0 for r in log)
