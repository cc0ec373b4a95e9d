"""Image and text towers: inputs -> features of k [CLS] tokens, ``[b, k, width]``.

Image: any timm model. For timm VisionTransformers the k [CLS] tokens are timm's own prefix
tokens (the class token plus k-1 "register" tokens), each with its own position embedding, and
the tower reads the first k output tokens. Any other timm model yields one pooled feature, so
it supports k = 1 only.

Text: a BERT encoder (HF transformers) built from a config. The tokenizer puts one [CLS] at
position 0; the tower inserts k-1 copies of it right after, so the k [CLS] tokens sit at
positions 0..k-1 and differ through their absolute position embeddings.

Both towers start from random weights; nothing is downloaded.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from transformers import BertConfig, BertModel

if TYPE_CHECKING:
    from .config import ImageTowerConfig, TextTowerConfig

__all__ = ["ImageTower", "TextTower", "TINY_VIT_ARGS", "topoclip_vit_tiny"]

TINY_VIT_ARGS = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0)


@register_model
def topoclip_vit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 32x32 images: 4x4 patches, depth 4, width 128, 4 heads (the CPU-sized default)."""
    if pretrained:
        raise ValueError("topoclip_vit_tiny has no pretrained weights")
    # create_model passes these for models with hub weights; this one has none.
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(**{**TINY_VIT_ARGS, **kwargs})


def _timm_model_class(name: str, kwargs: dict) -> type:
    """The class timm builds for ``name``, found without allocating weights when possible."""
    try:
        with torch.device("meta"):
            return type(timm.create_model(name, pretrained=False, num_classes=0, **kwargs))
    except Exception:
        # Some models compute values during construction (e.g. .item()), which meta tensors
        # refuse; building for real is slower but always tells the truth.
        return type(timm.create_model(name, pretrained=False, num_classes=0, **kwargs))


def _matching(names: list[str], patterns: set[str]) -> set[str]:
    """Parameter names matched by timm-style no-weight-decay patterns (exact, module or glob)."""
    return {
        n for n in names
        if any(n == p or n.startswith(p + ".") or fnmatch.fnmatch(n, p) for p in patterns)
    }


class ImageTower(nn.Module):
    """A timm image model -> ``[b, k, width]`` features of its k [CLS] tokens."""

    def __init__(self, cfg: "ImageTowerConfig", num_tokens: int = 1):
        super().__init__()
        kwargs = dict(cfg.timm_kwargs)
        try:
            model_cls = _timm_model_class(cfg.name, kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError) as err:
            raise ValueError(f"model.image: timm could not build {cfg.name!r} with timm_kwargs {kwargs}: {err}") from err
        self.is_vit = issubclass(model_cls, VisionTransformer)
        if self.is_vit:
            # k prefix tokens = timm's class token + k-1 register tokens; global_pool='' keeps
            # attention-pool heads (e.g. SigLIP's) from being built, as the tower reads tokens.
            kwargs.update(cfg.vit_overrides(), class_token=True, reg_tokens=num_tokens - 1, global_pool="")
        else:
            vit_only = [a for a in ("img_size", "patch_size", "depth", "width", "heads", "mlp_ratio") if getattr(cfg, a) is not None]
            if vit_only:
                raise ValueError(
                    f"model.image.{vit_only[0]} applies to timm VisionTransformer models only; "
                    f"{cfg.name!r} is a {model_cls.__name__} (pass its own options in model.image.timm_kwargs)"
                )
            if num_tokens != 1:
                raise ValueError(
                    f"model.num_tokens={num_tokens} needs a timm VisionTransformer image model (k learnable "
                    f"[CLS] tokens); {cfg.name!r} is a {model_cls.__name__}, which yields one pooled "
                    f"feature: use model.num_tokens=1"
                )
        self.model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
        self.num_tokens = num_tokens
        self.width = int(self.model.num_features)
        if self.is_vit:
            if self.model.num_prefix_tokens != num_tokens:
                raise ValueError(
                    f"model.image.name: {cfg.name!r} built {self.model.num_prefix_tokens} prefix tokens, "
                    f"expected model.num_tokens={num_tokens}"
                )
            if cfg.pos_embed == "sincos":
                self._init_sincos_pos_embed(cfg.pos_embed_temperature)
            if num_tokens > 1:
                # timm starts prefix tokens at ~0 (std 1e-6). Draw them visibly apart so the k
                # tokens differ from the first step even in ViTs whose prefix tokens get no
                # position embedding (no_embed_class=True).
                nn.init.normal_(self.model.cls_token, std=0.02)
                nn.init.normal_(self.model.reg_token, std=0.02)

    @torch.no_grad()
    def _init_sincos_pos_embed(self, temperature: float) -> None:
        """Patch positions from timm's 2-D sine-cosine table; prefix positions (if any) zero."""
        from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

        vit = self.model
        grid = list(vit.patch_embed.grid_size)
        table = build_sincos2d_pos_embed(grid, dim=vit.embed_dim, temperature=temperature)
        num_patches = grid[0] * grid[1]
        vit.pos_embed.zero_()
        vit.pos_embed[0, -num_patches:] = table.reshape(num_patches, vit.embed_dim).to(vit.pos_embed.dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks' activations in backward instead of storing them (timm's own
        switch; non-reentrant torch.utils.checkpoint): less memory, the same gradients."""
        setter = getattr(self.model, "set_grad_checkpointing", None)
        if setter is None:
            raise ValueError(f"gradient checkpointing: the timm model {type(self.model).__name__} does not support it")
        setter(enable)

    def set_eager_attention(self, enable: bool = True) -> None:
        """Attention as explicit matmuls + softmax instead of the fused SDPA kernel. On the CPU
        under bf16 autocast the fused kernel's backward is ~12x slower than fp32 (measured on
        AMX cores: 20 ms against 1.7 ms per call at 17 tokens), while bf16 matmuls run 5-8x
        faster than fp32; softmax stays in fp32 under autocast either way."""
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = not enable

    def forward(self, images: Tensor) -> Tensor:
        if self.is_vit:
            return self.model.forward_features(images)[:, : self.num_tokens]
        return self.model(images).unsqueeze(1)  # num_classes=0: pooled features [b, width]

    def no_weight_decay(self) -> set[str]:
        """Names of this tower's parameters exempt from weight decay beyond 1-d ones: the
        model's own list (ViT: class/register tokens, position embeddings)."""
        own = getattr(self.model, "no_weight_decay", None)
        patterns = set(own()) if callable(own) else set()
        names = [n for n, _ in self.model.named_parameters()]
        return {f"model.{n}" for n in _matching(names, patterns)}


