"""topoclip: contrastive image-text alignment with the embedding topology as a design choice.

    topo = topoclip.topology("oblique-inner", n=16, m=8)
    loss = topoclip.ContrastiveLoss(topo)(image_points, text_points, scale)
    run = topoclip.load_run("runs/default")        # model, tokenizer, topology, transform
"""

from ._lazy import exported, lazy_attributes

__version__ = "0.2.0"

# Everything is imported on first use (torch, and for runs and pretrained models the towers:
# timm, transformers), so that `import topoclip` and the command line's --help are instant.
_WHERE = exported({
    "topoclip.geometry": ["Euclidean", "Lorentz", "Oblique", "Product", "Sphere", "Topology", "available_topologies",
                          "is_blockwise", "product_topology", "register_topology", "topology"],
    "topoclip.losses": ["ContrastiveLoss"],
    "topoclip.temperature": ["LogitScale"],
    "topoclip.runs": ["LoadedRun", "load_run"],
    "topoclip.models": ["load_pretrained"],
})
__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)

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
