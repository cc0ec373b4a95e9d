"""Geodesic mixup losses: hand-computed values on a 3-pair batch, degenerate batches, m³ sum."""

from __future__ import annotations

import math

import pytest
import torch

import topoclip
from topoclip.losses.mixup import (
    M3MixLoss,
    MixupConfig,
    geodesic_mix,
    l_mix_loss,
    m2_mix_loss,
    v_mix_loss,
    vl_mix_loss,
)

SPECS = {
    "sphere": dict(dim=6),
    "euclidean": dict(dim=6),
    "oblique-inner": dict(n=3, m=2),
    "oblique-geodesic": dict(n=3, m=2),
}


def points(topo, seed):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return topo.project(x)


# -- independent scalar reference: one pair at a time, plain Python -----------------------

def ref_sim(topo, a, b):
    a, b = a.tolist(), b.tolist()
    if topo.name == "euclidean":
        return -math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))
    n = topo.block_dim
    blocks = [(a[k:k + n], b[k:k + n]) for k in range(0, len(a), n)]
    dots = [sum(p * q for p, q in zip(x, y)) for x, y in blocks]
    if topo.name == "oblique-geodesic":
        return -math.sqrt(sum(math.acos(max(-1, min(1, c))) ** 2 for c in dots))
    return sum(dots)


def ref_mix(topo, a, b, lam):
    """m_lam(a, b) = a sin(lam θ)/sin θ + b sin((1-lam) θ)/sin θ per block; linear on R^d."""
    if topo.name == "euclidean":
        return lam * a + (1 - lam) * b
    n = topo.block_dim
    out = []
    for k in range(0, a.shape[0], n):
        x, y = a[k:k + n], b[k:k + n]
        theta = math.acos(max(-1.0, min(1.0, float(x @ y))))
        if theta < 1e-7:  # the middle row of an odd batch is mixed with itself
            out.append(x)
            continue
        out.append((math.sin(lam * theta) * x + math.sin((1 - lam) * theta) * y) / math.sin(theta))
    return torch.cat(out)


def ref_ce(logit_rows, target_rows):
    total = 0.0
    for row, target in zip(logit_rows, target_rows):
        lse = math.log(sum(math.exp(z) for z in row))
        total += sum(-p * (z - lse) for z, p in zip(row, target))
    return total / len(logit_rows)


def onehots(n):
    return [[1.0 if j == i else 0.0 for j in range(n)] for i in range(n)]


@pytest.mark.parametrize("name", list(SPECS))
def test_m2_mix_matches_hand_computation(name):
    topo = topoclip.topology(name, **SPECS[name])
    v, t = points(topo, 1), points(topo, 2)
    lam, s = 0.3, 2.5
    mixed = [ref_mix(topo, v[j], t[j], lam) for j in range(3)]
    rows_v = [[s * (ref_sim(topo, v[i], t[i]) if j == i else ref_sim(topo, v[i], mixed[j])) for j in range(3)] for i in range(3)]
    rows_t = [[s * (ref_sim(topo, t[i], v[i]) if j == i else ref_sim(topo, t[i], mixed[j])) for j in range(3)] for i in range(3)]
    want = 0.5 * (ref_ce(rows_v, onehots(3)) + ref_ce(rows_t, onehots(3)))
    assert float(m2_mix_loss(topo, v, t, s, lam)) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("side", ["v", "l"])
