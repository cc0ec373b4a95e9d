"""Where the embeddings sit: alignment, uniformity, relative alignment, modality gap.

Alignment and uniformity follow Wang & Isola (2020). Uniformity is taken over the UNION of
image and text embeddings (the multimodal uniformity: how evenly both modalities together
cover the space). Distances are Euclidean distances of the flattened points, which on the
oblique manifold is the sum over blocks; given a hyperbolic ``topology`` (lorentz) they are its
geodesic distances instead, since the Euclidean distance of the space components says little
about how far apart two points are there. Lower is better for every metric here.
All pairwise quantities are computed in chunks: memory O(chunk * N).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..geometry import Topology

__all__ = [
    "alignment",
    "uniformity",
    "relative_alignment",
    "modality_gap",
    "embedding_shift",
    "geometry_report",
]


def _flat(x: Tensor) -> Tensor:
    x = x.reshape(x.shape[0], -1)
    return x.double() if x.dtype == torch.float64 else x.float()


def _hyperbolic(topology: Topology | None) -> bool:
    return topology is not None and getattr(topology, "metrics_by_own_distance", False)


def _sq_dists(a: Tensor, b: Tensor, topology: Topology | None = None) -> Tensor:
    if _hyperbolic(topology):
        return topology.similarity(a, b).square()
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * a @ b.T).clamp_min_(0.0)


def _paired_dists(a: Tensor, b: Tensor, topology: Topology | None = None) -> Tensor:
    if _hyperbolic(topology):
        return -topology.paired_similarity(a, b)
    return torch.linalg.vector_norm(a - b, dim=1)


def alignment(image: Tensor, text: Tensor, alpha: float = 2.0, topology: Topology | None = None) -> float:
    """mean_i d(v_i, t_i)^alpha (alpha = 2: the usual squared distance)."""
    image, text = _flat(image), _flat(text)
    return float(_paired_dists(image, text, topology).pow(alpha).mean())


def uniformity(image: Tensor, text: Tensor | None = None, temperature: float = 2.0, chunk_size: int = 1024,
               topology: Topology | None = None) -> float:
    """log mean_{x != y} exp(-temperature d(x, y)^2) over the union of v and t."""
    x = _flat(image) if text is None else torch.cat([_flat(image), _flat(text)])
    n = x.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least two points")
    total = torch.tensor(-math.inf, dtype=x.dtype)
    for i in range(0, n, chunk_size):
        block = -temperature * _sq_dists(x[i:i + chunk_size], x, topology)
        rows = torch.arange(i, min(n, i + chunk_size))
        block[rows - i, rows] = -math.inf  # leave out x == y (the pair with itself)
        total = torch.logaddexp(total, torch.logsumexp(block.flatten(), 0))
    return float(total - math.log(n * (n - 1)))


def relative_alignment(image: Tensor, text: Tensor, chunk_size: int = 1024, topology: Topology | None = None) -> float:
    """mean_i ( d(t_i, v_i)^2 - min_{j != i} d(t_i, v_j)^2 ): negative when every text is
    closer to its own image than to any other."""
    image, text = _flat(image), _flat(text)
    n = image.shape[0]
    if n < 2:
        raise ValueError("relative_alignment needs at least two pairs")
    out = []
    for i in range(0, n, chunk_size):
        d = _sq_dists(text[i:i + chunk_size], image, topology)
        rows = torch.arange(i, min(n, i + chunk_size))
        own = d[rows - i, rows].clone()
        d[rows - i, rows] = math.inf
        out.append(own - d.amin(1))
    return float(torch.cat(out).mean())


def modality_gap(image: Tensor, text: Tensor) -> Tensor:
    """The centroid difference mean(v) - mean(t) (flattened); its norm is the reported gap."""
    return _flat(image).mean(0) - _flat(text).mean(0)


def embedding_shift(topology: Topology, image: Tensor, text: Tensor, c: float = 1.0, gap: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Close the modality gap at inference: v' = proj(v - c gap/2), t' = proj(t + c gap/2).

    ``gap`` defaults to the gap of (v, t); pass one measured on held-out data to apply it to
    new embeddings.
    """
    gap = modality_gap(image, text) if gap is None else gap
    shift = (0.5 * c * gap).to(image.device)
    image_shift = topology.project(_flat(image) - shift)
    text_shift = topology.project(_flat(text) + shift)
    return image_shift, text_shift


def geometry_report(image: Tensor, text: Tensor, topology: Topology | None = None) -> dict[str, float]:
    """All of the above for paired embeddings, as plain floats (``topology``: see the module
    docstring; the modality gap stays the centroid difference of the stored components)."""
    return {
        "alignment": alignment(image, text, topology=topology),
        "uniformity": uniformity(image, text, topology=topology),
        "relative_alignment": relative_alignment(image, text, topology=topology),
        "modality_gap": float(torch.linalg.vector_norm(modality_gap(image, text))),
    }
