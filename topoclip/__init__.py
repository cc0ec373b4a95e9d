"""topoclip: contrastive image-text alignment with the embedding topology as a design choice."""

from .geometry import Euclidean, Oblique, Sphere, Topology, available_topologies, register_topology, topology
from .losses import ContrastiveLoss
from .temperature import LogitScale

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "Euclidean",
    "LogitScale",
    "Oblique",
    "Sphere",
    "Topology",
    "available_topologies",
    "register_topology",
    "topology",
    "__version__",
]
