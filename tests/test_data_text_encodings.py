"""Captions that are not in the declared encoding: the file and line (CSV) or shard and key
(webdataset) are named; a non-strict read skips and counts them; ``encoding`` reads them."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from topoclip.data import CsvPairs, skip_totals
from topoclip.data.text_files import check_encoding, read_lines


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(path)


@pytest.fixture
def latin1_csv(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png")
    body = "filepath\ttitle\n0.png\ta plain caption\n1.png\tun caf\u00e9 cr\u00e8me\n2.png\tanother plain one\n"
    path = tmp_path / "pairs.tsv"
    path.write_bytes(body.encode("latin-1"))  # 0xe9 for é: not UTF-8
    return path


def test_a_non_utf8_row_is_skipped_counted_and_located(latin1_csv, caplog):
    pairs = CsvPairs(latin1_csv, image_size=8)
    assert pairs.captions == ["a plain caption", "another plain one"]
    assert skip_totals(pairs) == {str(latin1_csv): {"bad_encoding": 1}}


def test_strict_names_the_file_line_and_byte(latin1_csv):
    with pytest.raises(ValueError, match=rf"{latin1_csv}:3: not valid utf-8 \(byte 0xe9 at column 13\)"):
        CsvPairs(latin1_csv, image_size=8, strict=True)


def test_the_encoding_option_reads_the_file(latin1_csv):
    pairs = CsvPairs(latin1_csv, image_size=8, encoding="latin-1", strict=True)
    assert pairs.captions[1] == "un caf\u00e9 cr\u00e8me"


def test_a_quoted_caption_across_lines_keeps_the_line_numbers(tmp_path):
    for i in range(2):
        _png(tmp_path / f"{i}.png")
    path = tmp_path / "pairs.csv"
    path.write_bytes(b'filepath,title\n0.png,"two\nlines"\n1.png,bad \xff here\n')
    with pytest.raises(ValueError, match=rf"{path}:4: not valid utf-8"):
        CsvPairs(path, image_size=8, sep=",", strict=True)
    assert CsvPairs(path, image_size=8, sep=",").captions == ["two\nlines"]


def test_a_header_that_does_not_decode_is_an_error(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_bytes(b"filepath\tt\xeftle\n")
    with pytest.raises(ValueError, match=rf"{path}:1: the header is not valid utf-8"):
        CsvPairs(path, image_size=8)


def test_unknown_encodings_are_config_errors():
    with pytest.raises(ValueError, match="data.csv.encoding: unknown text encoding 'latin-42'"):
        check_encoding("latin-42", "data.csv.encoding")
    from topoclip.config import load_config

    with pytest.raises(ValueError, match="data.csv.encoding: unknown text encoding"):
        load_config(overrides=["data.csv.encoding=klingon"])


def test_read_lines_reports_each_bad_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok\n\xe9t\xe9\nfine\n\xff\n")
    lines, bad = read_lines(path)
    assert len(lines) == 4 and sorted(bad) == [2, 4]


# ------------------------------------------------------------------------------------ shards
def _shard(path, captions: list[bytes]):
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            image = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(image, format="PNG")
            for ext, data in (("png", image.getvalue()), ("txt", caption)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_a_latin1_caption_in_a_shard_is_skipped_for_the_tokenizer_and_in_training(tmp_path):
    pytest.importorskip("webdataset")
    from topoclip.data.shards import ShardStats, shard_captions, shard_pairs

    shard = _shard(tmp_path / "s-000000.tar", [b"a red circle", "un caf\u00e9".encode("latin-1"), b"a blue square"])
    assert shard_captions(str(shard)) == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match=r"s-000000.tar:000000001: caption not valid utf-8 \(byte 0xe9"):
        shard_captions(str(shard), strict=True)
    assert shard_captions(str(shard), encoding="latin-1")[1] == "un caf\u00e9"
    stats = ShardStats()
    pairs = list(shard_pairs(str(shard), image_size=8, shuffle_buffer=0, stats=stats))
    assert [c for _, c in pairs] == ["a red circle", "a blue square"] and stats.skipped == 1
    from topoclip.data import skip_totals
    from topoclip.data.shards import ShardStream

    stream = ShardStream(str(shard), epoch_length=2, batch_size=2, image_size=8, shuffle_buffer=0)
    assert len(list(stream)) == 2
    assert skip_totals(stream) == {str(shard): {"unreadable": 1}}  # what the run reports at its end


def test_a_karpathy_json_or_classnames_file_not_in_utf8_names_file_and_line(tmp_path):
    from topoclip.data import KarpathyRetrieval

    split = tmp_path / "dataset.json"
    split.write_bytes(b'{"images": [\n{"filename": "caf\xe9.jpg"}]}')
    with pytest.raises(ValueError, match=rf"{split}:2: not valid utf-8 \(byte 0xe9 at column 18\)"):
        KarpathyRetrieval(split, tmp_path)


def test_an_evaluation_csv_not_in_utf8_skips_or_names_the_row(tmp_path):
    from topoclip.data.transforms import ImageTransform
    from topoclip.eval.suites import CsvClassification

    for i in range(3):
        _png(tmp_path / f"{i}.png")
    labels = tmp_path / "labels.tsv"
    labels.write_bytes("filepath\tlabel\n0.png\tcat\n1.png\tcaf\u00e9\n2.png\tdog\n".encode("latin-1"))
    kwargs = dict(name="t", image_root=tmp_path)
    ds = CsvClassification(labels, ImageTransform(8), **kwargs)
    assert ds.classnames == ["cat", "dog"] and skip_totals(ds) == {str(labels): {"bad_encoding": 1}}
    with pytest.raises(ValueError, match=rf"{labels}:3: not valid utf-8"):
        CsvClassification(labels, ImageTransform(8), strict=True, **kwargs)
    assert CsvClassification(labels, ImageTransform(8), encoding="latin-1", **kwargs).classnames == ["caf\u00e9", "cat", "dog"]
