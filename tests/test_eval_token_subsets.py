"""Token-subset zero-shot accuracy (Table 10): full set = zero-shot, hand case, seeds, errors."""
import math

import pytest
import torch
from torch import nn

import topoclip
from topoclip.eval import zeroshot_accuracy
from topoclip.eval.token_subsets import (
    default_subset_sizes,
    draw_subsets,
    evaluate_token_subsets,
    token_subset_accuracy,
)

OBLIQUE = ["oblique-inner", "oblique-geodesic"]


def random_problem(topo, num_images=30, num_classes=4, num_templates=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    class_texts = topo.project(torch.randn(num_classes, num_templates, topo.dim, generator=g))
    labels = torch.randint(0, num_classes, (num_images,), generator=g)
    # Images near their class's first template, so accuracy is informative (not 0 or 1).
    images = topo.project(class_texts[labels, 0] + 1.5 * torch.randn(num_images, topo.dim, generator=g))
    return images, labels, class_texts


@pytest.mark.parametrize("name", OBLIQUE)
def test_all_tokens_equals_zeroshot_accuracy(name):
    topo = topoclip.topology(name, n=3, m=4)
    images, labels, class_texts = random_problem(topo)
    [row] = token_subset_accuracy(topo, images, labels, class_texts, sizes=(4,), draws=5)
    expected = zeroshot_accuracy(topo, images, labels, class_texts, ks=(1,))["top1"]
    assert row["size"] == 4 and row["draws"] == 1 and row["subsets"] == [(0, 1, 2, 3)]
    assert row["mean"] == expected and row["std"] == 0.0
    assert 0.0 < expected < 1.0  # the problem is not degenerate


@pytest.mark.parametrize("name", OBLIQUE)
def test_hand_computed_two_tokens(name):
    # Ob(2, 2), one template per class. Class A = [(1,0), (1,0)], class B = [(0,1), (0,1)].
    # image 0 (A): token0 (1,0) -> A;  token1 (0.6,0.8) -> B (0.8 > 0.6; angle 0.64 < 0.93).
    # image 1 (B): token0 (0,1) -> B;  token1 (0,1) -> B.
    # {0}: both right -> 1.0;  {1}: image 0 wrong -> 0.5  => mean 0.75, population std 0.25.
    # {0,1}: image 0 scores A 1.6 vs B 0.8 (geodesic: 0.93 vs 1.70) -> right -> 1.0.
    topo = topoclip.topology(name, n=2, m=2)
    class_texts = torch.tensor([[[1.0, 0, 1, 0]], [[0.0, 1, 0, 1]]])
    images = torch.tensor([[1.0, 0, 0.6, 0.8], [0.0, 1, 0, 1]])
    labels = torch.tensor([0, 1])
    one, two = token_subset_accuracy(topo, images, labels, class_texts, sizes=(1, 2), draws=10)
    assert one["subsets"] == [(0,), (1,)] and one["draws"] == 2  # C(2,1)=2 <= 10: all used
    assert one["accuracies"] == [1.0, 0.5]
    assert one["mean"] == pytest.approx(0.75) and one["std"] == pytest.approx(0.25)
    assert two["mean"] == 1.0 and two["draws"] == 1


def test_subset_scores_sum_over_the_subset_only():
    # Independent check for oblique-inner: per-block inner products summed over each drawn subset.
    topo = topoclip.topology("oblique-inner", n=3, m=6)
    images, labels, class_texts = random_problem(topo, seed=3)
    [row] = token_subset_accuracy(topo, images, labels, class_texts, sizes=(2,), draws=4, seed=7)
    assert row["draws"] == 4
    ib = images.view(-1, 6, 3)
    tb = class_texts.view(4, 2, 6, 3)
    per_block = torch.einsum("ikn,ctkn->ictk", ib, tb)  # [N, C, T, m]
    for subset, accuracy in zip(row["subsets"], row["accuracies"]):
        logits = per_block[..., list(subset)].sum(-1).mean(-1)
        assert accuracy == pytest.approx(float((logits.argmax(1) == labels).float().mean()))


def test_deterministic_by_seed_and_independent_of_other_sizes():
    topo = topoclip.topology("oblique-geodesic", n=2, m=8)
    images, labels, class_texts = random_problem(topo, seed=1)
    a = token_subset_accuracy(topo, images, labels, class_texts, sizes=(2, 4), draws=5, seed=3)
    b = token_subset_accuracy(topo, images, labels, class_texts, sizes=(2, 4), draws=5, seed=3)
    c = token_subset_accuracy(topo, images, labels, class_texts, sizes=(4,), draws=5, seed=3)
    d = token_subset_accuracy(topo, images, labels, class_texts, sizes=(2, 4), draws=5, seed=4)
    assert a == b
    assert c[0] == a[1]
    assert d[0]["subsets"] != a[0]["subsets"]
    for row in a:
        assert row["draws"] == 5
        assert all(len(set(s)) == row["size"] and list(s) == sorted(s) for s in row["subsets"])
        assert row["mean"] == pytest.approx(sum(row["accuracies"]) / 5)


def test_default_sizes_and_enumeration():
    assert default_subset_sizes(16) == (1, 2, 4, 8, 16)
    assert default_subset_sizes(6) == (1, 2, 4, 6)
    assert default_subset_sizes(2) == (1, 2)
    assert draw_subsets(4, 2, draws=6) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert len(draw_subsets(5, 2, draws=3)) == 3 < math.comb(5, 2)


def test_bad_sizes_and_topologies_are_rejected():
    topo = topoclip.topology("oblique-inner", n=2, m=4)
    images, labels, class_texts = random_problem(topo)
    for sizes in ((5,), (0,), (1.5,), ()):
        with pytest.raises(ValueError, match="sizes"):
            token_subset_accuracy(topo, images, labels, class_texts, sizes=sizes)
    with pytest.raises(ValueError, match="draws"):
        token_subset_accuracy(topo, images, labels, class_texts, sizes=(1,), draws=0)
    sphere = topoclip.topology("sphere", dim=8)
    with pytest.raises(ValueError, match="several blocks"):
        token_subset_accuracy(sphere, images, labels, class_texts)
    with pytest.raises(ValueError, match="image_points must have shape"):
        token_subset_accuracy(topo, images[:, :4], labels, class_texts)


# --------------------------------------------------------------------------- model level
class CountingEncoder(nn.Module):
    """Fixed random linear maps onto the topology; counts how often it is run."""

    def __init__(self, topo, image_numel=12, vocab_size=30):
        super().__init__()
        torch.manual_seed(0)
        self.topology = topo
        self.image_head = nn.Linear(image_numel, topo.dim)
        self.embedding = nn.Embedding(vocab_size, topo.dim)
        self.calls = 0

    def encode_image(self, images):
        self.calls += 1
        return self.topology.project(self.image_head(images.flatten(1)))

    def encode_text(self, input_ids, attention_mask):
        self.calls += 1
        return self.topology.project((self.embedding(input_ids) * attention_mask.unsqueeze(-1)).sum(1))


class Tokenizer:
    def __call__(self, texts):
        ids = torch.tensor([[1 + ord(ch) % 29 for ch in t.ljust(12)[:12]] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class TinySet(torch.utils.data.Dataset):
    name, classnames, templates = "tiny", ["red", "green", "blue"], ["a {}", "the {} one"]

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.images = torch.randn(10, 3, 2, 2, generator=g)
        self.labels = [i % 3 for i in range(10)]

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_model_wrapper_embeds_once_and_matches_tensor_level():
    topo = topoclip.topology("oblique-inner", n=2, m=4)
    model, dataset, tokenizer = CountingEncoder(topo), TinySet(), Tokenizer()
    result = evaluate_token_subsets(model, dataset, tokenizer, draws=3, batch_size=4)
    assert model.calls == 2 + 3  # 6 texts and 10 images in batches of 4, once for all 3 sizes
    assert [r["size"] for r in result] == [1, 2, 4]
    with torch.no_grad():
        texts = [t.format(c) for c in dataset.classnames for t in dataset.templates]
        class_texts = model.encode_text(**tokenizer(texts)).view(3, 2, topo.dim)
        images = model.encode_image(dataset.images)
    expected = token_subset_accuracy(topo, images, torch.tensor(dataset.labels), class_texts, draws=3)
    assert result == expected

    single = CountingEncoder(topoclip.topology("sphere", dim=8))
    with pytest.raises(ValueError, match="several blocks"):
        evaluate_token_subsets(single, dataset, tokenizer)
    assert single.calls == 0  # rejected before any embedding
