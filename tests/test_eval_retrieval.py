"""Retrieval recall: hand-computed cases, tie rule, chunking, model-level wrapper."""
import pytest
import torch

import topoclip
from tests.helpers import FakeDualEncoder, FakeTokenizer
from topoclip.eval import embed_images, embed_texts, evaluate_retrieval, retrieval_recall

TOPOLOGY_ARGS = {
    "sphere": dict(dim=12),
    "euclidean": dict(dim=12),
    "oblique-inner": dict(n=4, m=3),
    "oblique-geodesic": dict(n=4, m=3),
}


def line(*positions):
    """Points on the real line, for Euclidean dim-1 examples whose distances are easy by hand."""
    return torch.tensor(positions, dtype=torch.float32).unsqueeze(1)


# --------------------------------------------------------------------------- hand-computed
# Images on a line at 0, 10, 20; five captions, two for image 0 and two for image 2.
#   caption:  c0   c1   c2    c3   c4
#   position: -15  -1   14.5  13   30
#   image:     0    0    1     2    2
# I->T (distance to each caption; GT marked *):
#   I0 (0):  c0 15*, c1 1*, c2 14.5, c3 13, c4 30 -> best GT c1 (its 2nd caption) first -> hit@1
#            (its 1st caption c0 comes only 3rd: "any GT" matters)
#   I1 (10): c0 25, c1 11, c2 4.5*, c3 3,  c4 20  -> c3 beats c2                        -> hit@2 only
#   I2 (20): c0 35, c1 21, c2 5.5,  c3 7*, c4 10* -> c2 beats best GT c3                -> hit@2 only
#   R@1 = 1/3, R@2 = 3/3
# T->I (distance to I0, I1, I2; GT marked *):
#   c0: 15*, 25, 35 hit@1      c1: 1*, 11, 21   hit@1      c2: 14.5, 4.5*, 5.5   hit@1
#   c3: 13, 3, 7*   hit@2      c4: 30, 20, 10*  hit@1
#   R@1 = 4/5, R@2 = 5/5
HAND_IMAGES = line(0, 10, 20)
HAND_TEXTS = line(-15, -1, 14.5, 13, 30)
HAND_CAPTION_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])


@pytest.mark.parametrize("chunk_size", [1, 2, 1024])
def test_hand_computed_recall(chunk_size):
    topo = topoclip.topology("euclidean", dim=1)
    result = retrieval_recall(topo, HAND_IMAGES, HAND_TEXTS, HAND_CAPTION_TO_IMAGE, ks=(1, 2, 10), chunk_size=chunk_size)
    assert result == pytest.approx(
        {"i2t_R@1": 1 / 3, "i2t_R@2": 1.0, "i2t_R@10": 1.0, "t2i_R@1": 4 / 5, "t2i_R@2": 1.0, "t2i_R@10": 1.0}
    )


def test_default_keys_and_types():
    topo = topoclip.topology("euclidean", dim=1)
    result = retrieval_recall(topo, HAND_IMAGES, HAND_TEXTS, HAND_CAPTION_TO_IMAGE)
    assert list(result) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    assert all(type(value) is float for value in result.values())  # JSON-ready


def test_caption_order_does_not_matter():
    topo = topoclip.topology("euclidean", dim=1)
    perm = torch.tensor([3, 0, 4, 2, 1])
    expected = retrieval_recall(topo, HAND_IMAGES, HAND_TEXTS, HAND_CAPTION_TO_IMAGE, ks=(1, 2))
    permuted = retrieval_recall(topo, HAND_IMAGES, HAND_TEXTS[perm], HAND_CAPTION_TO_IMAGE[perm], ks=(1, 2))
    assert permuted == expected


# --------------------------------------------------------------------------- ties and NaN
def test_ties_count_against_the_query():
    # Images 0 and 1 are the same point, so caption 0 (of image 0) is exactly as close to
    # image 1 as to its own image: pessimistic rank 1 -> miss at 1, hit at 2.
    topo = topoclip.topology("euclidean", dim=1)
    images = line(0, 0, 50)
    texts = line(1, 49)
    result = retrieval_recall(topo, images, texts, torch.tensor([0, 2]), ks=(1, 2))
    assert result["t2i_R@1"] == pytest.approx(1 / 2)  # caption 1 -> image 2 is a clean hit
    assert result["t2i_R@2"] == 1.0
    # I->T: image 1 has no caption and is left out; images 0 and 2 are clean hits.
    assert result["i2t_R@1"] == 1.0


def test_collapsed_embeddings_score_zero_not_perfect():
    # Every point identical: ground truth first in index order must not count as a hit.
    topo = topoclip.topology("sphere", dim=4)
    points = topo.project(torch.ones(3, 4))
    result = retrieval_recall(topo, points, points.clone(), torch.arange(3), ks=(1, 2, 3))
    assert result == {"i2t_R@1": 0.0, "i2t_R@2": 0.0, "i2t_R@3": 1.0, "t2i_R@1": 0.0, "t2i_R@2": 0.0, "t2i_R@3": 1.0}


def test_nan_points_are_misses():
    topo = topoclip.topology("euclidean", dim=1)
    images = line(0, 10)
    texts = line(float("nan"), 10)
    result = retrieval_recall(topo, images, texts, torch.tensor([0, 1]), ks=(1,))
    assert result["t2i_R@1"] == 0.5
    assert result["i2t_R@1"] == 0.5


