"""DualEncoder: projection heads, points on each topology, configs, weight-decay names, training."""

import math

import pytest
import torch
import torch.nn.functional as F

import topoclip
from topoclip.models import (
    DualEncoder,
    ImageTower,
    ImageTowerConfig,
    LogitScaleConfig,
    ModelConfig,
    TextTower,
    TextTowerConfig,
    build_model,
)

VOCAB, PAD, CLS = 40, 0, 1
B = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(num_tokens=1, **kw):
    return ModelConfig(
        num_tokens=num_tokens,
        image=ImageTowerConfig(img_size=16, patch_size=4, depth=1, width=32, heads=2),
        text=TextTowerConfig(width=24, depth=1, heads=2, context_length=10),
        **kw,
    )


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 16, 16, generator=g)
    ids = torch.randint(3, VOCAB, (B, 10), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0  # some padded captions
    ids[mask == 0] = PAD
    return images, ids, mask


# (topology, k): every topology single-token, oblique also multi-token
CASES = [
    (dict(name="sphere", dim=16), 1),
    (dict(name="euclidean", dim=16), 1),
    (dict(name="oblique-inner", n=4, m=4), 1),
    (dict(name="oblique-geodesic", n=4, m=4), 1),
    (dict(name="oblique-inner", n=4, m=4), 4),
    (dict(name="oblique-geodesic", n=4, m=4), 4),
]


def make_topology(spec):
    spec = dict(spec)
    return topoclip.topology(spec.pop("name"), **spec)


@pytest.mark.parametrize("spec,k", CASES, ids=[f"{s['name']}-k{k}" for s, k in CASES])
def test_points_on_manifold_and_equal_to_hand_projection(spec, k):
    torch.manual_seed(0)
    topo = make_topology(spec)
    model = build_model(tiny_cfg(num_tokens=k), topo, VOCAB, PAD).eval()
    images, ids, mask = batch()
    u, v = model(images, ids, mask)
    assert u.shape == v.shape == (B, 16)

    # independent computation from the towers' token features and the head weights
    for tokens, head, points in (
        (model.image(images), model.image_proj.linear.weight, u),
        (model.text(ids, mask), model.text_proj.linear.weight, v),
    ):
        assert tokens.shape[1] == k
        if k > 1:  # shared head per token -> one n-vector per token
            raw = tokens @ head.T                      # [b, k, n]
        else:      # one token -> d, cut into m blocks of n
            raw = (tokens[:, 0] @ head.T).view(B, topo.num_blocks, topo.block_dim)
        if spec["name"] == "euclidean":
            expected = raw.reshape(B, -1)
        else:
            expected = F.normalize(raw, dim=-1).reshape(B, -1)
            norms = points.view(B, topo.num_blocks, topo.block_dim).norm(dim=-1)
            torch.testing.assert_close(norms, torch.ones_like(norms))
        torch.testing.assert_close(points, expected, atol=1e-5, rtol=1e-5)


def test_head_shapes_single_vs_multi_token():
    topo = topoclip.topology("oblique-inner", n=4, m=4)
    single = build_model(tiny_cfg(num_tokens=1), topo, VOCAB, PAD)
    multi = build_model(tiny_cfg(num_tokens=4), topo, VOCAB, PAD)
    assert single.image_proj.linear.weight.shape == (16, 32)   # width -> d = n*m
    assert single.text_proj.linear.weight.shape == (16, 24)
    assert multi.image_proj.linear.weight.shape == (4, 32)     # width -> n, shared over tokens
    assert multi.text_proj.linear.weight.shape == (4, 24)
    assert single.image_proj.linear.bias is None
    assert (single.num_tokens, multi.num_tokens) == (1, 4)
    images, ids, mask = batch()
    assert multi.image_features(images).shape == (B, 4 * 32)
    assert single.image_features(images).shape == (B, 32)
    torch.testing.assert_close(multi.image_features(images), multi.image(images).reshape(B, -1))


def test_projection_init_std_is_inverse_sqrt_width():
    torch.manual_seed(0)
    cfg = ModelConfig(
        image=ImageTowerConfig(img_size=16, patch_size=4, depth=1, width=256, heads=2),
        text=TextTowerConfig(width=64, depth=1, heads=2, context_length=10),
    )
    model = build_model(cfg, topoclip.topology("sphere", dim=128), VOCAB, PAD)
    # 8k-32k samples each: the sample std is within ~1% of the truth, the mean within ~0.01 std
    for head, width in ((model.image_proj.linear.weight, 256), (model.text_proj.linear.weight, 64)):
        assert head.std().item() == pytest.approx(width ** -0.5, rel=0.04)
        assert abs(head.mean().item()) < 0.05 * width ** -0.5


def test_logit_scale_from_config():
    model = build_model(
        tiny_cfg(logit_scale=LogitScaleConfig(init=10.0, learnable=False, max=50.0)),
        topoclip.topology("sphere", dim=16), VOCAB, PAD,
    )
    assert isinstance(model.logit_scale, topoclip.LogitScale)
    assert model.logit_scale().item() == pytest.approx(10.0)
    assert model.logit_scale.max == 50.0
    assert "logit_scale.log_scale" not in dict(model.named_parameters())  # fixed: a buffer
    learnable = build_model(tiny_cfg(), topoclip.topology("sphere", dim=16), VOCAB, PAD)
    assert learnable.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert "logit_scale.log_scale" in dict(learnable.named_parameters())


def test_no_weight_decay_names():
    model = build_model(tiny_cfg(num_tokens=4), topoclip.topology("oblique-inner", n=4, m=4), VOCAB, PAD)
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay_names()
    assert nwd <= set(names)
    expected_embeddings = {
        "image.model.cls_token",
        "image.model.reg_token",
        "image.model.pos_embed",
        "text.model.embeddings.position_embeddings.weight",
        "text.model.embeddings.token_type_embeddings.weight",
    }
    assert expected_embeddings <= nwd
    assert "logit_scale.log_scale" in nwd
    for name, p in names.items():
        is_bias_or_norm = name.endswith(".bias") or "norm" in name.lower()
        if is_bias_or_norm or p.ndim < 2 or name in expected_embeddings or name == "logit_scale.log_scale":
            assert name in nwd, name
        else:  # matrices: attention, MLP, patch/word embeddings, projection heads
            assert name not in nwd, name
    assert "image_proj.linear.weight" not in nwd
    assert "text.model.embeddings.word_embeddings.weight" not in nwd


def test_resnet_image_tower_single_token():
    torch.manual_seed(0)
    cfg = ModelConfig(image=ImageTowerConfig(name="test_resnet"), text=TextTowerConfig(width=24, depth=1, heads=2, context_length=10))
    topo = topoclip.topology("oblique-inner", n=4, m=2)
    model = build_model(cfg, topo, VOCAB, PAD).eval()
    _, ids, mask = batch()
    u = model.encode_image(torch.randn(3, 3, 32, 32))
    assert u.shape == (3, 8)
    torch.testing.assert_close(topo.blocks(u).norm(dim=-1), torch.ones(3, 2))
    assert model.encode_text(ids, mask).shape == (B, 8)
    with pytest.raises(ValueError, match="model.num_tokens"):
        build_model(ModelConfig(num_tokens=2, image=ImageTowerConfig(name="test_resnet")), topo, VOCAB, PAD)


def test_dual_encoder_needs_equal_token_counts():
    cfg = tiny_cfg()
    topo = topoclip.topology("oblique-inner", n=4, m=2)
    with pytest.raises(ValueError, match="image tower has 2 .* text tower 1"):
        DualEncoder(ImageTower(cfg.image, 2), TextTower(cfg.text, VOCAB, PAD, 1), topo, topoclip.LogitScale())


# ----------------------------------------------------------------------------- configs

def test_defaults_build_and_run():
    cfg = ModelConfig()
    assert (cfg.num_tokens, cfg.image.name, cfg.text.width, cfg.text.depth, cfg.text.context_length) == (
        1, "topoclip_vit_tiny", 128, 4, 32)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = build_model(cfg, topoclip.topology("sphere", dim=64), VOCAB, PAD).eval()
    assert isinstance(model, DualEncoder)
    ids = torch.full((2, 32), PAD)
    ids[:, 0], ids[:, 1:4] = CLS, 5
    with torch.no_grad():
        u, v = model(torch.randn(2, 3, 32, 32), ids, (ids != PAD).long())
    assert u.shape == v.shape == (2, 64)


@pytest.mark.parametrize(
    "spec,k",
    [
        (dict(name="oblique-inner", n=4, m=2), 4),
        (dict(name="oblique-geodesic", n=8, m=2), 4),
        (dict(name="sphere", dim=16), 2),
        (dict(name="euclidean", dim=16), 2),
    ],
)
def test_tokens_must_match_topology(spec, k):
    with pytest.raises(ValueError, match=r"model\.num_tokens=.* must be 1 .* m="):
        build_model(tiny_cfg(num_tokens=k), make_topology(spec), VOCAB, PAD)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: ModelConfig(num_tokens=0), "model.num_tokens"),
        (lambda: ModelConfig(num_tokens=2.0), "model.num_tokens"),
        (lambda: ImageTowerConfig(name="no_such_model_xyz"), "model.image.name"),
        (lambda: ImageTowerConfig(depth=0), "model.image.depth"),
        (lambda: ImageTowerConfig(width=True), "model.image.width"),
        (lambda: ImageTowerConfig(img_size=30, patch_size=4), "model.image.patch_size"),
        (lambda: ImageTowerConfig(width=30, heads=4), "model.image.heads"),
        (lambda: ImageTowerConfig(mlp_ratio=-1.0), "model.image.mlp_ratio"),
        (lambda: ImageTowerConfig(timm_kwargs={"pretrained": True}), "model.image.timm_kwargs.pretrained"),
        (lambda: ImageTowerConfig(timm_kwargs={"num_heads": 2}), "model.image.timm_kwargs.num_heads"),
        (lambda: TextTowerConfig(depth="4"), "model.text.depth"),
        (lambda: TextTowerConfig(width=30, heads=4), "model.text.heads"),
        (lambda: TextTowerConfig(context_length=1), "model.text.context_length"),
        (lambda: TextTowerConfig(dropout=1.0), "model.text.dropout"),
        (lambda: TextTowerConfig(mlp_ratio=0), "model.text.mlp_ratio"),
        (lambda: ModelConfig(num_tokens=8, text=TextTowerConfig(context_length=32, max_positions=38)),
         "model.text.max_positions"),
        (lambda: LogitScaleConfig(init=0.0), "model.logit_scale.init"),
        (lambda: LogitScaleConfig(init=200.0, max=100.0), "model.logit_scale.init"),
        (lambda: LogitScaleConfig(max=float("inf")), "model.logit_scale.max"),
        (lambda: LogitScaleConfig(learnable="yes"), "model.logit_scale.learnable"),
        (lambda: ModelConfig.from_dict({"image": {"nmae": "x"}}), "model.image.nmae"),
        (lambda: ModelConfig.from_dict({"tokens": 4}), "model.tokens"),
        (lambda: ModelConfig.from_dict({"text": [1, 2]}), "model.text"),
    ],
)
def test_bad_config_names_field(make, field):
    with pytest.raises(ValueError) as err:
        make()
    assert field in str(err.value)


