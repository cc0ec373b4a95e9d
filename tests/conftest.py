"""Shared fixtures: one intra-op thread for tests of tiny tensors, and tiny pretrained CLIP
models saved to disk (OpenCLIP and Hugging Face), built from configs with random weights, so
loading and fine-tuning can be tested offline. Test doubles live in ``tests/helpers.py``."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

TINY = "topoclip-test-tiny"  # the registered OpenCLIP architecture name (tests use the same string)
EMBED = 16


@pytest.fixture
def one_thread():
    """One intra-op thread, restored afterwards: on tiny tensors a second thread only adds
    synchronisation, and on a shared machine a busy core makes it wait (seen: 10x slower).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def openclip_files(tmp_path_factory):
    """A tiny registered OpenCLIP architecture, one random model, its weights as .pt and .safetensors."""
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("openclip")
    cfg = {
        "embed_dim": EMBED,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        # The BPE tokenizer shipped with open_clip needs the full 49408-token vocabulary.
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (root / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    model.eval()
    state = model.state_dict()
    torch.save(state, root / "tiny.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "tiny.safetensors"))
    return model, root


def _tiny_clip_tokenizer():
    """A byte-level CLIP BPE (every byte, alone and word-final, plus a few merges), offline."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    merges = [("r", "e"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("l", "e</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    root = tmp_path_factory.mktemp("hfclip")
    tok = _tiny_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=EMBED,
        logit_scale_init_value=3.0,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(root)
    tok.save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(root)
    return model, tok, root
