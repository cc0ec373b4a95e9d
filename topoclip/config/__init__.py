"""The config schema: every run's config is nested dataclasses, read from YAML plus
``key=value`` overrides by ``topoclip.dataclass_io`` and validated before any work starts.

- ``sections``: what every run has (loss, optim, schedule, train, eval, output, logging);
- ``experiment``: a pretraining run (data, model, topology);
- ``finetune``: a fine-tuning run (source, method, target data);
- ``files``: YAML files with ``base:``, the configs shipped in the package.
"""

from .data import SOURCES, CsvDataConfig, FolderDataConfig, KarpathyDataConfig, ShardsConfig
from .experiment import DataConfig, ExperimentConfig, TopologyConfig, config_from_dict, load_config
from .files import PACKAGED_CONFIGS, deep_merge, default_config_path, read_config_file, resolve_config_path, save_config
from .finetune import (
    BASE_METHODS,
    METHODS,
    MIXUP_TERMS,
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneMethodConfig,
    SourceConfig,
    finetune_config_from_dict,
    load_finetune_config,
    split_method,
)
from .sections import (
    EvalConfig,
    LoggingConfig,
    LossConfig,
    OptimConfig,
    OutputConfig,
    RunSettings,
    ScheduleConfig,
    SuiteConfig,
    TrainConfig,
)

__all__ = [
    "BASE_METHODS",
    "METHODS",
    "MIXUP_TERMS",
    "split_method",
    "PACKAGED_CONFIGS",
    "SOURCES",
    "FolderDataConfig",
    "KarpathyDataConfig",
    "CsvDataConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FinetuneConfig",
    "FinetuneDataConfig",
    "FinetuneMethodConfig",
    "LoggingConfig",
    "LossConfig",
    "OptimConfig",
    "OutputConfig",
    "RunSettings",
    "ScheduleConfig",
    "ShardsConfig",
    "SourceConfig",
    "SuiteConfig",
    "TopologyConfig",
    "TrainConfig",
    "config_from_dict",
    "deep_merge",
    "finetune_config_from_dict",
    "default_config_path",
    "load_config",
    "load_finetune_config",
    "read_config_file",
    "resolve_config_path",
    "save_config",
]
