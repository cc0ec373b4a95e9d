"""Evaluation suites as data: a suite file becomes datasets on real files, every record has
CLIP_benchmark's keys and metric names, and training and `topoclip eval` write them."""

import json

import pytest
import yaml

from tests.helpers import QUIET_RUN, TINY_TOWERS
from tests.test_data_sources import CLASSES, write_csv, write_folder, write_karpathy
from topoclip.config import SuiteConfig, load_config
from topoclip.data import ImageTransform
from topoclip.eval.suites import build_entries, load_suite_file

# The keys of one CLIP_benchmark result file (clip_benchmark/cli.py writes exactly these) and
# the metric names of its three tasks (its metrics/zeroshot_classification.py,
# zeroshot_retrieval.py and linear_probe.py).
CLIP_BENCHMARK_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}
BENCHMARK_METRICS = {
    "zeroshot_classification": {"acc1", "acc5", "mean_per_class_recall"},
    "zeroshot_retrieval": {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)},
    "linear_probe": {"lp_acc1"},
}


def write_suite(tmp_path):
    folder = write_folder(tmp_path / "f")
    write_folder(tmp_path / "g")
    write_csv(tmp_path)
    write_karpathy(tmp_path)
    (tmp_path / "labels.tsv").write_text("filepath\tlabel\n" + "".join(f"img{i}.png\t{['a', 'b', 'c'][i % 3]}\n" for i in range(9)))
    (tmp_path / "classes.txt").write_text("\n".join(sorted(CLASSES)) + "\n")
    (tmp_path / "templates.json").write_text(json.dumps(["a photo of a {c}.", "a {c}"]))
    suite = [
        {"name": "shapes-folder", "task": "zeroshot", "data": {"folder": "f", "classnames": "classes.txt", "templates": "templates.json"}},
        {"name": "letters", "task": "zeroshot", "data": {"csv": "labels.tsv"}},
        {"name": "pairs", "task": "retrieval", "data": {"csv": "pairs.tsv"}},
        {"name": "karpathy", "task": "retrieval", "data": {"karpathy": "dataset.json", "image_root": ".", "split": "test"}},
        {"name": "probe", "task": "linear_probe", "data": {"train": str(folder), "test": "g"}},
    ]
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    return tmp_path / "suite.yaml"


def test_a_suite_file_becomes_datasets_with_paths_relative_to_it(tmp_path):
    suites = load_suite_file(write_suite(tmp_path))
    assert [s.task for s in suites] == ["zeroshot", "zeroshot", "retrieval", "retrieval", "linear_probe"]
    entries = build_entries(suites, ImageTransform(32), robustness=True)
    folder, letters, pairs, karpathy, probe = entries
    assert folder.dataset.templates == ["a photo of a {}.", "a {}"] and folder.dataset.classnames == sorted(CLASSES)
    assert letters.dataset.classnames == ["a", "b", "c"] and len(letters.dataset) == 9
    assert pairs.tasks == ("retrieval", "robustness") and len(pairs.dataset.captions) == 18
    assert len(karpathy.dataset) == 3 and probe.train_dataset is not None


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "x", "task": "zeroshot", "data": {}}, r"eval.suites.x.data: give exactly one of csv, folder"),
        ({"name": "x", "task": "zeroshot", "data": {"folder": "f", "labels": "y"}}, r"eval.suites.x.data.labels: unknown"),
        ({"name": "x", "task": "ocr", "data": {}}, r"eval.suites.x.task: must be one of"),
        ({"name": "x", "task": "retrieval", "data": {"karpathy": "a.json"}}, r"data.image_root: a Karpathy JSON needs"),
        ({"name": "x", "task": "linear_probe", "data": {"train": "t"}}, r"data.test: a linear probe needs"),
    ],
)
def test_a_bad_suite_names_the_field(entry, message):
    with pytest.raises(ValueError, match=message):
        SuiteConfig(**entry)


