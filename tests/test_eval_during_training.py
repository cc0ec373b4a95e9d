"""Evaluation during training: every eval.every steps on rank 0, logged, the best checkpoint
kept -- and the training trajectory exactly that of a run without it."""

import json

import pytest
import torch
from safetensors.torch import load_file

import topoclip
from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.config import load_config
from topoclip.recipes import pretrain
from topoclip.runs import latest_checkpoint

BASE = [*TINY_TOWERS, *QUIET_RUN, "data.shapes.num_train=96", "data.shapes.num_val=32", "data.shapes.num_test=24",
        "data.shapes.zeroshot_tasks=[shape,colour]", "train.steps=6", "train.batch_size=16", "train.checkpoint_every=0",
        "model.text.dropout=0.2", "eval.robustness=false"]  # dropout: the training draws random numbers


def _run(tmp_path, name, *extra):
    cfg = load_config(None, [*BASE, f"output.dir={tmp_path}", f"output.name={name}", *extra])
    return pretrain.run(cfg), tmp_path / name


def _weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def test_evaluation_every_few_steps_leaves_the_trajectory_unchanged(tmp_path):
    _run(tmp_path, "plain")
    results, run = _run(tmp_path, "evaluated", "eval.every=2", "eval.best=val/loss")
    a, b = _weights(tmp_path / "plain"), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert {"val/loss", "shape/top1", "colour/top1", "shapes-test/i2t_R@1", "shapes-test/t2i_R@5"} <= set(lines[0])
    best_step = min(lines, key=lambda r: r["val/loss"])["step"]
    best = torch.load(run / "checkpoints" / "best" / "state.pt", weights_only=True)["best"]
    assert best == {"step": best_step, "metric": "val/loss", "value": pytest.approx(min(r["val/loss"] for r in lines))}
    opened = topoclip.load_run(run / "checkpoints" / "best")  # the best weights open like any checkpoint
    assert opened.topology.name == "oblique-inner"


def test_the_check_above_would_see_an_evaluation_that_moved_the_random_stream(tmp_path, monkeypatch):
    # Without putting the generators back, the evaluation's DataLoader seed draw shifts the
    # dropout masks of every later step: the weights differ.
    import topoclip.engine.trainer as trainer_module

    _run(tmp_path, "plain")
    monkeypatch.setattr(trainer_module, "restore_rng_state", lambda state: None)
    _run(tmp_path, "leaky", "eval.every=2")
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "leaky")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_eval_best_needs_a_periodic_evaluation_and_a_known_metric(tmp_path):
    with pytest.raises(ValueError, match="eval.best: needs eval.every > 0"):
        load_config(None, ["eval.best=val/loss"])
    with pytest.raises(ValueError, match="eval.best: no metric 'shape/top9'"):
        _run(tmp_path, "bad", "eval.every=3", "eval.best=shape/top9")
    cfg = load_config(None, ["eval.every=10", "eval.best=val/loss"])
    assert not cfg.eval.higher_is_better() and load_config(None, ["eval.every=10", "eval.best=shape/top1"]).eval.higher_is_better()
