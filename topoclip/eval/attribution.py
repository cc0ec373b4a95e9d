"""Grad-CAM importance maps of image-text matching scores over image patches and text tokens (Fig. 5).

The score explained is either the final matching score ``topology.paired_similarity(u, v)``
or one token's (block's) score ``u_k . v_k`` (the cosine of the k-th [CLS] token pair on its
unit sphere). Relevance is assigned to the image patches and to the text tokens.

Which activations: the INPUT of the last transformer block (ViT: the output of the last
block's ``norm1``, what its attention reads; BERT: the hidden states entering its last
layer). The last block's OUTPUT, the usual Grad-CAM target, does not work for a [CLS]
readout: patch outputs of the last block never reach the [CLS] outputs, so their gradient is
exactly zero. Inside the last block, patches reach the [CLS] tokens only through attention,
which is what the maps then show. (timm ViTs are pre-norm, so ``norm1`` is what attention
reads; this is also the layer pytorch-grad-cam recommends for ViTs.)

Which formula (``variant``):
* ``"token"`` (default): ``relevance_t = relu(sum_c grad_tc * act_tc)`` per token t, i.e. the
  first-order estimate of how much the score drops if token t's activation were removed. In
  a CNN, Grad-CAM's channel weights are the gradient averaged over positions because
  positions are mixed by (near-)global pooling, so gradients are nearly equal across
  positions; in a transformer, positions are mixed by attention and each token's gradient
  carries its own attention weight. Averaging would throw exactly that away and light up any
  token whose activation points along the mean gradient, attended or not. Keeping the
  per-token gradient is Grad-CAM with the pooling assumption dropped; it equals classic
  Grad-CAM when gradients are constant over positions.
* ``"classic"``: Selvaraju et al.'s weights ``w_c = mean_t grad_tc`` and ``relu(act_t . w)``,
  for comparison with other Grad-CAM implementations.

Text tokens (*Design of the topology*, §4.5, extends Grad-CAM "token-wise" to text) use the same formula over the
text tower's token positions; the [CLS] positions and padding are excluded (relevance 0).

Gradients are taken with ``torch.autograd.grad`` with respect to the captured activations
only: the model's parameters get no ``.grad``, frozen models work, and every hook is removed
on exit, also after an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topoclip.devices import resolve_device
from topoclip.eval.embed import eval_mode

__all__ = [
    "Attribution",
    "gradcam",
    "token_strings",
    "save_overlay_png",
    "save_text_relevance_png",
    "explain_pair",
]

VARIANTS = ("token", "classic")


@dataclass
class Attribution:
    """Grad-CAM maps for a batch of b image-text pairs: non-negative, not rescaled."""

    score: Tensor  # [b] the explained score
    patch_map: Tensor  # [b, gh, gw] relevance per image patch
    image_map: Tensor  # [b, H, W] patch_map upsampled (bilinear) to the image size
    text_map: Tensor  # [b, L] relevance per input token position; 0 at [CLS] and padding
    text_mask: Tensor  # [b, L] bool: the positions that are scored
    block: int | None  # None: the final matching score; k: the k-th token's score


def _image_layer(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the timm ViT, the module whose output is the last block's attention input)."""
    from timm.models.vision_transformer import VisionTransformer

    vit = getattr(getattr(model, "image", None), "model", None)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"Grad-CAM needs a DualEncoder with a timm VisionTransformer image tower (model.image.model), "
            f"got {type(vit).__name__}"
        )
    block = vit.blocks[-1]
    if not hasattr(block, "norm1"):
        raise ValueError(f"the ViT's last block ({type(block).__name__}) has no norm1 to read the attention input from")
    return vit, block.norm1


def _text_layer(model: nn.Module) -> nn.Module:
    """The BERT encoder's last layer (its input hidden states are captured)."""
    from transformers import BertModel

    bert = getattr(getattr(model, "text", None), "model", None)
    if not isinstance(bert, BertModel):
        raise ValueError(
            f"Grad-CAM needs a DualEncoder with a BERT text tower (model.text.model), got {type(bert).__name__}"
        )
    return bert.encoder.layer[-1]


