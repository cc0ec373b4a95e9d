"""Geodesic multi-modal mixup losses (m²-Mix, V-Mix, L-Mix, VL-Mix, m³-Mix) on any topology.

Hard negatives are made by walking along the geodesic between embeddings, through the
topology's ``interpolate``: slerp on the sphere, per-block slerp on the oblique manifold,
linear interpolation in Euclidean space. The formulas are those of *Geodesic Multi-Modal Mixup
for Robust Fine-Tuning* (Oh et al., NeurIPS 2023), eqs. 4-8, with its notation: v_i an image
point, t_i a text point (``image`` and ``text`` in the code), J the reversed batch (partner of
i is N-1-i), and

    m_lam(a, b) = a sin(lam θ)/sin θ + b sin((1-lam) θ)/sin θ  =  interpolate(a, b, 1 - lam)

(weight lam on a), with lam ~ Beta(alpha, alpha), one draw per batch. ``interpolate`` is
finite at θ = 0 (identical pairs, repeated class-name prompts, the middle row of an odd batch
paired with itself) and θ = π, and computes half-precision inputs in fp32.

Every loss here averages its two directions (image->text and text->image) like the CLIP loss.

``path="linear"`` mixes along the straight line instead and projects back onto the manifold
(``topology.project``: renormalisation on the sphere, per block on Ob(n, m); nothing in
Euclidean space, where both paths agree): the baseline of the paper's linear-vs-geodesic table.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..geometry import Topology
from .contrastive import ContrastiveLoss
from .settings import MixupConfig  # re-exported

__all__ = [
    "MIX_PATHS",
    "geodesic_mix",
    "linear_mix",
    "mix",
    "m2_mix_loss",
    "m2_mix_sigmoid_loss",
    "v_mix_loss",
    "l_mix_loss",
    "vl_mix_loss",
    "MixupConfig",
    "M3MixLoss",
    "mixup_hardness",
]


def geodesic_mix(topology: Topology, a: Tensor, b: Tensor, lam: float | Tensor) -> Tensor:
    """m_lam(a, b): the point on the geodesic with weight lam on a (lam=1 -> a, lam=0 -> b)."""
    return topology.interpolate(a, b, 1.0 - lam)


def linear_mix(topology: Topology, a: Tensor, b: Tensor, lam: float | Tensor) -> Tensor:
    """lam a + (1 - lam) b, projected onto the manifold (in fp32 for half-precision inputs).
    Antipodal points at lam = 1/2 meet at zero, which ``project`` maps to a fixed point."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return topology.project(lam * a.to(dtype) + (1.0 - lam) * b.to(dtype))


MIX_PATHS = {"geodesic": geodesic_mix, "linear": linear_mix}


def mix(topology: Topology, a: Tensor, b: Tensor, lam: float | Tensor, path: str = "geodesic") -> Tensor:
    """m_lam(a, b) along ``path``: "geodesic" (the topology's geodesic) or "linear"."""
    if path not in MIX_PATHS:
        raise ValueError(f"mix path: unknown {path!r} (known: {', '.join(MIX_PATHS)})")
    return MIX_PATHS[path](topology, a, b, lam)


def _reversed(x: Tensor) -> Tensor:
    return torch.flip(x, dims=[0])


def _with_diagonal(matrix: Tensor, diagonal: Tensor) -> Tensor:
    """Copy of a square matrix whose diagonal is replaced (out of place: autograd-safe)."""
    eye = torch.eye(matrix.shape[0], dtype=torch.bool, device=matrix.device)
    return torch.where(eye, diagonal.unsqueeze(1).expand_as(matrix), matrix)


def _labels(n: int, device) -> Tensor:
    return torch.arange(n, device=device)


def m2_mix_loss(topology: Topology, image: Tensor, text: Tensor, scale: Tensor | float, lam: float,
                path: str = "geodesic") -> Tensor:
    """m²-Mix: the negatives of each anchor are replaced by mixed points m_j = m_lam(v_j, t_j).

    Row i (image anchor): positive <v_i, t_i>, negatives <v_i, m_j> for j != i; likewise for the
    text anchor t_i. ``scale`` is this term's own logit scale (the "high temperature variant":
    1/0.07 while the CLIP term runs at 1/0.01 during fine-tuning).
    """
    mixed = mix(topology, image, text, lam, path)
    positive = scale * topology.paired_similarity(image, text)
    logits_image = _with_diagonal(scale * topology.similarity(image, mixed), positive)
    logits_text = _with_diagonal(scale * topology.similarity(text, mixed), positive)
    labels = _labels(image.shape[0], positive.device)
    return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))


