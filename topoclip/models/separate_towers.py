"""Two towers pretrained apart, joined by new projection heads onto any topology.

*Geodesic Multi-Modal Mixup for Robust Fine-Tuning* (Oh et al., NeurIPS 2023), §5.3 fine-tunes
an image model and a text model that never saw each other: a timm image model and a BERT-style
text model, each from its own files, with new linear heads onto the joint embedding. Nothing is
downloaded:

- image: a timm model name plus a weights file (``.safetensors``/``.pth``/``.bin``), or a
  directory timm wrote with ``timm.models.save_for_hf`` (``config.json`` + weights, whose
  architecture timm reads as ``local-dir:``); the weights load strictly;
- text: a Hugging Face model directory (``config.json``, weights and tokenizer files), opened
  with ``local_files_only=True`` and ``trust_remote_code=False``; its [CLS] (first) token's last
  hidden state is the text feature.

The image transform follows the timm model's data config (input size, mean, std).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.tokenizer import TextTokenizer
from ..data.transforms import ImageTransform
from ..geometry import Topology
from .pretrained import DEFAULT_MAX_LOGIT_SCALE, WEIGHT_SUFFIXES, _PretrainedAdapter

__all__ = ["SeparateTowersDualEncoder", "load_separate_towers"]

DEFAULT_CONTEXT_LENGTH = 77


class SeparateTowersDualEncoder(_PretrainedAdapter):
    """``clip.visual`` (timm, pooled features) and ``clip.text`` (a transformers encoder), each
    with a new bias-free linear head to ``embed_dim``; the logit scale starts at 1/0.07."""

    image_features_kind = "pre_projection"

    def __init__(self, image_model: nn.Module, text_model: nn.Module, embed_dim: int, topology: Topology | None = None,
                 max_logit_scale: float | None = DEFAULT_MAX_LOGIT_SCALE):
        towers = nn.Module()
        towers.visual, towers.text = image_model, text_model
        super().__init__(towers, embed_dim, topology, torch.tensor(math.log(1 / 0.07)), max_logit_scale)
        image_width, text_width = int(image_model.num_features), int(text_model.config.hidden_size)
        self.image_proj = nn.Linear(image_width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        # CLIP's init for its projections: std width^-1/2, so points start spread out.
        nn.init.normal_(self.image_proj.weight, std=image_width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text_width ** -0.5)

    def image_features(self, images: Tensor) -> Tensor:
        """The timm model's pooled features (num_classes=0), ``[b, num_features]``."""
        return self.clip.visual(images)

    def image_embedding(self, images: Tensor) -> Tensor:
        return self.image_proj(self.image_features(images))

    def text_embedding(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        hidden = self.clip.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_proj(hidden[:, 0])

    def image_head_parameters(self) -> list[nn.Parameter]:
        return list(self.image_proj.parameters())


def _timm_image_model(name: str | None, weights: str | os.PathLike | None) -> nn.Module:
    import timm

    if weights is None:
        raise ValueError("source.image_weights: give the image tower's weights (a file or a timm directory)")
    path = Path(weights)
    where = os.fspath(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"source.image_weights: {where} is not a timm model directory (no config.json)")
        file = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
        if file is None:
            raise ValueError(f"source.image_weights: {where} holds no model.safetensors or pytorch_model.bin")
        # timm reads the architecture (and its arguments) from config.json.
        model, label = timm.create_model(f"local-dir:{where}", pretrained=False, num_classes=0), where
    else:
        if not path.is_file():
            raise ValueError(f"source.image_weights: {where} does not exist")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"source.image_weights: {where}: expected a weights file ({', '.join(WEIGHT_SUFFIXES)})")
        if not name:
            raise ValueError(f"source.image_tower: {where} is a weights file; name the timm model it belongs to")
        if not timm.is_model(name):
            raise ValueError(f"source.image_tower: {name!r} is not a timm model (see timm.list_models())")
        model, file, label = timm.create_model(name, pretrained=False, num_classes=0), path, name
    _load_strict(model, file, label)
    return model


def _load_strict(model: nn.Module, file: Path, label: str) -> None:
    """The file's weights into ``model``, every key accounted for. (timm's own pretrained
    loading tolerates unexpected keys, so a file of another architecture would load silently.)
    A classifier head in the file is dropped: the tower is used headless (num_classes=0)."""
    from timm.models import load_state_dict

    state = load_state_dict(os.fspath(file))
    classifier = model.pretrained_cfg.get("classifier") or "head"
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    state = {k: v for k, v in state.items() if not any(k == n or k.startswith(n + ".") for n in names)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise ValueError(f"source.image_weights: cannot load {os.fspath(file)} into the timm model {label!r}: {first}") from err


def _hf_text_model(directory: str | os.PathLike | None) -> tuple[nn.Module, object]:
    if directory is None:
        raise ValueError("source.text_tower: give the text tower's Hugging Face model directory")
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ValueError(f"source.text_tower: {os.fspath(path)} is not a Hugging Face model directory (no config.json)")
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"source.text_tower: cannot load the model and tokenizer from {os.fspath(path)}: {err}") from err
    if not hasattr(model, "config") or not hasattr(model.config, "hidden_size"):
        raise ValueError(f"source.text_tower: {os.fspath(path)} is not an encoder with a hidden_size")
    return model, tokenizer


def _timm_transform(model: nn.Module) -> ImageTransform:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    if height != width:
        raise ValueError(f"source.image_tower: non-square input size {height}x{width} is not supported")
    return ImageTransform(int(height), tuple(cfg["mean"]), tuple(cfg["std"]))


def load_separate_towers(
    image_tower: str | None,
    image_weights: str | os.PathLike | None,
    text_tower: str | os.PathLike | None,
    embed_dim: int = 256,
    topology: Topology | None = None,
    *,
    device: str | torch.device = "cpu",
    context_length: int | None = None,
) -> tuple[SeparateTowersDualEncoder, TextTokenizer, ImageTransform]:
    """``(model, tokenizer, image_transform)`` of a timm image tower and a Hugging Face text
    tower joined by new heads to ``embed_dim`` (on ``topology``; default the sphere)."""
    image = _timm_image_model(image_tower, image_weights)
    text, hf_tok = _hf_text_model(text_tower)
    if context_length is None:
        limits = [DEFAULT_CONTEXT_LENGTH, int(getattr(text.config, "max_position_embeddings", DEFAULT_CONTEXT_LENGTH))]
        if getattr(hf_tok, "model_max_length", None):
            limits.append(int(hf_tok.model_max_length))
        context_length = min(limits)
    tokenizer = TextTokenizer(hf_tok, context_length)
    model = SeparateTowersDualEncoder(image, text, embed_dim, topology).to(device)
    return model, tokenizer, _timm_transform(image)
