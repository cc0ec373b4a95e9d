"""Training straight from your files: CSV/TSV pairs, image folders (k shots per class,
captions from templates) and Karpathy JSON, each with its held-out evaluation part."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.config import load_config
from topoclip.data import ImageTransform
from topoclip.data.sources import folder_split, open_training_source, read_classnames, read_templates

CLASSES = ["circle", "square", "cross"]


def _image(kind: int, seed: int, mode: str) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    array[..., kind] = 255  # a class-coloured tint, so classes differ
    image = Image.fromarray(array)
    return image.convert(mode) if mode != "RGB" else image


def write_folder(root, per_class=6):
    """Class folders with grayscale PNGs, RGBA PNGs and JPEGs."""
    modes = [("L", "png"), ("RGBA", "png"), ("RGB", "jpg")]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode, ext = modes[i % len(modes)]
            _image(c, 100 * c + i, mode).save(root / name / f"{i}.{ext}")
    return root


def write_csv(root, rows=18):
    lines = ["filepath\ttitle"]
    for i in range(rows):
        c = i % 3
        _image(c, i, "RGB").save(root / f"img{i}.png")
        lines.append(f"img{i}.png\ta {['red', 'green', 'blue'][c]} picture number {i}")
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n")
    return root / "pairs.tsv"


def write_karpathy(root):
    images = []
    for i in range(10):
        _image(i % 3, i, "RGB").save(root / f"k{i}.png")
        images.append({"filename": f"k{i}.png", "split": "train" if i < 7 else "test",
                       "sentences": [{"raw": f"caption a of {i}"}, {"raw": f"caption b of {i}"}]})
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    return root / "dataset.json"


def _cfg(**data):
    return load_config(None, [f"data.{k}={v}" for k, v in data.items()])


TRANSFORM = ImageTransform(32)


def test_folder_source_k_shots_are_seeded_exact_and_captioned_from_templates(tmp_path):
    root = write_folder(tmp_path / "f")
    (tmp_path / "t.json").write_text(json.dumps(["a photo of a {c}.", "a drawing of a {}."]))
    cfg = _cfg(source="folder", **{"folder.root": root, "folder.templates": tmp_path / "t.json", "folder.shots_per_class": 2})
    a = open_training_source("folder", cfg.data, TRANSFORM, seed=0)
    b = open_training_source("folder", cfg.data, TRANSFORM, seed=0)
    c = open_training_source("folder", cfg.data, TRANSFORM, seed=1)
    assert len(a.train) == 6 and len(a.held_out) == 12  # 2 of 6 images per class train
    assert a.train.image_paths == b.train.image_paths and a.captions == b.captions
    assert a.train.image_paths != c.train.image_paths
    assert set(a.captions) <= {f"a photo of a {n}." for n in CLASSES} | {f"a drawing of a {n}." for n in CLASSES}
    for path, caption in zip(a.train.image_paths, a.captions):
        assert caption.endswith(path.split("/")[-2] + ".")  # each image captioned with its own class
    image, caption = a.train[0]
    assert image.shape == (3, 32, 32) and caption == a.captions[0]
    held_images = set(a.held_out.base.image_paths[i] for i in a.held_out.indices)
    assert not held_images & set(a.train.image_paths) and a.held_out.classnames == sorted(CLASSES)  # folder order


def test_folder_split_holds_out_a_fraction_of_each_class():
    import torch

    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train, held = folder_split(labels, None, 0.2, seed=0)
    assert len(held) == 2 + 1 + 0 and sorted(train + held) == list(range(16))
    with pytest.raises(ValueError, match="shots_per_class: class 2 has 1 images"):
        folder_split(labels, 1, 0.2, seed=0)


def test_csv_source_holds_out_whole_images_and_trains_on_the_rest(tmp_path):
    path = write_csv(tmp_path)
    cfg = _cfg(source="csv", **{"csv.path": path, "csv.holdout": 0.25})
    src = open_training_source("csv", cfg.data, TRANSFORM, seed=0)
    assert len(src.train) + len(src.held_out.captions) == 18 and len(src.held_out) == round(0.25 * 18)
    assert not set(src.held_out.captions) & set(src.captions)


def test_karpathy_source_trains_on_every_caption_and_evaluates_on_the_test_split(tmp_path):
    path = write_karpathy(tmp_path)
    cfg = _cfg(source="karpathy", **{"karpathy.path": path, "karpathy.image_root": tmp_path})
    src = open_training_source("karpathy", cfg.data, TRANSFORM, seed=0)
    assert len(src.train) == 14 and len(src.held_out) == 3 and len(src.held_out.captions) == 6
    assert src.train.captions[:2] == ["caption a of 0", "caption b of 0"]


def test_classnames_and_templates_files_in_clip_benchmark_form(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"mine": ["dog", "cat"], "other": ["x", "y"]}))
    assert read_classnames(tmp_path / "c.json", "mine") == ["dog", "cat"]
    with pytest.raises(ValueError, match="holds several lists"):
        read_classnames(tmp_path / "c.json")
    (tmp_path / "c.txt").write_text("dog\n\ncat\n")
    assert read_classnames(tmp_path / "c.txt") == ["dog", "cat"]
    (tmp_path / "bad.json").write_text(json.dumps(["a photo of a dog"]))
    with pytest.raises(ValueError, match=r"bad\.json.*has no \{\} or \{c\}"):
        read_templates(tmp_path / "bad.json")


def test_a_file_source_needs_its_path_named_before_any_work():
    with pytest.raises(ValueError, match="data.csv.path: data.source=csv needs the pairs file"):
        load_config(None, ["data.source=csv"])
    with pytest.raises(ValueError, match="data.source: must be one of"):
        load_config(None, ["data.source=parquet"])


@pytest.mark.parametrize("source", ["csv", "folder", "karpathy"])
def test_topoclip_train_on_a_file_source_evaluates_on_its_held_out_part(tmp_path, source):
    from topoclip.recipes import pretrain

    if source == "csv":
        data = [f"data.csv.path={write_csv(tmp_path)}", "data.csv.holdout=0.3"]
    elif source == "folder":
        data = [f"data.folder.root={write_folder(tmp_path / 'f')}", "data.folder.shots_per_class=3"]
    else:
        data = [f"data.karpathy.path={write_karpathy(tmp_path)}", f"data.karpathy.image_root={tmp_path}"]
    cfg = load_config(None, [f"data.source={source}", *data, *TINY_TOWERS, *QUIET_RUN, "train.steps=3",
                             "train.batch_size=4", f"output.dir={tmp_path / 'runs'}", "output.name=r",
                             "data.shapes.num_test=8", "eval.robustness=false"])
    results = pretrain.run(cfg)
    evaluated = results["eval"]
    if source == "folder":
        assert list(evaluated["zeroshot"]) == ["f-heldout"] and evaluated["zeroshot"]["f-heldout"]["n"] == 9
        assert "retrieval" not in evaluated
    else:
        assert "zeroshot" not in evaluated and 0.0 <= evaluated["retrieval"]["i2t_R@1"] <= 1.0


def test_a_comma_csv_read_as_tsv_says_which_separator_to_set(tmp_path):
    from topoclip.data import CsvPairs

    _image(0, 0, "RGB").save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("filepath,title\na.png,a picture\n")
    with pytest.raises(ValueError, match=r"pairs\.csv: no column 'filepath'.*looks comma-separated: set the separator to ','"):
        CsvPairs(tmp_path / "pairs.csv")
    assert len(CsvPairs(tmp_path / "pairs.csv", sep=",")) == 1


def test_an_empty_class_folder_is_named(tmp_path):
    from topoclip.data import ImageFolderClassification

    root = write_folder(tmp_path / "f", per_class=2)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder 'empty' has no usable images"):
        ImageFolderClassification(root)


def test_topoclip_data_digits_writes_real_images_as_your_own_data(tmp_path):
    pytest.importorskip("sklearn")
    from topoclip.cli import main
    from topoclip.eval.suites import build_entries, load_suite_file

    assert main(["data", "digits", "--out", str(tmp_path / "d")]) == 0
    train = (tmp_path / "d" / "train.tsv").read_text().splitlines()
    test = (tmp_path / "d" / "test.tsv").read_text().splitlines()
    assert len(train) - 1 + len(test) - 1 == 1797 and train[0] == "filepath\ttitle\tlabel"
    cfg = load_config(None, ["data.source=csv", f"data.csv.path={tmp_path / 'd' / 'train.tsv'}"])
    src = open_training_source("csv", cfg.data, TRANSFORM, seed=0)
    image, caption = src.train[0]
    assert image.shape == (3, 32, 32) and ("digit" in caption or "number" in caption)
    zeroshot, retrieval, classes, probe = build_entries(load_suite_file(tmp_path / "d" / "suite.yaml"), TRANSFORM)
    assert classes.tasks == ("retrieval", "map_at_r") and classes.dataset.positive_pairs is not None
    assert zeroshot.dataset.classnames[:3] == ["zero", "one", "two"] and len(zeroshot.dataset) == len(test) - 1
    assert len(retrieval.dataset) == len(test) - 1 and len(probe.train_dataset) == len(train) - 1
