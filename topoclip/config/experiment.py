"""Experiment configuration: nested dataclasses loaded from YAML plus ``key=value`` overrides.

Everything is validated when the config is built, before any data is generated or a model is
created; a problem raises ``ValueError`` whose message starts with the dotted field name
(``optim.lr: must be > 0, got -0.1``).

    cfg = load_config("configs/default.yaml", ["optim.lr=1e-3", "topology.name=sphere"])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from topoclip.data.shapes_config import ShapesConfig
from topoclip.dataclass_io import from_dict
from topoclip.losses.settings import SIGLIP_INIT
from topoclip.models.config import ModelConfig, check_tokens_fit_topology
from topoclip.topology_names import available_topologies, is_blockwise

from .data import CsvDataConfig, FolderDataConfig, KarpathyDataConfig, ShardsConfig, check_source
from .files import default_config_path, read_config_file, resolve_config_path
from .overrides import apply_natural_overrides
from .sections import RunSettings

if TYPE_CHECKING:
    from topoclip.geometry import Topology

__all__ = [
    "DataConfig",
    "TopologyConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
]

DEFAULT_DIM = 128
DEFAULT_BLOCKS = 8


@dataclass
class DataConfig:
    """Training and evaluation data, and the tokenizer.

    ``source`` (see ``topoclip.config.data``): ``shapes`` trains on the embedded data and
    evaluates on its test sets; ``shards`` streams webdataset shards and evaluates on the
    embedded test sets; ``csv``, ``folder`` and ``karpathy`` read your files and evaluate on
    their held-out part. ``shapes.image_size`` / ``mean`` / ``std`` are the model's input for
    every source (real images are resized and normalised to them).
    ``tokenizer`` None trains a WordPiece tokenizer of ``vocab_size`` on the training
    captions; a path loads a saved one (or any Hugging Face tokenizer directory). Its context
    length is ``model.text.context_length``.
    """

    source: str = "shapes"
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    csv: CsvDataConfig = field(default_factory=CsvDataConfig)
    folder: FolderDataConfig = field(default_factory=FolderDataConfig)
    karpathy: KarpathyDataConfig = field(default_factory=KarpathyDataConfig)
    tokenizer: Optional[str] = None
    vocab_size: int = 1000

    def __post_init__(self):
        check_source(self.source, self.csv, self.folder, self.karpathy, self.shards)
        if self.source == "shards" and self.shards.epoch_length is None:
            # `topoclip data convert` records the count (sizes.json); other shards must say it.
            from topoclip.data.shards import dataset_size

            self.shards.epoch_length = dataset_size(self.shards.urls)
            if self.shards.epoch_length is None:
                raise ValueError(
                    "data.shards.epoch_length: not given, and no sizes.json beside the shards to count them "
                    "(shards written by `topoclip data convert` have one; else give the samples per epoch)"
                )
        if self.vocab_size < 6:
            raise ValueError(f"data.vocab_size: must be > 5 (the special tokens), got {self.vocab_size}")
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            raise ValueError(f"data.tokenizer: no tokenizer directory at {self.tokenizer}")


@dataclass
class TopologyConfig:
    """The embedding space: ``name`` and its size.

    Unset sizes follow the rule of *Design of the topology for contrastive visual-textual alignment* of keeping the embedding dimension fixed: ``dim``
    defaults to 128, an oblique topology's ``m`` to 8 and ``n`` to dim / m. sphere and
    euclidean take ``dim`` only.
    """

    name: str = "oblique-inner"
    dim: Optional[int] = None
    n: Optional[int] = None
    m: Optional[int] = None
    # lorentz only: the curvature -c of the hyperboloid (its start when learned) and whether
    # the model learns it (c = exp(param), clamped to [c/10, 10 c]).
    curvature: float = 1.0
    learn_curvature: bool = True
    # product only: its factors, e.g. "sphere:64+lorentz:64" (name:dim, or name:NxM for an
    # oblique kind); dim is their sum. Similarity is the sum of the factors'.
    factors: Optional[str] = None

    def __post_init__(self):
        known = available_topologies()
        if self.name not in known:
            raise ValueError(f"topology.name: unknown topology {self.name!r} (known: {', '.join(known)})")
        if not self.curvature > 0:
            raise ValueError(f"topology.curvature: must be > 0, got {self.curvature}")
        if self.name == "product":
            self._check_product()
            return
        if self.factors is not None:
            raise ValueError(f"topology.factors: only a product has factors (topology.name=product), not {self.name}")
        if self.name != "lorentz" and self.curvature != 1.0:
            raise ValueError(f"topology.curvature: only the lorentz topology has a curvature ({self.name} has none)")
        for key in ("dim", "n", "m"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"topology.{key}: must be >= 1, got {value}")
        if not is_blockwise(self.name):
            for key in ("n", "m"):
                if getattr(self, key) is not None:
                    raise ValueError(f"topology.{key}: {self.name} has no blocks; set topology.dim only")
            self.dim = DEFAULT_DIM if self.dim is None else self.dim
            return
        if self.m is None:
            self.m = DEFAULT_BLOCKS
        if self.n is None:
            dim = DEFAULT_DIM if self.dim is None else self.dim
            if dim % self.m:
                raise ValueError(f"topology.dim: {dim} is not divisible by topology.m={self.m}")
            self.n = dim // self.m
        if self.dim is None:
            self.dim = self.n * self.m
        if self.n * self.m != self.dim:
            raise ValueError(f"topology.dim: n*m = {self.n}*{self.m} = {self.n * self.m} does not equal dim={self.dim}")

    def _check_product(self) -> None:
        if self.factors is None:
            raise ValueError("topology.factors: a product needs its factors, e.g. topology.factors=sphere:64+lorentz:64")
        for key in ("n", "m"):
            if getattr(self, key) is not None:
                raise ValueError(f"topology.{key}: a product is sized by its factors (topology.factors); set no {key}")
        try:
            built = self.build()
        except ValueError as err:
            raise ValueError(f"topology.factors: {err}") from None
        if self.dim is not None and self.dim != built.dim:
            raise ValueError(f"topology.dim: {self.dim} differs from the factors' total {built.dim} ({self.factors}); "
                             f"leave it null")
        if self.curvature != 1.0 and not built.curvature:
            raise ValueError("topology.curvature: the product has no hyperbolic (lorentz) factor")
        self.dim = built.dim

    def build(self) -> Topology:
        # Imported here: reading and checking a config needs no torch (the command line answers
        # a mistyped key at once); building the space does.
        from topoclip.geometry import Lorentz, product_topology, topology

        if self.name == "product":
            return product_topology(self.factors, curvature=self.curvature, learn_curvature=self.learn_curvature)
        if self.name == "lorentz":
            return Lorentz(self.dim, curvature=self.curvature, learn_curvature=self.learn_curvature)
        return topology(self.name, dim=self.dim, n=self.n, m=self.m)


@dataclass
class ExperimentConfig(RunSettings):
    """A pretraining run: its data, model and topology, plus the shared run settings."""

    # Saved configs list the sections in the order a reader looks for them.
    __field_order__ = ("data", "model", "topology", "loss", "optim", "schedule", "train", "eval", "output", "logging")

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)

    def __post_init__(self):
        image_size = self.model.image.img_size
        if image_size is not None and image_size != self.data.shapes.image_size:
            raise ValueError(
                f"model.image.img_size: {image_size} differs from data.shapes.image_size={self.data.shapes.image_size}"
            )
        check_tokens_fit_topology(self.model.num_tokens, self.topology.build())
        if self.loss.entailment > 0 and self.topology.name != "lorentz":
            raise ValueError(f"loss.entailment: the entailment cone lives in hyperbolic space (topology.name=lorentz), "
                             f"not {self.topology.name}")
        if self.loss.kind == "sigmoid" and self.model.logit_bias is None:
            self.model.logit_bias = SIGLIP_INIT["bias"]  # the sigmoid loss needs its bias
        elif self.loss.kind == "softmax" and self.model.logit_bias is not None:
            raise ValueError("model.logit_bias: only the sigmoid loss has a logit bias (set loss.kind=sigmoid or null it)")
        if self.data.source == "shapes" and self.train.batch_size > self.data.shapes.num_train:
            raise ValueError(f"train.batch_size: {self.train.batch_size} is larger than the training set "
                             f"(data.shapes.num_train={self.data.shapes.num_train})")
        shards = self.data.shards
        if self.data.source == "shards" and shards.epoch_length < self.train.batch_size:
            raise ValueError(
                f"data.shards.epoch_length: {shards.epoch_length} samples is less than one batch "
                f"(train.batch_size={self.train.batch_size})"
            )
        self.check_warmup_fits()


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Build and validate a config from a nested dict plus ``key=value`` overrides.

    Beyond the shared natural-override rules: ``loss.kind=sigmoid`` given starts the logit scale
    at SigLIP's 10 (unless ``model.logit_scale.init`` is given too), since a file's CLIP value
    1/0.07 was chosen for the softmax loss."""
    out = apply_natural_overrides(data or {}, list(overrides))
    given = {text.split("=", 1)[0].strip() for text in overrides}
    loss = out.get("loss") if isinstance(out.get("loss"), dict) else {}
    if "loss.kind" in given and loss.get("kind") == "sigmoid" and "model.logit_scale.init" not in given:
        model = out.setdefault("model", {})
        if isinstance(model, dict) and isinstance(model.setdefault("logit_scale", {}), dict):
            model["logit_scale"]["init"] = SIGLIP_INIT["scale"]
    return from_dict(ExperimentConfig, out)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (default ``configs/default.yaml``), apply overrides, validate.

    A top-level ``base: other.yaml`` key loads that file first and merges this one over it.
    The run name defaults to the config file's stem, so ``configs/sphere.yaml`` runs in
    ``runs/sphere``.
    """
    path = resolve_config_path(path) if path is not None else default_config_path()
    data = read_config_file(path)
    output = data.setdefault("output", {})
    if isinstance(output, dict) and output.get("name") is None:
        output["name"] = path.stem
    return config_from_dict(data, overrides)
