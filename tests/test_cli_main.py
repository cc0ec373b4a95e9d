"""The `topoclip` command: help, one-line errors with exit code 2, argument handling."""

import subprocess
import sys
from pathlib import Path

import pytest

from topoclip.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


def test_python_dash_m_and_console_script_share_main():
    proc = subprocess.run([sys.executable, "-m", "topoclip", "train", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    assert "--config" in proc.stdout and "--resume" in proc.stdout and "key=value" in proc.stdout


@pytest.mark.parametrize(
    "args, field",
    [
        (["optim.lrr=1"], "optim.lrr: unknown key"),
        (["topology.n=5", "topology.dim=128"], "topology.dim: n*m = 5*8 = 40"),
        (["model.num_tokens=4"], "model.num_tokens: multi-token models need num_tokens == topology.m"),
        (["train.batch_size=0"], "train.batch_size"),
        (["--config", "no/such.yaml"], "file not found: no/such.yaml"),
        (["--resume", "optim.lr=-1"], "optim.lr: must be > 0"),  # --resume does not swallow an override
        (["noequals"], "expected key=value"),
    ],
)
def test_bad_config_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys, args, field):
    monkeypatch.chdir(REPO)
    code = main(["train", *args, f"output.dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("topoclip train: error: ") and field in err
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_resume_of_a_non_run_dir(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topoclip eval: error: checkpoint:") and err.count("\n") == 1
