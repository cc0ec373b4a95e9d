"""topoclip: contrastive image-text alignment with the embedding topology as a design choice.

    topo = topoclip.topology("oblique-inner", n=16, m=8)
    loss = topoclip.ContrastiveLoss(topo)(image_points, text_points, scale)
    run = topoclip.load_run("runs/default")        # model, tokenizer, topology, transform
"""

from .geometry import (
    Euclidean,
    Lorentz,
    Oblique,
    Product,
    Sphere,
    Topology,
    available_topologies,
    is_blockwise,
    product_topology,
    register_topology,
    topology,
)
from .losses import ContrastiveLoss
from .temperature import LogitScale

__version__ = "0.2.0"

# Opening runs and pretrained models needs the towers (timm, transformers): imported on first
# use, so that `import topoclip` for the geometry and the losses stays light.
_LAZY = {
    "load_run": ("topoclip.runs", "load_run"),
    "LoadedRun": ("topoclip.runs", "LoadedRun"),
    "load_pretrained": ("topoclip.models", "load_pretrained"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'topoclip' has no attribute {name!r}")


__all__ = [
    "ContrastiveLoss",
    "Euclidean",
    "LoadedRun",
    "LogitScale",
    "Lorentz",
    "Oblique",
    "Product",
    "Sphere",
    "Topology",
    "available_topologies",
    "is_blockwise",
    "load_pretrained",
    "load_run",
    "product_topology",
    "register_topology",
    "topology",
    "__version__",
]
