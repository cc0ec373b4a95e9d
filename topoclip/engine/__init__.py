"""The training engine: one loop for every recipe (``Trainer``), its optimizer and schedule,
the seeded batch order, the gradient cache, multi-process training and the run logs.

The library (geometry, losses, models, data, eval, runs, config) never imports this package.
"""

from .optim import build_optimizer, build_scheduler, cosine_warmup_factor, param_groups
from .sampler import EpochBatchSampler
from .settings import TrainingSettings
from .task import ContrastiveTask, Task
from .trainer import Trainer, TrainResult, seed_everything

__all__ = [
    "ContrastiveTask",
    "EpochBatchSampler",
    "Task",
    "TrainingSettings",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "cosine_warmup_factor",
    "param_groups",
    "seed_everything",
]
