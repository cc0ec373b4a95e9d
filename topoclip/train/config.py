"""Experiment configuration: nested dataclasses loaded from YAML plus ``key=value`` overrides.

Everything is validated when the config is built, before any data is generated or a model is
created; a problem raises ``ValueError`` whose message starts with the dotted field name
(``optim.lr: must be > 0, got -0.1``).

    cfg = load_config("configs/default.yaml", ["optim.lr=1e-3", "topology.name=sphere"])
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

import topoclip
from topoclip.data.shapes import ShapesConfig
from topoclip.models import ModelConfig

from .dataclass_io import apply_overrides, from_dict, to_dict

__all__ = [
    "DataConfig",
    "ShardsConfig",
    "TopologyConfig",
    "LossConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "EvalConfig",
    "OutputConfig",
    "LoggingConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "save_config",
    "run_config_path",
    "default_config_path",
    "read_config_file",
]

DEFAULT_CONFIG = Path("configs") / "default.yaml"
RUN_CONFIG_FILE = "config.yaml"
DEFAULT_DIM = 128
DEFAULT_BLOCKS = 8


def _positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be > 0, got {value!r}")


def _non_negative(value: float, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: must be >= 0, got {value!r}")


@dataclass
class ShardsConfig:
    """Training pairs streamed from webdataset tar shards (``topoclip data convert`` writes them).

    ``urls``: a directory of .tar files, a brace pattern ``dir/shard-{000000..000099}.tar``
    or ``::``-joined patterns (``pipe:``/http URLs work). ``epoch_length``: samples per epoch
    over all processes (an epoch is epoch_length // train.batch_size steps). Each shard goes to
    one (rank, DataLoader worker); without ``resample`` every sample is read once per epoch when
    the shards split evenly. ``resample`` draws shards with replacement (any shard count works).
    ``tokenizer_captions``: captions read from the shards to train the tokenizer when
    ``data.tokenizer`` is null.
    """

    urls: Optional[str] = None
    epoch_length: Optional[int] = None
    shuffle_buffer: int = 1000
    resample: bool = False
    strict: bool = False
    tokenizer_captions: int = 100_000

    def __post_init__(self):
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ValueError(f"data.shards.epoch_length: must be >= 1, got {self.epoch_length}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shards.shuffle_buffer: must be >= 0 (0 = no shuffling), got {self.shuffle_buffer}")
        if self.tokenizer_captions < 1:
            raise ValueError(f"data.shards.tokenizer_captions: must be >= 1, got {self.tokenizer_captions}")


@dataclass
class DataConfig:
    """Training and evaluation data: the embedded captioned shapes, and the tokenizer.

    ``source: shards`` trains on webdataset shards (``data.shards``) instead of the embedded
    training split; evaluation stays on the embedded data's test sets.
    ``tokenizer`` None trains a WordPiece tokenizer of ``vocab_size`` on the training
    captions; a path loads a saved one (or any Hugging Face tokenizer directory). Its context
    length is ``model.text.context_length``.
    """

    source: Literal["shapes", "shards"] = "shapes"
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    tokenizer: Optional[str] = None
    vocab_size: int = 1000

    def __post_init__(self):
        if self.source == "shards":
            if not self.shards.urls:
                raise ValueError("data.shards.urls: needed with data.source=shards (a directory, pattern or list of shards)")
            if self.shards.epoch_length is None:
                raise ValueError("data.shards.epoch_length: needed with data.source=shards (samples per epoch)")
        if self.vocab_size < 6:
            raise ValueError(f"data.vocab_size: must be > 5 (the special tokens), got {self.vocab_size}")
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            raise ValueError(f"data.tokenizer: no tokenizer directory at {self.tokenizer}")


@dataclass
class TopologyConfig:
    """The embedding space: ``name`` and its size.

    Unset sizes follow the seed's rule of keeping the embedding dimension fixed: ``dim``
    defaults to 128, an oblique topology's ``m`` to 8 and ``n`` to dim / m. sphere and
    euclidean take ``dim`` only.
    """

    name: str = "oblique-inner"
    dim: Optional[int] = None
    n: Optional[int] = None
    m: Optional[int] = None

    def __post_init__(self):
        known = topoclip.available_topologies()
        if self.name not in known:
            raise ValueError(f"topology.name: unknown topology {self.name!r} (known: {', '.join(known)})")
        for key in ("dim", "n", "m"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"topology.{key}: must be >= 1, got {value}")
        if not self.name.startswith("oblique"):
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

    def build(self) -> topoclip.Topology:
        if self.name.startswith("oblique"):
            return topoclip.topology(self.name, n=self.n, m=self.m)
        return topoclip.topology(self.name, dim=self.dim)


@dataclass
class LossConfig:
    """How the contrastive loss is computed (never what it computes).

    From a global batch of ``tile_threshold`` pairs on, the exact tiled loss keeps memory at
    O(b d + tile_size^2) instead of O(b^2); null never tiles, 0 always tiles.
    """

    tile_threshold: Optional[int] = 16384
    tile_size: int = 1024

    def __post_init__(self):
        if self.tile_threshold is not None and self.tile_threshold < 0:
            raise ValueError(f"loss.tile_threshold: must be >= 0 or null (never tile), got {self.tile_threshold}")
        if self.tile_size < 1:
            raise ValueError(f"loss.tile_size: must be >= 1, got {self.tile_size}")


@dataclass
class OptimConfig:
    """AdamW; weight decay applies to weight matrices only (see ``optim.param_groups``)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 60
    grad_clip: Optional[float] = 1.0
    # Peak lr of the logit scale (the temperature); null: optim.lr. Short runs need a larger
    # one to let the temperature move as far as a long run would (see optim.param_groups).
    logit_scale_lr: Optional[float] = None

    def __post_init__(self):
        _positive(self.lr, "optim.lr")
        if self.logit_scale_lr is not None:
            _positive(self.logit_scale_lr, "optim.logit_scale_lr")
        _non_negative(self.weight_decay, "optim.weight_decay")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"optim.betas[{i}]: must lie in [0, 1), got {beta}")
        _positive(self.eps, "optim.eps")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None:
            _non_negative(self.grad_clip, "optim.grad_clip")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule after the linear warm-up."""

    name: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio: must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    """Length, batch, seed, device and checkpointing of a run. Give ``steps`` or ``epochs``."""

    steps: Optional[int] = 900
    epochs: Optional[int] = None
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: Optional[int] = None
    # Encode the batch in chunks of this many pairs with the gradient cache (an exact
    # full-batch step in the memory of one chunk); null: encode the whole batch at once.
    grad_cache_chunk: Optional[int] = None
    # Autocast dtype of the towers: fp32 (off), bf16 or fp16 (fp16: CUDA only, with loss
    # scaling). The geometry and the loss always compute in fp32.
    precision: str = "fp32"
    # Multi-process runs: each rank scores only its own rows against all gathered columns
    # (b x B logits instead of B x B); the same gradients, less memory and compute per rank.
    local_loss: bool = False
    # Recompute the towers' activations in backward (less memory, ~1/3 more compute).
    grad_checkpointing: bool = False
    # torch.compile the model (first steps are slow while it compiles).
    compile: bool = False
    checkpoint_every: int = 300
    keep_last: int = 2
    resume: bool = False

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("train.steps: give exactly one of train.steps and train.epochs (set the other to null)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"train.steps: must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"train.epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"train.batch_size: must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if self.device != "auto":
            try:
                import torch

                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"train.device: not a device: {self.device!r} (use auto, cpu, cuda, cuda:1, ...)") from None
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers: must be >= 0, got {self.num_workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"train.threads: must be >= 1, got {self.threads}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision: must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.grad_cache_chunk is not None and self.grad_cache_chunk < 1:
            raise ValueError(f"train.grad_cache_chunk: must be >= 1 or null, got {self.grad_cache_chunk}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every: must be >= 0 (0 = only at the end), got {self.checkpoint_every}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last: must be >= 1, got {self.keep_last}")


@dataclass
class EvalConfig:
    """Evaluation after training: zero-shot on every task and retrieval on the test set.

    ``robustness``: on the retrieval set also ECE (I->T, T->I), alignment / uniformity /
    relative alignment / modality gap and the m²-Mix hardness histogram, with PNG plots.
    """

    enabled: bool = True
    zeroshot: bool = True
    retrieval: bool = True
    robustness: bool = True
    batch_size: int = 512

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class OutputConfig:
    """Runs go to ``dir/name``; an existing non-empty run dir gets a ``-1``, ``-2`` suffix
    unless the run resumes."""

    dir: str = "runs"
    name: Optional[str] = None

    def __post_init__(self):
        if not self.dir:
            raise ValueError("output.dir: must not be empty")
        if self.name is not None and (not self.name or os.sep in self.name or self.name in (".", "..")):
            raise ValueError(f"output.name: must be a plain directory name, got {self.name!r}")


@dataclass
class LoggingConfig:
    progress: bool = True
    jsonl: bool = True
    tensorboard: bool = True


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        image_size = self.model.image.img_size
        if image_size is not None and image_size != self.data.shapes.image_size:
            raise ValueError(
                f"model.image.img_size: {image_size} differs from data.shapes.image_size={self.data.shapes.image_size}"
            )
        # The model's [CLS] token count must fit the topology.
        k = self.model.num_tokens
        m = self.topology.m
        if k > 1:
            if not self.topology.name.startswith("oblique"):
                raise ValueError(
                    f"model.num_tokens: {k} [CLS] tokens need an oblique topology (one sphere per token), "
                    f"but topology.name is {self.topology.name}"
                )
            if k != m:
                raise ValueError(f"model.num_tokens: multi-token models need num_tokens == topology.m, got {k} != {m}")
        shards = self.data.shards
        if self.data.source == "shards" and shards.epoch_length < self.train.batch_size:
            raise ValueError(
                f"data.shards.epoch_length: {shards.epoch_length} samples is less than one batch "
                f"(train.batch_size={self.train.batch_size})"
            )
        if self.optim.warmup_steps and self.train.steps is not None and self.optim.warmup_steps > self.train.steps:
            raise ValueError(
                f"optim.warmup_steps: {self.optim.warmup_steps} is longer than the run (train.steps={self.train.steps})"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Build and validate a config from a nested dict plus ``key=value`` overrides."""
    return from_dict(ExperimentConfig, apply_overrides(data or {}, list(overrides)))


