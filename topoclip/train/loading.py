"""Load a model to evaluate or fine-tune: a topoclip run (trained or fine-tuned) or a
pretrained OpenCLIP / Hugging Face CLIP model, with its tokenizer and input settings."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import topoclip
from topoclip.data import ImageTransform, TextTokenizer
from topoclip.data.shapes import ShapesConfig
from topoclip.models import build_model, load_pretrained
from topoclip.models.pretrained import register_checkpoint_loader

from .checkpoint import load_weights, read_checkpoint_config, resolve_checkpoint
from .config import EvalConfig, config_from_dict
from .dataclass_io import from_dict
from .finetune_config import FinetuneConfig, SourceConfig

__all__ = ["TOKENIZER_DIR", "LoadedModel", "load_run_model", "load_source"]

TOKENIZER_DIR = "tokenizer"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple
    std: tuple
    reference: ShapesConfig  # the distribution the source was trained on (or the default shapes)
    description: str
    data: ShapesConfig | None = None  # the data the model was last trained on (None: not trained here)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def image_transform(self) -> ImageTransform:
        """Files -> tensors at this model's input size and normalisation."""
        return ImageTransform(self.image_size, self.mean, self.std)


def _source_topology(source: SourceConfig, embed_dim: int) -> topoclip.Topology | None:
    if source.topology is None:
        return None
    if source.topology.startswith("oblique"):
        m = source.m or 8
        if embed_dim % m:
            raise ValueError(f"source.m: the embedding size {embed_dim} is not divisible by m={m}")
        return topoclip.topology(source.topology, n=embed_dim // m, m=m)
    if source.m is not None:
        raise ValueError(f"source.m: {source.topology} has no blocks")
    return topoclip.topology(source.topology, dim=embed_dim)


def load_run_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """A model saved by ``topoclip train`` or ``topoclip finetune`` (run or checkpoint dir)."""
    ckpt = resolve_checkpoint(path)
    saved = read_checkpoint_config(ckpt)
    if "source" in saved:  # a fine-tuning run: rebuild its source, then load its weights
        config = from_dict(FinetuneConfig, saved)
        loaded = load_source(config.source, device)
        load_weights(loaded.model, ckpt)
        loaded.description = f"{ckpt} (fine-tuned from {loaded.description})"
        if config.data.source == "shapes":  # else `topoclip eval` falls back to the reference shapes
            loaded.data = dataclasses.replace(config.data.shapes, image_size=loaded.image_size, mean=loaded.mean, std=loaded.std)
        loaded.eval = config.eval
        return loaded
    config = config_from_dict(saved)
    tokenizer_dir = ckpt.parent.parent / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise ValueError(f"checkpoint: no tokenizer directory at {tokenizer_dir}")
    tokenizer = TextTokenizer.load(tokenizer_dir)
    model = build_model(
        config.model, config.topology.build(), vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id
    )
    load_weights(model, ckpt)
    shapes = config.data.shapes
    return LoadedModel(
        model.to(device), tokenizer, shapes.image_size, shapes.mean, shapes.std, shapes, str(ckpt), shapes, config.eval
    )


def _is_run(path: Path) -> bool:
    try:
        resolve_checkpoint(path)
        return True
    except ValueError:
        return False


def load_source(source: SourceConfig, device) -> LoadedModel:
    if source.path is None:
        raise ValueError("source.path: give the pretrained model (--from PATH): a topoclip run, an OpenCLIP weights file or directory, or a Hugging Face CLIP directory")
    path = Path(source.path)
    if not path.exists():
        raise ValueError(f"source.path: {path} does not exist")
    if _is_run(path):
        if source.model_name is not None:
            raise ValueError(f"source.model_name: {path} is a topoclip run; model_name does not apply")
        loaded = load_run_model(path, device)
        if source.topology is not None and source.topology != loaded.model.topology.name:
            raise ValueError(
                f"source.topology: {path} was trained on {loaded.model.topology.name}; a topoclip model keeps its topology"
            )
        return loaded
    model, tokenizer, transform = load_pretrained(path, model_name=source.model_name, device=device)
    topology = _source_topology(source, model.embed_dim)
    if topology is not None:
        model.topology = topology
    size, mean, std = _input_settings(model, transform)
    if not 16 <= size <= 512:
        raise ValueError(f"source.path: the model's image size {size} is outside the shapes generator's 16..512")
    reference = ShapesConfig(image_size=size, mean=mean, std=std)
    return LoadedModel(model.to(device), tokenizer, size, mean, std, reference, str(path))


def _input_settings(model: nn.Module, transform) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) the model expects: from our ImageTransform (Hugging Face
    sources) or from open_clip's preprocessing config (its transform is a torchvision Compose)."""
    if hasattr(transform, "image_size"):
        return int(transform.image_size), tuple(transform.mean), tuple(transform.std)
    visual = model.clip.visual
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(visual, "image_size", None))
    if isinstance(size, (tuple, list)):
        if size[0] != size[-1]:
            raise ValueError(f"source.path: non-square input size {tuple(size)} is not supported by the shapes data")
        size = size[0]
    if size is None or "mean" not in cfg or "std" not in cfg:
        raise ValueError("source.path: cannot read the model's input size and normalisation")
    return int(size), tuple(cfg["mean"]), tuple(cfg["std"])




def _as_pretrained(path, topology: topoclip.Topology | None = None):
    """``load_pretrained``'s hook for topoclip runs: (model, tokenizer, image transform)."""
    loaded = load_run_model(path)
    if topology is not None and topology.name != loaded.model.topology.name:
        raise ValueError(f"{path}: a topoclip model keeps its topology ({loaded.model.topology.name}), got {topology.name}")
    return loaded.model, loaded.tokenizer, loaded.image_transform()


register_checkpoint_loader(_as_pretrained)