class _Capture:
    """Replaces one activation by a leaf that requires grad, so its gradient can be asked for."""

    def __init__(self, name: str):
        self.name = name
        self.tensor: Tensor | None = None

    def _leaf(self, x: Tensor) -> Tensor:
        if self.tensor is not None:
            raise RuntimeError(f"{self.name} activation captured twice in one forward pass")
        self.tensor = x.detach().requires_grad_(True)
        return self.tensor

    def forward_hook(self, module, inputs, output):
        return self._leaf(output)

    def forward_pre_hook(self, module, args, kwargs):
        if args:
            return (self._leaf(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._leaf(kwargs["hidden_states"])
        return args, kwargs


def _relevance(act: Tensor, grad: Tensor, valid: Tensor, variant: str) -> Tensor:
    """``[b, T]`` relevance from activations and gradients ``[b, T, C]``; 0 where not ``valid``."""
    act, grad = act.float(), grad.float()
    if variant == "token":
        cam = (grad * act).sum(-1)
    else:
        weights = (grad * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        cam = torch.einsum("btc,bc->bt", act, weights)
    return cam.clamp_min(0) * valid


def _score(model: nn.Module, u: Tensor, v: Tensor, block: int | None) -> Tensor:
    topology = model.topology
    if block is None:
        return topology.paired_similarity(u, v)
    return (topology.blocks(u)[:, block] * topology.blocks(v)[:, block]).sum(-1)


def gradcam(
    model: nn.Module,
    images: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    block: int | None = None,
    variant: str = "token",
) -> Attribution:
    """Grad-CAM maps of the score of each (image i, text i) pair; see the module docstring.

    ``images`` ``[b, 3, H, W]`` (normalised), ``input_ids`` / ``attention_mask`` ``[b, L]`` from the
    tokenizer. ``block=None`` explains the final matching score, ``block=k`` the k-th token's
    score ``u_k . v_k``. The model runs in eval mode; its train/eval flags are restored.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if images.dim() != 4 or input_ids.dim() != 2 or images.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"need images [b, 3, H, W] and input_ids [b, L] with the same b, got {tuple(images.shape)} "
            f"and {tuple(input_ids.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    vit, image_layer = _image_layer(model)
    device = resolve_device(None, model)
    images, input_ids, attention_mask = images.to(device), input_ids.to(device), attention_mask.to(device)
    text_layer = _text_layer(model)
    num_blocks = model.topology.num_blocks
    if block is not None and not (isinstance(block, int) and 0 <= block < num_blocks):
        raise ValueError(f"block must be None (final score) or an int in [0, {num_blocks}), got {block!r}")
    num_tokens = model.num_tokens

    image_capture, text_capture = _Capture("image"), _Capture("text")
    handles = [
        image_layer.register_forward_hook(image_capture.forward_hook),
        text_layer.register_forward_pre_hook(text_capture.forward_pre_hook, with_kwargs=True),
    ]
    try:
        with eval_mode(model), torch.enable_grad():
            u = model.encode_image(images)
            v = model.encode_text(input_ids, attention_mask)
            score = _score(model, u, v, block)
            for capture in (image_capture, text_capture):
                if capture.tensor is None:
                    raise RuntimeError(f"the {capture.name} tower's last block did not run; cannot attribute")
            image_grad, text_grad = torch.autograd.grad(
                score.sum(), [image_capture.tensor, text_capture.tensor], allow_unused=True
            )
    finally:
        for handle in handles:
            handle.remove()
    image_act, text_act = image_capture.tensor.detach(), text_capture.tensor.detach()
    # Samples do not interact in eval mode, so the gradient of the sum is each pair's own gradient.
    image_grad = torch.zeros_like(image_act) if image_grad is None else image_grad
    text_grad = torch.zeros_like(text_act) if text_grad is None else text_grad

    # Image: the patch tokens follow the prefix ([CLS]/register) tokens.
    prefix = vit.num_prefix_tokens
    grid_h, grid_w = vit.patch_embed.grid_size
    patches_act, patches_grad = image_act[:, prefix:], image_grad[:, prefix:]
    if patches_act.shape[1] != grid_h * grid_w:
        raise ValueError(
            f"the ViT produced {patches_act.shape[1]} patch tokens, expected a {grid_h}x{grid_w} grid"
        )
    all_patches = torch.ones(patches_act.shape[:2], dtype=torch.bool, device=patches_act.device)
    patch_map = _relevance(patches_act, patches_grad, all_patches, variant).view(-1, grid_h, grid_w)
    image_map = F.interpolate(patch_map.unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False)
    image_map = image_map.squeeze(1).clamp_min(0)

    # Text: the tower feeds [CLS] x k, then input positions 1..L-1 at tower positions k..L+k-2.
    text_mask = attention_mask.bool().clone()
    text_mask[:, 0] = False
    tower_valid = torch.cat([torch.zeros_like(text_mask[:, :1]).expand(-1, num_tokens), text_mask[:, 1:]], 1)
    tower_map = _relevance(text_act, text_grad, tower_valid.to(text_act.device), variant)
    text_map = torch.cat([torch.zeros_like(tower_map[:, :1]), tower_map[:, num_tokens:]], 1)

    return Attribution(score.detach(), patch_map, image_map, text_map, text_mask, block)


# --------------------------------------------------------------------------------- pictures
def token_strings(tokenizer, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[str]:
    """The string of each (unpadded) token of one tokenized text, for labelling a text map."""
    ids = input_ids.tolist()
    if attention_mask is not None:
        ids = ids[: int(attention_mask.sum())]
    return [tokenizer.decode([i], skip_special_tokens=False).strip() or f"<{i}>" for i in ids]


def _denormalise(image: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    if mean is None or std is None:
        # Imported here: topoclip.data pulls in torchvision, which evaluation code rarely needs.
        from topoclip.data.transforms import CLIP_MEAN, CLIP_STD

        mean = CLIP_MEAN if mean is None else mean
        std = CLIP_STD if std is None else std
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image.detach().float().cpu() * std_t + mean_t).clamp(0, 1)


def _overlay(image: Tensor, cam: Tensor, mean, std, alpha: float):
    """H x W x 3 float array: heatmap of ``cam`` (scaled to its max) blended over the image."""
    from matplotlib import colormaps

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    cam = cam.detach().float().cpu()
    if cam.dim() != 2:
        raise ValueError(f"cam must be a 2-d map, got {tuple(cam.shape)}")
    if cam.shape != image.shape[-2:]:
        cam = F.interpolate(cam[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    heat = torch.from_numpy(colormaps["jet"](cam.clamp(0, 1).numpy())[..., :3]).float()
    rgb = _denormalise(image, mean, std).permute(1, 2, 0)
    return ((1 - alpha) * rgb + alpha * heat).numpy()


def _new_figure(width: float, height: float):
    # A bare Figure (no pyplot): no global backend switch, nothing left open, thread-safe.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def save_overlay_png(
    image: Tensor,
    cam: Tensor,
    path: str | os.PathLike,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    alpha: float = 0.5,
    title: str | None = None,
) -> Path:
    """Write ``cam`` (``[H, W]`` or a patch grid) as a heatmap over the de-normalised ``image`` ``[3, H, W]``.

    ``mean`` / ``std`` are the normalisation the image went through (default: CLIP's, as used
    by the project's datasets); the heatmap is scaled to the map's maximum.
    """
    fig = _new_figure(3, 3)
    ax = fig.add_subplot()
    ax.imshow(_overlay(image, cam, mean, std, alpha), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _text_bars(ax, tokens: Sequence[str], relevance: Sequence[float], title: str | None) -> None:
    positions = range(len(tokens))
    ax.bar(positions, relevance, color="tab:red")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(tokens, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("relevance", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)


def save_text_relevance_png(
    tokens: Sequence[str], relevance: Tensor | Sequence[float], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Write a bar chart of one relevance value per text token."""
    relevance = [float(r) for r in relevance]
    if len(tokens) != len(relevance):
        raise ValueError(f"{len(tokens)} tokens but {len(relevance)} relevance values")
    fig = _new_figure(max(3.0, 0.35 * len(tokens) + 1), 2.5)
    _text_bars(fig.add_subplot(), tokens, relevance, title)
    return _save(fig, path)


def explain_pair(
    model: nn.Module,
    image: Tensor,
    caption: str,
    tokenizer,
    out_dir: str | os.PathLike,
    blocks: Sequence[int] | None = None,
    variant: str = "token",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Path]:
    """Figure-5-style PNGs for one image ``[3, H, W]`` and caption in ``out_dir``.

    Maps of the final score and of the tokens in ``blocks`` (default: the two best-aligned
    tokens of this pair, for multi-block topologies). Writes ``{name}_image.png`` and
    ``{name}_text.png`` per map (name ``full`` or ``token{k}``) and ``figure.png`` with all of
    them. Returns the written paths by key.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    device = resolve_device(None, model)
    tokens = tokenizer([caption])
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    images = image.unsqueeze(0).to(device)
    full = gradcam(model, images, ids, mask, None, variant)
    if blocks is None:
        blocks = []
        if model.topology.num_blocks > 1:
            with torch.no_grad(), eval_mode(model):
                u = model.topology.blocks(model.encode_image(images))[0]
                v = model.topology.blocks(model.encode_text(ids, mask))[0]
            blocks = (u * v).sum(-1).topk(min(2, model.topology.num_blocks)).indices.tolist()
    maps = {"full": full}
    for k in blocks:
        maps[f"token{int(k)}"] = gradcam(model, images, ids, mask, int(k), variant)

    out_dir = Path(out_dir)
    words = token_strings(tokenizer, ids[0].cpu(), mask[0].cpu())
    scored = full.text_mask[0, : len(words)].cpu()
    words_scored = [w for w, keep in zip(words, scored.tolist()) if keep]
    paths: dict[str, Path] = {}
    for name, attribution in maps.items():
        label = "final score" if name == "full" else f"token id={name[5:]}"
        title = f"{label}: {float(attribution.score[0]):.3f}"
        paths[f"{name}_image"] = save_overlay_png(image, attribution.image_map[0], out_dir / f"{name}_image.png", mean, std, title=title)
        relevance = attribution.text_map[0, : len(words)].cpu()[scored]
        paths[f"{name}_text"] = save_text_relevance_png(words_scored, relevance, out_dir / f"{name}_text.png", title=title)

    # One figure: the input pair, then a column per map (image overlay above, token bars below).
    columns = 1 + len(maps)
    fig = _new_figure(2.6 * columns, 5.2)
    grid = fig.add_gridspec(2, columns, height_ratios=[3, 2])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(_denormalise(image, mean, std).permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("image-text pair", fontsize=9)
    ax = fig.add_subplot(grid[1, 0])
    ax.set_axis_off()
    ax.text(0.0, 0.5, caption, wrap=True, fontsize=8, va="center")
    for column, (name, attribution) in enumerate(maps.items(), start=1):
        label = "full tokens" if name == "full" else f"token id={name[5:]}"
        ax = fig.add_subplot(grid[0, column])
        ax.imshow(_overlay(image, attribution.image_map[0], mean, std, 0.5), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{label} ({float(attribution.score[0]):.2f})", fontsize=9)
        relevance = attribution.text_map[0, : len(words)].cpu()[scored]
        bars = fig.add_subplot(grid[1, column])
        _text_bars(bars, words_scored, relevance.tolist(), None)
        if column > 1:
            bars.set_ylabel("")
    paths["figure"] = _save(fig, out_dir / "figure.png")
    return paths
