"""AdamW parameter groups and the cosine schedule with linear warm-up."""

import math

import pytest
import torch
from torch import nn

import topoclip
from topoclip.engine.optim import build_optimizer, build_scheduler, cosine_warmup_factor, no_weight_decay_names, param_groups


class _Declares(nn.Module):
    """A submodule that lists a 2-d parameter in timm's no_weight_decay() convention."""

    def __init__(self):
        super().__init__()
        self.special_table = nn.Parameter(torch.zeros(3, 4))
        self.proj = nn.Linear(4, 4)

    def no_weight_decay(self):
        return {"special_table"}


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 2, 8))  # 3-d: only the name says "no decay"
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.embeddings = nn.Module()
        self.embeddings.position_embeddings = nn.Embedding(10, 8)
        self.embeddings.word_embeddings = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8, bias=False)
        self.logit_scale = topoclip.LogitScale()
        self.sub = _Declares()
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_no_decay_names():
    names = no_weight_decay_names(_Toy())
    assert names == {
        "cls_token",
        "pos_embed",
        "embeddings.position_embeddings.weight",
        "norm.weight",
        "norm.bias",
        "fc.bias",
        "logit_scale.log_scale",
        "sub.special_table",
        "sub.proj.bias",
    }


def test_param_groups_partition_trainable_params():
    model = _Toy()
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.3)}
    assert groups["decay"]["weight_decay"] == 0.3 and groups["no_decay"]["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for p in groups["decay"]["params"]}
    assert decay == {"embeddings.word_embeddings.weight", "fc.weight", "head.weight", "sub.proj.weight"}
    everything = decay | {by_id[id(p)] for p in groups["no_decay"]["params"]}
    assert everything == {n for n, p in model.named_parameters() if p.requires_grad}


def test_weight_decay_really_skips_no_decay_group():
    # With zero gradients, AdamW changes a parameter only through decay: p <- p (1 - lr wd).
    model = _Toy()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.fc.weight, torch.full_like(model.fc.weight, 1 - 0.1 * 0.5))
    assert torch.equal(model.cls_token, torch.ones_like(model.cls_token))
    assert torch.equal(model.logit_scale.log_scale, torch.tensor(1.0))


def _reference(step, warmup, total, peak, floor):
    # Independent statement of the schedule: linear ramp to the peak over `warmup` updates,
    # then cosine from peak to floor*peak over the remaining updates.
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    return floor * peak + (peak - floor * peak) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_cosine_schedule_matches_formula(floor):
    peak, warmup, total = 2e-3, 10, 110
    param = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=peak)
    sched = build_scheduler(opt, warmup, total, "cosine", floor)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(peak / warmup)  # first update already moves
    assert seen[warmup - 1] == pytest.approx(peak)  # end of warm-up = peak
    assert seen[warmup] == pytest.approx(peak)  # start of the cosine
    assert seen[warmup + 50] == pytest.approx(peak * (1 + floor) / 2)  # half way down
    assert opt.param_groups[0]["lr"] == pytest.approx(floor * peak, abs=1e-12)  # after the last update
    for step, lr in enumerate(seen):
        assert lr == pytest.approx(_reference(step, warmup, total, peak, floor), rel=1e-9, abs=1e-15)
    assert max(seen) == pytest.approx(peak)


def test_constant_schedule_and_no_warmup():
    assert cosine_warmup_factor(0, 0, 10) == 1.0
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, 4, 100, "constant")
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="schedule.name"):
        build_scheduler(opt, 4, 100, "linear")


def test_logit_scale_lr_gets_its_own_group_and_follows_the_schedule():
    model = _Toy()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, scale_lr=0.05)
    groups = {g["name"]: g for g in opt.param_groups}
    assert [p for p in groups["logit_scale"]["params"]] == [model.logit_scale.log_scale]
    assert groups["logit_scale"]["lr"] == 0.05 and groups["logit_scale"]["weight_decay"] == 0.0
    assert all(model.logit_scale.log_scale is not p for p in groups["no_decay"]["params"])
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10)
    # the scale's lr is its own peak times the same warm-up/cosine factor as everyone else's
    assert groups["logit_scale"]["lr"] == pytest.approx(0.05 * cosine_warmup_factor(0, 2, 10))
    model.logit_scale.log_scale.grad = torch.ones_like(model.logit_scale.log_scale)
    before = model.logit_scale.log_scale.detach().clone()
    opt.step()
    sched.step()
    # Adam's first step moves by ~lr: the scale's own lr, not optim.lr
    assert (before - model.logit_scale.log_scale.detach()).item() == pytest.approx(0.025, rel=1e-3)
    assert groups["logit_scale"]["lr"] == pytest.approx(0.05 * cosine_warmup_factor(1, 2, 10))