def m2_mix_sigmoid_loss(topology: Topology, image: Tensor, text: Tensor, scale: Tensor | float, bias: Tensor | float,
                        lam: float, path: str = "geodesic") -> Tensor:
    """m²-Mix in the sigmoid form (for runs with the sigmoid loss): the same logits as
    ``m2_mix_loss`` plus the bias, each scored on its own, +1 on the diagonal (the original
    pair), -1 for the mixed negatives; -sum log sigmoid(z logits) / b per anchor modality,
    averaged over the two."""
    mixed = mix(topology, image, text, lam, path)
    positive = scale * topology.paired_similarity(image, text) + bias
    n = image.shape[0]
    signs = 2.0 * torch.eye(n, device=positive.device, dtype=positive.dtype) - 1.0
    out = 0.0
    for anchor in (image, text):
        logits = _with_diagonal(scale * topology.similarity(anchor, mixed) + bias, positive)
        out = out + 0.5 * -F.logsigmoid(signs * logits).sum() / n
    return out


def _soft_targets(n: int, lam: float, device, dtype) -> Tensor:
    """lam at j = i and 1 - lam at j = J(i); rows sum to 1 (the middle row of an odd batch,
    its own partner, gets lam + 1 - lam = 1 on the diagonal)."""
    eye = torch.eye(n, device=device, dtype=dtype)
    return lam * eye + (1.0 - lam) * _reversed(eye)


def _soft_symmetric_ce(logits: Tensor, targets: Tensor) -> Tensor:
    # J is an involution, so the target matrix is symmetric and serves both directions.
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def v_mix_loss(topology: Topology, image: Tensor, text: Tensor, scale: Tensor | float, lam: float,
               path: str = "geodesic") -> Tensor:
    """V-Mix: images mixed with the reversed batch, ṽ_i = m_lam(v_i, v_J(i)); logits <ṽ_i, t_j>,
    soft targets lam at j = i and 1 - lam at j = J(i)."""
    mixed = mix(topology, image, _reversed(image), lam, path)
    logits = scale * topology.similarity(mixed, text)
    return _soft_symmetric_ce(logits, _soft_targets(image.shape[0], lam, logits.device, logits.dtype))


def l_mix_loss(topology: Topology, image: Tensor, text: Tensor, scale: Tensor | float, lam: float,
               path: str = "geodesic") -> Tensor:
    """L-Mix: the same on the text side, t̃_i = m_lam(t_i, t_J(i)); logits <v_i, t̃_j>."""
    mixed = mix(topology, text, _reversed(text), lam, path)
    logits = scale * topology.similarity(image, mixed)
    return _soft_symmetric_ce(logits, _soft_targets(image.shape[0], lam, logits.device, logits.dtype))


