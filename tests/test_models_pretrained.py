"""Pretrained CLIP adapters: tiny OpenCLIP and Hugging Face CLIP models built from configs,
saved to disk, loaded back through topoclip, compared with the originals. Nothing downloads."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import topoclip
from topoclip.eval import evaluate_retrieval, zeroshot_classify
from topoclip.models import (
    HFClipDualEncoder,
    OpenClipDualEncoder,
    OpenClipTokenizer,
    load_openclip,
    load_pretrained,
)

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TINY = "topoclip-test-tiny"  # registered by the openclip_files fixture (conftest.py)
EMBED = 16
TEXTS = ["a red circle", "two blue squares!", "!~ odd punctuation", "a green triangle on the left"]


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ OpenCLIP

def test_openclip_tokenizer_is_open_clips_with_a_mask_up_to_the_end_token(openclip_files):
    _, root = openclip_files
    _, tok, _ = load_openclip(TINY, root / "tiny.pt")
    ref = open_clip.get_tokenizer(TINY)
    out = tok(TEXTS + ["word " * 100])
    assert torch.equal(out["input_ids"], ref(TEXTS + ["word " * 100]))
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 49406, 49407)
    assert (tok.context_length, tok.vocab_size) == (77, 49408)
    for row, text in enumerate(TEXTS):
        n = len(ref.encode(text)) + 2  # start + text + end
        assert out["attention_mask"][row].tolist() == [1] * n + [0] * (77 - n)
    # BPE id 0 is a real token ('!' inside "!~"): a mask of ids != 0 would drop it.
    row = TEXTS.index("!~ odd punctuation")
    assert (out["input_ids"][row, 1:4] == 0).any() and out["attention_mask"][row, :4].all()
    assert out["attention_mask"][-1].all() and out["input_ids"][-1, -1] == 49407  # truncated keeps the end token


@pytest.mark.parametrize("weights", ["tiny.pt", "tiny.safetensors"])
def test_openclip_adapter_reproduces_the_original_embeddings(openclip_files, weights):
    original, root = openclip_files
    model, tok, transform = load_pretrained(root / weights, model_name=TINY)
    assert isinstance(model, OpenClipDualEncoder) and isinstance(tok, OpenClipTokenizer)
    model.eval()
    images, tokens = _images(3), tok(TEXTS)
    with torch.no_grad():
        u, v = model(images, tokens["input_ids"], tokens["attention_mask"])
        ref_u = F.normalize(original.encode_image(images), dim=-1)
        ref_v = F.normalize(original.encode_text(tokens["input_ids"]), dim=-1)
        assert torch.allclose(u, ref_u, atol=1e-6) and torch.allclose(v, ref_v, atol=1e-6)
        # the mask is accepted and ignored (open_clip's towers find padding themselves)
        assert torch.equal(model.encode_text(tokens["input_ids"]), v)
        # image_features is the pooled feature BEFORE the projection: projecting it gives the embedding
        feats = model.image_features(images)
        assert feats.shape == (3, 32)
        assert torch.allclose(feats @ original.visual.proj, original.encode_image(images), atol=1e-5)
    assert model.image_features_kind == "pre_projection"
    assert model.num_tokens == 1 and model.topology.name == "sphere" and model.topology.dim == EMBED
    assert model.logit_scale.value == pytest.approx(20.0, rel=1e-6)
    assert model.logit_scale.learnable and model.logit_scale.max == 100.0
    image = transform(Image.new("RGB", (40, 48), (10, 200, 30)))
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32


def test_openclip_local_dir_loads_through_the_dispatcher(openclip_files, tmp_path):
    original, root = openclip_files
    cfg = json.loads((root / f"{TINY}.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    (tmp_path / "open_clip_model.safetensors").write_bytes((root / "tiny.safetensors").read_bytes())
    model, tok, _ = load_pretrained(tmp_path)
    assert isinstance(model, OpenClipDualEncoder) and tok.context_length == 77
    tokens = tok(TEXTS)
    with torch.no_grad():
        expected = F.normalize(original.encode_text(tokens["input_ids"]), dim=-1)
        assert torch.allclose(model.eval().encode_text(tokens["input_ids"]), expected, atol=1e-6)


def test_openclip_onto_the_oblique_manifold_splits_the_embedding_into_unit_blocks(openclip_files):
    original, root = openclip_files
    topo = topoclip.topology("oblique-inner", n=4, m=4)
    model, tok, _ = load_openclip(TINY, root / "tiny.pt", topology=topo)
    model.eval()
    images = _images(5, seed=1)
    with torch.no_grad():
        u = model.encode_image(images)
        raw = original.encode_image(images).view(5, 4, 4)
    blocks = u.view(5, 4, 4)
    assert torch.allclose(blocks.norm(dim=-1), torch.ones(5, 4), atol=1e-6)
    assert torch.allclose(blocks, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="embed_dim=16"):
        load_openclip(TINY, root / "tiny.pt", topology=topoclip.topology("sphere", dim=32))


def test_openclip_scale_at_clips_clamp_loads(tmp_path, openclip_files):
    original, root = openclip_files
    state = {k: v.clone() for k, v in original.state_dict().items()}
    state["logit_scale"] = torch.tensor(math.log(100.0) + 1e-4)  # a hair above 100, as float rounding gives
    torch.save(state, tmp_path / "at_max.pt")
    model, _, _ = load_openclip(TINY, tmp_path / "at_max.pt")
    assert model.logit_scale.value == pytest.approx(100.0)


def test_openclip_finetune_step_trains_towers_and_scale_not_the_wrapped_scale(openclip_files):
    _, root = openclip_files
    model, tok, _ = load_openclip(TINY, root / "tiny.pt")
    no_decay = model.no_weight_decay_names()
    for name in ("logit_scale.log_scale", "clip.positional_embedding", "clip.visual.class_embedding",
                 "clip.visual.positional_embedding", "clip.ln_final.weight",
                 "clip.visual.transformer.resblocks.0.attn.in_proj_bias"):
        assert name in no_decay
    for name in ("clip.visual.proj", "clip.text_projection", "clip.visual.conv1.weight", "clip.logit_scale"):
        assert name not in no_decay
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "clip.logit_scale" not in trainable  # superseded by model.logit_scale
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = topoclip.ContrastiveLoss(model.topology)
    tokens = tok(TEXTS)
    u, v = model(_images(4), tokens["input_ids"], tokens["attention_mask"])
    loss = loss_fn(u, v, model.logit_scale())
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(params, lr=0.1).step()
    after = dict(model.named_parameters())
    for name in ("clip.visual.conv1.weight", "clip.visual.proj", "clip.token_embedding.weight", "clip.text_projection",
                 "logit_scale.log_scale"):
        assert not torch.equal(before[name], after[name]), name
    assert torch.equal(before["clip.logit_scale"], after["clip.logit_scale"])


def test_the_sigmoid_loss_gets_a_bias_from_a_siglip_source_or_siglips_init(openclip_files):
    from topoclip.losses import SigmoidLoss
    from topoclip.models import ensure_logit_bias

    torch.manual_seed(0)
    siglip = OpenClipDualEncoder(open_clip.create_model(TINY, init_logit_bias=-7.0))  # SigLIP-style: has a bias
    assert ensure_logit_bias(siglip).value == pytest.approx(-7.0)
    assert not siglip.clip.logit_bias.requires_grad  # superseded, like the wrapped scale
    assert "logit_bias.bias" in siglip.no_weight_decay_names()
    assert ensure_logit_bias(siglip, 3.0).value == pytest.approx(-7.0)  # a model keeps the bias it has
    _, root = openclip_files
    clip, tok, _ = load_openclip(TINY, root / "tiny.pt")
    assert clip.logit_bias is None and ensure_logit_bias(clip).value == -10.0  # SigLIP's init
    assert ensure_logit_bias(OpenClipDualEncoder(open_clip.create_model(TINY)), 2.5).value == 2.5
    tokens = tok(TEXTS)
    u, v = clip(_images(4), tokens["input_ids"], tokens["attention_mask"])
    SigmoidLoss(clip.topology)(u, v, clip.logit_scale(), clip.logit_bias()).backward()
    assert clip.logit_bias.bias.grad is not None and float(clip.logit_bias.bias.grad) != 0.0


def test_openclip_loader_refuses_downloads_and_bad_names(openclip_files, tmp_path):
    _, root = openclip_files
    with pytest.raises(ValueError, match="allow_download"):
        load_openclip(TINY, "openai")  # a tag, not a file: would download
    with pytest.raises(ValueError, match="allow_download"):
        load_openclip("hf-hub:someone/some-clip")
    with pytest.raises(ValueError, match="unknown OpenCLIP model_name 'no-such-model'"):
        load_openclip("no-such-model", root / "tiny.pt")
    with pytest.raises(ValueError, match="give the OpenCLIP model_name"):
        load_pretrained(root / "tiny.pt")
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="wrong.pt"):
        load_openclip(TINY, tmp_path / "wrong.pt")


# --------------------------------------------------------------------------- Hugging Face

def test_hf_adapter_reproduces_the_original_embeddings(hf_dir):
    original, hf_tok, root = hf_dir
    model, tok, _ = load_pretrained(root)
    assert isinstance(model, HFClipDualEncoder)
    model.eval()
    tokens = tok(TEXTS)
    # our TextTokenizer layout is exactly what the HF tokenizer gives with max_length padding
    ref = hf_tok(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert tok.context_length == 77
    assert torch.equal(tokens["input_ids"], ref["input_ids"])
    assert torch.equal(tokens["attention_mask"], ref["attention_mask"])
    images = _images(3)
    with torch.no_grad():
        u, v = model(images, tokens["input_ids"], tokens["attention_mask"])
        ref_u = F.normalize(original.get_image_features(pixel_values=images).pooler_output, dim=-1)
        ref_v = F.normalize(original.get_text_features(**ref).pooler_output, dim=-1)
        assert torch.allclose(u, ref_u, atol=1e-6) and torch.allclose(v, ref_v, atol=1e-6)
        feats = model.image_features(images)
        assert feats.shape == (3, 32)
        assert torch.allclose(original.visual_projection(feats), original.get_image_features(pixel_values=images).pooler_output,
                              atol=1e-6)
    assert model.logit_scale.value == pytest.approx(math.exp(3.0), rel=1e-6)
    assert not model.clip.logit_scale.requires_grad
    assert "clip.vision_model.embeddings.position_embedding.weight" in model.no_weight_decay_names()


def test_hf_image_transform_follows_the_preprocessor_config(hf_dir):
    _, _, root = hf_dir
    _, _, transform = load_pretrained(root)
    out = transform(Image.new("RGB", (50, 40), (128, 64, 255)))
    assert out.shape == (3, 32, 32)  # resize shorter side to 36, crop 32
    expected = torch.tensor([(c / 255 - 0.5) / 0.25 for c in (128, 64, 255)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)
    # a 36x36 image is not resized (shortest edge already 36), only center-cropped to 32
    pixels = torch.randint(0, 256, (36, 36, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = transform(Image.fromarray(pixels.numpy()))
    crop = pixels[2:34, 2:34].permute(2, 0, 1).float() / 255
    expected = (crop - 0.5) / 0.25
    assert torch.allclose(out, expected, atol=1e-5)


class _Retrieval(torch.utils.data.Dataset):
    def __init__(self, images, captions, caption_to_image):
        self.images, self.captions, self.caption_to_image = images, captions, caption_to_image
        self.name = "tiny"

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


class _Classification(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.name, self.classnames, self.templates = "tiny", ["circle", "square", "star"], ["a {}", "a red {}."]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_hf_adapter_runs_through_topoclip_eval(hf_dir):
    original, hf_tok, root = hf_dir
    model, tok, _ = load_pretrained(root)
    images = _images(6, seed=3)

    def ref_text(texts):
        ids = hf_tok(texts, padding="max_length", max_length=77, return_tensors="pt")
        return F.normalize(original.get_text_features(**ids).pooler_output, dim=-1)

    with torch.no_grad():
        img = F.normalize(original.get_image_features(pixel_values=images).pooler_output, dim=-1)
        captions = [f"caption number {i}" for i in range(12)]
        caption_to_image = torch.arange(12) % 6
        txt = ref_text(captions)
        sims = img @ txt.T
        i2t = (caption_to_image[sims.argmax(dim=1)] == torch.arange(6)).float().mean().item()
        t2i = (sims.argmax(dim=0) == caption_to_image).float().mean().item()
        labels = torch.tensor([0, 1, 2, 0, 1, 2])
        data = _Classification(images, labels)
        prompts = ref_text([t.format(c) for c in data.classnames for t in data.templates]).view(3, 2, EMBED)
        class_scores = torch.einsum("nd,ctd->nct", img, prompts).mean(dim=2)
        top1 = (class_scores.argmax(dim=1) == labels).float().mean().item()

    got = evaluate_retrieval(model, _Retrieval(images, captions, caption_to_image), tok, batch_size=4, ks=(1,))
    assert got["i2t_R@1"] == pytest.approx(i2t) and got["t2i_R@1"] == pytest.approx(t2i)
    assert zeroshot_classify(model, data, tok, batch_size=4)["top1"] == pytest.approx(top1)


def test_hf_finetune_step_changes_both_towers(hf_dir):
    _, _, root = hf_dir
    model, tok, _ = load_pretrained(root, topology=topoclip.topology("oblique-geodesic", n=8, m=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = tok(TEXTS)
    u, v = model(_images(4), tokens["input_ids"], tokens["attention_mask"])
    assert torch.allclose(u.view(4, 2, 8).norm(dim=-1), torch.ones(4, 2), atol=1e-5)
    loss = topoclip.ContrastiveLoss(model.topology)(u, v, model.logit_scale())
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = dict(model.named_parameters())
    for name in ("clip.visual_projection.weight", "clip.text_projection.weight",
                 "clip.vision_model.embeddings.patch_embedding.weight", "clip.text_model.embeddings.token_embedding.weight"):
        assert not torch.equal(before[name], after[name]), name


def test_hf_tokenizer_model_mismatch_is_refused(hf_dir, tmp_path):
    original, hf_tok, _ = hf_dir
    original.config.text_config.eos_token_id = 5  # not the tokenizer's end token
    try:
        original.save_pretrained(tmp_path)
    finally:
        original.config.text_config.eos_token_id = hf_tok.eos_token_id
    hf_tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="eos_token_id 5"):
        load_pretrained(tmp_path)


# ----------------------------------------------------------------------------- dispatcher

def test_load_pretrained_says_what_it_expected(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a Hugging Face CLIP directory"):
        load_pretrained(tmp_path)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a weights file"):
        load_pretrained(tmp_path / "weights.txt")
    other = tmp_path / "siglip"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ValueError, match="model_type='siglip'; expected 'clip'"):
        load_pretrained(other)



def test_weights_of_another_architecture_say_so(openclip_files, tmp_path):
    import json as _json

    open_clip = pytest.importorskip("open_clip")
    _, root = openclip_files
    other = {"embed_dim": EMBED, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1}}
    (tmp_path / "topoclip-test-other.json").write_text(_json.dumps(other))
    open_clip.add_model_config(tmp_path / "topoclip-test-other.json")
    with pytest.raises(ValueError, match=r"do not match the architecture 'topoclip-test-other' \(is --model-name right\?\)"):
        load_openclip("topoclip-test-other", root / "tiny.pt")
