"""Training with the sigmoid loss (loss.kind=sigmoid): SigLIP's initialisation follows the
choice, the model carries a learnable bias that is saved and reopened, and a tiny run's loss
falls on every topology."""

import json

import pytest
import torch

import topoclip
from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.config import load_config
from topoclip.recipes import pretrain
from topoclip.recipes.common import build_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [*TINY_TOWERS, *QUIET_RUN, "data.shapes.num_train=256", "data.shapes.num_val=16", "data.shapes.num_test=32",
        "train.batch_size=32", "eval.enabled=false"]


def test_the_sigmoid_loss_brings_siglip_s_initialisation_and_a_bias():
    cfg = load_config(None, ["loss.kind=sigmoid"])
    assert (cfg.model.logit_bias, cfg.model.logit_scale.init) == (-10.0, 10.0)
    assert isinstance(build_loss(cfg, cfg.topology.build()), topoclip.losses.SigmoidLoss)
    given = load_config(None, ["loss.kind=sigmoid", "model.logit_scale.init=5", "model.logit_bias=-3"])
    assert (given.model.logit_bias, given.model.logit_scale.init) == (-3.0, 5.0)
    assert load_config(None, []).model.logit_bias is None
    with pytest.raises(ValueError, match="loss.kind: unknown loss 'hinge'"):
        load_config(None, ["loss.kind=hinge"])
    with pytest.raises(ValueError, match="model.logit_bias: only the sigmoid loss"):
        load_config(None, ["model.logit_bias=-10"])


@pytest.mark.parametrize("topology", [["topology.name=sphere", "topology.dim=32"], ["topology.name=euclidean", "topology.dim=32"],
                                      [], ["topology.name=oblique-geodesic"], ["topology.name=lorentz", "topology.dim=32", "train.steps=80"]])
def test_a_tiny_sigmoid_run_learns_on_every_topology_and_keeps_its_bias(tmp_path, topology):
    # (hyperbolic points start near the origin, where MERU's feature scale puts them: 80 steps)
    cfg = load_config(None, [*TINY, "loss.kind=sigmoid", "train.steps=40", "optim.lr=2e-3", *topology,
                             f"output.dir={tmp_path}", "output.name=s"])
    pretrain.run(cfg)
    log = [json.loads(line) for line in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert all("bias" in r for r in log)
    opened = topoclip.load_run(tmp_path / "s")
    assert opened.model.logit_bias is not None
    assert opened.model.logit_bias.value == pytest.approx(log[-1]["bias"], abs=1e-3)
    assert opened.model.logit_bias.value != -10.0


def test_sigmoid_runs_resume_exactly(tmp_path):
    import shutil

    from topoclip.runs.checkpoint import latest_checkpoint

    common = [*TINY, "loss.kind=sigmoid", "train.steps=6", f"output.dir={tmp_path}", "train.checkpoint_every=3",
              "train.keep_last=5"]
    pretrain.run(load_config(None, [*common, "output.name=full"]))
    pretrain.run(load_config(None, [*common, "output.name=part"]))
    shutil.rmtree(latest_checkpoint(tmp_path / "part"))  # as if it had died after step 3
    assert latest_checkpoint(tmp_path / "part").name.endswith("3")
    pretrain.run(load_config(None, [*common, "output.name=part", "train.resume=true"]), run_dir=tmp_path / "part")
    a = topoclip.load_run(tmp_path / "full").model.state_dict()
    b = topoclip.load_run(tmp_path / "part").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["logit_bias.bias"] != -10.0


def test_a_tiny_softmax_run_learns_in_hyperbolic_space(tmp_path):
    cfg = load_config(None, [*TINY, "topology.name=lorentz", "topology.dim=32", "train.steps=80", "optim.lr=2e-3",
                             f"output.dir={tmp_path}", "output.name=h", "eval.enabled=true", "eval.robustness=false"])
    results = pretrain.run(cfg)
    log = [json.loads(line) for line in (tmp_path / "h" / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert results["eval"]["retrieval"]["i2t_R@1"] >= 0 and "shape" in results["eval"]["zeroshot"]
    assert topoclip.load_run(tmp_path / "h").topology.name == "lorentz"