PACKAGED_CONFIGS = Path(topoclip.__file__).resolve().parent / "configs"


def default_config_path() -> Path:
    """``configs/default.yaml`` of the working directory, else the one shipped in the package."""
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    return PACKAGED_CONFIGS / DEFAULT_CONFIG.name


def resolve_config_path(path: str | os.PathLike) -> Path:
    """``path`` if it exists; else, for a bare name like ``sphere`` or ``ablation/table3.yaml``,
    the config of that name shipped in the package (so installed users need no checkout)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    shipped = PACKAGED_CONFIGS / (path if path.suffix else path.with_suffix(".yaml"))
    return shipped if shipped.is_file() else path


def run_config_path(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps the config it was started with."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"resume: {run_dir} is not a run directory (no {RUN_CONFIG_FILE})")
    return path


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict, with its ``base:`` file (relative to it) merged underneath."""
    if not path.is_file():
        raise ValueError(f"config: file not found: {path}")
    if path.resolve() in seen:
        raise ValueError(f"config: {path}: base files form a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config: {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"base: expected a file name, got {base!r} (in {path})")
    return _deep_merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), data)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A config file as a nested dict with its ``base:`` files merged in; not validated."""
    return _read_yaml(Path(path))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (default ``configs/default.yaml``), apply overrides, validate.

    A top-level ``base: other.yaml`` key loads that file first and merges this one over it.
    The run name defaults to the config file's stem, so ``configs/sphere.yaml`` runs in
    ``runs/sphere``.
    """
    path = resolve_config_path(path) if path is not None else default_config_path()
    data = _read_yaml(path)
    output = data.setdefault("output", {})
    if isinstance(output, dict) and output.get("name") is None:
        output["name"] = path.stem
    return config_from_dict(data, overrides)


def save_config(config: ExperimentConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
