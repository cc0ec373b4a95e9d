"""Command-line overrides in their natural form.

A config file states a whole run; an override changes one thing and expects the values that
depended on the old choice to follow. ``topoclip train topology.name=sphere`` on a file that
sized Ob(16, 8) by ``n`` and ``m`` means the sphere of the same dimension, and
``train.steps=100`` on a file that counts ``epochs`` means 100 steps. So after the overrides are
applied, the file's values that would contradict them are dropped (set to null, so that they
take their defaults again); a value that is itself overridden is never dropped.
"""

from __future__ import annotations

import copy
from typing import Any

from topoclip.dataclass_io import apply_overrides, parse_override
from topoclip.topology_names import available_topologies, is_blockwise

__all__ = ["apply_natural_overrides", "drop_dependents"]


def _set_null(data: dict, section: str, key: str, overridden: set[str]) -> None:
    if f"{section}.{key}" not in overridden and isinstance(data.get(section), dict) and key in data[section]:
        data[section][key] = None


def apply_natural_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``apply_overrides`` plus the rules above:

    - ``train.steps`` given: the file's ``train.epochs`` goes (and the other way round);
    - ``topology.name`` of a topology without blocks: the file's ``n`` and ``m`` go (the
      dimension stays ``n * m`` when the file gave no ``dim``);
    - ``topology.dim`` or ``topology.m`` given: the file's ``n`` goes (it follows ``dim / m``);
    - ``topology.factors`` given: the file's ``dim`` goes (a product's is its factors' total);
    - ``optim.warmup_ratio`` given: the file's ``optim.warmup_steps`` goes.
    """
    overridden = {".".join(parse_override(text)[0]) for text in overrides}
    out = apply_overrides(copy.deepcopy(data or {}), list(overrides))
    drop_dependents(out, overridden)
    return out


def drop_dependents(out: dict[str, Any], overridden: set[str]) -> None:
    """In place: null the values of ``out`` that the ``overridden`` dotted keys make stale
    (the rules of ``apply_natural_overrides``)."""
    train = out.get("train") if isinstance(out.get("train"), dict) else {}
    if "train.steps" in overridden and train.get("steps") is not None:
        _set_null(out, "train", "epochs", overridden)
    if "train.epochs" in overridden and train.get("epochs") is not None:
        _set_null(out, "train", "steps", overridden)
    topo = out.get("topology")
    if isinstance(topo, dict):
        name = topo.get("name")
        if "topology.name" in overridden and name in available_topologies() and not is_blockwise(name):
            n, m = topo.get("n"), topo.get("m")
            if topo.get("dim") is None and isinstance(n, int) and isinstance(m, int):
                topo["dim"] = n * m  # the paper's rule: the embedding dimension stays fixed
            _set_null(out, "topology", "n", overridden)
            _set_null(out, "topology", "m", overridden)
        elif overridden & {"topology.dim", "topology.m"}:
            _set_null(out, "topology", "n", overridden)
        if "topology.factors" in overridden:
            _set_null(out, "topology", "dim", overridden)  # a product's dim is its factors' total
    if "optim.warmup_ratio" in overridden:
        _set_null(out, "optim", "warmup_steps", overridden)
