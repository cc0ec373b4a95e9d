"""Evaluation that embeds once: an evaluation is a list of (dataset, tasks) entries; each
dataset is embedded once and every metric is a function of the embedded set."""

import pytest
import torch

import topoclip
from tests.helpers import FakeDualEncoder, FakeTokenizer
from topoclip.data import TensorClassificationSet, TensorRetrievalSet
from topoclip.eval import (
    EvalEntry,
    embed_dataset,
    evaluate_map_at_r,
    evaluate_retrieval,
    evaluate_robustness,
    linear_probe_metrics,
    nest_records,
    run_evaluation,
    run_linear_probe,
    zeroshot_classify,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingEncoder(FakeDualEncoder):
    """Counts the images and texts it encodes, and gives pre-projection features."""

    def __init__(self, topo):
        super().__init__(topo, image_numel=3 * 4 * 4)
        self.images_seen = self.texts_seen = 0

    def encode_image(self, images):
        self.images_seen += images.shape[0]
        return super().encode_image(images)

    def encode_text(self, input_ids, attention_mask):
        self.texts_seen += input_ids.shape[0]
        return super().encode_text(input_ids, attention_mask)

    def image_features(self, images):
        return images.flatten(1)


def _retrieval_set(n=12):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g)
    captions = [f"caption {i} of image {i // 2}" for i in range(2 * n)]
    return TensorRetrievalSet("pairs", images, captions, [i // 2 for i in range(2 * n)])


def _classification_set(name="shape", n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g)
    return TensorClassificationSet(name, images, [i % 3 for i in range(n)], ["circle", "square", "cross"], ["a {}", "the {}"])


@pytest.fixture
def topo():
    return topoclip.topology("oblique-inner", n=4, m=2)


def test_a_retrieval_set_is_embedded_once_for_every_task(topo):
    model, tok, pairs = CountingEncoder(topo), FakeTokenizer(), _retrieval_set()
    records = run_evaluation(model, tok, [EvalEntry(pairs, ("retrieval", "map_at_r", "robustness"))], batch_size=5)
    assert model.images_seen == len(pairs) and model.texts_seen == len(pairs.captions)
    assert [(r.dataset, r.task) for r in records] == [("pairs", "retrieval"), ("pairs", "map_at_r"), ("pairs", "robustness")]


def test_records_equal_the_one_dataset_evaluations(topo):
    model, tok = CountingEncoder(topo), FakeTokenizer()
    pairs, shapes = _retrieval_set(), _classification_set()
    entries = [EvalEntry(shapes, ("zeroshot",)), EvalEntry(pairs, ("retrieval", "map_at_r", "robustness"))]
    nested = nest_records(run_evaluation(model, tok, entries, batch_size=5))
    assert list(nested) == ["zeroshot", "retrieval", "map_at_r", "robustness"]
    assert nested["zeroshot"] == {"shape": zeroshot_classify(model, shapes, tok, batch_size=5)}
    assert nested["retrieval"] == evaluate_retrieval(model, pairs, tok, batch_size=5)
    assert nested["map_at_r"] == evaluate_map_at_r(model, pairs, tok, batch_size=5)
    assert nested["robustness"] == evaluate_robustness(model, pairs, tok, batch_size=5)


def test_several_datasets_of_one_task_are_keyed_by_dataset_and_plot_apart(topo, tmp_path):
    model, tok = CountingEncoder(topo), FakeTokenizer()
    a, b = _retrieval_set(10), _retrieval_set(12)
    b.name = "other"
    entries = [EvalEntry(a, ("retrieval", "robustness")), EvalEntry(b, ("retrieval", "robustness"))]
    nested = nest_records(run_evaluation(model, tok, entries, batch_size=4, plot_dir=tmp_path))
    assert set(nested["retrieval"]) == {"pairs", "other"} and set(nested["robustness"]) == {"pairs", "other"}
    assert (tmp_path / "pairs" / "hardness.png").is_file() and (tmp_path / "other" / "hardness.png").is_file()


def test_embedded_set_carries_points_relation_topology_and_scale(topo):
    model, tok = CountingEncoder(topo), FakeTokenizer()
    emb = embed_dataset(model, _retrieval_set(), tok, batch_size=4)
    assert emb.is_retrieval and not emb.is_classification
    assert emb.image_points.shape == (12, topo.dim) and emb.text_points.shape == (24, topo.dim)
    assert torch.equal(emb.caption_to_image, torch.arange(24) // 2)
    assert emb.topology is topo and emb.scale == pytest.approx(model.logit_scale.value)
    cls = embed_dataset(model, _classification_set(), tok, batch_size=4)
    assert cls.class_text_points.shape == (3, 2, topo.dim) and torch.equal(cls.labels, torch.arange(16) % 3)
    with pytest.raises(ValueError, match="needs a RetrievalSet"):
        run_evaluation(model, tok, [EvalEntry(_classification_set(), ("retrieval",))])


def test_linear_probe_of_embedded_sets_equals_the_direct_probe(topo):
    model, tok = CountingEncoder(topo), FakeTokenizer()
    train, test = _classification_set("train", 30, seed=2), _classification_set("test", 12, seed=3)
    direct = run_linear_probe(model, train, test, batch_size=8)
    embedded = linear_probe_metrics(
        embed_dataset(model, train, tok, batch_size=8, with_features=True),
        embed_dataset(model, test, tok, batch_size=8, with_features=True),
    )
    assert embedded == direct
    with pytest.raises(ValueError, match="with_features=True"):
        linear_probe_metrics(embed_dataset(model, train, tok), embed_dataset(model, test, tok))


def test_unknown_task_and_empty_entries_are_refused():
    with pytest.raises(ValueError, match="eval task 'recall': unknown"):
        EvalEntry(_retrieval_set(), ("recall",))
    with pytest.raises(ValueError, match="no tasks"):
        EvalEntry(_retrieval_set(), ())


def test_identical_captions_are_one_text_with_several_positive_images(topo):
    """~17 images sharing a caption string scored R@1 = 0 when identical texts tied against
    each other; merged, an image is a hit when its (shared) text comes first."""
    model, tok = CountingEncoder(topo), FakeTokenizer()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=g)
    captions = ["a red circle"] * 3 + ["a blue square"] * 3
    dataset = TensorRetrievalSet("shared", images, captions, list(range(6)))
    emb = embed_dataset(model, dataset, tok)
    assert emb.text_points.shape[0] == 2 and model.texts_seen == 2  # each distinct string embedded once
    assert emb.merged_pairs.tolist() == [[0, 0], [1, 0], [2, 0], [3, 1], [4, 1], [5, 1]]
    assert emb.caption_points.shape == (6, topo.dim)
    merged = evaluate_retrieval(model, dataset, tok)
    # I->T by hand: an image is a hit when its class's text scores higher than the other one.
    s = topo.similarity(emb.image_points, emb.text_points)
    own = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = float((s.gather(1, own[:, None]).squeeze(1) > s.gather(1, 1 - own[:, None]).squeeze(1)).float().mean())
    assert merged["i2t_R@1"] == pytest.approx(expected)
    unmerged = embed_dataset(model, dataset, tok, merge_duplicate_captions=False)
    from topoclip.eval import retrieval_metrics

    assert retrieval_metrics(unmerged)["i2t_R@1"] == 0.0  # the old, pessimistic reading
