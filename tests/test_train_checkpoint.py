"""Checkpoints: round trip, weights-only loading, atomic writes, retention; the resumable sampler."""

import random

import numpy as np
import pytest
import torch
from torch import nn

import topoclip
from topoclip.engine.optim import build_optimizer, build_scheduler
from topoclip.engine.sampler import EpochBatchSampler
from topoclip.runs import checkpoint as ckpt_mod
from topoclip.runs.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    load_weights,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.tied = nn.Linear(3, 3, bias=False)
        self.tied_again = self.tied  # a shared tensor: safetensors must cope
        self.logit_scale = topoclip.LogitScale(init=10.0, learnable=False)


def _trained():
    torch.manual_seed(0)
    net = _Net()
    opt = build_optimizer(net, lr=1e-2, weight_decay=0.1)
    sched = build_scheduler(opt, 2, 10)
    for _ in range(3):
        loss = net.tied(net.fc(torch.randn(5, 4))).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net, opt, sched


def _state(opt, sched):
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": capture_rng_state(), "note": [1, 2.5]}


def test_round_trip(tmp_path):
    net, opt, sched = _trained()
    path = save_checkpoint(tmp_path, 3, net, _state(opt, sched), {"a": {"b": 1}})
    assert path.name == "step_00000003"

    torch.manual_seed(123)  # a different init
    net2 = _Net()
    opt2 = build_optimizer(net2, lr=1e-2, weight_decay=0.1)
    sched2 = build_scheduler(opt2, 2, 10)
    load_weights(net2, path)
    state = load_training_state(path)  # torch.load(weights_only=True) inside
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    for (name, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), name
    assert net2.tied_again is net2.tied
    assert state["step"] == 3 and state["note"] == [1, 2.5]
    assert sched2.get_last_lr() == sched.get_last_lr()
    # Same optimizer state -> the same next update.
    x = torch.randn(5, 4)
    for model, optimizer in ((net, opt), (net2, opt2)):
        optimizer.zero_grad()
        model.tied(model.fc(x)).pow(2).sum().backward()
        optimizer.step()
    assert torch.equal(net.fc.weight, net2.fc.weight)


def test_state_file_needs_no_pickle(tmp_path):
    net, opt, sched = _trained()
    path = save_checkpoint(tmp_path, 1, net, _state(opt, sched), {})
    torch.load(path / "state.pt", weights_only=True)  # raises if anything needs unpickling code
    from safetensors.torch import load_file

    assert set(load_file(path / "model.safetensors")) >= {"fc.weight", "fc.bias", "logit_scale.log_scale"}


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    torch.rand(7), random.random(), np.random.rand(5)  # move every generator on
    restore_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2])


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    net, opt, sched = _trained()
    first = save_checkpoint(tmp_path, 1, net, _state(opt, sched), {"v": 1})
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:  # half a file, then the "disk" fails
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with torch.no_grad():
        net.fc.weight.add_(1.0)
    with pytest.raises(ckpt_mod.CheckpointWriteError, match=r"cannot write checkpoint .*step_00000002: disk full \(.* MiB free"):
        save_checkpoint(tmp_path, 2, net, _state(opt, sched), {"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # no temp dir, no step 2
    assert latest_checkpoint(tmp_path) == first
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_half_written_temporary_is_ignored(tmp_path):
    net, opt, sched = _trained()
    good = save_checkpoint(tmp_path, 5, net, _state(opt, sched), {})
    (tmp_path / ".tmp-step_00000010-999").mkdir()  # a writer killed mid-way
    (tmp_path / "step_00000011").mkdir()  # no state file: incomplete, not a checkpoint
    assert latest_checkpoint(tmp_path) == good
    ckpt_mod.remove_stale_temporaries(tmp_path)
    assert not (tmp_path / ".tmp-step_00000010-999").exists()


def test_keep_last_and_resolve(tmp_path):
    net, opt, sched = _trained()
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        save_checkpoint(root, step, net, _state(opt, sched), {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    last = root / "step_00000040"
    assert resolve_checkpoint(tmp_path) == last  # run dir
    assert resolve_checkpoint(root) == last  # checkpoints dir
    assert resolve_checkpoint(last / "model.safetensors") == last  # a file in it
    assert resolve_checkpoint(root / "step_00000030") == root / "step_00000030"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


def test_load_weights_rejects_other_model(tmp_path):
    net, opt, sched = _trained()
    path = save_checkpoint(tmp_path, 1, net, _state(opt, sched), {})
    with pytest.raises(ValueError, match="do not match"):
        load_weights(nn.Linear(4, 3), path)


def test_sampler_is_a_function_of_seed_and_epoch():
    full = list(EpochBatchSampler(103, 10, seed=7, epoch=2))
    assert len(full) == 10 and all(len(b) == 10 for b in full)  # last partial batch dropped
    assert len({i for b in full for i in b}) == 100
    assert list(EpochBatchSampler(103, 10, seed=7, epoch=2)) == full
    assert list(EpochBatchSampler(103, 10, seed=7, epoch=2, start_batch=4)) == full[4:]
    assert list(EpochBatchSampler(103, 10, seed=7, epoch=3)) != full
    assert list(EpochBatchSampler(103, 10, seed=8, epoch=2)) != full
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(5, 10, seed=0)