def test_max_positions_exactly_enough_is_accepted():
    cfg = ModelConfig(num_tokens=8, text=TextTowerConfig(context_length=32, max_positions=39))
    assert cfg.text.resolved_max_positions(cfg.num_tokens) == 39
    assert TextTowerConfig(context_length=32).resolved_max_positions(8) == 39


def test_from_dict_nested():
    cfg = ModelConfig.from_dict({
        "num_tokens": 4,
        "image": {"name": "topoclip_vit_tiny", "depth": 2},
        "logit_scale": {"init": 5.0, "learnable": False, "max": None},
    })
    assert cfg.num_tokens == 4 and cfg.image.depth == 2 and cfg.text == TextTowerConfig()
    assert cfg.logit_scale == LogitScaleConfig(init=5.0, learnable=False, max=None)


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize(
    "spec,k", [CASES[0], CASES[1], CASES[4], CASES[5]], ids=["sphere", "euclidean", "inner-k4", "geodesic-k4"]
)
def test_model_fits_a_fixed_batch(spec, k):
    # From chance (log B) the loss first plateaus (collapsed points) and then drops as the
    # model memorises the 6 random pairs; the minimum is robust to that plateau's length
    # (every seed tried reaches < 0.3 within 120 steps).
    torch.manual_seed(0)
    topo = make_topology(spec)
    model = build_model(tiny_cfg(num_tokens=k), topo, VOCAB, PAD)
    loss_fn = topoclip.ContrastiveLoss(topo)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    images, ids, mask = batch()
    losses = []
    for step in range(120):
        u, v = model(images, ids, mask)
        loss = loss_fn(u, v, model.logit_scale())
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every parameter is reached by the loss, with finite gradients
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        model.logit_scale.clamp_()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(B)  # starts near chance
    assert min(losses) < 0.3 * math.log(B), losses[::10]
