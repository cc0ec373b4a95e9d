"""Which topologies exist, by name, and which are sized by (n, m) blocks.

Kept free of torch (``topoclip.geometry`` holds the builders) so that a config can be
validated without importing it; ``geometry.register_topology`` adds a user's kind here too.
"""

from __future__ import annotations

__all__ = ["available_topologies", "is_blockwise", "add_topology_name"]

# name -> whether it is sized by m blocks of n (the oblique kinds) rather than by dim alone.
_KINDS: dict[str, bool] = {
    "sphere": False,
    "euclidean": False,
    "oblique-inner": True,
    "oblique-geodesic": True,
    "lorentz": False,
    "product": False,
}


def add_topology_name(name: str, blockwise: bool) -> None:
    if name in _KINDS:
        raise ValueError(f"topology {name!r} is already registered")
    _KINDS[name] = blockwise


def available_topologies() -> list[str]:
    return sorted(_KINDS)


def is_blockwise(name: str) -> bool:
    """Whether the topology called ``name`` is sized by (n, m) blocks rather than by dim alone
    (known before anything is built, e.g. to fill a config's defaults)."""
    if name not in _KINDS:
        raise ValueError(f"unknown topology {name!r}; available: {', '.join(available_topologies())}")
    return _KINDS[name]
