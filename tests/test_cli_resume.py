"""Kill -9 a real `python -m topoclip train` after its first checkpoint, resume it, and get
bit-identical final weights to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import shared_tokenizer, tiny_run_yaml
from topoclip.runs.checkpoint import latest_checkpoint, list_checkpoints

STEPS = 30

TINY_YAML = tiny_run_yaml(STEPS, checkpoint_every=5, warmup_steps=5)


def _train(*args):
    return [sys.executable, "-m", "topoclip", "train", *args]


@pytest.mark.slow  # three training processes (~30 s): runs in CI's second, `-m slow` step
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    shared_tokenizer(tokenizer_dir)  # one tokenizer for every run
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    common = ["--config", str(config), f"output.dir={tmp_path / 'runs'}", f"data.tokenizer={tokenizer_dir}"]

    full = subprocess.run(_train(*common, "output.name=full"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    killed_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(
        _train(*common, "output.name=killed"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(killed_dir) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = int(latest_checkpoint(killed_dir).name.split("_")[1])
    assert stopped_at < STEPS, "the run finished before it was killed: the test proved nothing"

    resumed = subprocess.run(_train("--resume", str(killed_dir)), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {killed_dir} at step {stopped_at}/{STEPS}" in resumed.stdout

    final_full = load_file(list_checkpoints(tmp_path / "runs" / "full")[-1] / "model.safetensors")
    final_resumed = load_file(list_checkpoints(killed_dir)[-1] / "model.safetensors")
    assert list_checkpoints(killed_dir)[-1].name == f"step_{STEPS:08d}"
    assert final_full.keys() == final_resumed.keys()
    for name in final_full:
        assert torch.equal(final_full[name], final_resumed[name]), name


def test_resuming_a_finished_run_keeps_its_results_and_a_longer_run_goes_on(tmp_path, capsys):
    from tests.helpers import QUIET_RUN, TINY_TOWERS
    from topoclip.cli import main

    tiny = [*TINY_TOWERS, *QUIET_RUN, "data.shapes.num_train=48", "data.shapes.num_val=8", "data.shapes.num_test=16",
            "train.batch_size=8", "eval.robustness=false", f"output.dir={tmp_path}", "output.name=done"]
    run = tmp_path / "done"
    assert main(["train", *tiny, "train.steps=2"]) == 0
    written = (run / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "is finished (step 2/2); its results are kept" in capsys.readouterr().out
    assert (run / "results.json").read_bytes() == written  # not the summary of zero steps
    assert main(["train", "--resume", str(run), "train.steps=3"]) == 0
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000003"
    import json

    assert json.loads((run / "results.json").read_text())["train"]["steps"] == 3
