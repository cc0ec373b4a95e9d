"""Alignment / uniformity / relative alignment / gap / ECE against straightforward formulas."""

from __future__ import annotations

import math

import pytest
import torch

import topoclip
from topoclip.eval.calibration import (
    expected_calibration_error,
    retrieval_calibration,
    save_reliability_diagram,
)
from topoclip.eval.geometry_metrics import (
    alignment,
    embedding_shift,
    geometry_report,
    modality_gap,
    relative_alignment,
    uniformity,
)


def pts(n, seed, topo):
    return topo.project(torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


TOPO = topoclip.topology("oblique-inner", n=3, m=2)


def sqd(a, b):
    return sum((float(p) - float(q)) ** 2 for p, q in zip(a, b))


def test_alignment_uniformity_relative_alignment_gap_match_loops():
    v, t = pts(5, 1, TOPO), pts(5, 2, TOPO)
    assert alignment(v, t) == pytest.approx(sum(sqd(a, b) for a, b in zip(v, t)) / 5)
    union = list(v) + list(t)
    pairs = [math.exp(-2 * sqd(x, y)) for i, x in enumerate(union) for j, y in enumerate(union) if i != j]
    want_u = math.log(sum(pairs) / len(pairs))
    assert uniformity(v, t) == pytest.approx(want_u)
    assert uniformity(v, t, chunk_size=3) == pytest.approx(want_u)  # chunked = full
    rel = [sqd(t[i], v[i]) - min(sqd(t[i], v[j]) for j in range(5) if j != i) for i in range(5)]
    assert relative_alignment(v, t) == pytest.approx(sum(rel) / 5)
    assert relative_alignment(v, t, chunk_size=2) == pytest.approx(sum(rel) / 5)
    gap = [sum(float(v[i, k]) for i in range(5)) / 5 - sum(float(t[i, k]) for i in range(5)) / 5 for k in range(6)]
    torch.testing.assert_close(modality_gap(v, t), torch.tensor(gap, dtype=torch.float64))
    report = geometry_report(v, t)
    assert set(report) == {"alignment", "uniformity", "relative_alignment", "modality_gap"}


def test_uniformity_prefers_spread_points():
    topo = topoclip.topology("sphere", dim=3)
    spread = topo.project(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]]))
    clumped = topo.project(torch.tensor([[1.0, 0, 0], [1.0, 0.1, 0], [1.0, 0, 0.1], [1.0, 0.1, 0.1]]))
    assert uniformity(spread) < uniformity(clumped)


def test_embedding_shift_closes_the_gap():
    v = pts(50, 3, TOPO) + torch.tensor([1.0, 0, 0, 1.0, 0, 0], dtype=torch.float64)
    t = pts(50, 4, TOPO)
    v, t = TOPO.project(v), TOPO.project(t)
    v0, t0 = embedding_shift(TOPO, v, t, c=0.0)
    torch.testing.assert_close(v0, v)
    v1, t1 = embedding_shift(TOPO, v, t, c=1.0)
    assert modality_gap(v1, t1).norm() < 0.5 * modality_gap(v, t).norm()
    norms = torch.linalg.vector_norm(TOPO.blocks(v1), dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_ece_matches_formula_on_hand_case():
    conf = torch.tensor([0.95, 0.92, 0.55, 0.51, 0.15])
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    # 10 bins: (0.9,1] -> {0.95, 0.92}: acc 0.5 conf 0.935; (0.5,0.6] -> {0.55, 0.51}: acc 1, conf 0.53;
    # (0.1,0.2] -> {0.15}: acc 0, conf 0.15
    want = 2 / 5 * abs(0.5 - 0.935) + 2 / 5 * abs(1 - 0.53) + 1 / 5 * abs(0 - 0.15)
    assert expected_calibration_error(conf, correct, num_bins=10) == pytest.approx(want, rel=1e-6)


def test_retrieval_calibration_with_several_captions(tmp_path):
    topo = topoclip.topology("sphere", dim=2)
    images = topo.project(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    texts = topo.project(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0]]))
    c2i = torch.tensor([0, 0, 1])
    out = retrieval_calibration(topo, images, texts, c2i, scale=10.0, num_bins=10)
    # I->T predicts a caption set: image 0's confidence is the mass of both its captions, not
    # of the best one alone. Both images' own sets are the most probable: every query correct.
    P = torch.softmax(10.0 * images @ texts.T, 1)
    p = torch.stack([P[0, 0] + P[0, 1], P[1, 2]])
    assert p[0] > P[0].max() + 0.1  # the grouping matters here
    want = expected_calibration_error(p, torch.ones(2), 10)
    assert out["i2t_ece"] == pytest.approx(want)
    assert sum(out["t2i_reliability"]["count"]) == 3
    png = tmp_path / "rel.png"
    save_reliability_diagram(out["i2t_reliability"], png, "i2t")
    assert png.stat().st_size > 1000
