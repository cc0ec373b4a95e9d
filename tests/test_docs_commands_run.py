"""Every `topoclip` command in the README and docs/ runs as written, at a tiny size: in one
working directory, in the order the pages give them (the commands after `topoclip data digits`
use what it wrote; `--resume`, `eval`, `report` and `finetune` use the runs the earlier commands
left). Only sizes are changed: tiny towers, a few steps, small benchmark batches. Commands that
need files only a user has (OpenCLIP or Hugging Face weights) are left to the parse-and-validate
check in test_docs_examples.py; the user's own pairs, class folders and Karpathy JSON are
stood in for by the digits that `topoclip data digits` writes."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest

from tests.helpers import QUIET_RUN, TINY_TOWERS
from tests.test_docs_examples import COMMANDS, ROOT
from topoclip.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# Weights files and directories that only a user has.
USER_WEIGHTS = ("ViT-B-32.safetensors", "ViT-B-32.pt", "./clip-vit-base-patch32", "source.image_weights=vit_small.safetensors")

TINY_DATA = ["data.shapes.num_train=64", "data.shapes.num_val=16", "data.shapes.num_test=16"]
TINY_TRAIN = [*TINY_TOWERS, *QUIET_RUN, *TINY_DATA, "train.steps=2", "train.batch_size=8", "eval.batch_size=32",
              "eval.robustness=false"]
TINY_FINETUNE = [*TINY_DATA, "train.steps=2", "train.batch_size=8", "finetune.gap_pairs=16", "eval.robustness=false"]
# Benchmark flags whose page values take minutes or gigabytes: their tiny stand-ins.
TINY_FLAGS = {"--batch": ["16"], "--dim": ["32"], "--repeats": ["1"], "--limit-gib": ["4"], "--chunk": ["8"],
              "--start": ["16"], "--max": ["32"], "--steps": ["1"], "--tile-size": ["8"], "--pretrain-steps": ["2"],
              "--seeds": ["1"], "--temperatures": ["0.05,0.1"]}


def tiny(argv: list[str]) -> list[str]:
    """The command at a tiny size: benchmark flags replaced, size overrides appended."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        if flag == "--full":  # a size preset: the tiny sizes below replace it
            i += 1
            continue
        if flag in TINY_FLAGS:
            out += [flag, *TINY_FLAGS[flag]]
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                i += 1  # the page's values (nargs="+" for bench loss --batch)
            continue
        out.append(flag)
        i += 1
    command = out[0]
    if command == "train":
        out += TINY_TRAIN
    elif command == "finetune":
        out += TINY_FINETUNE
    elif command == "finetune-demo":
        for flag, value in (("--pretrain-steps", "2"), ("--steps", "1"), ("--seeds", "1")):
            if flag not in out:
                out[1:1] = [flag, value]
        out += TINY_FINETUNE
    elif command == "ablate" and "--list" not in out:
        # The grid's first run (its own warm-up is longer than 2 steps). The options go before
        # the overrides: argparse ends the key=value list at the next option.
        from topoclip.analysis.grid import load_grid

        grid = out[out.index("--grid") + 1]
        out[1:1] = ["--only", load_grid(ROOT / grid if grid.startswith("configs/") else grid).runs[0].name]
        out += [*TINY_TRAIN, "optim.warmup_steps=1"]
    elif out[:2] == ["bench", "train-step"]:
        out += ["--model", "topoclip-bench-small"] if "--model" not in out else []
    elif out[:2] == ["bench", "max-batch"]:
        out += [*TINY_TOWERS]
    return out


def runnable() -> list[tuple[str, list[str]]]:
    found = []
    for page, command in COMMANDS:
        argv = shlex.split(command)[1:]
        argv = [a.strip("[]") for a in argv]  # [--max 131072]: the optional parts, taken
        if any(weights in argv for weights in USER_WEIGHTS):
            continue
        found.append((page, argv))
    # The digits first: the stand-ins for the user's own files are made from them.
    found.sort(key=lambda item: item[1][:2] != ["data", "digits"])
    return found


def _stand_ins(work: Path) -> None:
    """pairs.tsv, pets/train, a Karpathy JSON and its images: the user's files, from the digits."""
    digits = work / "digits"
    (work / "pairs.tsv").write_text((digits / "train.tsv").read_text())
    (work / "images").symlink_to(digits / "images")  # pairs.tsv's relative image paths
    (work / "pets").mkdir()
    (work / "pets" / "train").symlink_to(digits / "train")
    with open(digits / "train.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    images = [{"filename": Path(r["filepath"]).name, "split": "train" if i % 4 else "test",
               "sentences": [{"raw": r["title"]}, {"raw": f"a picture of {r['title']}"}]} for i, r in enumerate(rows[:200])]
    (work / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    (work / "flickr30k-images").symlink_to(digits / "images")


def test_every_documented_command_runs_at_a_tiny_size(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    ran, failed = [], []
    # `--resume runs/default`, `eval --checkpoint runs/default`: the pages assume the README's
    # first run has happened.
    assert main(["train", *TINY_TRAIN]) == 0 and (tmp_path / "runs" / "default").is_dir()
    for page, argv in runnable():
        argv = tiny(argv)
        code = main(argv)
        (ran if code == 0 else failed).append(f"{page}: topoclip {shlex.join(argv)} -> {code}")
        if argv[:2] == ["data", "digits"] and not (tmp_path / "pairs.tsv").exists():
            _stand_ins(tmp_path)
    assert not failed, "\n".join(failed)
    assert len(ran) >= 25
    assert (tmp_path / "runs" / "digits" / "results.jsonl").is_file()
    assert (tmp_path / "runs" / "ablation" / "table3" / "report.html").is_file()
