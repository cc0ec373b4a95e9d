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


_LOADED = """
import contextlib, sys
from topoclip.cli import main
with contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(sorted(m for m in ("torch", "timm", "transformers", "torchvision", "open_clip") if m in sys.modules))
"""


@pytest.mark.parametrize("args, allowed", [
    (["--help"], []), (["train", "--help"], []), (["data", "convert", "--help"], []), (["finetune", "--help"], []),
    # the config schema is torch-free: a mistyped key, a wrong type or an unknown topology is
    # answered before any heavy import
    (["train", "optim.lrr=1"], []), (["finetune", "--from", "x", "finetune.methd=ft"], []),
    (["train", "train.steps=many"], []), (["train", "topology.name=spher"], []),
    (["train", "data.shapes.background=grey"], []),
])
def test_help_and_config_errors_answer_without_loading_the_heavy_libraries(args, allowed):
    # `python -X importtime -c "from topoclip.cli import main"` shows where start-up time goes;
    # torch alone is about a second, timm + transformers + torchvision several more.
    proc = subprocess.run([sys.executable, "-c", _LOADED, *args], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip().splitlines()[-1] == repr(allowed), (proc.stdout, proc.stderr)


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


def test_data_convert_writes_shards_that_read_back(tmp_path):
    import json

    from topoclip.cli import main
    from topoclip.data.shapes import make_shapes
    from topoclip.data.shards import shard_pairs

    shapes = ["num_train=10", "num_val=100", "num_test=10"]
    expected = list(make_shapes(None, num_train=10, num_val=100, num_test=10).val.captions)
    out = tmp_path / "shards"
    assert main(["data", "convert", "--shapes", "--out", str(out), "--maxcount", "40", "--split", "val", "--no-shuffle", *shapes]) == 0
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == 3  # 100 samples, 40 per shard
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 40, "shard-000001.tar": 40, "shard-000002.tar": 20}
    captions = [c for _, c in shard_pairs(str(out), image_size=32, shuffle_buffer=0)]
    assert captions == expected
    # By default the order is shuffled (seeded): the same samples, not the file's order.
    mixed = tmp_path / "mixed"
    assert main(["data", "convert", "--shapes", "--out", str(mixed), "--split", "val", *shapes]) == 0
    shuffled = [c for _, c in shard_pairs(str(mixed), image_size=32, shuffle_buffer=0)]
    assert sorted(shuffled) == sorted(expected) and shuffled != expected
    # The recorded count stands in for data.shards.epoch_length.
    from topoclip.config import load_config

    assert load_config(None, ["data.source=shards", f"data.shards.urls={mixed}", "train.batch_size=10"]).data.shards.epoch_length == 100


def test_data_convert_from_csv_keeps_bytes_and_bad_input_errors(tmp_path, capsys):
    from PIL import Image

    from topoclip.cli import main

    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "g.png")
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\ng.png\ta green square\n")
    assert main(["data", "convert", "--csv", str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / "s")]) == 0
    import tarfile

    with tarfile.open(next((tmp_path / "s").glob("*.tar"))) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        assert tar.extractfile(png).read() == (tmp_path / "g.png").read_bytes()
    assert main(["data", "convert", "--csv", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.tsv" in capsys.readouterr().err
    # An image that does not decode is named and left out; the others are written.
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "two.tsv").write_text("filepath\ttitle\ng.png\ta green square\nbad.png\ta broken one\n")
    assert main(["data", "convert", "--csv", str(tmp_path / "two.tsv"), "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples" in out and "bad.png" in out


def test_resume_names_the_command_for_a_run_of_the_other_kind(tmp_path, capsys):
    import json

    run = tmp_path / "ft"
    run.mkdir()
    (run / "config.yaml").write_text("finetune: {method: ft}\n")
    (run / "run.json").write_text(json.dumps({"format": 2, "kind": "finetune"}))
    assert main(["train", "--resume", str(run)]) == 2
    assert f"is a finetune run; continue it with `topoclip finetune --resume {run}`" in capsys.readouterr().err
