"""Write a file so that a reader (or a run resumed after a kill) sees the old file or the new
one, never a half-written one: write a temporary file beside it, fsync, then ``os.replace``.

Every file topoclip writes that another process or a later run reads goes through here:
configs, results, logs rewritten on resume, analysis arrays, weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_write_dir", "fsync_dir", "json_safe",
           "TMP_PREFIX"]

# Temporary files and directories start with this; a reader skips them, a writer removes its own.
TMP_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable; not every platform can open a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it to ``path`` in one step.

    ``suffix`` is appended to the temporary name for writers that insist on an extension
    (``numpy.savez`` adds ``.npz`` unless the name ends with it). A writer that fails leaves
    no temporary file behind and the previous ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively: JSON has no NaN or
    Infinity, and strict parsers reject Python's extensions."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike, payload: Any, sort_keys: bool = False) -> Path:
    """``payload`` as indented JSON; NaN and infinities become null (valid JSON for every parser)."""
    text = json.dumps(json_safe(payload), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_dir)`` to fill a directory, fsync every file in it, then move it to
    ``path`` in one step: a reader sees the previous directory or the complete new one.

    An existing ``path`` is moved aside first and removed after the rename (a directory cannot
    be replaced by ``os.replace`` while it has entries). A writer that fails leaves no
    temporary directory behind and ``path`` as it was.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(tmp)
        if path.exists():
            aside = path.with_name(f"{TMP_PREFIX}old-{path.name}-{os.getpid()}")
            os.replace(path, aside)
            os.replace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return path
