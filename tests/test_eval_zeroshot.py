"""Zero-shot classification: template ensembling by averaged similarities, top-k, wrappers."""
import math

import pytest
import torch
from torch import nn

import topoclip
from tests.helpers import FakeDualEncoder, FakeTokenizer
from topoclip.eval import embed_class_texts, topk_accuracy, zeroshot_accuracy, zeroshot_classify, zeroshot_logits

TOPOLOGY_ARGS = {
    "sphere": dict(dim=12),
    "euclidean": dict(dim=12),
    "oblique-inner": dict(n=4, m=3),
    "oblique-geodesic": dict(n=4, m=3),
}


def embedding_average_logits(topo, image_points, class_text_points):
    """The single-sphere recipe we do NOT use: mean template embedding, re-project, score."""
    return topo.similarity(image_points, topo.project(class_text_points.mean(dim=1)))


# --------------------------------------------------------------------------- hand-computed
def test_euclidean_similarity_average_differs_from_embedding_average():
    # Image at 0 on a line. Class 0 templates at -1 and +1: distances 1, 1 -> score -1, but
    # their mean embedding 0 sits ON the image (score 0). Class 1 templates at 0.5, 0.5:
    # score -0.5 either way. Averaging similarities picks class 1, averaging embeddings class 0.
    topo = topoclip.topology("euclidean", dim=1)
    image = torch.tensor([[0.0]])
    class_texts = torch.tensor([[[-1.0], [1.0]], [[0.5], [0.5]]])  # [C=2, T=2, d=1]

    logits = zeroshot_logits(topo, image, class_texts)

    torch.testing.assert_close(logits, torch.tensor([[-1.0, -0.5]]))
    assert embedding_average_logits(topo, image, class_texts).argmax(1).item() == 0
    assert logits.argmax(1).item() == 1


def test_geodesic_similarity_average_differs_from_embedding_average():
    # Ob(2, 1): the unit circle, similarity = -angle. Image at angle 0. Class 0 templates at
    # +-80 deg: score -80 deg, but their renormalised mean points at 0 deg (score 0). Class 1
    # templates at 30 and 40 deg: score -35 deg; their mean also points at 35 deg.
    topo = topoclip.topology("oblique-geodesic", n=2, m=1)

    def at(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    image = torch.tensor([at(0)])
    class_texts = torch.tensor([[at(80), at(-80)], [at(30), at(40)]])

    logits = zeroshot_logits(topo, image, class_texts)

    torch.testing.assert_close(logits, torch.tensor([[-math.radians(80), -math.radians(35)]]))
    assert embedding_average_logits(topo, image, class_texts).argmax(1).item() == 0
    assert logits.argmax(1).item() == 1
    assert zeroshot_accuracy(topo, image, torch.tensor([1]), class_texts)["top1"] == 1.0


def test_topk_hand_computed_and_capped_at_number_of_classes():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]])
    labels = torch.tensor([0, 0, 2])  # true class ranked 1st, 3rd (last), 2nd
    result = topk_accuracy(logits, labels, ks=(1, 2, 3, 5))
    assert result == pytest.approx({"top1": 1 / 3, "top2": 2 / 3, "top3": 1.0, "top5": 1.0})


def test_topk_ties_count_as_misses():
    # A collapsed model (all classes scored equally) must not get credit from index order.
    logits = torch.zeros(4, 6)
    result = topk_accuracy(logits, torch.tensor([0, 1, 2, 3]), ks=(1, 5))
    assert result == {"top1": 0.0, "top5": 0.0}


def test_zeroshot_accuracy_reports_count_and_default_keys():
    topo = topoclip.topology("euclidean", dim=1)
    images = torch.tensor([[0.0], [1.0], [5.0]])
    class_texts = torch.tensor([[[0.0]], [[5.0]]])  # 2 classes, 1 template
    result = zeroshot_accuracy(topo, images, torch.tensor([0, 1, 1]), class_texts)
    # class 0: its one image right; class 1: one of two (image 1.0 is nearer class 0's text)
    assert result == {"top1": pytest.approx(2 / 3), "top5": 1.0, "n": 3, "mean_per_class_recall": pytest.approx((1 + 1 / 2) / 2)}


