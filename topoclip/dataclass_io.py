"""Nested dataclasses <-> plain dicts, strictly typed, with errors that name the dotted field.

Experiment configs are data (YAML) turned into dataclasses before any work starts. This module
is the one place that knows how: unknown keys, wrong types and the dataclasses' own
``__post_init__`` checks all come back as ``ValueError("<dotted.field>: <problem>")``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from typing import Any, Literal, Union

import yaml

__all__ = ["from_dict", "to_dict", "check_types", "parse_override", "apply_overrides", "flatten", "config_differences"]

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on"}
_FALSE_WORDS = {"false", "no", "off"}


def _name(path: str) -> str:
    return path or "<config>"


def _coerce(value: Any, tp: Any, path: str, strict: bool = False) -> Any:
    """Convert ``value`` (as YAML or an override produced it) to the annotated type ``tp``.

    ``strict``: only values that already have the type pass (an int for a float, a list for a
    tuple); no strings are read as numbers or booleans. That is the check a dataclass built
    directly in Python gets (``check_types``)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)

    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{_name(path)}: expected a mapping of fields, got {value!r}")
        return from_dict(tp, value, path)

    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, strict)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{_name(path)}: {value!r} matches none of {tp}")

    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{_name(path)}: must be one of {list(choices)}, got {value!r}")
        return value

    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{_name(path)}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{path}[{i}]", strict) for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise ValueError(f"{_name(path)}: expected {len(args)} items, got {len(value)} ({value!r})")
            items = [_coerce(v, a, f"{path}[{i}]", strict) for i, (v, a) in enumerate(zip(value, args))]
        return tuple(items) if origin is tuple else items

    if tp in (tuple, list):  # bare container annotation: items are taken as they are
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{_name(path)}: expected a list, got {value!r}")
        return tp(value)

    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{_name(path)}: expected a mapping, got {value!r}")
        return dict(value)

    if tp is bool:
        if isinstance(value, bool):
            return value
        if not strict and isinstance(value, str) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise ValueError(f"{_name(path)}: expected true or false, got {value!r}")

    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{_name(path)}: expected an integer, got {value!r}")
        if isinstance(value, numbers.Integral):  # int, numpy integers
            return int(value)
        if not strict and isinstance(value, float) and value.is_integer():
            return int(value)  # 1e3 in YAML is a float
        if not strict and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = math.nan
                if as_float.is_integer():
                    return int(as_float)
        raise ValueError(f"{_name(path)}: expected an integer, got {value!r}")

    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{_name(path)}: expected a number, got {value!r}")
        if isinstance(value, numbers.Real):  # int, float, numpy scalars
            return float(value)
        if not strict and isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{_name(path)}: expected a number, got {value!r}")

    if tp is str:
        if isinstance(value, str):
            return value
        if not strict and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. output.name=2024
        raise ValueError(f"{_name(path)}: expected a string, got {value!r}")

    # Any other annotation: accept values that already have the type.
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(f"{_name(path)}: expected {tp.__name__}, got {value!r}")
    return value


def check_types(obj: Any, path: str) -> None:
    """Check every field of dataclass ``obj`` against its annotation (strictly: see ``_coerce``)
    and store the normalised value (lists become the annotated tuples). Config dataclasses call
    this first in ``__post_init__``, so one mechanism types a config read from YAML and one
    built in Python; the ``__post_init__`` itself checks only ranges and relations."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.init:
            setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], f"{path}.{f.name}", strict=True))


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; missing fields take their defaults.

    A ``ValueError`` raised by the dataclass itself (its ``__post_init__`` validation) is
    re-raised with the dotted path of the dataclass in front, so the message names the field
    as the user wrote it in the YAML file.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{_name(path)}: expected a mapping of fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ValueError(f"{prefix}{key}: unknown key{hint}; known keys: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        message = str(err)
        # The dataclass names its field ("depth must be ..." or "ShapesConfig.noise must
        # be ..."); say where it sits in the experiment config.
        if path and message.startswith(f"{cls.__name__}."):
            message = f"{path}.{message[len(cls.__name__) + 1:]}"
        elif path and not message.startswith(path):
            message = f"{path}: {message}"
        raise ValueError(message) from None
    except TypeError as err:  # a required field is missing
        raise ValueError(f"{_name(path)}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML/JSON-safe) form of a dataclass tree; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj) if f.init]
        # A class may list its fields in the order a reader expects (an inherited dataclass
        # otherwise puts the base class's fields first).
        order = getattr(type(obj), "__field_order__", ())
        names.sort(key=lambda n: order.index(n) if n in order else len(order))
        return {n: to_dict(getattr(obj, n)) for n in names}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> ``(["optim", "lr"], 1e-3)``; the value is read as YAML
    (``[0.9, 0.98]``, ``true``, ``null``) and converted to the field's type later."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r}: expected key=value with a dotted key, e.g. optim.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict ``data`` with ``key=value`` overrides applied.

    Unknown keys are left for :func:`from_dict` to reject, so the error names the field the
    same way whether it came from the YAML file or the command line.
    """
    import copy

    result = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                dotted = ".".join(keys[: depth + 1])
                raise ValueError(f"{dotted}: is a value, not a section; cannot set {'.'.join(keys)}")
            node = child
        node[keys[-1]] = value
    return result


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict (or dataclass tree) as ``{"dotted.key": value}``."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = to_dict(data)
    if not isinstance(data, dict):
        return {prefix[:-1]: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def config_differences(a: Any, b: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """The dotted fields in which two configs (dataclasses or nested dicts) differ, sorted;
    fields equal to or under a prefix in ``ignore`` are left out."""
    fa, fb = flatten(a), flatten(b)
    ignored = lambda key: any(key == p or key.startswith(p.rstrip(".") + ".") for p in ignore)  # noqa: E731
    return [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k) and not ignored(k)]
