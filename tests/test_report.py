"""`topoclip report` and the plots: PNG files are produced and non-empty; the HTML is one file
with the tables and the images embedded."""

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.analysis.plots import plot_similarity_distributions, plot_temperature_trajectories, plot_uniformity_alignment
from topoclip.analysis.run_metrics import ANALYSIS_FILE, SIMILARITY_FILE, load_similarities
from topoclip.cli import main
from topoclip.config import load_config
from topoclip.recipes import pretrain

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # pretrain.run applies train.threads process-wide; later tests get their threads back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = TINY_TOWERS + QUIET_RUN + [
    "train.steps=4",
    "train.batch_size=16",
    "train.checkpoint_every=2",
    "optim.warmup_steps=1",
    "data.shapes.num_train=64",
    "data.shapes.num_val=8",
    "data.shapes.num_test=40",
    "eval.batch_size=64",
    "train.threads=1",  # tiny ops: a second intra-op thread only waits on a busy machine
]


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


def test_plots_are_written_as_non_empty_pngs(tmp_path):
    rng = np.random.default_rng(0)
    trajectories = {"a": [(1, 14.0), (2, 15.0), (3, 16.5)], "b": [(1, 1.0), (2, 1.1), (3, 1.3)], "empty": []}
    assert _is_png(plot_temperature_trajectories(trajectories, tmp_path / "t.png"))
    samples = {
        "in-domain": {"positive": rng.normal(0.6, 0.1, 300), "negative": rng.normal(0.0, 0.2, 300),
                      "image-image": rng.normal(0.3, 0.2, 300), "text-text": np.full(300, 0.5)},
        "out-of-domain": {"positive": rng.normal(0.3, 0.1, 300), "negative": np.array([np.nan, 0.1, 0.2])},
    }
    assert _is_png(plot_similarity_distributions(samples, tmp_path / "deep" / "s.png", title="x"))
    assert _is_png(plot_uniformity_alignment({"a": (1.0, -2.0), "b": (0.5, -1.0)}, tmp_path / "u.png"))
    for plot in (plot_temperature_trajectories, plot_similarity_distributions, plot_uniformity_alignment):
        with pytest.raises(ValueError, match="no "):
            plot({}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_run_report_computes_the_analysis_and_embeds_every_plot(tmp_path, capsys):
    config = load_config(CONFIGS / "default.yaml", TINY + [f"output.dir={tmp_path}"])
    run_dir = Path(pretrain.run(config)["run_dir"])
    assert not (run_dir / ANALYSIS_FILE).exists()

    assert main(["report", str(run_dir), "--output", str(tmp_path / "page.html")]) == 0
    assert capsys.readouterr().out.strip().endswith("page.html")
    page = (tmp_path / "page.html").read_text()

    # The analysis was computed once and cached beside the run's results.
    analysis = json.loads((run_dir / ANALYSIS_FILE).read_text())
    assert analysis["topology"]["label"] == "Ob(16,8) inner"
    kinds = load_similarities(run_dir)
    assert set(kinds) == {"in-domain", "out-of-domain"}
    assert all(set(v) == {"positive", "negative", "image-image", "text-text"} for v in kinds.values())
    assert (run_dir / SIMILARITY_FILE).is_file()

    for png in ("temperature.png", "similarity.png"):
        assert _is_png(run_dir / "plots" / png)
    # Every plot and the Grad-CAM figure of the default 2 test pairs (final score only: one token).
    assert [len(pair["tokens"]) for pair in analysis["gradcam"]] == [0, 0]
    figures = [run_dir / pair["figure"] for pair in analysis["gradcam"]]
    assert all(_is_png(f) for f in figures) and all(_is_png(run_dir / f) for p in analysis["gradcam"] for f in p["files"])
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    files = sorted((run_dir / "plots").rglob("*.png")) + figures
    assert len(embedded) == len(files) >= 4
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in files)
    assert html.escape(analysis["gradcam"][0]["caption"]) in page

    # Tables: zero-shot per task, retrieval, the analysis and mAP@R / R-Precision (no token
    # subsets for a single-token run), with the numbers of the JSON files.
    results = json.loads((run_dir / "results.json").read_text())
    assert page.count("<table>") == 4 and analysis["token_subsets"] is None and "Token subsets" not in page
    i2t = [f"{100 * analysis['map_at_r'][f'i2t_{k}']:.1f}" for k in ("mAP@R", "R-P")]
    assert f'<td class="text">i2t</td><td>{i2t[0]}</td><td>{i2t[1]}</td></tr>' in page
    shape_top1 = 100 * results["eval"]["zeroshot"]["shape"]["top1"]
    assert f'<td class="text">shape</td><td>{shape_top1:.1f}</td>' in page
    assert f"{100 * analysis['linear_probe']['top1']:.1f}" in page
    assert "http://" not in page and "https://" not in page  # self-contained

    # An analysis cached before mAP@R existed (or with other settings) is redone with its own
    # settings; a current one is reused as it is.
    stale = dict(analysis, settings={k: v for k, v in analysis["settings"].items() if k != "gradcam_pairs"})
    stale["settings"]["similarity_pairs"] = 20
    del stale["map_at_r"]
    (run_dir / ANALYSIS_FILE).write_text(json.dumps(stale))
    assert main(["report", str(run_dir)]) == 0
    redone = json.loads((run_dir / ANALYSIS_FILE).read_text())
    assert redone["settings"]["similarity_pairs"] == 20 and redone["geometry"]["in-domain"]["pairs"] == 20
    assert redone["map_at_r"] == pytest.approx(analysis["map_at_r"])
    before = (run_dir / ANALYSIS_FILE).stat().st_mtime_ns
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / ANALYSIS_FILE).stat().st_mtime_ns == before


