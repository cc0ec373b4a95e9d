"""Every topology end to end on the real towers and the embedded data: a few steps of
`pretrain.run`, then evaluation, results JSON, and re-evaluation from the checkpoint."""

import json
import math
from pathlib import Path

import pytest

from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.config import load_config
from topoclip.recipes import evaluate, pretrain

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

TINY = TINY_TOWERS + QUIET_RUN + [
    "train.steps=3",
    "train.batch_size=16",
    "train.checkpoint_every=2",
    "optim.warmup_steps=1",
    "data.shapes.num_train=64",
    "data.shapes.num_val=8",
    "data.shapes.num_test=40",
    "model.image.patch_size=8",
    "model.text.context_length=24",
    "eval.batch_size=64",
]

# config file -> (topology name, k [CLS] tokens)
EXPECTED = {
    "default.yaml": ("oblique-inner", 1),
    "sphere.yaml": ("sphere", 1),
    "euclidean.yaml": ("euclidean", 1),
    "oblique_geodesic.yaml": ("oblique-geodesic", 1),
    "oblique_inner.yaml": ("oblique-inner", 1),
    "multi_token.yaml": ("oblique-inner", 8),
}


def test_every_shipped_config_is_listed_and_valid():
    training_configs = [p.name for p in CONFIGS.glob("*.yaml") if p.name != "finetune.yaml"]  # see test_finetune.py
    assert sorted(training_configs) == sorted(EXPECTED)
    for name, (topology, k) in EXPECTED.items():
        cfg = load_config(CONFIGS / name)
        assert (cfg.topology.name, cfg.model.num_tokens) == (topology, k), name
        assert cfg.output.name == Path(name).stem


@pytest.mark.parametrize("config_file", sorted(EXPECTED))
def test_topology_end_to_end(tmp_path, config_file, capsys):
    cfg = load_config(CONFIGS / config_file, TINY + [f"output.dir={tmp_path}"])
    results = pretrain.run(cfg)
    run_dir = tmp_path / Path(config_file).stem
    assert results["run_dir"] == str(run_dir)
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["train"]["skipped_steps"] == 0
    assert math.isfinite(saved["train"]["final_loss"])
    zeroshot = saved["eval"]["zeroshot"]
    assert set(zeroshot) == {"shape", "colour", "size", "position"}
    assert all(0.0 <= task["top1"] <= task["top5"] <= 1.0 for task in zeroshot.values())
    assert {"i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10"} <= set(saved["eval"]["retrieval"])
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert "zero-shot task" in capsys.readouterr().out

    # The checkpoint alone (weights + config + the run's tokenizer) reproduces the numbers.
    again = evaluate.evaluate_checkpoint(run_dir, output=tmp_path / "again.json")
    assert again["eval"]["zeroshot"] == {k: v for k, v in saved["eval"]["zeroshot"].items()}
    assert again["eval"]["retrieval"] == saved["eval"]["retrieval"]


def test_fresh_run_never_overwrites(tmp_path):
    cfg = load_config(CONFIGS / "default.yaml", TINY + [f"output.dir={tmp_path}", "eval.enabled=false", "train.steps=1"])
    first = pretrain.run(cfg)["run_dir"]
    second = pretrain.run(cfg)["run_dir"]
    assert (first, second) == (str(tmp_path / "default"), str(tmp_path / "default-1"))


def test_eval_cli_on_image_folder_and_karpathy_json(tmp_path, capsys):
    from PIL import Image

    from topoclip.cli import main

    cfg = load_config(CONFIGS / "default.yaml", TINY + [f"output.dir={tmp_path}", "eval.enabled=false", "train.steps=1"])
    run_dir = Path(pretrain.run(cfg)["run_dir"])
    folder = tmp_path / "colours"
    entries = []
    for name, rgb in (("red", (220, 40, 40)), ("blue", (45, 90, 230))):
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (48, 40), rgb).save(folder / name / f"{i}.png")
            entries.append({"filename": f"{i}.png", "filepath": name, "split": "test", "sentences": [{"raw": f"a {name} object"}]})
    (folder / "red" / "broken.png").write_bytes(b"not a png")  # skipped, not fatal
    karpathy = tmp_path / "dataset.json"
    karpathy.write_text(json.dumps({"images": entries}))

    out = tmp_path / "real.json"
    code = main(
        ["eval", "--checkpoint", str(run_dir), "--folder", str(folder), "--karpathy", str(karpathy),
         "--image-root", str(folder), "--output", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())["eval"]
    assert results["zeroshot"]["colours"]["n"] == 4  # the broken file was skipped
    assert 0.0 <= results["retrieval"]["i2t_R@1"] <= 1.0
    assert main(["eval", "--checkpoint", str(run_dir), "--karpathy", str(karpathy)]) == 2
    assert "--image-root" in capsys.readouterr().err