# --------------------------------------------------------------------------- chunking
def random_case(topo, num_images=20, num_texts=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = topo.project(torch.randn(num_images, topo.dim, generator=g))
    texts = topo.project(torch.randn(num_texts, topo.dim, generator=g))
    # Every image gets at least one caption, some several, in shuffled order.
    caption_to_image = torch.cat([torch.arange(num_images), torch.randint(num_images, (num_texts - num_images,), generator=g)])
    return images, texts, caption_to_image[torch.randperm(num_texts, generator=g)]


def reference_recall(topo, images, texts, caption_to_image, ks):
    """Full-matrix top-k membership (no ties in random data, so the tie rule is moot)."""
    scores = topo.similarity(images, texts)
    out = {}
    for k in ks:
        hits = [bool((caption_to_image[scores[i].argsort(descending=True)[:k]] == i).any()) for i in range(len(images))]
        out[f"i2t_R@{k}"] = sum(hits) / len(hits)
    for k in ks:
        hits = [int(caption_to_image[j]) in scores[:, j].argsort(descending=True)[:k].tolist() for j in range(len(texts))]
        out[f"t2i_R@{k}"] = sum(hits) / len(hits)
    return out


class SimilaritySpy:
    """Wraps a topology and records the shapes of its similarity calls."""

    def __init__(self, topo):
        self.topo, self.dim, self.shapes = topo, topo.dim, []

    def similarity(self, u, v):
        self.shapes.append((u.shape[0], v.shape[0]))
        return self.topo.similarity(u, v)


@pytest.mark.parametrize("name", sorted(TOPOLOGY_ARGS))
def test_chunked_equals_full_matrix_reference(name):
    topo = topoclip.topology(name, **TOPOLOGY_ARGS[name])
    images, texts, caption_to_image = random_case(topo)
    ks = (1, 5, 10)
    expected = reference_recall(topo, images, texts, caption_to_image, ks)
    assert 0.0 < expected["i2t_R@5"] < 1.0  # the random case is not trivially all-hit or all-miss
    for chunk_size in (1, 7, len(texts)):
        spy = SimilaritySpy(topo)
        result = retrieval_recall(spy, images, texts, caption_to_image, ks, chunk_size=chunk_size)
        assert result == pytest.approx(expected), (name, chunk_size)
        # Never more than chunk_size query rows scored at once.
        assert max(rows for rows, _ in spy.shapes) <= chunk_size


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_problem():
    topo = topoclip.topology("euclidean", dim=1)
    with pytest.raises(ValueError, match="caption_to_image"):
        retrieval_recall(topo, HAND_IMAGES, HAND_TEXTS, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="caption_to_image"):
        retrieval_recall(topo, HAND_IMAGES, HAND_TEXTS, torch.tensor([0, 0, 1, 2, 3]))
    with pytest.raises(ValueError, match="text_points"):
        retrieval_recall(topo, HAND_IMAGES, torch.zeros(5, 2), HAND_CAPTION_TO_IMAGE)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_recall(topo, HAND_IMAGES, HAND_TEXTS, HAND_CAPTION_TO_IMAGE, chunk_size=0)
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(topo, HAND_IMAGES, HAND_TEXTS, HAND_CAPTION_TO_IMAGE, ks=(0,))


# --------------------------------------------------------------------------- model level
class TinyRetrievalSet(torch.utils.data.Dataset):
    name = "tiny-retrieval"

    def __init__(self, num_images=7):
        g = torch.Generator().manual_seed(1)
        self.images = torch.randn(num_images, 3, 4, 4, generator=g)
        self.captions = [f"picture {i} number {j}" for i in range(num_images) for j in range(1 + i % 3)]
        self.caption_to_image = torch.tensor([i for i in range(num_images) for _ in range(1 + i % 3)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.mark.parametrize("name", ["sphere", "oblique-geodesic"])
def test_evaluate_retrieval_matches_tensor_level_and_restores_mode(name):
    topo = topoclip.topology(name, **TOPOLOGY_ARGS[name])
    dataset, tokenizer = TinyRetrievalSet(), FakeTokenizer()
    model = FakeDualEncoder(topo, image_numel=3 * 4 * 4, dropout=0.5)
    model.train()
    model.frozen.eval()

    result = evaluate_retrieval(model, dataset, tokenizer, batch_size=3, ks=(1, 2, 5))

    assert model.training and model.dropout.training and not model.frozen.training
    assert model.modes_seen and not any(model.modes_seen)  # every encode call ran in eval mode
    model.eval()
    with torch.no_grad():
        image_points = model.encode_image(dataset.images)
        text_points = model.encode_text(**tokenizer(dataset.captions))
    expected = retrieval_recall(topo, image_points, text_points, dataset.caption_to_image, ks=(1, 2, 5))
    assert result == pytest.approx(expected)
    assert tokenizer.calls >= 2  # 12 captions in batches of 3


def test_embed_helpers_batch_and_order():
    topo = topoclip.topology("euclidean", dim=12)
    dataset, tokenizer = TinyRetrievalSet(), FakeTokenizer()
    model = FakeDualEncoder(topo, image_numel=3 * 4 * 4, dropout=0.5).eval()
    images = embed_images(model, dataset, batch_size=2)
    texts = embed_texts(model, dataset.captions, tokenizer, batch_size=5)
    assert not images.requires_grad and not texts.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(images, model.encode_image(dataset.images))
        torch.testing.assert_close(texts, model.encode_text(**tokenizer(dataset.captions)))
    # A shuffling loader would pair embeddings with the wrong captions.
    shuffled = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
    with pytest.raises(ValueError, match="shuffl"):
        embed_images(model, shuffled)
    with pytest.raises(ValueError, match="texts"):
        embed_texts(model, "a single string", tokenizer)