class TextTower(nn.Module):
    """A BERT encoder -> ``[b, k, width]`` features of k [CLS] tokens at positions 0..k-1."""

    def __init__(self, cfg: "TextTowerConfig", vocab_size: int, pad_token_id: int = 0, num_tokens: int = 1):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2 (the tokenizer's), got {vocab_size!r}")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size={vocab_size}), got {pad_token_id!r}")
        self.max_positions = cfg.resolved_max_positions(num_tokens)
        if self.max_positions < cfg.positions_needed(num_tokens):
            raise ValueError(
                f"model.text.max_positions={self.max_positions} is too small: the text tower sees "
                f"model.text.context_length + model.num_tokens - 1 = {cfg.positions_needed(num_tokens)} positions"
            )
        bert = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.width,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads,
            intermediate_size=round(cfg.mlp_ratio * cfg.width),
            max_position_embeddings=self.max_positions,
            type_vocab_size=1,  # no sentence pairs
            pad_token_id=pad_token_id,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
        )
        self.model = BertModel(bert, add_pooling_layer=False)
        self.num_tokens = num_tokens
        self.width = cfg.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each BERT layer's activations in backward (torch.utils.checkpoint,
        use_reentrant=False, through transformers' switch): less memory, the same gradients."""
        if enable:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()

    def set_eager_attention(self, enable: bool = True) -> None:
        """transformers' eager attention instead of SDPA (see ``ImageTower.set_eager_attention``)."""
        self.model.config._attn_implementation = "eager" if enable else "sdpa"

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [b, L], got shape {tuple(input_ids.shape)}")
        b, length = input_ids.shape
        k = self.num_tokens
        if length + k - 1 > self.max_positions:
            raise ValueError(
                f"text of length {length} plus {k - 1} extra [CLS] tokens needs {length + k - 1} positions; "
                f"the text tower has {self.max_positions} (raise model.text.context_length)"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        # Copies of the start token, not a hard-coded id: whatever the tokenizer puts at
        # position 0 is the [CLS] token. Default position ids 0..L+k-2 give each its own.
        input_ids = torch.cat([input_ids[:, :1].expand(b, k), input_ids[:, 1:]], dim=1)
        attention_mask = torch.cat([attention_mask[:, :1].expand(b, k), attention_mask[:, 1:]], dim=1)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden[:, :k]

    def no_weight_decay(self) -> set[str]:
        """Embedding tables that act as biases: positions, and the single token-type row."""
        return {
            n for n, _ in self.named_parameters()
            if "position_embeddings" in n or "token_type_embeddings" in n
        }
