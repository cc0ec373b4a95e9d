"""SIGKILL a real training process at each phase of its start-up — before and during the
config write, during the tokenizer save, before the first checkpoint — then resume it the way
a user would, and get final weights bit-identical to an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import shared_tokenizer, tiny_run_yaml
from topoclip.runs.checkpoint import list_checkpoints

STEPS = 12

TINY_YAML = tiny_run_yaml(STEPS, checkpoint_every=4, warmup_steps=3)

# Run `topoclip train` with one function wrapped so that the process kills itself (SIGKILL:
# no clean-up, no finally) at the chosen point. The wrappers touch nothing else.
_KILLER = r"""
import os, signal, sys
from pathlib import Path

phase = sys.argv[1]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if phase == "before-config":
    import topoclip.recipes.common as common
    real_save = common.save_config
    def save_config(config, path):
        if Path(path).name == "config.yaml":
            die()
        return real_save(config, path)
    common.save_config = save_config
elif phase == "during-config":
    import topoclip.atomic as atomic
    real_replace = os.replace
    def replace(src, dst):
        if Path(dst).name == "config.yaml":
            die()  # the temporary file is complete, the rename has not happened
        return real_replace(src, dst)
    atomic.os.replace = replace
elif phase == "during-tokenizer":
    real_write_text = Path.write_text
    def write_text(self, *args, **kwargs):
        if self.name == "topoclip_tokenizer.json":
            die()  # tokenizer.json is written, its settings are not
        return real_write_text(self, *args, **kwargs)
    Path.write_text = write_text
elif phase == "before-first-checkpoint":
    import topoclip.engine.trainer as trainer
    real_step = trainer.Trainer.train_step
    def train_step(self, batch):
        if self.step == 2:
            die()
        return real_step(self, batch)
    trainer.Trainer.train_step = train_step

from topoclip.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    tokenizer_dir = root / "tokenizer"
    shared_tokenizer(tokenizer_dir)  # one tokenizer for every run
    config = root / "tiny.yaml"
    config.write_text(TINY_YAML)
    common = ["--config", str(config), f"output.dir={root / 'runs'}", f"data.tokenizer={tokenizer_dir}"]
    full = subprocess.run([sys.executable, "-m", "topoclip", "train", *common, "output.name=full"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    return root, common


def _weights(run: Path) -> dict[str, torch.Tensor]:
    final = list_checkpoints(run)[-1]
    assert final.name == f"step_{STEPS:08d}"
    return load_file(final / "model.safetensors")


@pytest.mark.slow  # five training processes (~1 min): runs in CI's second, `-m slow` step
@pytest.mark.parametrize("phase, resume_by", [
    # No config landed: the user runs the same command again (with train.resume=true).
    ("before-config", "same command"),
    ("during-config", "same command"),
    # The config landed: `--resume RUN_DIR` works from here on.
    ("during-tokenizer", "run dir"),
    ("before-first-checkpoint", "run dir"),
])
def test_a_kill_at_each_start_up_phase_resumes_to_the_uninterrupted_weights(setting, phase, resume_by):
    root, common = setting
    name = f"killed-{phase}"
    run = root / "runs" / name
    killed = subprocess.run([sys.executable, "-c", _KILLER, phase, *common, f"output.name={name}"], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list_checkpoints(run) == []  # every phase is before the first checkpoint
    if resume_by == "same command":
        args = ["train", *common, f"output.name={name}", "train.resume=true"]
    else:
        args = ["train", "--resume", str(run)]
    resumed = subprocess.run([sys.executable, "-m", "topoclip", *args], cwd=root, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-1000:] + resumed.stderr[-2000:]
    assert not (root / "runs" / f"{name}-1").exists()  # it went on in its own directory
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # the lock and the killed writer's temporaries are gone
    full, ours = _weights(root / "runs" / "full"), _weights(run)
    assert full.keys() == ours.keys()
    for key in full:
        assert torch.equal(full[key], ours[key]), key