def vl_mix_loss(topology: Topology, image: Tensor, text: Tensor, scale: Tensor | float, lam: float,
                path: str = "geodesic") -> Tensor:
    """VL-Mix: both sides mixed with one lam; (ṽ_i, t̃_i) is the positive, the negatives keep
    the original similarities <v_i, t_j> (hard targets on the diagonal)."""
    image_mixed = mix(topology, image, _reversed(image), lam, path)
    text_mixed = mix(topology, text, _reversed(text), lam, path)
    logits = _with_diagonal(scale * topology.similarity(image, text), scale * topology.paired_similarity(image_mixed, text_mixed))
    labels = _labels(image.shape[0], logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class M3MixLoss(nn.Module):
    """L = L_CLIP + w_m2 L_m2 + w_V L_V + w_L L_L + w_VL L_VL, each over the given topology.

    One lam per term per batch, drawn from a seeded numpy generator (its state is part of
    ``state_dict`` so resumed runs draw the same sequence). ``forward`` returns the total and,
    with ``return_details``, the individual terms and the lam values used.
    """

    def __init__(
        self, topology: Topology, weights: MixupConfig | None = None, seed: int = 0, clip_loss: nn.Module | None = None,
        path: str = "geodesic",
    ):
        super().__init__()
        if path not in MIX_PATHS:
            raise ValueError(f"mix path: unknown {path!r} (known: {', '.join(MIX_PATHS)})")
        self.topology, self.path = topology, path
        self.weights = weights or MixupConfig()
        # The L_CLIP term; pass a configured ContrastiveLoss (local loss, tiling) to share it.
        # Under torch.distributed it gathers the batch, while the mixup terms see each
        # process's own pairs.
        self.clip_loss = clip_loss if clip_loss is not None else ContrastiveLoss(topology)
        self.rng = np.random.default_rng(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch used by the optional 1/(epoch+1) decay when ``forward`` gets none (the
        trainer calls this at each epoch, like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def _draw(self, alpha: float) -> float:
        return float(self.rng.beta(alpha, alpha))

    def forward(self, image: Tensor, text: Tensor, scale: Tensor | float, *bias: Tensor, epoch: int | None = None,
                return_details: bool = False):
        """``bias``: the logit bias, when the main term is the sigmoid loss; the m²-Mix term
        then takes its sigmoid form with it (the uni-modal terms keep their softmax form)."""
        w = self.weights
        epoch = self.epoch if epoch is None else epoch
        decay = 1.0 / (epoch + 1) if w.decay else 1.0
        terms: dict[str, Tensor] = {"clip": self.clip_loss(image, text, scale, *bias)}
        lams: dict[str, float] = {}
        if w.m2 > 0:
            lams["m2"] = self._draw(w.alpha_m2)
            if bias:
                terms["m2"] = m2_mix_sigmoid_loss(self.topology, image, text, w.m2_scale, bias[0], lams["m2"], self.path)
            else:
                terms["m2"] = m2_mix_loss(self.topology, image, text, w.m2_scale, lams["m2"], self.path)
        if w.v > 0:
            lams["v"] = self._draw(w.alpha_uni)
            terms["v"] = v_mix_loss(self.topology, image, text, scale, lams["v"], self.path)
        if w.l > 0:
            lams["l"] = self._draw(w.alpha_uni)
            terms["l"] = l_mix_loss(self.topology, image, text, scale, lams["l"], self.path)
        if w.vl > 0:
            lams["vl"] = self._draw(w.alpha_vl)
            terms["vl"] = vl_mix_loss(self.topology, image, text, scale, lams["vl"], self.path)
        total = terms["clip"]
        for name, value in terms.items():
            if name != "clip":
                total = total + decay * getattr(w, name) * value
        if not return_details:
            return total
        details = {f"loss_{k}": float(val.detach()) for k, val in terms.items()}
        details.update({f"lam_{k}": val for k, val in lams.items()})
        return total, details

    # The generator's state travels with checkpoints (JSON-safe: bit_generator.state is a dict
    # of ints and strings).
    def get_extra_state(self):
        return {"rng": self.rng.bit_generator.state, "epoch": self.epoch}

    def set_extra_state(self, state) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epoch = int(state.get("epoch", 0))


@torch.no_grad()
def mixup_hardness(topology: Topology, image: Tensor, text: Tensor, lam: float, bins: int = 50,
                   path: str = "geodesic") -> dict:
    """How hard the m²-Mix negatives are (Fig. 4 of *Geodesic Multi-Modal Mixup*): similarities of each image anchor
    to the original negatives <v_i, t_j> and to the mixed negatives <v_i, m_j>, j != i, as
    histograms over a shared range plus their means. Harder negatives sit closer to the
    positives' similarities."""
    mixed = mix(topology, image, text, lam, path)
    off = ~torch.eye(image.shape[0], dtype=torch.bool, device=image.device)
    original = topology.similarity(image, text)[off].float().cpu()
    hard = topology.similarity(image, mixed)[off].float().cpu()
    positive = topology.paired_similarity(image, text).float().cpu()
    lo = float(torch.minimum(original.min(), hard.min()))
    hi = float(torch.maximum(torch.maximum(original.max(), hard.max()), positive.max()))
    hi = hi if hi > lo else lo + 1.0
    edges = torch.linspace(lo, hi, bins + 1)
    return {
        "edges": edges.tolist(),
        "original": torch.histc(original, bins, lo, hi).tolist(),
        "mixed": torch.histc(hard, bins, lo, hi).tolist(),
        "mean_original": float(original.mean()),
        "mean_mixed": float(hard.mean()),
        "mean_positive": float(positive.mean()),
    }
