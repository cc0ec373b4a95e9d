"""A run directory has one writer, a resume takes only what it can honour, a corrupt newest
checkpoint falls back to an older one, a diverging run stops, and mistakes about devices,
paths and configs are one line before anything is written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.cli import main
from topoclip.runs.checkpoint import list_checkpoints
from topoclip.runs.lock import LOCK_FILE, RunLock, RunLockedError, lock_holder

TINY_DATA = ["data.shapes.num_train=48", "data.shapes.num_val=8", "data.shapes.num_test=16", "train.batch_size=8",
             "eval.enabled=false"]


def _tiny(tmp_path, name, *more):
    return [*TINY_TOWERS, *QUIET_RUN, *TINY_DATA, f"output.dir={tmp_path}", f"output.name={name}", *more]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has it (pids are not reused this fast)


# ------------------------------------------------------------------------------------- lock
def test_a_live_lock_refuses_a_second_writer_and_names_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from topoclip.runs.lock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"in use by process {holder.pid} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Its holder is gone (SIGKILL: no clean-up ran): the lock is stale and taken over.
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over["pid"] == holder.pid
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_honoured_and_says_which_file_to_remove(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(RunLockedError, match=rf"elsewhere.example.*remove {tmp_path / LOCK_FILE}"):
        RunLock(tmp_path).acquire()


def test_an_empty_lock_file_left_by_a_kill_is_stale(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")
    with RunLock(tmp_path) as lock:
        assert lock.took_over == {}
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_resume_into_a_directory_another_run_holds_fails_at_once(tmp_path, capsys):
    assert main(["train", *_tiny(tmp_path, "r"), "train.steps=2"]) == 0
    run = tmp_path / "r"
    before = (run / "results.json").read_bytes()
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # a live process
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 1
    assert f"is in use by process {os.getppid()}" in capsys.readouterr().err
    assert (run / "results.json").read_bytes() == before and len(list_checkpoints(run)) == 1


def test_two_fresh_runs_with_one_name_get_one_directory_each(tmp_path):
    from topoclip.config import load_config
    from topoclip.recipes.common import prepare_run_dir

    config = load_config(overrides=[f"output.dir={tmp_path}", "output.name=same"])
    first, resume, lock = prepare_run_dir(config)
    # This process has locked its directory but written nothing yet: another must not join it.
    other = subprocess.run([sys.executable, "-c",
                            "from topoclip.config import load_config; from topoclip.recipes.common import prepare_run_dir; "
                            f"d, _, _ = prepare_run_dir(load_config(overrides=['output.dir={tmp_path}', 'output.name=same'])); "
                            "print(d.name)"], capture_output=True, text=True, timeout=120)
    assert (first.name, other.stdout.strip(), resume) == ("same", "same-1", False), other.stderr
    lock.release()


def test_the_lock_is_released_when_a_run_ends_and_when_it_fails(tmp_path):
    assert main(["train", *_tiny(tmp_path, "ok"), "train.steps=1"]) == 0
    assert not (tmp_path / "ok" / LOCK_FILE).exists()
    assert main(["train", "--resume", str(tmp_path / "ok"), "train.steps=2", "optim.lr=1"]) == 1  # refused
    assert not (tmp_path / "ok" / LOCK_FILE).exists()
    assert (tmp_path / "ok" / "results.json").is_file()  # a failed resume removes nothing


def test_a_batch_larger_than_the_shapes_is_a_config_error(tmp_path, capsys):
    assert main(["train", *_tiny(tmp_path, "r"), "train.batch_size=64"]) == 2
    assert "train.batch_size: 64 is larger than the training set (data.shapes.num_train=48)" in capsys.readouterr().err
    assert not tmp_path.joinpath("r").exists()


def test_a_fresh_run_whose_set_up_fails_leaves_no_directory_and_the_next_takes_its_name(tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
    pairs.write_text("filepath\ttitle\n" + "".join(f"{i}.png\tcaption {i}\n" for i in range(3)))
    # Three pairs, one held out: a batch of 8 is larger than the data, found once it is read.
    csv = ["data.source=csv", f"data.csv.path={pairs}", "data.csv.holdout=0.3"]
    assert main(["train", *_tiny(tmp_path, "r"), *csv, "train.steps=1"]) == 1
    assert "is larger than the training set (2 pairs)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "r").exists()
    assert main(["train", *_tiny(tmp_path, "r"), *csv, "train.steps=1", "train.batch_size=2"]) == 0
    assert (tmp_path / "r" / "results.json").is_file() and not (tmp_path / "r-1").exists()


# ------------------------------------------------------------------------------ resume rules
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *_tiny(root, "r"), "train.steps=2", "train.checkpoint_every=1", "train.keep_last=5"]) == 0
    return root / "r"


@pytest.mark.parametrize("change, field", [
    (["optim.lr=5e-3"], "optim.lr"),
    (["model.text.width=64"], "model.text.width"),
    (["topology.name=sphere"], "topology.name ('oblique-inner' -> 'sphere')"),
    (["train.seed=3"], "train.seed"),
    (["data.shapes.noise=0.1", "optim.weight_decay=0"], "data.shapes.noise (0.0 -> 0.1), optim.weight_decay"),
])
def test_a_resume_refuses_changes_it_cannot_honour_listing_them(finished_run, capsys, change, field):
    config = (finished_run / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(finished_run), "train.steps=4", *change]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused: " in err and field in err, err
    assert (finished_run / "config.yaml").read_bytes() == config  # nothing recorded
    assert [p.name for p in list_checkpoints(finished_run)][-1] == "step_00000002"  # nothing trained


def test_a_resume_takes_harmless_changes_says_so_and_records_them(tmp_path, capsys):
    assert main(["train", *_tiny(tmp_path, "r"), "train.steps=2"]) == 0
    run = tmp_path / "r"
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=3", "train.checkpoint_every=7"]) == 0
    out = capsys.readouterr().out
    assert "resume: taking the new train.checkpoint_every: 300 -> 7; train.steps: 2 -> 3" in out
    from topoclip.config import load_config
    from topoclip.runs import read_checkpoint_config

    assert load_config(run / "config.yaml").train.steps == 3
    assert read_checkpoint_config(list_checkpoints(run)[-1])["train"]["steps"] == 3


def test_config_beside_resume_is_an_error_not_ignored(finished_run, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text("train: {steps: 9}\n")
    assert main(["train", "--resume", str(finished_run), "--config", str(other)]) == 2
    assert "--config: a resumed run uses its own config" in capsys.readouterr().err


def test_an_empty_saved_config_is_an_error_never_the_defaults(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("")
    assert main(["train", "--resume", str(run)]) == 2
    assert "config.yaml: empty" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "" and sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_flag_form_resume_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    foreign = tmp_path / "w"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["train", *_tiny(tmp_path, "w"), "train.resume=true", "train.steps=1"]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------ checkpoint fallback
@pytest.mark.parametrize("damage", ["zero-byte weights", "truncated state"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one(tmp_path, capsys, damage):
    assert main(["train", *_tiny(tmp_path, "r"), "train.steps=3", "train.checkpoint_every=2", "train.keep_last=5"]) == 0
    run = tmp_path / "r"
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_00000003"
    if damage == "zero-byte weights":
        bad = newest / "model.safetensors"
        bad.write_bytes(b"")
    else:
        bad = newest / "state.pt"
        bad.write_bytes(bad.read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint file {bad} cannot be read" in out and "continuing from the older checkpoint" in out
    assert "resuming" in out and "at step 2/4" in out
    assert json.loads((run / "results.json").read_text())["train"]["steps"] == 4


def test_no_readable_checkpoint_is_an_error_naming_each_file(tmp_path, capsys):
    assert main(["train", *_tiny(tmp_path, "r"), "train.steps=2"]) == 0
    run = tmp_path / "r"
    (list_checkpoints(run)[-1] / "state.pt").write_bytes(b"\x00")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 1
    assert "no checkpoint of this run can be read: checkpoint file" in capsys.readouterr().err


# ------------------------------------------------------------------------------ divergence
def test_a_run_whose_steps_are_all_skipped_stops_with_an_error_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    # A logit scale of 1e30 makes every loss non-finite from the first step.
    args = _tiny(tmp_path, "d", "train.steps=40", "train.checkpoint_every=1", "model.logit_scale.init=1e30",
                 "model.logit_scale.max=null", "model.logit_scale.learnable=false", "train.max_consecutive_skips=5")
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "5 steps in a row skipped" in err and "no checkpoint was written" in err
    assert list_checkpoints(tmp_path / "d") == [] and not (tmp_path / "d" / "results.json").exists()


# ------------------------------------------------------------------- early, one-line errors
@pytest.mark.parametrize("args, message", [
    (["train.device=cuda"], "train.device: cuda:0 asked for, but this machine has no CUDA GPU"),
    (["train.precision=fp16"], "train.precision: fp16 needs a CUDA GPU"),
])
def test_machine_mistakes_are_one_line_before_any_directory(tmp_path, capsys, args, message):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", *_tiny(tmp_path / "runs", "x"), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "runs").exists()


def test_a_run_name_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "x").write_text("mine")
    assert main(["train", *_tiny(tmp_path, "x")]) == 1
    assert f"output.name: {tmp_path / 'x'} is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_an_output_dir_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", *_tiny(a_file, "x")]) == 1
    assert f"output.dir: {a_file} is a file" in capsys.readouterr().err
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    assert main(["train", *_tiny(locked, "x")]) == 1
    assert f"output.dir: {locked} is not writable" in capsys.readouterr().err


# --------------------------------------------------------------------- full and read-only disks
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for the run's start, not for many checkpoints (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_leaves_no_temporaries_and_keeps_the_last_good_checkpoint(small_disk, capsys):
    # Each checkpoint is ~0.9 MiB (weights + Adam moments): the third one does not fit.
    args = _tiny(small_disk, "r", "train.steps=20", "train.checkpoint_every=1", "train.keep_last=20",
                 "logging.jsonl=false")
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write checkpoint" in err and "free on its disk" in err, err
    run = small_disk / "r"
    good = list_checkpoints(run)
    assert good and f"the last good checkpoint {good[-1]} is intact" in err
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
    from topoclip.runs import load_training_state

    assert load_training_state(good[-1])["step"] == len(good)


def test_a_read_only_disk_is_one_line_before_anything_is_made(small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(["train", *_tiny(small_disk / "runs", "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output.dir: {small_disk} is not writable" in err, err
    assert not (small_disk / "runs").exists()


def test_a_batch_the_processes_cannot_share_is_found_before_any_directory(tmp_path):
    from topoclip.config import load_config
    from topoclip.engine.distributed import DistInfo
    from topoclip.recipes.common import check_machine

    config = load_config(overrides=["train.batch_size=10", "train.device=cpu"])
    with pytest.raises(ValueError, match="train.batch_size: 10 is not divisible by the 3 processes"):
        check_machine(config, DistInfo(rank=0, world_size=3, device=__import__("torch").device("cpu")))
    assert str(check_machine(config, DistInfo(rank=0, world_size=2, device=__import__("torch").device("cpu")))) == "cpu"


def test_data_convert_from_a_directory_says_so(tmp_path, capsys):
    assert main(["data", "convert", "--csv", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"pairs file '{tmp_path}' is a directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
