"""Training: experiment configs, the Trainer (optimizer groups, schedule, checkpoints, logs)
and the run that goes from a config to results.json. The library never imports this package."""

from .checkpoint import latest_checkpoint, load_training_state, load_weights, resolve_checkpoint, save_checkpoint
from .config import ExperimentConfig, config_from_dict, load_config, save_config
from .experiment import evaluate, evaluate_checkpoint, run
from .finetune import run_finetune
from .finetune_config import FinetuneConfig, load_finetune_config
from .loading import LoadedModel, load_run_model  # also lets load_pretrained open topoclip runs
from .optim import build_optimizer, build_scheduler, cosine_warmup_factor, param_groups
from .sampler import EpochBatchSampler
from .trainer import Trainer, TrainResult, seed_everything

__all__ = [
    "EpochBatchSampler",
    "ExperimentConfig",
    "FinetuneConfig",
    "LoadedModel",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "config_from_dict",
    "cosine_warmup_factor",
    "evaluate",
    "evaluate_checkpoint",
    "run_finetune",
    "load_finetune_config",
    "load_run_model",
    "latest_checkpoint",
    "load_config",
    "load_training_state",
    "load_weights",
    "param_groups",
    "resolve_checkpoint",
    "run",
    "save_checkpoint",
    "save_config",
    "seed_everything",
]