# --------------------------------------------------------------------------- chunking
def reference_logits(topo, image_points, class_text_points):
    """One similarity call per (class, template), averaged over templates."""
    num_classes, num_templates, _ = class_text_points.shape
    columns = []
    for c in range(num_classes):
        total = sum(topo.similarity(image_points, class_text_points[c, t : t + 1]) for t in range(num_templates))
        columns.append(total / num_templates)
    return torch.cat(columns, dim=1)


class SimilaritySpy:
    def __init__(self, topo):
        self.topo, self.dim, self.shapes = topo, topo.dim, []

    def similarity(self, u, v):
        self.shapes.append((u.shape[0], v.shape[0]))
        return self.topo.similarity(u, v)


@pytest.mark.parametrize("name", sorted(TOPOLOGY_ARGS))
def test_chunked_logits_equal_per_template_reference(name):
    topo = topoclip.topology(name, **TOPOLOGY_ARGS[name])
    g = torch.Generator().manual_seed(0)
    images = topo.project(torch.randn(20, topo.dim, generator=g))
    class_texts = topo.project(torch.randn(5 * 3, topo.dim, generator=g)).view(5, 3, topo.dim)
    expected = reference_logits(topo, images, class_texts)
    # Template averaging is not a no-op here, so the test would catch e.g. a max over templates.
    assert not torch.allclose(expected, embedding_average_logits(topo, images, class_texts))
    for chunk_size in (1, 7, 20):
        spy = SimilaritySpy(topo)
        logits = zeroshot_logits(spy, images, class_texts, chunk_size=chunk_size)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        # One call per chunk of images, each against all C*T texts.
        assert len(spy.shapes) == math.ceil(20 / chunk_size)
        assert all(rows <= chunk_size and cols == 15 for rows, cols in spy.shapes)


def test_bad_shapes_name_the_argument():
    topo = topoclip.topology("sphere", dim=4)
    with pytest.raises(ValueError, match="class_text_points"):
        zeroshot_logits(topo, torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="image_points"):
        zeroshot_logits(topo, torch.zeros(2, 5), torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="labels"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="placeholder"):
        embed_class_texts(nn.Identity(), ["cat"], ["a photo"], tokenizer=None)


# --------------------------------------------------------------------------- model level
class TinyClassificationSet(torch.utils.data.Dataset):
    name = "tiny-shapes"
    classnames = ["circle", "square", "star"]
    templates = ["a {}", "a photo of a {}"]

    def __init__(self, num_images=8):
        g = torch.Generator().manual_seed(2)
        self.images = torch.randn(num_images, 3, 4, 4, generator=g)
        self.labels = [i % 3 for i in range(num_images)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@pytest.mark.parametrize("name", ["euclidean", "oblique-inner"])
def test_zeroshot_classify_matches_tensor_level_and_restores_mode(name):
    topo = topoclip.topology(name, **TOPOLOGY_ARGS[name])
    dataset, tokenizer = TinyClassificationSet(), FakeTokenizer()
    model = FakeDualEncoder(topo, image_numel=3 * 4 * 4, dropout=0.5).train()

    result = zeroshot_classify(model, dataset, tokenizer, batch_size=3, ks=(1, 2, 5))

    assert model.training and model.dropout.training
    assert model.modes_seen and not any(model.modes_seen)
    model.eval()
    with torch.no_grad():
        image_points = model.encode_image(dataset.images)
        texts = [t.format(c) for c in dataset.classnames for t in dataset.templates]
        class_texts = model.encode_text(**tokenizer(texts)).view(3, 2, topo.dim)
    expected = zeroshot_accuracy(topo, image_points, torch.tensor(dataset.labels), class_texts, ks=(1, 2, 5))
    assert result == pytest.approx(expected)
    assert result["n"] == 8 and result["top5"] == 1.0  # 3 classes: top-5 is capped to top-3

    # Precomputed text points: no tokenizer needed, same answer.
    assert zeroshot_classify(model, dataset, None, class_text_points=class_texts, ks=(1, 2, 5)) == pytest.approx(expected)
