"""Image and text towers: k [CLS] tokens in, [b, k, width] out, positions and padding right."""

import pytest
import timm
import torch

from topoclip.models import DEFAULT_IMAGE_MODEL, ImageTower, ImageTowerConfig, TextTower, TextTowerConfig

VOCAB, PAD, CLS, SEP = 50, 0, 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_image_cfg(**kw):
    return ImageTowerConfig(**{**dict(img_size=16, patch_size=4, depth=1, width=32, heads=2), **kw})


def tiny_text_cfg(**kw):
    return TextTowerConfig(**{**dict(width=32, depth=2, heads=2, context_length=12), **kw})


def tokens(lengths, context_length=12, seed=0):
    """Tokenizer-like batch: [CLS] text [SEP] then padding; mask 1 on real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), context_length), PAD)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 0] = CLS
        ids[i, 1 : n + 1] = torch.randint(3, VOCAB, (n,), generator=g)
        ids[i, n + 1] = SEP
        mask[i, : n + 2] = 1
    return ids, mask


# ----------------------------------------------------------------------------- image tower

def test_default_image_model_is_registered_tiny_vit():
    assert timm.is_model(DEFAULT_IMAGE_MODEL)
    tower = ImageTower(ImageTowerConfig(), num_tokens=1)
    assert tower.is_vit and tower.width == 128
    assert len(tower.model.blocks) == 4 and tower.model.patch_embed.patch_size == (4, 4)
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, 1, 128)


@pytest.mark.parametrize("k", [1, 3])
def test_vit_tower_k_prefix_tokens(k):
    torch.manual_seed(0)
    tower = ImageTower(tiny_image_cfg(), num_tokens=k).eval()
    images = torch.randn(2, 3, 16, 16)
    out = tower(images)
    assert out.shape == (2, k, 32)
    assert tower.model.num_prefix_tokens == k
    # 16 patches + k prefix tokens; the tower returns the first k (the [CLS] tokens)
    full = tower.model.forward_features(images)
    assert full.shape == (2, 16 + k, 32)
    torch.testing.assert_close(out, full[:, :k])
    if k > 1:  # tokens broken out of symmetry: no two [CLS] outputs coincide
        for i in range(k):
            for j in range(i + 1, k):
                assert not torch.allclose(out[:, i], out[:, j], atol=1e-3)


def test_vit_prefix_tokens_start_apart_without_position_embeddings():
    # With no_embed_class=True the prefix tokens get no position embedding; only their own
    # random init tells the k [CLS] tokens apart (timm's ~1e-6 init would leave them ~equal).
    torch.manual_seed(0)
    tower = ImageTower(tiny_image_cfg(timm_kwargs={"no_embed_class": True}), num_tokens=3).eval()
    assert tower.model.pos_embed.shape[1] == 16  # patches only
    out = tower(torch.randn(2, 3, 16, 16))
    for i in range(3):
        for j in range(i + 1, 3):
            assert (out[:, i] - out[:, j]).abs().max() > 0.1


def test_non_vit_tower_single_token():
    torch.manual_seed(0)
    tower = ImageTower(ImageTowerConfig(name="test_resnet"), num_tokens=1).eval()
    images = torch.randn(2, 3, 32, 32)
    out = tower(images)
    assert not tower.is_vit
    assert out.shape == (2, 1, tower.width)
    torch.testing.assert_close(out[:, 0], tower.model(images))


def test_non_vit_tower_rejects_multi_token_and_vit_fields():
    with pytest.raises(ValueError, match="model.num_tokens"):
        ImageTower(ImageTowerConfig(name="test_resnet"), num_tokens=2)
    with pytest.raises(ValueError, match="model.image.patch_size"):
        ImageTower(ImageTowerConfig(name="test_resnet", patch_size=4), num_tokens=1)


def test_image_tower_bad_timm_kwargs_named():
    with pytest.raises(ValueError, match="model.image"):
        ImageTower(ImageTowerConfig(name="test_resnet", timm_kwargs={"no_such_option": 1}), num_tokens=1)


def test_vit_no_weight_decay_names():
    tower = ImageTower(tiny_image_cfg(), num_tokens=2)
    assert tower.no_weight_decay() == {"model.cls_token", "model.reg_token", "model.pos_embed"}


# ----------------------------------------------------------------------------- text tower

def capture_bert_inputs(tower):
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    tower.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("k", [1, 4])
def test_text_tower_shape_and_cls_positions(k):
    torch.manual_seed(0)
    tower = TextTower(tiny_text_cfg(), VOCAB, PAD, num_tokens=k).eval()
    seen = capture_bert_inputs(tower)
    ids, mask = tokens([3, 10])
    out = tower(ids, mask)
    assert out.shape == (2, k, 32)
    fed_ids, fed_mask = seen["input_ids"], seen["attention_mask"]
    assert fed_ids.shape == (2, 12 + k - 1)
    assert (fed_ids[:, :k] == CLS).all()                      # k [CLS] at positions 0..k-1
    torch.testing.assert_close(fed_ids[:, k - 1 :], ids)      # then the text, unshifted order
    torch.testing.assert_close(fed_mask[:, k - 1 :], mask)
    assert (fed_mask[:, :k] == 1).all()
    # the last hidden states at positions 0..k-1 are what the tower returns
    hidden = tower.model(input_ids=fed_ids, attention_mask=fed_mask).last_hidden_state
    torch.testing.assert_close(out, hidden[:, :k])


def test_text_cls_tokens_differ_only_through_positions():
    torch.manual_seed(0)
    k = 4
    tower = TextTower(tiny_text_cfg(), VOCAB, PAD, num_tokens=k).eval()
    ids, mask = tokens([5])
    out = tower(ids, mask)[0]
    for i in range(1, k):  # same id, different absolute positions -> different outputs
        assert not torch.allclose(out[0], out[i], atol=1e-3)
    # Give positions 1..k-1 the embedding of position 0: the k [CLS] tokens become the same
    # input, so they must give the same output. Positions are the only thing telling them apart.
    with torch.no_grad():
        table = tower.model.embeddings.position_embeddings.weight
        table[1:k] = table[0]
    out = tower(ids, mask)[0]
    for i in range(1, k):
        torch.testing.assert_close(out[0], out[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_text_tower_padding_invariance(k):
    torch.manual_seed(0)
    tower = TextTower(tiny_text_cfg(context_length=20), VOCAB, PAD, num_tokens=k).eval()
    ids, mask = tokens([2, 7], context_length=12)
    short = tower(ids, mask)
    # more padding at the end
    ids_long = torch.cat([ids, torch.full((2, 8), PAD)], dim=1)
    mask_long = torch.cat([mask, torch.zeros(2, 8, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(tower(ids_long, mask_long), short, atol=1e-5, rtol=1e-5)
    # garbage under the mask is ignored too
    garbage = torch.where(mask_long.bool(), ids_long, torch.randint(3, VOCAB, ids_long.shape))
    torch.testing.assert_close(tower(garbage, mask_long), short, atol=1e-5, rtol=1e-5)
    # ... but without the mask it is not (the mask is really used)
    assert not torch.allclose(tower(garbage, torch.ones_like(mask_long)), short, atol=1e-3)


def test_text_tower_length_and_argument_checks():
    tower = TextTower(tiny_text_cfg(context_length=12), VOCAB, PAD, num_tokens=3)
    assert tower.max_positions == 14
    assert tower.model.config.max_position_embeddings == 14
    ids, mask = tokens([3], context_length=13)
    with pytest.raises(ValueError, match="context_length"):
        tower(ids, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        tower(ids[:, :12], mask[:, :11])
    with pytest.raises(ValueError, match="vocab_size"):
        TextTower(tiny_text_cfg(), 1, PAD)
    with pytest.raises(ValueError, match="pad_token_id"):
        TextTower(tiny_text_cfg(), VOCAB, VOCAB)
    with pytest.raises(ValueError, match="model.text.max_positions"):
        TextTower(tiny_text_cfg(context_length=12, max_positions=13), VOCAB, PAD, num_tokens=3)


def test_text_no_weight_decay_names():
    tower = TextTower(tiny_text_cfg(), VOCAB, PAD)
    assert tower.no_weight_decay() == {
        "model.embeddings.position_embeddings.weight",
        "model.embeddings.token_type_embeddings.weight",
    }


def test_sincos_position_embeddings_start_from_the_2d_table():
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    from topoclip.models import ImageTower, ImageTowerConfig

    cfg = ImageTowerConfig(img_size=16, patch_size=4, depth=1, width=32, heads=2, pos_embed="sincos", pos_embed_temperature=10.0)
    tower = ImageTower(cfg, num_tokens=2)
    pe = tower.model.pos_embed.detach()[0]
    want = build_sincos2d_pos_embed([4, 4], dim=32, temperature=10.0).reshape(16, 32)
    torch.testing.assert_close(pe[-16:], want)
    assert torch.count_nonzero(pe[:-16]) == 0
    assert tower.model.pos_embed.requires_grad
    with pytest.raises(ValueError, match="model.image.pos_embed"):
        ImageTowerConfig(pos_embed="rope")