def test_uni_modal_mix_matches_hand_computation(name, side):
    topo = topoclip.topology(name, **SPECS[name])
    v, t = points(topo, 3), points(topo, 4)
    lam, s = 0.8, 1.7
    J = [2, 1, 0]
    if side == "v":
        vm = [ref_mix(topo, v[i], v[J[i]], lam) for i in range(3)]
        L = [[s * ref_sim(topo, vm[i], t[j]) for j in range(3)] for i in range(3)]
        got = v_mix_loss(topo, v, t, s, lam)
    else:
        tm = [ref_mix(topo, t[i], t[J[i]], lam) for i in range(3)]
        L = [[s * ref_sim(topo, v[i], tm[j]) for j in range(3)] for i in range(3)]
        got = l_mix_loss(topo, v, t, s, lam)
    # soft targets lam at i, 1-lam at J(i); the middle row is its own partner -> 1.
    T = [[(lam if j == i else 0.0) + ((1 - lam) if j == J[i] else 0.0) for j in range(3)] for i in range(3)]
    LT = [[L[j][i] for j in range(3)] for i in range(3)]
    want = 0.5 * (ref_ce(L, T) + ref_ce(LT, T))
    assert float(got) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("name", list(SPECS))
def test_vl_mix_matches_hand_computation(name):
    topo = topoclip.topology(name, **SPECS[name])
    v, t = points(topo, 5), points(topo, 6)
    lam, s = 0.45, 3.0
    J = [2, 1, 0]
    vm = [ref_mix(topo, v[i], v[J[i]], lam) for i in range(3)]
    tm = [ref_mix(topo, t[i], t[J[i]], lam) for i in range(3)]
    L = [[s * (ref_sim(topo, vm[i], tm[i]) if i == j else ref_sim(topo, v[i], t[j])) for j in range(3)] for i in range(3)]
    LT = [[L[j][i] for j in range(3)] for i in range(3)]
    want = 0.5 * (ref_ce(L, onehots(3)) + ref_ce(LT, onehots(3)))
    assert float(vl_mix_loss(topo, v, t, s, lam)) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("name", ["sphere", "oblique-inner", "oblique-geodesic"])
def test_mixed_points_on_manifold_and_endpoints(name):
    topo = topoclip.topology(name, **SPECS[name])
    a, b = points(topo, 7), points(topo, 8)
    torch.testing.assert_close(geodesic_mix(topo, a, b, 1.0), a)
    torch.testing.assert_close(geodesic_mix(topo, a, b, 0.0), b)
    for pair in ((a, b), (a, a), (a, -a)):  # generic, θ = 0, θ = π
        w = geodesic_mix(topo, *pair, 0.37)
        norms = torch.linalg.vector_norm(topo.blocks(w), dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_on_identical_pairs_repeated_captions_odd_batch_half_precision(name, dtype):
    topo = topoclip.topology(name, **SPECS[name])
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(9)).to(dtype).requires_grad_()
    # every text identical (class-name prompts), image 2 identical to the text: θ = 0 everywhere
    y = x[2:3].detach().expand(5, -1).clone().requires_grad_()
    loss_fn = M3MixLoss(topo, MixupConfig(m2=0.5, v=0.5, l=0.5, vl=0.5), seed=0)
    loss = loss_fn(topo.project(x), topo.project(y), torch.tensor(100.0))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(y.grad.float()).all()


def test_m3_is_weighted_sum_of_terms_with_seeded_lams():
    topo = topoclip.topology("oblique-inner", n=3, m=2)
    v, t = points(topo, 10), points(topo, 11)
    w = MixupConfig(m2=0.1, v=0.2, l=0.3, vl=0.4, m2_scale=5.0)
    loss, info = M3MixLoss(topo, w, seed=3)(v, t, torch.tensor(2.0, dtype=torch.float64), return_details=True)
    want = (
        topoclip.ContrastiveLoss(topo)(v, t, torch.tensor(2.0, dtype=torch.float64))
        + 0.1 * m2_mix_loss(topo, v, t, 5.0, info["lam_m2"])
        + 0.2 * v_mix_loss(topo, v, t, 2.0, info["lam_v"])
        + 0.3 * l_mix_loss(topo, v, t, 2.0, info["lam_l"])
        + 0.4 * vl_mix_loss(topo, v, t, 2.0, info["lam_vl"])
    )
    torch.testing.assert_close(loss, want)
    # same seed -> same lams; the generator state survives a state_dict round trip
    again = M3MixLoss(topo, w, seed=3)(v, t, 2.0, return_details=True)[1]
    assert again["lam_vl"] == info["lam_vl"]
    a = M3MixLoss(topo, w, seed=4)
    a(v, t, 2.0)
    b = M3MixLoss(topo, w, seed=99)
    b.load_state_dict(a.state_dict())
    assert a(v, t, 2.0, return_details=True)[1] == b(v, t, 2.0, return_details=True)[1]


