"""The run directory as a library format: kind and version, opening runs without the trainer,
and runs written in the 0.1.0 layout (no run.json)."""

import json
import subprocess
import sys

import pytest
import torch

import topoclip
from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.config import load_config
from topoclip.models import load_pretrained
from topoclip.recipes import pretrain
from topoclip.runs import FORMAT_VERSION, RUN_INFO_FILE, read_run_info

TINY_DATA = ["data.shapes.num_train=256", "data.shapes.num_val=16", "data.shapes.num_test=32",
             "data.shapes.zeroshot_tasks=[shape]", "train.steps=3", "train.batch_size=32", "optim.warmup_steps=1",
             "eval.enabled=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, TINY_DATA + TINY_TOWERS + QUIET_RUN + [f"output.dir={root}", "output.name=r"])
    pretrain.run(cfg)
    return root / "r"


def _points(model, tokenizer):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(["a red circle", "a blue square"])
    with torch.no_grad():
        return model.eval()(images, tokens["input_ids"], tokens["attention_mask"])


def test_a_new_run_records_its_kind_and_format(tiny_run):
    info = json.loads((tiny_run / RUN_INFO_FILE).read_text())
    assert info == {"format": FORMAT_VERSION, "kind": "pretrain", "topoclip": topoclip.__version__}
    assert read_run_info(tiny_run).kind == "pretrain"


def test_load_run_gives_model_tokenizer_topology_and_transform(tiny_run):
    run = topoclip.load_run(tiny_run)
    assert run.kind == "pretrain" and run.topology.name == "oblique-inner" and run.topology.num_blocks == 8
    assert run.transform.image_size == 32
    u, v = _points(run.model, run.tokenizer)
    assert u.shape == v.shape == (2, run.topology.dim)


def test_load_pretrained_opens_a_run_the_same_way(tiny_run):
    run = topoclip.load_run(tiny_run)
    model, tokenizer, transform = load_pretrained(tiny_run)
    for a, b in zip(_points(model, tokenizer), _points(run.model, run.tokenizer)):
        assert torch.equal(a, b)
    assert transform.image_size == run.transform.image_size
    with pytest.raises(ValueError, match="keeps its topology"):
        load_pretrained(tiny_run, topology=topoclip.topology("sphere", dim=128))


def test_a_run_in_the_0_1_0_layout_still_opens(tiny_run, tmp_path):
    # topoclip 0.1.0 wrote no run.json; its kind follows from the config.
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    (old / RUN_INFO_FILE).unlink()
    info = read_run_info(old)
    assert (info.kind, info.format) == ("pretrain", 1)
    loaded = topoclip.load_run(old)
    for a, b in zip(_points(loaded.model, loaded.tokenizer), _points(topoclip.load_run(tiny_run).model, loaded.tokenizer)):
        assert torch.equal(a, b)


def test_topoclip_eval_opens_a_0_1_0_run_with_the_same_numbers(tiny_run, tmp_path):
    import shutil

    from topoclip.cli import main

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    (old / RUN_INFO_FILE).unlink()
    assert main(["eval", "--checkpoint", str(old), "--output", str(tmp_path / "old.json")]) == 0
    assert main(["eval", "--checkpoint", str(tiny_run), "--output", str(tmp_path / "new.json")]) == 0
    old_eval = json.loads((tmp_path / "old.json").read_text())["eval"]
    new_eval = json.loads((tmp_path / "new.json").read_text())["eval"]
    for section in (old_eval, new_eval):
        section["robustness"].pop("plots")
    assert old_eval == new_eval and set(old_eval) == {"zeroshot", "retrieval", "robustness"}


def test_an_unknown_or_newer_run_format_is_refused(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "future"
    shutil.copytree(tiny_run, run)
    (run / RUN_INFO_FILE).write_text(json.dumps({"format": FORMAT_VERSION + 1, "kind": "pretrain"}))
    with pytest.raises(ValueError, match="newer than this topoclip reads"):
        read_run_info(run)
    (run / RUN_INFO_FILE).write_text(json.dumps({"format": 2, "kind": "mystery"}))
    with pytest.raises(ValueError, match="unknown run kind 'mystery'"):
        topoclip.load_run(run)


def test_opening_a_run_imports_no_trainer_recipe_or_cli(tiny_run):
    code = (
        "import sys, topoclip; topoclip.load_run(sys.argv[1]); "
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['topoclip', 'engine'], ['topoclip', 'recipes'], ['topoclip', 'cli'], ['topoclip', 'analysis'], ['topoclip', 'bench'])); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tiny_run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_record_run_saves_a_fresh_run_and_keeps_a_resumed_ones_config(tmp_path, capsys):
    from topoclip.config import load_finetune_config
    from topoclip.recipes.common import record_run
    from topoclip.runs.resume_rules import ResumeRefused

    first = load_finetune_config(None, ["train.epochs=null", "train.steps=10", "optim.lr=1e-4"])
    record_run(tmp_path, False, first, "finetune")
    saved = (tmp_path / "config.yaml").read_text()
    assert read_run_info(tmp_path).kind == "finetune"
    changed = load_finetune_config(tmp_path / "config.yaml", ["optim.lr=1e-3", "train.resume=true"])
    with pytest.raises(ResumeRefused, match=r"refused: optim.lr \(0.0001 -> 0.001\)"):
        record_run(tmp_path, True, changed, "finetune")
    assert (tmp_path / "config.yaml").read_text() == saved  # nothing recorded that is not used
    longer = load_finetune_config(tmp_path / "config.yaml", ["train.steps=20", "train.resume=true"])
    record_run(tmp_path, True, longer, "finetune")
    assert "resume: taking the new train.steps: 10 -> 20" in capsys.readouterr().out
    assert load_finetune_config(tmp_path / "config.yaml").train.steps == 20  # what is used is recorded
