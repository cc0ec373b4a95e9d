"""Robustness metrics in evaluation: ECE, geometry and mixup hardness against loop formulas,
plots, JSON safety, degenerate embeddings, and the `robustness` section of the eval JSON."""

import json
import math
from pathlib import Path

import pytest
import torch

import topoclip
from tests.helpers import QUIET_RUN, TINY_TOWERS, FakeDualEncoder, FakeTokenizer
from topoclip.eval import evaluate_robustness
from topoclip.eval.calibration import retrieval_calibration

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TOPOLOGY_ARGS = {"sphere": dict(dim=8), "oblique-geodesic": dict(n=4, m=2)}


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyRetrievalSet(torch.utils.data.Dataset):
    """Images with 0-3 captions each, the captions in shuffled order (so an image's first
    caption is not simply the first one listed for it by construction)."""

    name = "tiny"

    def __init__(self, num_images=10, captionless=(5,), captions=None, caption_to_image=None, images=None):
        g = torch.Generator().manual_seed(3)
        self.images = torch.randn(num_images, 3, 4, 4, generator=g) if images is None else images
        if captions is None:
            pairs = [(i, k) for i in range(num_images) if i not in captionless for k in range(1 + i % 3)]
            order = torch.randperm(len(pairs), generator=g).tolist()
            pairs = [pairs[j] for j in order]
            captions = [f"picture {i} variant {k}" for i, k in pairs]
            caption_to_image = [i for i, _ in pairs]
        self.captions = captions
        self.caption_to_image = torch.tensor(caption_to_image)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def points(model, dataset, tokenizer):
    """The embeddings computed here, without the library's embedding helpers."""
    model.eval()
    with torch.no_grad():
        return model.encode_image(dataset.images).double(), model.encode_text(**tokenizer(dataset.captions)).double()


def loop_ece(topo, queries, candidates, is_positive, scale, num_bins, group_of=None):
    """Softmax of scale * similarity per query, confidence = max, ECE over (b/B, (b+1)/B].
    With ``group_of`` (candidate -> class) the probabilities are summed per class first and
    the prediction is the class."""
    conf, correct = [], []
    sims = topo.similarity(queries, candidates)
    for q in range(queries.shape[0]):
        logits = [scale * float(s) for s in sims[q]]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        if group_of is None:
            probs = {j: w / total for j, w in enumerate(weights)}
        else:
            probs = {}
            for j, w in enumerate(weights):
                probs[group_of(j)] = probs.get(group_of(j), 0.0) + w / total
        best = max(probs, key=lambda j: probs[j])
        conf.append(probs[best])
        correct.append(1.0 if is_positive(q, best) else 0.0)
    ece, n = 0.0, len(conf)
    for b in range(num_bins):
        members = [i for i, c in enumerate(conf) if b / num_bins < c <= (b + 1) / num_bins]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            ece += len(members) / n * abs(acc - mean_conf)
    return ece, conf


def first_caption_pairs_by_loop(caption_to_image, num_images):
    pairs = []
    for i in range(num_images):
        owned = [j for j, image in enumerate(caption_to_image.tolist()) if image == i]
        if owned:
            pairs.append((i, min(owned)))
    return pairs


def sq(a, b):
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))


