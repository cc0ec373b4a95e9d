"""Open a model to evaluate or fine-tune: a topoclip run (pretrained or fine-tuned) or a
pretrained OpenCLIP / Hugging Face CLIP model, with its tokenizer and input settings.

    run = topoclip.load_run("runs/default")
    run.model, run.tokenizer, run.topology, run.transform

Nothing here imports the trainer: a run directory is read as a file format.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from topoclip.config import EvalConfig, FinetuneConfig, SourceConfig, config_from_dict
from topoclip.data import ImageTransform, TextTokenizer
from topoclip.data.shapes import ShapesConfig
from topoclip.dataclass_io import from_dict
from topoclip.geometry import Topology, is_blockwise, topology
from topoclip.models import build_model, ensure_logit_bias
from topoclip.models.pretrained import load_pretrained

from .checkpoint import load_weights, read_checkpoint_config, resolve_checkpoint
from .layout import TOKENIZER_DIR, read_run_info, upgrade_config

__all__ = ["LoadedRun", "load_finetune_source", "load_run", "load_source"]


@dataclass
class LoadedRun:
    """A model ready to evaluate, with what it needs around it.

    ``image_size``/``mean``/``std``: the input the model expects. ``reference``: the shapes
    distribution the model (or its source) was trained on, or the default shapes rendered at its
    input size. ``data``: the shapes data the run itself trained on (None for other data or
    foreign models). ``kind``: ``pretrain``, ``finetune`` or ``foreign`` (OpenCLIP/HF).
    """

    model: nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple
    std: tuple
    reference: ShapesConfig
    description: str
    data: ShapesConfig | None = None
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    kind: str = "foreign"

    @property
    def topology(self) -> Topology:
        return self.model.topology

    @property
    def transform(self) -> ImageTransform:
        """Image files -> tensors at this model's input size and normalisation."""
        return ImageTransform(self.image_size, self.mean, self.std)


def _source_topology(source: SourceConfig, embed_dim: int) -> Topology | None:
    if source.topology is None:
        return None
    if is_blockwise(source.topology):
        m = source.m or 8
        if embed_dim % m:
            raise ValueError(f"source.m: the embedding size {embed_dim} is not divisible by m={m}")
        return topology(source.topology, dim=embed_dim, m=m)
    if source.m is not None:
        raise ValueError(f"source.m: {source.topology} has no blocks")
    return topology(source.topology, dim=embed_dim)


def load_run(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedRun:
    """The model of a run directory (its latest checkpoint) or of one checkpoint directory,
    written by ``topoclip train`` or ``topoclip finetune`` in any format version."""
    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent.parent
    saved = read_checkpoint_config(ckpt)
    info = read_run_info(run_dir, config=saved)
    saved, kind = upgrade_config(saved, info), info.kind
    if kind == "finetune":  # rebuild the source's architecture, then load the fine-tuned weights
        config = from_dict(FinetuneConfig, saved)
        loaded = load_finetune_source(config, device)
        load_weights(loaded.model, ckpt)
        loaded.description = f"{ckpt} (fine-tuned from {loaded.description})"
        if config.data.source == "shapes":  # else `topoclip eval` falls back to the reference shapes
            loaded.data = dataclasses.replace(config.data.shapes, image_size=loaded.image_size, mean=loaded.mean, std=loaded.std)
        loaded.eval = config.eval
        loaded.kind = kind
        return loaded
    config = config_from_dict(saved)
    tokenizer_dir = run_dir / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise ValueError(f"checkpoint: no tokenizer directory at {tokenizer_dir}")
    tokenizer = TextTokenizer.load(tokenizer_dir)
    model = build_model(
        config.model, config.topology.build(), vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id
    )
    load_weights(model, ckpt)
    shapes = config.data.shapes
    return LoadedRun(
        model.to(device), tokenizer, shapes.image_size, shapes.mean, shapes.std, shapes, str(ckpt), shapes, config.eval, kind
    )


def is_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a topoclip run, checkpoints or checkpoint directory (or a file in one)."""
    try:
        resolve_checkpoint(path)
        return True
    except ValueError:
        return False


def load_finetune_source(config: FinetuneConfig, device) -> LoadedRun:
    """A fine-tuning run's source model, fitted to its loss: the sigmoid loss gives a source
    without a logit bias one (``finetune.logit_bias``), before training and again when the
    fine-tuned weights are loaded back."""
    loaded = load_source(config.source, device)
    if config.loss.kind == "sigmoid":
        ensure_logit_bias(loaded.model, config.finetune.logit_bias)
    return loaded


def load_source(source: SourceConfig, device) -> LoadedRun:
    """The model a fine-tuning run starts from: a topoclip run, or an OpenCLIP / HF model."""
    if source.separate_towers:
        return _load_separate_towers(source, device)
    if source.path is None:
        raise ValueError(
            "source.path: give the pretrained model (--from PATH): a topoclip run, an OpenCLIP weights file or "
            "directory, or a Hugging Face CLIP directory"
        )
    path = Path(source.path)
    if not path.exists():
        raise ValueError(f"source.path: {path} does not exist")
    if is_run(path):
        if source.model_name is not None:
            raise ValueError(f"source.model_name: {path} is a topoclip run; model_name does not apply")
        loaded = load_run(path, device)
        if source.topology is not None and source.topology != loaded.model.topology.name:
            raise ValueError(
                f"source.topology: {path} was trained on {loaded.model.topology.name}; a topoclip model keeps its topology"
            )
        return loaded
    model, tokenizer, transform = load_pretrained(path, model_name=source.model_name, device=device)
    topo = _source_topology(source, model.embed_dim)
    if topo is not None:
        model.topology = topo
    size, mean, std = _input_settings(model, transform)
    if not 16 <= size <= 512:
        raise ValueError(f"source.path: the model's image size {size} is outside the shapes generator's 16..512")
    reference = ShapesConfig(image_size=size, mean=mean, std=std)
    return LoadedRun(model.to(device), tokenizer, size, mean, std, reference, str(path))


def _load_separate_towers(source: SourceConfig, device) -> LoadedRun:
    from topoclip.models.separate_towers import load_separate_towers

    dim = source.embed_dim
    model, tokenizer, transform = load_separate_towers(source.image_tower, source.image_weights, source.text_tower, dim,
                                                       device=device)
    topo = _source_topology(source, dim)
    if topo is not None:
        model.topology = topo
    size, mean, std = int(transform.image_size), tuple(transform.mean), tuple(transform.std)
    description = f"timm {source.image_tower or source.image_weights} + {source.text_tower}"
    return LoadedRun(model.to(device), tokenizer, size, mean, std, ShapesConfig(image_size=size, mean=mean, std=std), description)


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
