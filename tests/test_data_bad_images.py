"""Images that pass a header check but cannot be decoded, files that are no images, and
high-bit-depth images: skipped and counted wherever they are met (training, held-out and
evaluation sets), an error naming the file under ``strict``, and 16-bit pixels scaled."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.data import CsvPairs, ImageFolderClassification, holdout_split, load_image, skip_totals
from topoclip.data.transforms import CorruptImageError, ImageTransform, to_rgb, verify_image


def _noisy(size=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def truncated_jpeg(path, seed=0):
    """A JPEG cut to half its bytes: its header is intact, so ``Image.verify`` accepts it."""
    buffer = io.BytesIO()
    _noisy(seed=seed).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_png(path, seed=0):
    buffer = io.BytesIO()
    _noisy(seed=seed).save(buffer, format="PNG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def good_png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    _noisy(seed=seed).save(path)
    return path


@pytest.mark.parametrize("make", [truncated_jpeg, truncated_png])
def test_a_cut_short_image_passes_pils_verify_but_not_ours(tmp_path, make):
    path = make(tmp_path / f"cut.{'jpg' if make is truncated_jpeg else 'png'}")
    if make is truncated_jpeg:
        with Image.open(path) as image:
            image.verify()  # the header check PIL offers: it does not notice
    with pytest.raises(CorruptImageError, match=str(path)):
        verify_image(path)
    with pytest.raises(CorruptImageError, match=str(path)):
        load_image(path)


# ----------------------------------------------------------------------------- 16-bit images
def test_16_bit_grey_is_scaled_not_clipped_to_white(tmp_path):
    level = round(0.46 * 65535)
    Image.fromarray(np.full((8, 8), level, dtype=np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")  # PIL opens it as 16/32-bit integers
        assert np.asarray(raw.convert("RGB")).max() == 255  # what convert("RGB") alone gives
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.dtype == np.uint8 and (rgb == round(level / 65535 * 255)).all()  # 117, not 255
    tensor = ImageTransform(8)(Image.open(tmp_path / "g16.png"))
    want = ImageTransform(8)(Image.new("RGB", (8, 8), (117, 117, 117)))
    torch.testing.assert_close(tensor, want)


def test_16_bit_rgba_and_float_images_come_out_at_the_right_level(tmp_path):
    import struct
    import zlib

    # PIL cannot write 16-bit RGBA, so the PNG is written by hand: 2x2 pixels of
    # (0.46, 0.2, 0.8) grey levels at full opacity, 16 bits per sample.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    sample = struct.pack(">4H", round(0.46 * 65535), round(0.2 * 65535), round(0.8 * 65535), 65535)
    raw = b"".join(b"\x00" + sample * 2 for _ in range(2))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 6, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "rgba16.png").write_bytes(png)
    rgb = np.asarray(load_image(tmp_path / "rgba16.png"))
    assert rgb.shape == (2, 2, 3) and np.abs(rgb[0, 0].astype(int) - [117, 51, 204]).max() <= 1
    floats = Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32), mode="F")
    assert (np.asarray(to_rgb(floats)) == 64).all()


# -------------------------------------------------------------------------------- CSV pairs
@pytest.fixture
def pairs_csv(tmp_path):
    rows = []
    for i in range(8):
        good_png(tmp_path / "img" / f"{i}.png", seed=i)
        rows.append((f"img/{i}.png", f"picture number {i}"))
    truncated_jpeg(tmp_path / "img" / "cut.jpg")
    (tmp_path / "img" / "notes.png").write_text("not an image at all")
    rows += [("img/cut.jpg", "a cut jpeg"), ("img/notes.png", "a text file")]
    path = tmp_path / "pairs.tsv"
    path.write_text("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    return path


def test_verify_drops_cut_and_non_images_and_counts_them(pairs_csv):
    pairs = CsvPairs(pairs_csv, image_size=16, verify=True)
    assert len(pairs) == 8
    assert skip_totals(pairs) == {str(pairs_csv): {"corrupt": 2}}


def test_strict_names_the_file_and_its_line(pairs_csv):
    with pytest.raises(ValueError, match=rf"{pairs_csv}:10: .*cut.jpg"):
        CsvPairs(pairs_csv, image_size=16, verify=True, strict=True)


def test_a_held_out_split_drops_unreadable_images_with_their_captions(pairs_csv):
    pairs = CsvPairs(pairs_csv, image_size=16)  # not verified: the held-out split checks its own
    train, held = holdout_split(pairs, 0.9, seed=0)  # 9 of the 10 files held out
    held_files = set(pairs.image_paths) - {pairs.image_paths[i] for i in train.indices}
    bad = {p for p in held_files if p.endswith(("cut.jpg", "notes.png"))}
    assert bad  # at least one bad file was drawn into the held-out part
    kept = {pairs.image_paths[r] for r in held._rows}
    assert kept == held_files - bad and len(held.captions) == len(kept)  # one caption per image here
    assert all(held[i].shape == (3, 16, 16) for i in range(len(held)))
    assert skip_totals(pairs) == {str(pairs_csv): {"corrupt": len(bad)}}


# ------------------------------------------------------------------------------ image folder
def test_folder_evaluation_drops_an_unreadable_image_instead_of_repeating_another(tmp_path):
    from topoclip.eval.embed import embed_labelled_images
    from topoclip.models import DualEncoder  # noqa: F401 - any model with encode_image

    class Mean(torch.nn.Module):
        def encode_image(self, images):
            return images.mean(dim=(2, 3))

    for i in range(3):
        good_png(tmp_path / "cats" / f"{i}.png", seed=i)
        good_png(tmp_path / "dogs" / f"{i}.png", seed=10 + i)
    truncated_jpeg(tmp_path / "dogs" / "9.jpg")
    folder = ImageFolderClassification(tmp_path, image_size=16)  # verify=False: found on access
    assert len(folder) == 7
    points, labels = embed_labelled_images(Mean(), folder, batch_size=4)
    assert points.shape[0] == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert skip_totals(folder) == {str(tmp_path): {"corrupt": 1}}
    with pytest.raises(ValueError, match="9.jpg"):
        ImageFolderClassification(tmp_path, image_size=16, strict=True)[6]


# ------------------------------------------------------------------------ a whole training run
def test_a_csv_run_with_bad_files_trains_evaluates_and_reports_every_skip(pairs_csv, tmp_path, capsys):
    from topoclip.cli import main

    args = [*TINY_TOWERS, *QUIET_RUN, "data.source=csv", f"data.csv.path={pairs_csv}", "data.csv.holdout=0.3",
            "train.batch_size=2", "train.steps=2", "eval.robustness=false", f"output.dir={tmp_path / 'runs'}",
            "output.name=r", "data.shapes.num_test=16", "data.shapes.num_val=8"]
    assert main(["train", *args]) == 0
    results = json.loads((tmp_path / "runs" / "r" / "results.json").read_text())
    assert sum(results["skipped"][str(pairs_csv)].values()) == 2  # the cut JPEG and the text file
    assert f"skipped in {pairs_csv}: 2 corrupt" in capsys.readouterr().out
