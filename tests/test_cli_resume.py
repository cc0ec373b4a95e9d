"""Kill -9 a real `python -m topoclip train` after its first checkpoint, resume it, and get
bit-identical final weights to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from topoclip.data import build_tokenizer, make_shapes
from topoclip.runs.checkpoint import latest_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parent.parent
STEPS = 30

TINY_YAML = f"""
base: {REPO / 'configs' / 'default.yaml'}
data:
  shapes: {{num_train: 96, num_val: 8, num_test: 24}}
model:
  image: {{patch_size: 8, depth: 1, width: 32, heads: 2}}
  text: {{depth: 1, width: 32, heads: 2}}
train: {{steps: {STEPS}, batch_size: 16, checkpoint_every: 5, keep_last: 20}}
optim: {{warmup_steps: 5}}
eval: {{enabled: false}}
logging: {{progress: false, tensorboard: false}}
"""


def _train(*args):
    return [sys.executable, "-m", "topoclip", "train", *args]


@pytest.mark.slow  # three training processes (~30 s): runs in CI's second, `-m slow` step
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    # One tokenizer for both runs: training a WordPiece twice need not give the same vocab.
    tokenizer_dir = tmp_path / "tokenizer"
    data = make_shapes(num_train=96, num_val=8, num_test=24)
    build_tokenizer(data.captions("train"), 1000, 24).save(tokenizer_dir)
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
