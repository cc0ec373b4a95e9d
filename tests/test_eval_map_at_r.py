"""mAP@R and R-Precision: hand-computed rankings, pessimistic ties, chunking, all topologies."""
import logging

import pytest
import torch

import topoclip
from topoclip.eval import map_at_r_scores, retrieval_map_at_r, retrieval_recall

TOPOLOGY_ARGS = {
    "sphere": dict(dim=6),
    "euclidean": dict(dim=6),
    "oblique-inner": dict(n=3, m=2),
    "oblique-geodesic": dict(n=3, m=2),
}


def per_query(scores, positive):
    out = map_at_r_scores(torch.tensor([scores]), torch.tensor([positive]))
    return float(out["mAP@R"][0]), float(out["R-P"][0]), float(out["R@1"][0])


# --------------------------------------------------------------------------- hand-computed
def test_hand_computed_single_query():
    # Ranking: c0(+) c1(-) c2(+) c3(-) c4(+); R = 3 -> judge the top 3: + - +.
    # R-P = 2/3;  mAP@R = (1/3) * (P(1)*1 + P(2)*0 + P(3)*1) = (1/3) * (1 + 2/3) = 5/9.
    ap, rp, r1 = per_query([0.9, 0.8, 0.7, 0.6, 0.5], [True, False, True, False, True])
    assert ap == pytest.approx(5 / 9)
    assert rp == pytest.approx(2 / 3)
    assert r1 == 1.0


def test_ties_rank_negatives_first():
    # p1=0.9, n1=0.7, p2=0.7 (tie with n1), n2=0.2, p3=0.1; R = 3.
    # Pessimistic order: p1 n1 p2 n2 p3 -> top 3 = + - +: mAP@R = (1/3)(1 + 2/3) = 5/9, R-P = 2/3.
    # (Optimistic order p1 p2 n1 would give mAP@R = 2/3: the convention matters.)
    ap, rp, _ = per_query([0.9, 0.7, 0.7, 0.2, 0.1], [True, False, True, False, True])
    assert ap == pytest.approx(5 / 9)
    assert rp == pytest.approx(2 / 3)
    # A lone positive tied with a negative is ranked second: R = 1 -> all zero.
    assert per_query([1.0, 1.0, 0.0], [True, False, False]) == (0.0, 0.0, 0.0)
    # Ties among positives only cost nothing: positions 1 and 2 for R = 2.
    assert per_query([0.5, 0.5, 0.1], [True, True, False]) == pytest.approx((1.0, 1.0, 1.0))


def test_collapsed_model_scores_zero_and_nan_is_worst():
    # Every item scored equally: the 2 positives land at positions 3 and 4, outside the top 2.
    assert per_query([0.3] * 4, [True, False, True, False]) == (0.0, 0.0, 0.0)
    # NaN counts as -inf: a NaN positive is below every finite negative.
    assert per_query([float("nan"), 0.0], [True, False]) == (0.0, 0.0, 0.0)


def test_end_to_end_hand_computed_on_a_line():
    # Euclidean dim 1, similarity = -|x - y|. Images at 0 and 10.
    # Captions c0@1, c1@9 describe image 0; c2@11, c3@4 describe image 1.
    topo = topoclip.topology("euclidean", dim=1)
    images = torch.tensor([[0.0], [10.0]])
    texts = torch.tensor([[1.0], [9.0], [11.0], [4.0]])
    c2i = torch.tensor([0, 0, 1, 1])
    # I->T image 0: distances c0 1, c3 4, c1 9, c2 11 -> + - + -; R=2: AP = 1/2 * 1 = 1/2, R-P 1/2, R@1 1.
    # I->T image 1: c1 1, c2 1 (tie: negative c1 first), c3 6, c0 9 -> - + + -;
    #               R=2: AP = 1/2 * (1/2) = 1/4, R-P 1/2, R@1 0.
    # T->I (R=1 each): c0 -> img0 first (hit), c1 -> img1 first (miss), c2 hit, c3 (4 vs 6) miss.
    result = retrieval_map_at_r(topo, images, texts, c2i, chunk_size=1)
    assert result == pytest.approx({
        "i2t_mAP@R": (1 / 2 + 1 / 4) / 2, "i2t_R-P": 1 / 2, "i2t_R@1": 1 / 2,
        "t2i_mAP@R": 1 / 2, "t2i_R-P": 1 / 2, "t2i_R@1": 1 / 2,
    })
    recall = retrieval_recall(topo, images, texts, c2i, ks=(1,))
    assert result["i2t_R@1"] == recall["i2t_R@1"] and result["t2i_R@1"] == recall["t2i_R@1"]

    # ECCV-style extra positive: caption c0 also matches image 1 (duplicates are one pair).
    pairs = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 3], [1, 0], [1, 0]])
    # I->T image 1 now has R=3 (c2, c3, c0): order c1(-) c2(+) c3(+) c0(+):
    #   top 3 = - + +: AP = 1/3 * (1/2 + 2/3) = 7/18, R-P = 2/3.
    # T->I c0: R=2 (both images) -> both in its top 2: AP = R-P = 1.
    result = retrieval_map_at_r(topo, images, texts, positive_pairs=pairs)
    assert result["i2t_mAP@R"] == pytest.approx((1 / 2 + 7 / 18) / 2)
    assert result["i2t_R-P"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result["t2i_mAP@R"] == pytest.approx((1 + 0 + 1 + 0) / 4)


# --------------------------------------------------------------------------- reference
def reference_per_query(scores, positive):
    """Plain-Python ranking: sort by (score desc, negatives before positives), read the top R."""
    scores = [float("-inf") if s != s else s for s in scores]
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], positive[j]))
    r = sum(positive)
    rel = [positive[j] for j in order[:r]]
    precisions = [sum(rel[: i + 1]) / (i + 1) for i in range(r)]
    return sum(p for p, hit in zip(precisions, rel) if hit) / r, sum(rel) / r


