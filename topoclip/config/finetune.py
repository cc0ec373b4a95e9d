"""The fine-tuning config: the source model, the method and its settings, the data, and the
usual optim/schedule/train/eval/output/logging sections (with fine-tuning defaults)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from topoclip.data.shapes_config import ShapesConfig
from topoclip.dataclass_io import from_dict, to_dict
from topoclip.losses.settings import MixupConfig
from topoclip.topology_names import available_topologies

from .data import CsvDataConfig, FolderDataConfig, KarpathyDataConfig, check_source
from .files import deep_merge, read_config_file, resolve_config_path
from .overrides import apply_natural_overrides
from .sections import OptimConfig, RunSettings, TrainConfig

__all__ = [
    "BASE_METHODS",
    "METHODS",
    "MIX_PATHS",
    "split_method",
    "MIXUP_TERMS",
    "FinetuneConfig",
    "SourceConfig",
    "FinetuneMethodConfig",
    "FinetuneDataConfig",
    "finetune_config_from_dict",
    "load_finetune_config",
]

# The base methods: how the model is trained (or not) and what is taken from it.
BASE_METHODS = ("ft", "lp-ft", "wise-ft", "embedding-shift")
# The mixup terms each mixup method adds to the contrastive loss (MixupConfig field names).
MIXUP_TERMS = {"m2mix": ("m2",), "vmix": ("v",), "lmix": ("l",), "vlmix": ("vl",), "m3mix": ("m2", "v", "l", "vl")}
# Every single-word method; a method may also compose a base with mixups: "wise-ft+m2mix"
# (the paper's "WiSE-FT w/ m²-Mix"), "lp-ft+m2mix", "ft+vmix+lmix". A mixup alone means FT with it.
METHODS = (*BASE_METHODS, *MIXUP_TERMS)
MIX_PATHS = ("geodesic", "linear")


@dataclass
class SourceConfig:
    """The pretrained model to start from (see the module docstring).

    ``topology``/``m`` put an OpenCLIP or Hugging Face model's embeddings on a topology
    (default: the sphere, i.e. cosine similarity as the model was trained); a topoclip
    checkpoint keeps its own.
    """

    path: Optional[str] = None
    model_name: Optional[str] = None
    topology: Optional[str] = None
    m: Optional[int] = None
    # Or two towers pretrained apart (instead of path): a timm image model (name + weights
    # file, or a timm directory) and a Hugging Face text model directory, joined by new
    # projection heads to an embed_dim-dimensional embedding.
    image_tower: Optional[str] = None
    image_weights: Optional[str] = None
    text_tower: Optional[str] = None
    embed_dim: int = 256

    @property
    def separate_towers(self) -> bool:
        return any(v is not None for v in (self.image_tower, self.image_weights, self.text_tower))

    def __post_init__(self):
        if self.separate_towers:
            if self.path is not None or self.model_name is not None:
                raise ValueError("source.path: give either a pretrained model (path) or two towers "
                                 "(image_tower/image_weights and text_tower), not both")
            if self.image_weights is None or self.text_tower is None:
                missing = "source.image_weights" if self.image_weights is None else "source.text_tower"
                raise ValueError(f"{missing}: separately pretrained towers need both an image tower's weights and a text tower")
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim < 2:
            raise ValueError(f"source.embed_dim: must be an integer >= 2, got {self.embed_dim!r}")
        if self.topology is not None and self.topology not in available_topologies():
            known = ", ".join(available_topologies())
            raise ValueError(f"source.topology: unknown topology {self.topology!r} (known: {known})")
        if self.m is not None and self.m < 1:
            raise ValueError(f"source.m: must be >= 1, got {self.m}")


def split_method(method: str) -> tuple[str, tuple[str, ...]]:
    """(base method, mixup methods) of a method name; ValueError naming the field if unknown."""
    parts = [p.strip() for p in str(method).split("+")]
    base = parts[0] if parts[0] in BASE_METHODS else "ft"
    mixups = tuple(parts[1:] if parts[0] in BASE_METHODS else parts)
    for part in mixups:
        if part not in MIXUP_TERMS:
            known = ", ".join(METHODS)
            raise ValueError(f"finetune.method: unknown method {part!r} in {method!r} (known: {known}; "
                             "compose a base with mixups as wise-ft+m2mix)")
    if base == "embedding-shift" and mixups:
        raise ValueError(f"finetune.method: {method!r}: the embedding shift trains nothing, so no mixup can be added")
    if len(set(mixups)) != len(mixups):
        raise ValueError(f"finetune.method: {method!r} names a mixup twice")
    return base, mixups


@dataclass
class FinetuneMethodConfig:
    """Which method, and its settings.

    ``method``: a base (``ft``, ``lp-ft``, ``wise-ft``, ``embedding-shift``), a mixup (``m2mix``,
    ``vmix``, ``lmix``, ``vlmix``, ``m3mix``: FT with it), or a base with mixups joined by ``+``.
    ``mix_path``: mixup along the topology's geodesic, or the straight line projected back.
    LP-FT: the first ``lp_ratio`` of the steps train only the image projection (a linear probe
    on frozen image features, starting from the zero-shot classifier), at ``lp_lr`` (null: 10x
    ``optim.lr``); the rest fine-tune everything.
    """

    method: str = "ft"
    mixup: MixupConfig = field(default_factory=MixupConfig)
    mix_path: str = "geodesic"
    wise_alpha: float = 0.5  # weight of the fine-tuned model in WiSE-FT (0: zero-shot, 1: fine-tuned)
    lp_ratio: float = 0.5
    lp_lr: Optional[float] = None
    simat_lambda: Optional[float] = 1.0  # embedding arithmetic on the shapes: the move's lam (null: off)
    # The paper's high-temperature variants ("FT (τ)", "m³-Mix (τ)"): fine-tune with the logit
    # scale fixed at 1/temperature instead of the model's own learned one (null).
    temperature: Optional[float] = None
    # The sigmoid loss (loss.kind=sigmoid) needs a learnable logit bias; a source without one
    # gets it, starting here (null: a SigLIP source's own, else SigLIP's -10).
    logit_bias: Optional[float] = None
    shift: float = 1.0  # c of the embedding shift: points move by c * gap / 2
    gap_pairs: int = 4096  # fine-tuning pairs the modality gap is measured on
    eval_zero_shot: bool = True  # also evaluate the source model before fine-tuning

    def __post_init__(self):
        _, mixups = split_method(self.method)
        for term in self.mixup_terms:
            if getattr(self.mixup, term) <= 0:
                raise ValueError(f"finetune.mixup.{term}: the {self.method} method needs a weight > 0")
        if self.mix_path not in MIX_PATHS:
            raise ValueError(f"finetune.mix_path: unknown path {self.mix_path!r} (known: {', '.join(MIX_PATHS)})")
        if not 0.0 <= self.wise_alpha <= 1.0:
            raise ValueError(f"finetune.wise_alpha: must lie in [0, 1], got {self.wise_alpha}")
        if not 0.0 < self.lp_ratio < 1.0:
            raise ValueError(f"finetune.lp_ratio: must lie in (0, 1), got {self.lp_ratio}")
        if self.lp_lr is not None and not self.lp_lr > 0:
            raise ValueError(f"finetune.lp_lr: must be > 0, got {self.lp_lr}")
        if self.temperature is not None and not 0.01 <= self.temperature <= 10.0:
            raise ValueError(f"finetune.temperature: must lie in [0.01, 10] (a logit scale of 1/temperature <= 100), "
                             f"got {self.temperature}")
        if self.logit_bias is not None and not math.isfinite(self.logit_bias):
            raise ValueError(f"finetune.logit_bias: must be a finite number or null, got {self.logit_bias}")
        if self.simat_lambda is not None and not self.simat_lambda > 0:
            raise ValueError(f"finetune.simat_lambda: must be > 0 (null: no embedding arithmetic), got {self.simat_lambda}")
        if self.gap_pairs < 1:
            raise ValueError(f"finetune.gap_pairs: must be >= 1, got {self.gap_pairs}")

    @property
    def base(self) -> str:
        return split_method(self.method)[0]

    @property
    def mixup_terms(self) -> tuple[str, ...]:
        """The MixupConfig terms the method adds, in the order m2, v, l, vl."""
        active = {t for part in split_method(self.method)[1] for t in MIXUP_TERMS[part]}
        return tuple(t for t in ("m2", "v", "l", "vl") if t in active)

    def mixup_weights(self) -> MixupConfig:
        """The mixup weights with every term this method does not use set to 0."""
        active = self.mixup_terms
        return dataclasses.replace(self.mixup, **{t: 0.0 for t in ("m2", "v", "l", "vl") if t not in active})


def _light_shapes() -> ShapesConfig:
    return ShapesConfig(background="light")


@dataclass
class FinetuneDataConfig:
    """The fine-tuning (target) distribution: ``source: shapes`` (default; light backgrounds, a
    shift from the default training data), or your files: ``csv``, ``folder`` or ``karpathy``
    (see ``topoclip.config.data``), whose held-out part is the target test set.
    ``reference``: the original distribution for the robustness columns; null takes a topoclip
    source's own training data, or the default shapes for other sources. Image size and
    normalisation always follow the source model."""

    source: str = "shapes"
    shapes: ShapesConfig = field(default_factory=_light_shapes)
    csv: CsvDataConfig = field(default_factory=CsvDataConfig)
    folder: FolderDataConfig = field(default_factory=FolderDataConfig)
    karpathy: KarpathyDataConfig = field(default_factory=KarpathyDataConfig)
    reference: Optional[ShapesConfig] = None

    def __post_init__(self):
        check_source(self.source, self.csv, self.folder, self.karpathy)


def _finetune_optim() -> OptimConfig:
    # The usual robust fine-tuning recipe: AdamW, lr 1e-5, weight decay 0.2, 10% warm-up.
    return OptimConfig(lr=1e-5, weight_decay=0.2, warmup_ratio=0.1)


def _finetune_train() -> TrainConfig:
    # The recipe's 9 epochs of batch 128 (set train.epochs=null to give train.steps instead).
    return TrainConfig(steps=None, epochs=9, batch_size=128, checkpoint_every=300)


@dataclass
class FinetuneConfig(RunSettings):
    """A fine-tuning run: the source model, the method, the target data, plus the shared run
    settings with fine-tuning defaults (lr 1e-5, weight decay 0.2, 9 epochs)."""

    __field_order__ = ("source", "finetune", "data", "optim", "loss", "schedule", "train", "eval", "output", "logging")

    source: SourceConfig = field(default_factory=SourceConfig)
    finetune: FinetuneMethodConfig = field(default_factory=FinetuneMethodConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=_finetune_optim)
    train: TrainConfig = field(default_factory=_finetune_train)

    def __post_init__(self):
        if self.output.name is None:
            self.output.name = f"finetune-{self.finetune.method}"
        if self.finetune.logit_bias is not None and self.loss.kind != "sigmoid":
            raise ValueError("finetune.logit_bias: only the sigmoid loss has a logit bias (set loss.kind=sigmoid or null it)")
        self.check_warmup_fits()


def load_finetune_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> FinetuneConfig:
    """A fine-tuning config from YAML (optional; ``base:`` works as for training configs) plus
    ``key=value`` overrides, validated."""
    # The file is merged over the fine-tuning defaults, so a section it gives only in part
    # keeps the fine-tuning values (lr 1e-5, ...) rather than the training ones.
    defaults = to_dict(FinetuneConfig())
    defaults["output"]["name"] = None  # derived from the method unless set
    data = deep_merge(defaults, read_config_file(resolve_config_path(path))) if path is not None else defaults
    return finetune_config_from_dict(data, overrides)


def finetune_config_from_dict(data: dict[str, Any], overrides: list[str] = ()) -> FinetuneConfig:
    """Build and validate a fine-tuning config from a nested dict plus ``key=value`` overrides."""
    return from_dict(FinetuneConfig, apply_natural_overrides(data, list(overrides)))
