"""The settings the engine reads: optimizer, schedule, length/batch/precision/checkpointing and
logging. Recipes hand it these sections of their config and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from topoclip.config import LoggingConfig, OptimConfig, RunSettings, ScheduleConfig, TrainConfig

__all__ = ["TrainingSettings"]


@dataclass
class TrainingSettings:
    optim: OptimConfig
    schedule: ScheduleConfig
    train: TrainConfig
    logging: LoggingConfig

    @classmethod
    def of(cls, config: RunSettings) -> "TrainingSettings":
        """The training sections of any run's config (pretraining or fine-tuning)."""
        return cls(config.optim, config.schedule, config.train, config.logging)