def numbers(tree, path=""):
    """Every (path, value) leaf of a nested dict/list."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from numbers(value, f"{path}[{i}]")
    else:
        yield path, tree


# --------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("name", sorted(TOPOLOGY_ARGS))
def test_ece_matches_loop_formula(name):
    topo = topoclip.topology(name, **TOPOLOGY_ARGS[name])
    dataset, tokenizer = TinyRetrievalSet(), FakeTokenizer()
    model = FakeDualEncoder(topo)
    result = evaluate_robustness(model, dataset, tokenizer, batch_size=3, bins=(10, 15, 4))

    v, t = points(model, dataset, tokenizer)
    c2i = dataset.caption_to_image.tolist()
    scale = model.logit_scale.value
    with_caption = [i for i in range(len(dataset)) if i in c2i]  # image 5 has no caption: not a query
    cal = result["calibration"]
    for b in (10, 15, 4):
        i2t, i2t_conf = loop_ece(topo, v[with_caption], t, lambda q, k: k == with_caption[q], scale, b, lambda k: c2i[k])
        t2i, t2i_conf = loop_ece(topo, t, v, lambda q, k: k == c2i[q], scale, b)
        assert cal[f"i2t_ece_{b}"] == pytest.approx(i2t, rel=1e-5, abs=1e-7)
        assert cal[f"t2i_ece_{b}"] == pytest.approx(t2i, rel=1e-5, abs=1e-7)
    # The largest bin count's reliability bins, with one entry per query.
    assert cal["reliability_bins"] == 15
    assert sum(cal["i2t_reliability"]["count"]) == len(with_caption)
    assert sum(cal["t2i_reliability"]["count"]) == len(dataset.captions)
    # The case exercises the binning: confidences spread over several bins.
    assert len({math.ceil(c * 15) for c in i2t_conf + t2i_conf}) >= 3


def test_calibration_agrees_with_retrieval_calibration():
    """Same ground truth as the existing helper when every image has a caption."""
    topo = topoclip.topology("sphere", dim=8)
    dataset, tokenizer = TinyRetrievalSet(captionless=()), FakeTokenizer()
    model = FakeDualEncoder(topo)
    cal = evaluate_robustness(model, dataset, tokenizer, bins=(15,))["calibration"]
    v, t = points(model, dataset, tokenizer)
    reference = retrieval_calibration(topo, v.float(), t.float(), dataset.caption_to_image, model.logit_scale.value, 15)
    for direction in ("i2t", "t2i"):
        assert cal[f"{direction}_ece_15"] == pytest.approx(reference[f"{direction}_ece"], rel=1e-5, abs=1e-7)
        ref_bins = reference[f"{direction}_reliability"]
        assert cal[f"{direction}_reliability"]["count"] == ref_bins["count"]
        ours = [x if x is not None else float("nan") for x in cal[f"{direction}_reliability"]["accuracy"]]
        assert ours == pytest.approx(ref_bins["accuracy"], nan_ok=True)


# --------------------------------------------------------------------------- geometry, hardness
def test_geometry_and_hardness_match_direct_formulas():
    topo = topoclip.topology("sphere", dim=8)
    dataset, tokenizer = TinyRetrievalSet(), FakeTokenizer()
    model = FakeDualEncoder(topo)
    lam = 0.3  # asymmetric, so swapping the weights of v and t would show
    result = evaluate_robustness(model, dataset, tokenizer, hardness_lam=lam, hardness_bins=7)

    v_all, t_all = points(model, dataset, tokenizer)
    pairs = first_caption_pairs_by_loop(dataset.caption_to_image, len(dataset))
    last = [(i, max(j for j, image in enumerate(dataset.caption_to_image.tolist()) if image == i)) for i, _ in pairs]
    assert pairs != last  # the case tells the first caption from another one
    v = [v_all[i] for i, _ in pairs]
    t = [t_all[j] for _, j in pairs]
    n = len(pairs)
    geo = result["geometry"]
    assert geo["num_pairs"] == n == len(dataset) - 1
    assert geo["alignment"] == pytest.approx(sum(sq(a, b) for a, b in zip(v, t)) / n, rel=1e-5)
    union = v + t
    kernel = [math.exp(-2 * sq(x, y)) for i, x in enumerate(union) for j, y in enumerate(union) if i != j]
    assert geo["uniformity"] == pytest.approx(math.log(sum(kernel) / len(kernel)), rel=1e-5)
    rel = [sq(t[i], v[i]) - min(sq(t[i], v[j]) for j in range(n) if j != i) for i in range(n)]
    assert geo["relative_alignment"] == pytest.approx(sum(rel) / n, rel=1e-4, abs=1e-6)
    gap = [sum(float(x[k]) for x in v) / n - sum(float(y[k]) for y in t) / n for k in range(8)]
    assert geo["modality_gap"] == pytest.approx(math.sqrt(sum(g * g for g in gap)), rel=1e-5)
    assert all(result["better"][key] == "lower" for key in ("alignment", "uniformity", "relative_alignment", "modality_gap"))

    def dot(a, b):
        return sum(float(x) * float(y) for x, y in zip(a, b))

    def slerp(a, b):  # m_lam(a, b): weight lam on a
        theta = math.acos(max(-1.0, min(1.0, dot(a, b))))
        wa, wb = math.sin(lam * theta) / math.sin(theta), math.sin((1 - lam) * theta) / math.sin(theta)
        return [wa * float(x) + wb * float(y) for x, y in zip(a, b)]

    mixed = [slerp(a, b) for a, b in zip(v, t)]
    off = [(i, j) for i in range(n) for j in range(n) if i != j]
    hard = result["hardness"]
    assert hard["lam"] == lam
    assert hard["mean_positive"] == pytest.approx(sum(dot(a, b) for a, b in zip(v, t)) / n, rel=1e-5)
    assert hard["mean_original"] == pytest.approx(sum(dot(v[i], t[j]) for i, j in off) / len(off), rel=1e-5)
    assert hard["mean_mixed"] == pytest.approx(sum(dot(v[i], mixed[j]) for i, j in off) / len(off), rel=1e-5)
    assert len(hard["edges"]) == 8 and sum(hard["original"]) == sum(hard["mixed"]) == len(off)


# --------------------------------------------------------------------------- plots, JSON, degenerate
def test_plots_are_written_and_result_is_strict_json(tmp_path):
    topo = topoclip.topology("oblique-geodesic", n=4, m=2)
    result = evaluate_robustness(FakeDualEncoder(topo), TinyRetrievalSet(), FakeTokenizer(), plot_dir=tmp_path / "p")
    assert set(result["plots"]) == {"reliability_i2t", "reliability_t2i", "hardness"}
    for name, path in result["plots"].items():
        data = Path(path).read_bytes()
        assert Path(path).parent == tmp_path / "p" and Path(path).name == f"{name}.png"
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    # Empty reliability bins are None, not NaN: the result is strict JSON.
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result
    assert None in result["calibration"]["i2t_reliability"]["accuracy"]


@pytest.mark.parametrize("collapse", [False, True], ids=["repeated-captions", "all-points-identical"])
def test_repeated_captions_and_identical_points_give_finite_values(collapse):
    """Repeated captions (and, collapsed, v_i == t_j everywhere: the mixup's theta = 0)."""
    images = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    images[3] = images[2]  # two identical images as well
    dataset = TinyRetrievalSet(
        images=images, captions=["a red circle"] * 8, caption_to_image=[0, 1, 2, 3, 4, 5, 0, 2]
    )
    model = FakeDualEncoder(topoclip.topology("sphere", dim=8), collapse=collapse)
    result = evaluate_robustness(model, dataset, FakeTokenizer())
    for path, value in numbers({k: v for k, v in result.items() if k != "calibration"}):
        if isinstance(value, float):
            assert math.isfinite(value), path
    cal = result["calibration"]
    for key in ("i2t_ece_10", "t2i_ece_10", "i2t_ece_15", "t2i_ece_15"):
        assert math.isfinite(cal[key]) and 0.0 <= cal[key] <= 1.0, key
    if collapse:  # every point the same: no spread, no gap, mixed negatives = original ones
        assert result["geometry"]["uniformity"] == pytest.approx(0.0, abs=1e-6)
        assert result["geometry"]["modality_gap"] == pytest.approx(0.0, abs=1e-6)
        assert result["hardness"]["mean_mixed"] == pytest.approx(result["hardness"]["mean_original"], abs=1e-6)


def test_bad_input_names_the_problem():
    model, tokenizer = FakeDualEncoder(topoclip.topology("sphere", dim=8)), FakeTokenizer()
    dataset = TinyRetrievalSet()
    with pytest.raises(ValueError, match="bins"):
        evaluate_robustness(model, dataset, tokenizer, bins=())
    with pytest.raises(ValueError, match="hardness_lam"):
        evaluate_robustness(model, dataset, tokenizer, hardness_lam=1.5)
    with pytest.raises(ValueError, match="captions"):
        evaluate_robustness(model, torch.utils.data.TensorDataset(torch.zeros(2, 3, 4, 4)), tokenizer)
    one = TinyRetrievalSet(num_images=2, captions=["x"], caption_to_image=[0])
    with pytest.raises(ValueError, match="at least two images"):
        evaluate_robustness(model, one, tokenizer)


# --------------------------------------------------------------------------- eval JSON
TINY = TINY_TOWERS + QUIET_RUN + [
    "train.steps=1",
    "train.batch_size=16",
    "optim.warmup_steps=1",
    "data.shapes.num_train=32",
    "data.shapes.num_val=8",
    "data.shapes.num_test=24",
    "model.image.patch_size=8",
    "model.text.context_length=24",
    "eval.zeroshot=false",  # the robustness section needs only the retrieval set
    "eval.batch_size=64",
]


def test_train_and_cli_eval_write_robustness(tmp_path, capsys):
    from topoclip.cli import main
    from topoclip.config import load_config
    from topoclip.recipes import pretrain

    cfg = load_config(CONFIGS / "default.yaml", TINY + [f"output.dir={tmp_path}"])
    run_dir = Path(pretrain.run(cfg)["run_dir"])
    saved = json.loads((run_dir / "results.json").read_text())["eval"]["robustness"]
    assert {"i2t_ece_10", "t2i_ece_10", "i2t_ece_15", "t2i_ece_15"} <= set(saved["calibration"])
    assert set(saved["plots"]) == {"reliability_i2t", "reliability_t2i", "hardness"}
    assert all(Path(p).parent == run_dir / "plots" and Path(p).stat().st_size > 0 for p in saved["plots"].values())
    assert "ECE (15 bins)" in capsys.readouterr().out

    out = tmp_path / "again.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--output", str(out)]) == 0, capsys.readouterr().err
    again = json.loads(out.read_text())["eval"]["robustness"]
    assert all(Path(p).parent == tmp_path / "again_plots" and Path(p).is_file() for p in again["plots"].values())
    # The checkpoint reproduces the numbers of the end of training.
    for key in ("i2t_ece_15", "t2i_ece_15", "i2t_ece_10", "t2i_ece_10"):
        assert again["calibration"][key] == pytest.approx(saved["calibration"][key], abs=1e-6)
    assert again["geometry"] == pytest.approx(saved["geometry"])
    assert "mixup hardness" in capsys.readouterr().out

    cfg_off = load_config(CONFIGS / "default.yaml", TINY + [f"output.dir={tmp_path}", "eval.robustness=false", "output.name=no-robustness"])
    off = pretrain.run(cfg_off)
    assert "robustness" not in off["eval"] and "retrieval" in off["eval"]
