"""Config files: YAML with an optional ``base:`` file underneath, the configs shipped inside the
package, and the atomic write of a run's config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from topoclip.atomic import atomic_write_text
from topoclip.dataclass_io import to_dict

__all__ = [
    "PACKAGED_CONFIGS",
    "DEFAULT_CONFIG",
    "default_config_path",
    "resolve_config_path",
    "deep_merge",
    "read_config_file",
    "save_config",
]

PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = Path("configs") / "default.yaml"


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


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, section by section (a nested dict merges, anything else replaces)."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
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
    return deep_merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), data)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A config file as a nested dict with its ``base:`` files (relative to it) merged
    underneath; not validated."""
    return _read_yaml(Path(path))


def save_config(config: Any, path: str | os.PathLike) -> None:
    """A config dataclass as YAML, written atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
