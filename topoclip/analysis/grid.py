"""Ablation grids: a YAML file -> the runs (name + validated config) it stands for.

    base: ../default.yaml              # experiment config every run starts from (relative to this file)
    overrides: [train.steps=400]       # key=value overrides applied to every run
    axes:                              # the grid is the product of the axes, in this order
      topology:
        - {name: sphere, topology.name: sphere, topology.dim: 128, topology.n: null, topology.m: null}
        - {name: ob-inner, topology.name: oblique-inner}
      tokens:
        - {name: single}
        - {name: multi, model.num_tokens: "${topology.m}"}
    exclude:                           # leave out combinations: every listed axis must match
      - {topology: sphere, tokens: multi}   # a value may also be a list of names
    analysis: {probe_task: shape}      # settings of the per-run metrics (see run_metrics.AnalysisConfig)

Each axis value is a mapping of dotted config keys to values; its optional ``name`` labels it
(default: its values joined by "-"). A value written "${dotted.key}" takes that field of the
same run's config. A run is named by its values' names joined with "__" in axis order
(``sphere__multi``) and every run's config is built and validated when the grid is loaded,
before anything trains.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from topoclip.config import ExperimentConfig, config_from_dict, default_config_path, read_config_file, resolve_config_path
from topoclip.config.overrides import drop_dependents
from topoclip.dataclass_io import apply_overrides, from_dict, to_dict
from topoclip.dataclass_io import config_differences as _config_differences

from .run_metrics import AnalysisConfig
from .table import RESERVED_COLUMNS

__all__ = ["AxisValue", "GridRun", "Grid", "load_grid", "parse_grid", "select_runs", "config_differences"]

RUN_SEPARATOR = "__"
_NAME = re.compile(r"^[A-Za-z0-9+][A-Za-z0-9._+-]*$")
_REFERENCE = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")
_GRID_KEYS = ("base", "overrides", "axes", "exclude", "analysis")
# Fields that may differ between a finished run and the grid without changing what was trained.
_NOT_COMPARED = ("output.", "logging.", "train.resume", "train.device", "train.threads", "train.num_workers")


@dataclass(frozen=True)
class AxisValue:
    name: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class GridRun:
    name: str
    axes: dict[str, str]  # axis -> value name
    config: ExperimentConfig


@dataclass
class Grid:
    path: Path | None
    axes: dict[str, list[AxisValue]]
    runs: list[GridRun]
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    num_excluded: int = 0


def _slug(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def _parse_axis(axis: str, values: Any) -> list[AxisValue]:
    if not isinstance(axis, str) or not re.match(r"^[A-Za-z][A-Za-z0-9_-]*$", axis):
        raise ValueError(f"axes: axis names must be words (letters, digits, _ or -), got {axis!r}")
    if axis in RESERVED_COLUMNS:
        raise ValueError(f"axes.{axis}: the name is a column of the table; call the axis something else")
    if not isinstance(values, list) or not values:
        raise ValueError(f"axes.{axis}: expected a non-empty list of values (mappings of config keys), got {values!r}")
    parsed, seen = [], set()
    for i, value in enumerate(values):
        where = f"axes.{axis}[{i}]"
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of dotted config keys to values, got {value!r}")
        settings = {k: v for k, v in value.items() if k != "name"}
        for key in settings:
            if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
                raise ValueError(f"{where}: {key!r} is not a dotted config key (e.g. topology.name)")
        name = value.get("name")
        if name is None:
            name = "-".join(_slug(v) for v in settings.values()) or "base"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{where}.name: must be a plain name (letters, digits, . _ + -), got {name!r}")
        if RUN_SEPARATOR in name:
            raise ValueError(f"{where}.name: must not contain {RUN_SEPARATOR!r} (it separates axes in run names)")
        if name in seen:
            raise ValueError(f"{where}.name: {name!r} is used twice on axis {axis}; give the values distinct names")
        seen.add(name)
        parsed.append(AxisValue(name, settings))
    return parsed


def _parse_exclude(rules: Any, axes: dict[str, list[AxisValue]]) -> list[dict[str, set[str]]]:
    if rules is None:
        return []
    if not isinstance(rules, list):
        raise ValueError(f"exclude: expected a list of rules (mappings of axis -> value name), got {rules!r}")
    parsed = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or not rule:
            raise ValueError(f"exclude[{i}]: expected a mapping of axis -> value name(s), got {rule!r}")
        names: dict[str, set[str]] = {}
        for axis, wanted in rule.items():
            if axis not in axes:
                raise ValueError(f"exclude[{i}].{axis}: no such axis (axes: {', '.join(axes)})")
            wanted = wanted if isinstance(wanted, list) else [wanted]
            known = [v.name for v in axes[axis]]
            for name in wanted:
                if name not in known:
                    raise ValueError(f"exclude[{i}].{axis}: no value named {name!r} (values: {', '.join(known)})")
            names[axis] = set(wanted)
        parsed.append(names)
    return parsed


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[:depth + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


def _get_dotted(data: dict, key: str) -> tuple[bool, Any]:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _run_config(base: dict, settings: dict[str, Any], run_name: str) -> ExperimentConfig:
    import copy

    data = copy.deepcopy(base)
    references = {}
    for key, value in settings.items():
        match = _REFERENCE.match(value) if isinstance(value, str) else None
        if match:
            references[key] = match.group(1)
        else:
            _set_dotted(data, key, value)
    resolved = None
    for key, source in references.items():
        found, value = _get_dotted(data, source)
        if not found:  # a default the file does not spell out: ask the validated config
            resolved = resolved if resolved is not None else to_dict(config_from_dict(data))
            found, value = _get_dotted(resolved, source)
            if not found:
                raise ValueError(f"{key}: ${{{source}}} names no config field")
        _set_dotted(data, key, value)
    # The axis' values are overrides like the command line's: what depends on them follows
    # (topology.name=sphere drops the base's blocks, train.steps its epochs).
    drop_dependents(data, set(settings))
    data.setdefault("output", {})["name"] = run_name
    return config_from_dict(data)


def parse_grid(spec: Any, base_dir: Path, overrides: list[str] = (), path: Path | None = None) -> Grid:
    """A ``Grid`` from the parsed YAML ``spec``; ``base`` is resolved against ``base_dir``.

    ``overrides`` (``key=value``) apply to every run after the file's own ``overrides``.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"grid: expected a mapping with keys {', '.join(_GRID_KEYS)}, got {type(spec).__name__}")
    unknown = [k for k in spec if k not in _GRID_KEYS]
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown grid key (known: {', '.join(_GRID_KEYS)})")
    base = spec.get("base")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"base: expected a config file name, got {base!r}")
    base_path = base_dir / base if base is not None else default_config_path()
    base_data = read_config_file(base_path)
    file_overrides = spec.get("overrides") or []
    if not isinstance(file_overrides, list) or not all(isinstance(o, str) for o in file_overrides):
        raise ValueError(f"overrides: expected a list of key=value strings, got {file_overrides!r}")
    base_data = apply_overrides(base_data, list(file_overrides) + list(overrides))

    axes_spec = spec.get("axes")
    if not isinstance(axes_spec, dict) or not axes_spec:
        raise ValueError(f"axes: expected a mapping of axis name -> list of values, got {axes_spec!r}")
    axes = {axis: _parse_axis(axis, values) for axis, values in axes_spec.items()}
    exclude = _parse_exclude(spec.get("exclude"), axes)
    analysis = from_dict(AnalysisConfig, spec.get("analysis") or {}, "analysis")

    runs, excluded = [], 0
    for combo in itertools.product(*axes.values()):
        names = dict(zip(axes, (value.name for value in combo)))
        if any(all(names[axis] in wanted for axis, wanted in rule.items()) for rule in exclude):
            excluded += 1
            continue
        settings: dict[str, Any] = {}
        for value in combo:
            settings.update(value.settings)  # a later axis wins on a key both set
        run_name = RUN_SEPARATOR.join(names.values())
        try:
            config = _run_config(base_data, settings, run_name)
        except ValueError as err:
            raise ValueError(f"run {run_name}: {err}") from None
        runs.append(GridRun(run_name, names, config))
    if not runs:
        raise ValueError("exclude: every combination of the axes is excluded; the grid is empty")
    return Grid(path, axes, runs, analysis, excluded)


def load_grid(path: str | os.PathLike, overrides: list[str] = ()) -> Grid:
    """Read and expand a grid file; every run's config is validated here (ValueError naming the field)."""
    path = resolve_config_path(path)  # also a shipped grid by name: ablation/table3
    if not path.is_file():
        raise ValueError(f"grid: file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"grid: {path} is not valid YAML: {err}") from None
    return parse_grid(spec, path.parent, list(overrides), path)


def select_runs(grid: Grid, patterns: list[str]) -> Grid:
    """The grid restricted to the runs whose names match any of the shell-style ``patterns``."""
    if not patterns:
        return grid
    runs = [run for run in grid.runs if any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]
    if not runs:
        names = ", ".join(run.name for run in grid.runs)
        raise ValueError(f"--only: no run matches {' or '.join(patterns)} (runs: {names})")
    return dataclasses.replace(grid, runs=runs)


def config_differences(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Dotted fields in which two configs would train differently (output and logging ignored)."""
    return _config_differences(a, b, ignore=_NOT_COMPARED)
