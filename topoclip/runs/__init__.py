"""The run directory as a library format: what a run holds (``layout``), its checkpoints
(``checkpoint``), and opening its model again (``loading``). Nothing here imports the trainer."""

from .checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    load_weights,
    read_checkpoint_config,
    resolve_checkpoint,
    save_checkpoint,
)
from .layout import (
    CONFIG_FILE,
    FORMAT_VERSION,
    LOG_FILE,
    PLOTS_DIR,
    RECORDS_FILE,
    RESULTS_FILE,
    RUN_INFO_FILE,
    TOKENIZER_DIR,
    RunInfo,
    read_jsonl,
    read_run_config,
    read_run_info,
    run_config_path,
    upgrade_config,
    write_run_info,
)
from .loading import LoadedRun, is_run, load_run, load_source

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "LOG_FILE",
    "PLOTS_DIR",
    "RECORDS_FILE",
    "RESULTS_FILE",
    "RUN_INFO_FILE",
    "TOKENIZER_DIR",
    "LoadedRun",
    "RunInfo",
    "is_run",
    "latest_checkpoint",
    "list_checkpoints",
    "load_run",
    "load_source",
    "load_training_state",
    "load_weights",
    "read_checkpoint_config",
    "read_jsonl",
    "read_run_config",
    "read_run_info",
    "resolve_checkpoint",
    "run_config_path",
    "save_checkpoint",
    "upgrade_config",
    "write_run_info",
]
