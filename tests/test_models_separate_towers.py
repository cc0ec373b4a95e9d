"""Separately pretrained towers: a timm image model from a weights file or a timm directory
and a Hugging Face BERT directory, joined by new heads, fine-tuned jointly from the files."""

import pytest
import torch
from safetensors.torch import save_file

from tests.test_finetune import TINY_DATA
from topoclip.config import load_finetune_config
from topoclip.models.separate_towers import load_separate_towers
from topoclip.recipes.finetune import run_finetune
from topoclip.runs import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["a", "an", "of", "photo", "picture", "there", "is", "this", "image", "showing", "shape", "object",
         "circle", "square", "triangle", "cross", "ring", "diamond", "red", "green", "blue", "yellow", "purple",
         "orange", "cyan", "white", "small", "large", "left", "right", "top", "bottom", "center", "on", "the", "at",
         "in", "and", "next", "to", "above", "below", "middle"]


@pytest.fixture(scope="module")
def tower_files(tmp_path_factory):
    """test_vit weights as a file and as a timm directory; a 1-layer BERT directory with its
    WordPiece tokenizer."""
    import timm
    from timm.models import save_for_hf
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    image = timm.create_model("test_vit", pretrained=False, num_classes=0)
    save_file(image.state_dict(), str(root / "test_vit.safetensors"))
    save_for_hf(image, str(root / "timm-dir"), safe_serialization=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    text = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=40), add_pooling_layer=False)
    text.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    return root, image.state_dict(), text.state_dict()


def test_the_towers_load_their_own_weights_from_a_file_or_a_directory(tower_files):
    root, image_state, text_state = tower_files
    for weights in (root / "test_vit.safetensors", root / "timm-dir"):
        name = "test_vit" if weights.suffix else None
        model, tokenizer, transform = load_separate_towers(name, weights, root / "bert", embed_dim=24)
        for k, v in image_state.items():
            assert torch.equal(model.clip.visual.state_dict()[k], v), k
    for k, v in text_state.items():
        assert torch.equal(model.clip.text.state_dict()[k], v), k
    assert transform.image_size == 160 and tokenizer.context_length == 40
    batch = tokenizer(["a red circle", "a blue square on the left"])
    points = model.encode_text(**batch)
    assert points.shape == (2, 24) and torch.allclose(points.norm(dim=-1), torch.ones(2))  # the sphere by default
    assert model.encode_image(torch.randn(2, 3, 160, 160)).shape == (2, 24)


def test_bad_tower_files_are_named(tower_files, tmp_path):
    root, _, _ = tower_files
    with pytest.raises(ValueError, match="source.image_tower: .* is a weights file"):
        load_separate_towers(None, root / "test_vit.safetensors", root / "bert")
    with pytest.raises(ValueError, match="cannot load .*test_vit.safetensors.* into the timm model 'test_resnet'"):
        load_separate_towers("test_resnet", root / "test_vit.safetensors", root / "bert")
    with pytest.raises(ValueError, match="source.text_tower: .* not a Hugging Face model directory"):
        load_separate_towers("test_vit", root / "test_vit.safetensors", tmp_path)
    with pytest.raises(ValueError, match="source.text_tower: separately pretrained towers need both"):
        load_finetune_config(None, [f"source.image_weights={root / 'test_vit.safetensors'}"])
    with pytest.raises(ValueError, match="either a pretrained model"):
        load_finetune_config(None, [f"source.path={root}", f"source.image_weights={root}", f"source.text_tower={root}"])


def test_fine_tuning_two_separately_pretrained_towers_on_the_oblique_manifold(tower_files, tmp_path):
    root, image_state, _ = tower_files
    cfg = load_finetune_config(None, TINY_DATA + [
        "source.image_tower=test_vit", f"source.image_weights={root / 'test_vit.safetensors'}",
        f"source.text_tower={root / 'bert'}", "source.embed_dim=32", "source.topology=oblique-inner", "source.m=4",
        "finetune.method=m2mix", "optim.lr=1e-3", "finetune.eval_zero_shot=false", "eval.robustness=false",
        "finetune.simat_lambda=null", "data.shapes.num_test=8", f"output.dir={tmp_path}",
    ])
    results = run_finetune(cfg)
    assert results["train"]["steps"] == 4 and results["train"]["skipped_steps"] == 0
    tuned = load_run(tmp_path / "finetune-m2mix")  # rebuilt from the tower files, then the tuned weights
    assert tuned.model.topology.name == "oblique-inner" and tuned.model.topology.num_blocks == 4
    assert tuned.image_size == 160
    moved = [k for k, v in image_state.items() if not torch.equal(tuned.model.clip.visual.state_dict()[k], v)]
    assert moved, "the image tower did not train"
    images = torch.randn(2, 3, 160, 160)
    again = load_run(tmp_path / "finetune-m2mix")  # the new heads are saved, not drawn anew
    assert torch.equal(tuned.model.encode_image(images), again.model.encode_image(images))