def test_matches_plain_python_reference_with_many_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (40, 12), generator=g).float()  # few values -> many ties
    positive = torch.rand(40, 12, generator=g) < 0.3
    positive[:, 0] |= ~positive.any(1)  # every row has a positive
    out = map_at_r_scores(scores, positive)
    for i in range(40):
        ap, rp = reference_per_query(scores[i].tolist(), positive[i].tolist())
        assert float(out["mAP@R"][i]) == pytest.approx(ap)
        assert float(out["R-P"][i]) == pytest.approx(rp)
        assert int(out["R"][i]) == int(positive[i].sum())


@pytest.mark.parametrize("name", sorted(TOPOLOGY_ARGS))
def test_chunked_equals_unchunked_and_reference(name):
    topo = topoclip.topology(name, **TOPOLOGY_ARGS[name])
    g = torch.Generator().manual_seed(1)
    images = topo.project(torch.randn(7, 6, generator=g, dtype=torch.float64))
    c2i = torch.randint(0, 7, (19,), generator=g)
    texts = topo.project(images[c2i] + 0.8 * torch.randn(19, 6, generator=g, dtype=torch.float64))
    pairs = torch.cat([torch.stack([c2i, torch.arange(19)], 1), torch.tensor([[3, 0], [5, 0], [0, 7]])])

    full = retrieval_map_at_r(topo, images, texts, positive_pairs=pairs, chunk_size=1000)
    for chunk in (1, 2, 3, 5):
        assert retrieval_map_at_r(topo, images, texts, positive_pairs=pairs, chunk_size=chunk) == pytest.approx(full)

    # Independent reference from the full score matrix.
    scores = topo.similarity(images, texts)
    positive = torch.zeros(7, 19, dtype=torch.bool)
    positive[pairs[:, 0], pairs[:, 1]] = True
    for prefix, s, pos in (("i2t", scores, positive), ("t2i", scores.T, positive.T)):
        rows = [i for i in range(pos.shape[0]) if pos[i].any()]
        ref = [reference_per_query(s[i].tolist(), pos[i].tolist()) for i in rows]
        assert full[f"{prefix}_mAP@R"] == pytest.approx(sum(a for a, _ in ref) / len(rows))
        assert full[f"{prefix}_R-P"] == pytest.approx(sum(b for _, b in ref) / len(rows))


def test_perfect_retrieval_scores_one():
    topo = topoclip.topology("sphere", dim=3)
    images = torch.eye(3)
    texts = torch.eye(3).repeat_interleave(2, dim=0)  # two exact captions per image
    c2i = torch.tensor([0, 0, 1, 1, 2, 2])
    assert set(retrieval_map_at_r(topo, images, texts, c2i).values()) == {1.0}


def test_images_without_captions_are_left_out_with_warning(caplog):
    topo = topoclip.topology("euclidean", dim=1)
    images = torch.tensor([[0.0], [10.0], [100.0]])  # image 2 has no caption
    texts = torch.tensor([[0.5], [10.5]])
    with caplog.at_level(logging.WARNING):
        result = retrieval_map_at_r(topo, images, texts, torch.tensor([0, 1]))
    assert result["i2t_mAP@R"] == 1.0
    assert "1 of 3 image->text queries have no positive" in caplog.text


def test_bad_inputs_name_the_problem():
    topo = topoclip.topology("euclidean", dim=2)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="caption_to_image or positive_pairs"):
        retrieval_map_at_r(topo, x, x)
    with pytest.raises(ValueError, match="caption_to_image must have shape"):
        retrieval_map_at_r(topo, x, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="image indices outside"):
        retrieval_map_at_r(topo, x, x, positive_pairs=torch.tensor([[3, 0]]))
    with pytest.raises(ValueError, match=r"shape \[P, 2\]"):
        retrieval_map_at_r(topo, x, x, positive_pairs=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="image_points must have shape"):
        retrieval_map_at_r(topo, torch.zeros(3, 5), x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_map_at_r(topo, x, x, torch.tensor([0, 1, 2]), chunk_size=0)
