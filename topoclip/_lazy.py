"""Package attributes imported on first use (PEP 562), so that importing a package, or one
light module inside it, does not pull in torch, timm, transformers or torchvision.

The command line answers ``--help`` and config errors without those libraries; a user's
``import topoclip`` costs nothing until a topology or a loss is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable


def lazy_attributes(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: attribute ``name`` comes from the module
    ``where[name]`` (absolute, or relative to ``package`` when it starts with a dot)."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            # A submodule not imported yet (``topoclip.geometry`` after ``import topoclip``).
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        globals_of(package)[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals_of(package)) | set(where))

    return __getattr__, __dir__


def globals_of(package: str) -> dict[str, Any]:
    import sys

    return vars(sys.modules[package])


def exported(groups: dict[str, list[str]]) -> dict[str, str]:
    """{module: [names]} -> {name: module}, the form ``lazy_attributes`` takes."""
    return {name: module for module, names in groups.items() for name in names}
