"""What a run directory holds, and which kind of run it is.

    run.json           {"format": 2, "kind": "pretrain" | "finetune", "topoclip": "<version>"}
    config.yaml        the validated config the run was started with (resume reads it)
    tokenizer/         the tokenizer (pretraining runs; trained on the captions unless given)
    checkpoints/       step_<N>/ {model.safetensors, state.pt, config.json}  (checkpoint.py)
    log.jsonl          one line per step
    eval.jsonl         one line per evaluation during training (``eval.every``)
    tensorboard/       the same scalars for TensorBoard
    results.json       the evaluation after training
    results.jsonl      the same as CLIP_benchmark records (one per dataset and task)
    plots/             reliability diagrams and the mixup-hardness histogram
    .lock              while a process writes the run: its pid and host (lock.py)

Runs written by topoclip 0.1.0 have no ``run.json``: they are format 1, and their kind is read
off their config (a fine-tuning config names its ``source``). Their configs are upgraded when
read (``upgrade_config``). This module is the only place that knows these rules.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topoclip.atomic import atomic_write_json

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "RUN_INFO_FILE",
    "CONFIG_FILE",
    "TOKENIZER_DIR",
    "RESULTS_FILE",
    "RECORDS_FILE",
    "LOG_FILE",
    "EVAL_LOG_FILE",
    "TENSORBOARD_DIR",
    "PLOTS_DIR",
    "RunInfo",
    "write_run_info",
    "read_run_info",
    "run_config_path",
    "upgrade_config",
    "read_run_config",
    "read_jsonl",
]

FORMAT_VERSION = 2
KINDS = ("pretrain", "finetune")

RUN_INFO_FILE = "run.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
RESULTS_FILE = "results.json"
RECORDS_FILE = "results.jsonl"
LOG_FILE = "log.jsonl"
EVAL_LOG_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"


@dataclass(frozen=True)
class RunInfo:
    kind: str
    format: int
    topoclip: str | None = None


def write_run_info(run_dir: str | os.PathLike, kind: str) -> RunInfo:
    """Record the run's kind and the format it is written in (atomically)."""
    import topoclip

    if kind not in KINDS:
        raise ValueError(f"run kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    info = RunInfo(kind, FORMAT_VERSION, topoclip.__version__)
    atomic_write_json(Path(run_dir) / RUN_INFO_FILE, {"format": info.format, "kind": info.kind, "topoclip": info.topoclip})
    return info


def _legacy_kind(config: dict[str, Any]) -> str:
    return "finetune" if "source" in config else "pretrain"


def read_run_info(run_dir: str | os.PathLike, config: dict[str, Any] | None = None) -> RunInfo:
    """The kind and format of the run in ``run_dir``.

    A format-1 run (no ``run.json``) is recognised by its config: ``config`` if given (e.g. a
    checkpoint's ``config.json``), else the run's ``config.yaml``.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_INFO_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            kind, version = data["kind"], int(data["format"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable run description ({err})") from None
        if kind not in KINDS:
            raise ValueError(f"{path}: unknown run kind {kind!r} (known: {', '.join(KINDS)})")
        if version > FORMAT_VERSION:
            raise ValueError(f"{path}: run format {version} is newer than this topoclip reads ({FORMAT_VERSION}); upgrade topoclip")
        return RunInfo(kind, version, data.get("topoclip"))
    if config is None:
        import yaml

        config_file = run_dir / CONFIG_FILE
        if not config_file.is_file():
            raise ValueError(f"{run_dir}: not a run directory (no {RUN_INFO_FILE} or {CONFIG_FILE})")
        config = yaml.safe_load(config_file.read_text()) or {}
    return RunInfo(_legacy_kind(config), 1)


def upgrade_config(config: dict[str, Any], info: RunInfo) -> dict[str, Any]:
    """A saved config in the current schema.

    Format 1 fine-tuning configs held the warm-up fraction as ``finetune.warmup_ratio``, with
    ``optim.warmup_steps`` as a placeholder 0 (or the steps it resolved to); it is now
    ``optim.warmup_ratio``, used when ``optim.warmup_steps`` is null.
    """
    config = copy.deepcopy(config)
    if info.format < 2 and info.kind == "finetune":
        ratio = (config.get("finetune") or {}).pop("warmup_ratio", None)
        if ratio is not None:
            optim = config.setdefault("optim", {})
            optim["warmup_ratio"] = ratio
            if not optim.get("warmup_steps"):
                optim["warmup_steps"] = None
    return config


def read_run_config(run_dir: str | os.PathLike) -> tuple[dict[str, Any], RunInfo]:
    """The config a run was started with (its ``config.yaml``, upgraded) and its kind."""
    import yaml

    path = run_config_path(run_dir)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    # Never the defaults: an empty file (a full disk or a crash of an older topoclip) would
    # otherwise resume as the default run and save that over the run's own config.
    if data is None:
        raise ValueError(f"{path}: empty; the run's config is lost, so it cannot be resumed")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a mapping of config sections")
    info = read_run_info(run_dir, config=data)
    return upgrade_config(data, info), info


def run_config_path(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps the config it was started with."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"resume: {run_dir} is not a run directory (no {CONFIG_FILE})")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log, up to the first line a kill cut short."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is unreliable
    return records
