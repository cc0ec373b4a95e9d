"""Embedded captioned-shapes data: determinism, noise, captions vs. labels, held-out combos,
task labels vs. pixels, retrieval mapping, config validation.

Generation speed on the project's 2-core CPU machine (shared with other jobs while measured):
~35-40k images/s rendering 32x32 (test_generation_speed_report prints it; run with -s), and
~20k images/s for the whole make_shapes (rendering + captions) at 32x32.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from topoclip.data import TextTokenizer, build_tokenizer, make_collate
from topoclip.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesConfig,
    _render,
    _sample_attributes,
    _split_generator,
    make_shapes,
)
from topoclip.data.transforms import CLIP_MEAN, CLIP_STD

COLOUR_NAMES = list(COLOURS)
SMALL = dict(num_train=1500, num_val=200, num_test=1200)


@pytest.fixture(scope="module")
def data():
    return make_shapes(ShapesConfig(seed=3, **SMALL))


# ---------------------------------------------------------------------------------------------
# An independent caption parser: words -> attributes, using only the vocabulary.
# ---------------------------------------------------------------------------------------------
_PHRASE_TO_POS = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(caption: str) -> dict:
    words = caption.replace(":", " ").replace(",", " ").split()
    found = {
        "colours": [w for w in words if w in COLOURS],
        "shapes": [w for w in words if w in SHAPES],
        "sizes": [w for w in words if w in SIZES],
        "positions": [],
        "objects": [],  # (colour, shape, size|None, position|None) for each "colour shape" pair
    }
    text = " ".join(words)
    for phrase, pos in _PHRASE_TO_POS.items():
        found["positions"] += [pos] * text.count(phrase)
    for t, w in enumerate(words):
        if w in SHAPES and t > 0 and words[t - 1] in COLOURS:
            size = words[t - 2] if t > 1 and words[t - 2] in SIZES else None
            after = " ".join(words[t + 1 : t + 4])
            pos = next((p for ph, p in _PHRASE_TO_POS.items() if after.startswith(ph)), None)
            found["objects"].append((words[t - 1], w, size, pos))
    return found


def check_caption_matches(caption: str, objs: list[dict]) -> None:
    p = parse_caption(caption)
    assert set(p["colours"]) <= {o["colour"] for o in objs}, caption
    assert set(p["shapes"]) <= {o["shape"] for o in objs}, caption
    assert set(p["sizes"]) <= {o["size"] for o in objs}, caption
    assert set(p["positions"]) <= {o["position"] for o in objs}, caption
    assert p["colours"] or p["shapes"], f"caption names neither a colour nor a shape: {caption!r}"
    if len(objs) == 2:
        # Pair captions always name both objects as "colour shape".
        named = Counter((c, s) for c, s, _, _ in p["objects"])
        assert named == Counter((o["colour"], o["shape"]) for o in objs), caption
    by_combo = {(o["colour"], o["shape"]): o for o in objs}
    for colour, shape, size, pos in p["objects"]:
        o = by_combo[(colour, shape)]
        assert size in (None, o["size"]), caption
        assert pos in (None, o["position"]), caption


# ---------------------------------------------------------------------------------------------
def test_deterministic_from_seed(data):
    again = make_shapes(ShapesConfig(seed=3, **SMALL))
    other = make_shapes(ShapesConfig(seed=4, **SMALL))
    for split in ("train", "val", "test"):
        a, b, c = data.split(split), again.split(split), other.split(split)
        assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
        assert a.captions == b.captions
        assert a.images.numpy().tobytes() != c.images.numpy().tobytes()
        assert a.captions != c.captions
    # Splits are drawn from different streams, not copies of one another.
    assert not torch.equal(data.train.images[:200], data.test.images[:200])


def test_shapes_dtypes_and_normalisation(data):
    n, s = SMALL["num_train"], 32
    assert data.train.images.shape == (n, 3, s, s) and data.train.images.dtype == torch.uint8
    assert len(data.val) == SMALL["num_val"] and len(data.test) == SMALL["num_test"]
    img, cap = data.train[7]
    assert img.dtype == torch.float32 and img.shape == (3, s, s) and isinstance(cap, str)
    raw = data.train.images[7, :, 5, 9].float()
    expected = torch.tensor([(raw[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c] for c in range(3)])
    torch.testing.assert_close(img[:, 5, 9], expected, rtol=0, atol=1e-5)
    # The batched fetch DataLoader uses returns exactly what single fetches return.
    batch = data.train.__getitems__([3, 0, 11])
    for (bi, bc), i in zip(batch, [3, 0, 11]):
        si, sc = data.train[i]
        assert torch.equal(bi, si) and bc == sc


def test_image_size_configurable():
    d = make_shapes(ShapesConfig(image_size=64, num_train=20, num_val=5, num_test=5, heldout_combos=()))
    assert d.train.images.shape == (20, 3, 64, 64) and d.test[0][0].shape == (3, 64, 64)


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.37])
def test_noise_rate_is_exact(noise):
    d = make_shapes(ShapesConfig(noise=noise, num_train=1000, num_val=50, num_test=50))
    tr = d.train
    src = tr.caption_source
    swapped = (src != torch.arange(len(tr))).sum().item()
    assert swapped == round(noise * 1000)
    # Each caption comes from exactly one pair (a permutation), and it is that pair's clean caption.
    assert sorted(src.tolist()) == list(range(1000))
    assert all(tr.captions[i] == tr.clean_captions[j] for i, j in enumerate(src.tolist()))
    # The swap is real: a clearly positive fraction of swapped pairs ends up with a different text.
    if swapped:
        differs = sum(tr.captions[i] != tr.clean_captions[i] for i in range(1000))
        assert differs >= 0.8 * swapped
    # Evaluation splits are always clean.
    assert d.test.captions == d.test.clean_captions


def test_noise_changes_only_train_captions():
    clean = make_shapes(ShapesConfig(noise=0.0, num_train=300, num_val=30, num_test=30))
    noisy = make_shapes(ShapesConfig(noise=0.5, num_train=300, num_val=30, num_test=30))
    assert torch.equal(clean.train.images, noisy.train.images)
    assert clean.train.clean_captions == noisy.train.clean_captions
    assert clean.train.captions != noisy.train.captions
    assert clean.test.captions == noisy.test.captions


def test_captions_describe_the_images(data):
    for split in ("train", "test"):
        ds = data.split(split)
        for i, objs in enumerate(ds.attributes.all_objects()):
            check_caption_matches(ds.captions[i], objs)
    # Both one- and two-object images and both complete and partial phrasings occur.
    nobj = data.train.attributes.num_objects
    assert 0.2 < (nobj == 2).float().mean() < 0.4
    full = sum(len(parse_caption(c)["positions"]) > 0 and len(parse_caption(c)["sizes"]) > 0 for c in data.train.captions)
    assert 0.3 < full / len(data.train) < 0.8


def test_parser_rejects_wrong_captions():
    # Guard against a vacuous parser: a caption naming other attributes must fail.
    objs = [{"shape": "circle", "colour": "red", "size": "small", "position": "left"}]
    check_caption_matches("a small red circle on the left", objs)
    for wrong in ("a small blue circle on the left", "a large red circle", "a red square", "a red circle at the top"):
        with pytest.raises(AssertionError):
            check_caption_matches(wrong, objs)


def test_heldout_combos_absent_from_train_present_in_test(data):
    heldout = set(data.config.heldout_combos)
    assert heldout  # the default holds some out

    def combos(ds):
        a = ds.attributes
        out = Counter()
        for k in range(2):
            present = a.num_objects > k
            for s, c in zip(a.shape[present, k].tolist(), a.colour[present, k].tolist()):
                out[(SHAPES[s], COLOUR_NAMES[c])] += 1
        return out

    train, test, val = combos(data.train), combos(data.test), combos(data.val)
    assert not heldout & set(train)
    assert heldout <= set(test) and heldout <= set(val)
    # Everything else is seen in training.
    assert len(train) == len(SHAPES) * len(COLOURS) - len(heldout)
    # Captions agree: no training caption names a held-out combo.
    for cap in data.train.captions:
        assert not any((s, c) in heldout for c, s, _, _ in parse_caption(cap)["objects"]), cap


def test_heldout_guaranteed_even_in_tiny_test():
    d = make_shapes(ShapesConfig(num_train=50, num_val=3, num_test=3))
    a = d.test.attributes
    got = {(SHAPES[s], COLOUR_NAMES[c]) for s, c in zip(a.shape[:, 0].tolist(), a.colour[:, 0].tolist())}
    assert got == set(d.config.heldout_combos)


def _object_pixels(img_u8: torch.Tensor) -> torch.Tensor:
    # Every palette colour has a channel >= 210; the background stays below ~100.
    return img_u8.max(0).values > 130


def test_task_labels_match_pixels(data):
    tasks = {t.name: t for t in data.zeroshot_tasks("test")}
    assert set(tasks) == {"shape", "colour", "size", "position"}
    assert len(tasks["shape"]) == int((data.test.attributes.num_objects == 1).sum())
    n = 400  # enough for every shape x size; keeps the per-image loop fast
    palette = torch.tensor([COLOURS[c] for c in tasks["colour"].classnames], dtype=torch.float32)
    s = data.config.image_size
    areas = {}
    for i in range(n):
        img = tasks["colour"].images[i]
        m = _object_pixels(img)
        ys, xs = m.nonzero(as_tuple=True)
        # colour: the median object pixel is nearest to the labelled palette colour
        med = img[:, m].float().median(dim=1).values
        assert (palette - med).norm(dim=1).argmin().item() == tasks["colour"].labels[i].item()
        # position: the object's centroid is near the labelled position's centre
        pos = POSITIONS[tasks["position"].labels[i]]
        expect = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}[pos]
        cx, cy = (xs.float().mean() + 0.5) / s, (ys.float().mean() + 0.5) / s
        assert abs(cx - expect[0]) < 0.1 and abs(cy - expect[1]) < 0.1, (pos, cx, cy)
        # shape: invariants of the drawn shapes
        shape = tasks["shape"].classnames[tasks["shape"].labels[i]]
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        fill = m.sum().item() / ((y1 - y0 + 1) * (x1 - x0 + 1)).item()
        centre_filled = bool(m[(y0 + y1) // 2, (x0 + x1) // 2])
        assert centre_filled == (shape != "ring"), shape
        assert (fill > 0.95) == (shape == "square"), (shape, fill)
        if shape == "triangle":  # apex up: the top row is narrower than the base
            assert m[y0].sum() < m[y1].sum()
        size = tasks["size"].classnames[tasks["size"].labels[i]]
        areas.setdefault(shape, {}).setdefault(size, []).append(m.sum().item())
    # size: within a shape every large object covers more pixels than every small one
    for shape, by_size in areas.items():
        assert max(by_size["small"]) < min(by_size["large"]), shape
    # templates hold the class-name slot, and the tasks share the same images
    for t in tasks.values():
        assert all("{}" in tpl for tpl in t.templates) and len(t.templates) >= 3
        img, label = t[0]
        assert img.shape == (3, s, s) and isinstance(label, int)
    assert torch.equal(tasks["shape"].images, tasks["colour"].images)


def test_zeroshot_prompts_are_in_the_training_vocabulary(data):
    tok = build_tokenizer(data.captions("train"), vocab_size=500, context_length=32)
    unk = tok.unknown_token_id()
    for task in data.zeroshot_tasks():
        prompts = [t.format(c) for c in task.classnames for t in task.templates]
        ids = tok(prompts)["input_ids"]
        assert not (ids == unk).any(), task.name


def test_retrieval_set_mapping(data):
    rs = data.retrieval_set("test")
    k = data.config.retrieval_captions_per_image
    n = len(rs)
    assert rs.caption_to_image.dtype == torch.long
    assert len(rs.captions) == rs.caption_to_image.numel() == k * n
    assert torch.equal(rs.caption_to_image, torch.arange(n).repeat_interleave(k))
    assert torch.equal(rs.images, data.test.images[rs.source_indices])
    assert rs[0].shape == (3, 32, 32) and rs[0].dtype == torch.float32
    all_objs = data.test.attributes.all_objects()
    signatures = set()
    for row, src in enumerate(rs.source_indices.tolist()):
        objs = all_objs[src]
        caps = [rs.captions[j] for j in (rs.caption_to_image == row).nonzero().squeeze(1).tolist()]
        assert len(set(caps)) == k  # different phrasings
        for cap in caps:
            check_caption_matches(cap, objs)
            # complete captions: every object with all four attributes
            parsed = parse_caption(cap)["objects"]
            assert sorted(parsed) == sorted((o["colour"], o["shape"], o["size"], o["position"]) for o in objs), cap
        signatures.add(tuple(sorted(tuple(o.values()) for o in objs)))
    assert len(signatures) == n  # each image's description is unique in the set
    assert n > 0.5 * len(data.test)


def test_dataloader_with_collate(data):
    tok = build_tokenizer(data.captions(), vocab_size=300, context_length=24)
    loader = DataLoader(data.train, batch_size=16, shuffle=False, collate_fn=make_collate(tok))
    batch = next(iter(loader))
    assert batch["images"].shape == (16, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["input_ids"].shape == (16, 24) and batch["attention_mask"].shape == (16, 24)
    assert torch.equal(batch["images"][5], data.train[5][0])
    assert torch.equal(batch["input_ids"][5], tok([data.train.captions[5]])["input_ids"][0])
    assert isinstance(tok, TextTokenizer)


@pytest.mark.parametrize(
    "field,value",
    [
        ("image_size", 8),
        ("image_size", 32.0),
        ("num_train", 1),
        ("num_test", 0),
        ("noise", 1.5),
        ("noise", -0.1),
        ("two_object_prob", "half"),
        ("full_caption_prob", float("nan")),
        ("pixel_noise", -1.0),
        ("retrieval_captions_per_image", 0),
        ("retrieval_captions_per_image", 99),
        ("heldout_combos", [("hexagon", "red")]),
        ("heldout_combos", [("circle", "mauve")]),
        ("heldout_combos", [("circle", "red"), ("circle", "red")]),
        ("heldout_combos", [("circle", c) for c in COLOURS]),
        ("zeroshot_tasks", ["shape", "texture"]),
        ("zeroshot_tasks", []),
        ("mean", (0.5, 0.5)),
        ("std", (0.5, 0.0, 0.5)),
        ("seed", True),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ShapesConfig(**{field: value})


def test_config_accepts_yaml_style_lists_and_overrides():
    cfg = ShapesConfig(heldout_combos=[["circle", "red"]], mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert cfg.heldout_combos == (("circle", "red"),) and cfg.mean == (0.5, 0.5, 0.5)
    d = make_shapes(cfg, num_train=10, num_val=2, num_test=2)
    assert len(d.train) == 10 and d.config.heldout_combos == (("circle", "red"),)
    with pytest.raises(ValueError, match="colour_count"):
        make_shapes(cfg, colour_count=3)
    with pytest.raises(ValueError, match="colour_count"):
        make_shapes({"colour_count": 3})
    from_dict = make_shapes({"num_train": 10, "num_val": 2, "num_test": 2, "heldout_combos": [["circle", "red"]]})
    assert from_dict.train.captions == d.train.captions
    with pytest.raises(ValueError, match="split"):
        d.captions("holdout")


def test_generation_speed_report():
    """Prints the rendering rate (no assertion: timing depends on the machine's load)."""
    cfg = ShapesConfig()
    g = _split_generator(0, 0)
    attrs = _sample_attributes(20000, cfg, torch.arange(len(SHAPES) * len(COLOURS)), g, None)
    t0 = time.perf_counter()
    images = _render(attrs, 32, cfg.pixel_noise, g)
    rate = len(images) / (time.perf_counter() - t0)
    print(f"\nshapes rendering: {rate:,.0f} images/s at 32x32")
    assert images.shape == (20000, 3, 32, 32)


def test_light_background_changes_only_the_rendering():
    """The "light" background is a pure rendering shift: the same objects and captions, a
    background grey level in the light range, and objects still distinguishable from it."""
    small = dict(num_train=64, num_val=8, num_test=8, pixel_noise=0.0)
    dark, light = make_shapes(None, **small), make_shapes(None, background="light", **small)
    assert light.train.captions == dark.train.captions
    assert torch.equal(light.train.attributes.colour, dark.train.attributes.colour)
    raw = light.train.images  # uint8 [N, 3, S, S]
    corners = raw[:, :, 0, 0].float()  # no object reaches a corner
    lo, hi = BACKGROUNDS["light"]
    assert corners.min() >= lo and corners.max() <= hi
    assert (corners[:, 0] == corners[:, 1]).all()  # grey
    assert not torch.equal(raw, dark.train.images)
    with pytest.raises(ValueError, match="background"):
        ShapesConfig(background="striped")