def test_report_of_a_directory_that_is_neither_run_nor_grid(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topoclip report: error: report:") and "neither a grid directory" in err


# ------------------------------------------------------------------ runs on any data source

def _tiny_run(tmp_path, name, *overrides):
    cfg = load_config(None, [*QUIET_RUN, "model.image.depth=1", "model.image.width=32", "model.image.heads=2",
                             "model.text.depth=1", "model.text.width=32", "model.text.heads=2", "train.steps=4",
                             "train.batch_size=4", "data.shapes.num_test=8", "eval.robustness=false",
                             f"output.dir={tmp_path}", f"output.name={name}", *overrides])
    pretrain.run(cfg)
    return tmp_path / name


def test_report_on_a_csv_run_with_evaluation_during_training(tmp_path):
    from tests.test_data_sources import write_csv
    from topoclip.cli import main

    csv = write_csv(tmp_path)
    run = _tiny_run(tmp_path, "csv", "data.source=csv", f"data.csv.path={csv}", "data.csv.holdout=0.3", "eval.every=2")
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<h2>Retrieval (%)</h2>" in page and "Analysis" not in page  # no shapes analysis of a CSV run
    assert (run / "plots" / "eval_during_training.png").is_file() and _is_png(run / "plots" / "eval_during_training.png")


def test_report_on_a_shards_run_and_on_a_fine_tuned_run(tmp_path):
    from topoclip.cli import main
    from topoclip.config import load_finetune_config
    from topoclip.recipes.finetune import run_finetune

    shards = tmp_path / "shards"
    assert main(["data", "convert", "--shapes", "--out", str(shards), "num_train=40", "num_val=4", "num_test=8"]) == 0
    run = _tiny_run(tmp_path, "sh", "data.source=shards", f"data.shards.urls={shards}")
    assert main(["report", str(run)]) == 0 and "Zero-shot classification" in (run / "report.html").read_text()
    tuned = load_finetune_config(None, [f"source.path={run}", "train.steps=2", "train.batch_size=4", "data.shapes.num_train=16",
                                        "data.shapes.num_test=8", "eval.robustness=false", *QUIET_RUN, f"output.dir={tmp_path}"])
    run_finetune(tuned)
    assert main(["report", str(tmp_path / "finetune-ft")]) == 0
    assert "Fine-tuned models: target and reference distributions" in (tmp_path / "finetune-ft" / "report.html").read_text()