def test_a_suite_whose_files_disagree_names_the_file(tmp_path):
    write_folder(tmp_path / "f")
    (tmp_path / "two.txt").write_text("dog\ncat\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{"name": "x", "task": "zeroshot", "data": {"folder": "f", "classnames": "two.txt"}}]))
    with pytest.raises(ValueError, match=r"classnames has 2 names but .*f' has 3 class folders"):
        build_entries(load_suite_file(tmp_path / "s.yaml"), ImageTransform(32))
    (tmp_path / "l.csv").write_text("filepath,label\nimg.png,a\n")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump([{"name": "y", "task": "zeroshot", "data": {"csv": "l.csv"}}]))
    with pytest.raises(ValueError, match=r"l\.csv: no column 'filepath'.*separator '\\t'"):
        build_entries(load_suite_file(tmp_path / "t.yaml"), ImageTransform(32))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_with_a_suite_writes_clip_benchmark_records_and_topoclip_eval_reads_the_suite(tmp_path):
    from topoclip.cli import main
    from topoclip.recipes import pretrain

    suite = write_suite(tmp_path)
    cfg = load_config(None, [*TINY_TOWERS, *QUIET_RUN, "data.shapes.num_train=64", "data.shapes.num_test=16",
                             "train.steps=2", "train.batch_size=16", f"eval.suite_file={suite}",
                             f"output.dir={tmp_path / 'runs'}", "output.name=r"])
    results = pretrain.run(cfg)
    run = tmp_path / "runs" / "r"
    evaluated = results["eval"]
    assert set(evaluated["zeroshot"]) == {"shapes-folder", "letters"} and set(evaluated["retrieval"]) == {"pairs", "karpathy"}
    assert 0.0 <= evaluated["linear_probe"]["top1"] <= 1.0  # one probe suite: its metrics directly
    rows = _records(run / "results.jsonl")
    assert [(r["dataset"], r["task"]) for r in rows] == [
        ("shapes-folder", "zeroshot_classification"), ("letters", "zeroshot_classification"),
        ("pairs", "zeroshot_retrieval"), ("karpathy", "zeroshot_retrieval"), ("probe", "linear_probe")]
    for row in rows:
        assert set(row) == CLIP_BENCHMARK_KEYS and row["language"] == "en" and row["pretrained"] == str(run)
        assert BENCHMARK_METRICS[row["task"]] <= set(row["metrics"]), row
    retrieval = rows[2]["metrics"]
    assert retrieval["image_retrieval_recall@1"] == results["eval"]["retrieval"]["pairs"]["t2i_R@1"]
    assert {"text_retrieval_ece@15", "uniformity", "modality_gap"} <= set(retrieval)  # topoclip's own names
    assert main(["eval", "--checkpoint", str(run), "--suite", str(suite), "--output", str(tmp_path / "e.json")]) == 0
    assert [r["metrics"] for r in _records(tmp_path / "e.jsonl")] == [r["metrics"] for r in rows]


def test_class_level_retrieval_counts_any_caption_of_the_images_class(tmp_path):
    import torch

    import topoclip
    from tests.helpers import FakeDualEncoder, FakeTokenizer
    from tests.test_data_sources import _image
    from topoclip.eval import embed_dataset, run_evaluation

    rows = ["filepath\ttitle\tlabel"]
    for i in range(8):
        _image(i % 2, i, "RGB").save(tmp_path / f"c{i}.png")
        rows.append(f"c{i}.png\tpicture {i} of a {'cat' if i % 2 else 'dog'}\t{'cat' if i % 2 else 'dog'}")
    (tmp_path / "labelled.tsv").write_text("\n".join(rows) + "\n")
    suite = [{"name": "pets", "task": "retrieval", "data": {"csv": "labelled.tsv", "label_key": "label", "class_level": True}}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    (entry,) = build_entries(load_suite_file(tmp_path / "s.yaml"), ImageTransform(4))
    assert entry.tasks == ("retrieval", "map_at_r") and entry.dataset.positive_pairs.shape == (32, 2)  # 4 x 4 per class
    model, tok = FakeDualEncoder(topoclip.topology("sphere", dim=8)), FakeTokenizer()
    (record, _) = run_evaluation(model, tok, [entry], batch_size=4)
    emb = embed_dataset(model, entry.dataset, tok)
    top = model.topology.similarity(emb.image_points, emb.text_points).argmax(1)
    classes = torch.arange(8) % 2
    assert record.metrics["i2t_R@1"] == pytest.approx(float((classes[top] == classes).float().mean()))
    with pytest.raises(ValueError, match="class_level: needs a CSV with a label column"):
        SuiteConfig("x", "retrieval", {"csv": "a.tsv", "class_level": True})