def test_epoch_decay_and_disabled_terms():
    topo = topoclip.topology("sphere", dim=6)
    v, t = points(topo, 12), points(topo, 13)
    clip = topoclip.ContrastiveLoss(topo)(v, t, 2.0)
    off = M3MixLoss(topo, MixupConfig(m2=0, v=0, l=0, vl=0))
    torch.testing.assert_close(off(v, t, 2.0), clip)
    w = MixupConfig(m2=0.0, v=0.0, l=0.0, vl=1.0, decay=True)
    _, info = M3MixLoss(topo, w, seed=0)(v, t, 2.0, epoch=3, return_details=True)
    total = M3MixLoss(topo, w, seed=0)(v, t, 2.0, epoch=3)
    torch.testing.assert_close(total, clip + 0.25 * vl_mix_loss(topo, v, t, 2.0, info["lam_vl"]))
    with pytest.raises(ValueError, match="mixup.vl"):
        MixupConfig(vl=-1.0)


@pytest.mark.parametrize("name", list(SPECS))
def test_hardness_histograms_count_every_negative_pair(name):
    from topoclip.losses.mixup import mixup_hardness

    topo = topoclip.topology(name, **SPECS[name])
    g = torch.Generator().manual_seed(20)
    v = topo.project(torch.randn(16, 6, generator=g, dtype=torch.float64))
    t = topo.project(v + 0.3 * torch.randn(16, 6, generator=g, dtype=torch.float64))  # aligned pairs
    out = mixup_hardness(topo, v, t, lam=0.5, bins=10)
    assert sum(out["original"]) == sum(out["mixed"]) == 16 * 15
    off = ~torch.eye(16, dtype=torch.bool)
    assert out["mean_original"] == pytest.approx(float(topo.similarity(v, t)[off].mean()))
    assert len(out["edges"]) == 11


def test_m2_mix_in_the_sigmoid_form_with_the_sigmoid_main_term():
    from topoclip.losses import SigmoidLoss
    from topoclip.losses.mixup import m2_mix_sigmoid_loss

    topo = topoclip.topology("oblique-inner", dim=16, m=4)
    g = torch.Generator().manual_seed(3)
    image, text = topo.project(torch.randn(6, 16, generator=g)), topo.project(torch.randn(6, 16, generator=g))
    lam, scale, bias = 0.4, 5.0, -2.0
    got = float(m2_mix_sigmoid_loss(topo, image, text, scale, bias, lam))
    mixed = geodesic_mix(topo, image, text, lam)
    want = 0.0
    for anchor in (image, text):
        for i in range(6):
            for j in range(6):
                s = float(topo.paired_similarity(image[i:i + 1], text[i:i + 1])) if i == j else float(topo.similarity(anchor[i:i + 1], mixed[j:j + 1]))
                z = 1.0 if i == j else -1.0
                want += 0.5 * math.log1p(math.exp(-z * (scale * s + bias))) / 6
    assert got == pytest.approx(want, rel=1e-5)
    loss = M3MixLoss(topo, MixupConfig(m2=0.5, v=0.1, l=0, vl=0), seed=0, clip_loss=SigmoidLoss(topo))
    total, details = loss(image, text, torch.tensor(scale), torch.tensor(bias), return_details=True)
    assert {"loss_clip", "loss_m2", "loss_v"} <= set(details) and torch.isfinite(total)
