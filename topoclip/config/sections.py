"""The config sections every run has, whatever its recipe: the loss's computation, the optimizer
and its schedule, length/batch/device/checkpointing, evaluation, output and logging.

``RunSettings`` holds them once; the pretraining and the fine-tuning configs extend it with
their own sections (data, model, topology; source, method). Each section validates itself on
construction, and a problem raises ``ValueError`` whose message starts with the dotted field
name (``optim.lr: must be > 0, got -0.1``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

__all__ = [
    "SuiteConfig",
    "LossConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "EvalConfig",
    "OutputConfig",
    "LoggingConfig",
    "RunSettings",
]


def _positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be > 0, got {value!r}")


def _non_negative(value: float, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: must be >= 0, got {value!r}")


LOSS_KINDS = ("softmax", "sigmoid")


@dataclass
class LossConfig:
    """Which contrastive loss, and how it is computed.

    From a global batch of ``tile_threshold`` pairs on, the exact tiled loss keeps memory at
    O(b d + tile_size^2) instead of O(b^2); null never tiles, 0 always tiles.
    """

    # softmax: the symmetric InfoNCE of CLIP; sigmoid: SigLIP's pairwise loss, with the
    # model's learnable logit bias (model.logit_bias, SigLIP's -10 unless given).
    kind: str = "softmax"
    # lorentz only: the weight of MERU's entailment-cone term (text entails image; MERU: 0.2);
    # 0 leaves it out.
    entailment: float = 0.0
    tile_threshold: Optional[int] = 16384
    tile_size: int = 1024

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind: unknown loss {self.kind!r} (known: {', '.join(LOSS_KINDS)})")
        if not 0.0 <= self.entailment < float("inf"):
            raise ValueError(f"loss.entailment: the weight must be >= 0, got {self.entailment}")
        if self.tile_threshold is not None and self.tile_threshold < 0:
            raise ValueError(f"loss.tile_threshold: must be >= 0 or null (never tile), got {self.tile_threshold}")
        if self.tile_size < 1:
            raise ValueError(f"loss.tile_size: must be >= 1, got {self.tile_size}")


@dataclass
class OptimConfig:
    """AdamW; weight decay applies to weight matrices only (see ``optim.param_groups``).

    The linear warm-up lasts ``warmup_steps`` when given, else ``warmup_ratio`` of the run's
    steps (the default, 1/15, is 60 of 900 steps), so a run of any length gets a warm-up that fits.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: Optional[int] = None
    warmup_ratio: float = 0.0667
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
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps: must be >= 0 or null (use optim.warmup_ratio), got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim.warmup_ratio: must lie in [0, 1), got {self.warmup_ratio}")
        if self.grad_clip is not None:
            _non_negative(self.grad_clip, "optim.grad_clip")

    def warmup_for(self, total_steps: int) -> int:
        """The warm-up of a run of ``total_steps`` steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round(self.warmup_ratio * total_steps))


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
    # scaling); auto: bf16 where the hardware multiplies bf16 natively (CUDA GPUs with bf16,
    # CPUs with AMX or AVX512-BF16), else fp32. The geometry and the loss always compute in fp32.
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
    # Stop with an error after this many skipped (non-finite) steps in a row: the run is
    # diverging and every later step would be skipped too (0 = never stop).
    max_consecutive_skips: int = 10

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
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise ValueError(f"train.precision: must be fp32, bf16, fp16 or auto, got {self.precision!r}")
        if self.grad_cache_chunk is not None and self.grad_cache_chunk < 1:
            raise ValueError(f"train.grad_cache_chunk: must be >= 1 or null, got {self.grad_cache_chunk}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every: must be >= 0 (0 = only at the end), got {self.checkpoint_every}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last: must be >= 1, got {self.keep_last}")
        if self.max_consecutive_skips < 0:
            raise ValueError(f"train.max_consecutive_skips: must be >= 0 (0 = never stop), got {self.max_consecutive_skips}")


# What each suite task reads from its ``data`` mapping (one of the first group names the data).
SUITE_DATA_KEYS = {
    "zeroshot": ({"folder", "csv"}, {"classnames", "templates", "image_root", "image_key", "label_key", "sep", "verify", "strict",
                                     "encoding"}),
    "retrieval": ({"karpathy", "csv"}, {"image_root", "split", "image_key", "caption_key", "sep", "verify", "strict",
                                        "label_key", "class_level", "encoding"}),
    "linear_probe": ({"train"}, {"test", "classnames", "verify", "strict"}),
}


@dataclass
class SuiteConfig:
    """One evaluation dataset and its task, as data (``eval.suites`` or a suite file):

    - ``zeroshot``: ``data: {folder: DIR}`` (one sub-folder per class) or ``{csv: FILE,
      image_key: filepath, label_key: label}``; ``classnames`` (a text file or JSON list) and
      ``templates`` (a JSON list, ``{}`` or ``{c}`` for the class) in CLIP_benchmark's forms;
    - ``retrieval``: ``{karpathy: JSON, image_root: DIR, split: test}`` or ``{csv: FILE,
      image_key: filepath, caption_key: title}`` with several captions (rows) per image;
      ``class_level: true`` with a ``label_key`` column (CSV only): a caption is a positive of
      every image of its class, for R@K and mAP@R;
    - ``linear_probe``: ``{train: DIR, test: DIR}`` image folders; features before the
      projection head.

    Relative paths in a suite file are relative to the file.
    """

    name: str
    task: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        where = f"eval.suites.{self.name}"
        if not self.name:
            raise ValueError("eval.suites: every suite needs a name")
        if self.task not in SUITE_DATA_KEYS:
            raise ValueError(f"{where}.task: must be one of {', '.join(SUITE_DATA_KEYS)}, got {self.task!r}")
        sources, options = SUITE_DATA_KEYS[self.task]
        unknown = sorted(set(self.data) - sources - options)
        if unknown:
            raise ValueError(f"{where}.data.{unknown[0]}: unknown for a {self.task} suite (known: {', '.join(sorted(sources | options))})")
        given = sorted(set(self.data) & sources)
        if len(given) != 1:
            raise ValueError(f"{where}.data: give exactly one of {', '.join(sorted(sources))} (got {given or 'none'})")
        if self.task == "linear_probe" and "test" not in self.data:
            raise ValueError(f"{where}.data.test: a linear probe needs a test folder beside data.train")
        if self.data.get("class_level") and ("csv" not in self.data or "label_key" not in self.data):
            raise ValueError(f"{where}.data.class_level: needs a CSV with a label column (data.csv and data.label_key)")
        if self.task == "retrieval" and "karpathy" in self.data and "image_root" not in self.data:
            raise ValueError(f"{where}.data.image_root: a Karpathy JSON needs the folder of its images")


@dataclass
class EvalConfig:
    """Evaluation after training.

    Without suites: the run's own evaluation sets (the shapes tasks and retrieval set, or a
    file source's held-out part); ``zeroshot`` / ``retrieval`` switch them. ``suites`` (and
    the entries of ``suite_file``, a YAML/JSON list) replace them with your datasets, see
    ``SuiteConfig``. ``robustness``: on retrieval sets also ECE (I->T, T->I), alignment /
    uniformity / relative alignment / modality gap and the m²-Mix hardness histogram, with
    PNG plots.
    """

    enabled: bool = True
    zeroshot: bool = True
    retrieval: bool = True
    robustness: bool = True
    batch_size: int = 512
    suites: list[SuiteConfig] = field(default_factory=list)
    suite_file: Optional[str] = None
    # During training: every ``every`` steps (and after the last one) the suites without plots
    # plus the contrastive loss on the held-out split ("val/loss"), in eval.jsonl and
    # TensorBoard; 0: only after training. ``best``: the "dataset/metric" (e.g. "shape/top1",
    # "val/loss") whose best value keeps its weights in checkpoints/best; ``best_mode`` auto
    # minimises losses, ECE and the geometry metrics and maximises everything else.
    every: int = 0
    best: Optional[str] = None
    best_mode: Literal["auto", "max", "min"] = "auto"

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size: must be >= 1, got {self.batch_size}")
        if self.every < 0:
            raise ValueError(f"eval.every: must be >= 0 (0: only after training), got {self.every}")
        if self.best is not None and (self.every == 0 or "/" not in self.best):
            raise ValueError(f"eval.best: needs eval.every > 0 and a \"dataset/metric\" name such as shape/top1 or val/loss, got {self.best!r}")

    def higher_is_better(self) -> bool:
        """Whether a larger ``best`` metric is better."""
        if self.best_mode != "auto":
            return self.best_mode == "max"
        lower = ("loss", "ece", "alignment", "uniformity", "gap")
        return not any(word in self.best.split("/", 1)[1].lower() for word in lower)
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.suites: names must be distinct, got {names}")


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
class RunSettings:
    """The sections shared by every run's config (see the module docstring)."""

    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check_warmup_fits(self) -> None:
        warmup = self.optim.warmup_steps
        if warmup and self.train.steps is not None and warmup > self.train.steps:
            raise ValueError(
                f"optim.warmup_steps: {self.optim.warmup_steps} is longer than the run (train.steps={self.train.steps})"
            )

    def to_dict(self) -> dict:
        from topoclip.dataclass_io import to_dict

        return to_dict(self)
