"""Real-data loaders on tiny files: CSV/TSV pairs, image folders, Karpathy JSON; skips and strict mode."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from topoclip.data import (
    ClassificationSet,
    CorruptImageError,
    CsvPairs,
    ImageFolderClassification,
    ImageTransform,
    KarpathyRetrieval,
    RetrievalSet,
    TensorPairSet,
    build_tokenizer,
    make_collate,
)
from topoclip.data.transforms import CLIP_MEAN, CLIP_STD

RED = (200, 30, 90)
TEAL = (10, 160, 150)
SIZE = 16


def solid_png(path, rgb, size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def corrupt_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path


def expected_pixel(rgb, mean=CLIP_MEAN, std=CLIP_STD):
    return torch.tensor([(rgb[c] / 255 - mean[c]) / std[c] for c in range(3)])


def assert_solid(image, rgb, mean=CLIP_MEAN, std=CLIP_STD):
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    want = expected_pixel(rgb, mean, std).view(3, 1, 1).expand_as(image)
    # One grey level of rounding in the resize at most.
    torch.testing.assert_close(image, want, rtol=0, atol=1.01 / 255 / min(std))


# ---------------------------------------------------------------------------------------------
# CSV / TSV pairs
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tsv(tmp_path):
    solid_png(tmp_path / "img" / "red.png", RED)
    solid_png(tmp_path / "img" / "teal.png", TEAL, size=(12, 30))
    corrupt_file(tmp_path / "img" / "broken.png")
    solid_png(tmp_path / "img" / "uncaptioned.png", RED)
    rows = [
        ("img/red.png", "a red square"),
        ("img/broken.png", "a broken file"),
        ("img/missing.png", "a file that is not there"),
        ("img/uncaptioned.png", "   "),
        ("img/teal.png", "a teal square"),
    ]
    path = tmp_path / "pairs.tsv"
    path.write_text("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    return path


def test_pairs_skips_counts_and_logs(tsv, caplog):
    with caplog.at_level(logging.DEBUG, logger="topoclip.data"):
        ds = CsvPairs(tsv, image_size=SIZE)
    # Missing file and empty caption are found at construction; the corrupt file only on access.
    assert len(ds) == 3 and ds.captions == ["a red square", "a broken file", "a teal square"]
    assert ds.skip_stats.as_dict() == {"missing": 1, "empty_caption": 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 missing" in warnings[0].getMessage() and "1 empty caption" in warnings[0].getMessage()
    debug = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "missing.png" in debug and "uncaptioned.png" in debug

    image, caption = ds[0]
    assert caption == "a red square"
    assert_solid(image, RED)
    image, caption = ds[2]
    assert caption == "a teal square"
    assert_solid(image, TEAL)  # non-square source: resized and center-cropped

    # The corrupt item is replaced by the next readable one (index 2), counted once.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="topoclip.data"):
        image, caption = ds[1]
        assert caption == "a teal square"
        assert ds[1][1] == "a teal square"
    assert ds.skip_stats.as_dict() == {"missing": 1, "empty_caption": 1, "corrupt": 1}
    assert len([r for r in caplog.records if "broken.png" in r.getMessage()]) == 1


def test_pairs_verify_finds_corrupt_files_up_front(tsv):
    ds = CsvPairs(tsv, image_size=SIZE, verify=True)
    assert len(ds) == 2 and ds.captions == ["a red square", "a teal square"]
    assert ds.skip_stats.as_dict() == {"missing": 1, "empty_caption": 1, "corrupt": 1}


def test_pairs_strict_names_the_file(tsv, tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        CsvPairs(tsv, image_size=SIZE, strict=True)
    with pytest.raises(ValueError, match="broken.png"):
        CsvPairs(tsv, image_size=SIZE, strict=True, verify=True)
    # Only a corrupt file, found lazily: strict access raises naming it.
    only_broken = tmp_path / "broken.tsv"
    only_broken.write_text("filepath\ttitle\nimg/red.png\tred\nimg/broken.png\tbroken\n")
    ds = CsvPairs(only_broken, image_size=SIZE, strict=True)
    assert ds[0][1] == "red"
    with pytest.raises(ValueError, match="broken.png"):
        ds[1]
    empty = tmp_path / "empty.tsv"
    empty.write_text("filepath\ttitle\nimg/red.png\t\n")
    with pytest.raises(ValueError, match="empty caption.*red.png"):
        CsvPairs(empty, image_size=SIZE, strict=True)


def test_pairs_csv_columns_root_and_normalisation(tmp_path):
    solid_png(tmp_path / "elsewhere" / "a.png", RED)
    path = tmp_path / "meta" / "pairs.csv"
    path.parent.mkdir()
    path.write_text('caption,image,extra\n"a red, bright square",a.png,x\n')
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    ds = CsvPairs(path, tmp_path / "elsewhere", sep=",", image_key="image", caption_key="caption",
                  image_size=SIZE, mean=mean, std=std)
    image, caption = ds[0]
    assert caption == "a red, bright square"
    assert_solid(image, RED, mean, std)
    with pytest.raises(ValueError, match="'filepath'"):
        CsvPairs(path, tmp_path / "elsewhere", sep=",", caption_key="caption")
    with pytest.raises(ValueError, match="sep"):
        CsvPairs(path, sep=";;")
    with pytest.raises(ValueError, match="nothere.tsv"):
        CsvPairs(tmp_path / "nothere.tsv")


def test_pairs_all_bad_is_an_error(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("filepath\ttitle\nnope.png\tcaption\n")
    with pytest.raises(ValueError, match="no usable"):
        CsvPairs(path)


def test_pairs_with_collate_in_a_dataloader(tsv):
    ds = CsvPairs(tsv, image_size=SIZE, verify=True)
    tok = build_tokenizer(["a red square", "a teal square"], vocab_size=50, context_length=6)
    collate = make_collate(tok)
    collate = pickle.loads(pickle.dumps(collate))  # workers receive a pickled copy
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["images"].shape == (2, 3, SIZE, SIZE)
    assert torch.equal(batch["images"][1], ds[1][0])
    assert torch.equal(batch["input_ids"], tok(["a red square", "a teal square"])["input_ids"])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0]] * 2
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="pairs"):
        collate([(torch.zeros(3, 2, 2), 5)])


def test_tensor_pair_set_round_trip():
    u8 = torch.tensor(RED, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, SIZE, SIZE).contiguous()
    ds = TensorPairSet(u8, ["x", "y"])
    assert_solid(ds[1][0], RED)
    with pytest.raises(ValueError, match="captions"):
        TensorPairSet(u8, ["only one"])


# ---------------------------------------------------------------------------------------------
# Image folder classification
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "animals"
    solid_png(root / "golden_retriever" / "1.png", RED)
    solid_png(root / "golden_retriever" / "2.jpg", RED)
    corrupt_file(root / "tabby_cat" / "0.png")
    solid_png(root / "tabby_cat" / "sub" / "1.png", TEAL)
    (root / "tabby_cat" / "notes.txt").write_text("ignored")
    return root


def test_folder_classnames_labels_and_templates(folder):
    ds = ImageFolderClassification(folder, image_size=SIZE)
    assert isinstance(ds, ClassificationSet)
    assert ds.name == "animals" and ds.classnames == ["golden retriever", "tabby cat"]
    assert all("{}" in t for t in ds.templates)
    assert len(ds) == 4 and ds.labels.tolist() == [0, 0, 1, 1]
    image, label = ds[3]
    assert label == 1
    assert_solid(image, TEAL)
    # The corrupt file (index 2) is left out (None), not replaced by the next item: in an
    # evaluation a substitute would be scored twice.
    image, label = ds[2]
    assert image is None and label == 1 and ds.skip_stats.as_dict() == {"corrupt": 1}


def test_folder_classnames_file_templates_and_errors(folder, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("dog\n\ncat\n")
    ds = ImageFolderClassification(folder, classnames=names, templates=["a {} photo"], name="pets",
                                   image_size=SIZE, verify=True)
    assert ds.classnames == ["dog", "cat"] and ds.templates == ["a {} photo"] and ds.name == "pets"
    assert len(ds) == 3 and ds.skip_stats.as_dict() == {"corrupt": 1}
    assert ImageFolderClassification(folder, classnames=["a", "b"]).classnames == ["a", "b"]
    with pytest.raises(ValueError, match="names"):
        ImageFolderClassification(folder, classnames=["only one"])
    with pytest.raises(ValueError, match="templates"):
        ImageFolderClassification(folder, templates=["no slot"])
    with pytest.raises(ValueError, match="0.png"):
        ImageFolderClassification(folder, verify=True, strict=True)
    lazy_strict = ImageFolderClassification(folder, strict=True, image_size=SIZE)
    with pytest.raises(ValueError, match="0.png"):
        lazy_strict[2]
    with pytest.raises(ValueError, match="class sub-folders"):
        ImageFolderClassification(tmp_path / "animals" / "golden_retriever")


# ---------------------------------------------------------------------------------------------
# Karpathy JSON retrieval
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "images"
    solid_png(root / "val2014" / "a.png", RED)
    solid_png(root / "b.png", TEAL)
    corrupt_file(root / "c.png")
    solid_png(root / "train.png", RED)
    doc = {
        "images": [
            {"filepath": "val2014", "filename": "a.png", "split": "test",
             "sentences": [{"raw": "a red square."}, {"raw": " "}, {"raw": "red everywhere"}]},
            {"filename": "missing.png", "split": "test", "sentences": [{"raw": "gone"}]},
            {"filename": "c.png", "split": "test", "sentences": [{"raw": "broken"}]},
            {"filename": "train.png", "split": "train", "sentences": [{"raw": "training image"}]},
            {"filename": "b.png", "split": "test", "sentences": [{"tokens": ["a", "teal", "square"]}]},
            {"filename": "b.png", "split": "test", "sentences": [{"raw": ""}]},
        ]
    }
    path = tmp_path / "dataset_tiny.json"
    path.write_text(json.dumps(doc))
    return path, root


def test_karpathy_mapping_and_skips(karpathy, caplog):
    path, root = karpathy
    with caplog.at_level(logging.WARNING, logger="topoclip.data"):
        ds = KarpathyRetrieval(path, root, image_size=SIZE)
    assert isinstance(ds, RetrievalSet) and ds.name == "dataset_tiny-test"
    assert len(ds) == 2
    assert ds.captions == ["a red square.", "red everywhere", "a teal square"]
    assert ds.caption_to_image.tolist() == [0, 0, 1]
    assert ds.skip_stats.as_dict() == {"empty_caption": 2, "missing": 1, "corrupt": 1, "no_caption": 1}
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert_solid(ds[0], RED)
    assert_solid(ds[1], TEAL)


def test_karpathy_splits_strict_and_lazy(karpathy):
    path, root = karpathy
    both = KarpathyRetrieval(path, root, split=["train", "test"], image_size=SIZE)
    assert len(both) == 3 and "training image" in both.captions
    with pytest.raises(ValueError, match="splits present"):
        KarpathyRetrieval(path, root, split="val")
    with pytest.raises(ValueError, match="empty caption.*a.png"):
        KarpathyRetrieval(path, root, strict=True)
    # Without verification the corrupt image stays in and fails on access, naming the file:
    # a retrieval set cannot swap in another image without breaking caption_to_image.
    trusting = KarpathyRetrieval(path, root, verify=False, image_size=SIZE)
    assert len(trusting) == 3
    with pytest.raises(CorruptImageError, match="c.png"):
        trusting[1]
    bad = path.parent / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        KarpathyRetrieval(bad, root)


# ---------------------------------------------------------------------------------------------
# Transform
# ---------------------------------------------------------------------------------------------
def test_transform_converts_modes_and_validates(tmp_path):
    t = ImageTransform(SIZE)
    grey = Image.new("L", (40, 40), 128)
    assert_solid(t(grey), (128, 128, 128))
    with pytest.raises(ValueError, match="std"):
        ImageTransform(SIZE, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="image_size"):
        ImageTransform(0)
    with pytest.raises(ValueError, match="interpolation"):
        ImageTransform(SIZE, interpolation="cubic-ish")
