"""Pretrained CLIP models on disk (OpenCLIP, Hugging Face) as drop-in replacements for DualEncoder.

An adapter wraps the foreign model and exposes the DualEncoder interface (``encode_image``,
``encode_text``, ``forward``, ``image_features``, ``topology``, ``logit_scale``, ``num_tokens``,
``no_weight_decay_names``), so eval, the trainer and mixup fine-tuning take it unchanged.

The raw (unnormalised) CLIP embedding goes through ``topology.project``. On the default sphere
this is CLIP's own L2 normalisation; any topology with ``dim == embed_dim`` works, read as a
single-token model (oblique: m blocks of the one embedding), so a model pretrained on the
sphere can be fine-tuned onto another topology.

Nothing here downloads: weights and tokenizers come from files. An OpenCLIP pretrained *tag*
(or an ``hf-hub:`` name) downloads, so it needs ``allow_download=True``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.tokenizer import DEFAULT_HF_CONTEXT_LENGTH, TextTokenizer
from ..data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from ..geometry import Topology
from ..geometry import topology as make_topology
from ..temperature import LogitScale

__all__ = [
    "HFClipDualEncoder",
    "OpenClipDualEncoder",
    "OpenClipTokenizer",
    "load_hf_clip",
    "load_openclip",
    "load_pretrained",
]

DEFAULT_MAX_LOGIT_SCALE = 100.0
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
# Parameters that act as offsets or lookup tables rather than weight matrices: weight decay
# would pull them towards zero for no regularising benefit (the usual CLIP recipe).
_NO_DECAY_NAME_PARTS = ("class_embedding", "positional_embedding", "position_embedding", "logit_scale", "logit_bias")


def _resolve_topology(topology: Topology | None, embed_dim: int) -> Topology:
    if topology is None:
        return make_topology("sphere", dim=embed_dim)
    if not isinstance(topology, Topology):
        raise ValueError(f"topology must be a topoclip Topology or None, got {type(topology).__name__}")
    if topology.dim != embed_dim:
        raise ValueError(
            f"topology {topology!r} has dim={topology.dim} but the pretrained model's embedding has "
            f"embed_dim={embed_dim}; choose a topology with dim == {embed_dim} (e.g. oblique with n*m = {embed_dim})"
        )
    return topology


def _logit_scale_from(log_scale: Tensor, max_scale: float | None) -> LogitScale:
    """A learnable LogitScale starting at the checkpoint's exp(log_scale), clamped to ``max_scale``
    (CLIP checkpoints sit exactly at their clamp of 100, which float rounding can put a hair above)."""
    value = float(log_scale.detach().float().exp().reshape(-1)[0])
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the pretrained model's logit_scale exp(log_scale) = {value} is not a positive finite number")
    if max_scale is not None:
        value = min(value, float(max_scale))
    return LogitScale(init=value, learnable=True, max=max_scale)


class _PretrainedAdapter(nn.Module):
    """Shared DualEncoder interface; subclasses supply the raw embeddings of their model."""

    num_tokens = 1  # one pooled embedding per tower: the single-token convention

    def __init__(self, clip: nn.Module, embed_dim: int, topology: Topology | None, log_scale: Tensor,
                 max_logit_scale: float | None):
        super().__init__()
        self.clip = clip
        self.embed_dim = int(embed_dim)
        self.topology = _resolve_topology(topology, self.embed_dim)
        self.logit_scale = _logit_scale_from(log_scale, max_logit_scale)
        self.logit_bias = None  # the sigmoid loss's: models.ensure_logit_bias adds one when needed

    def image_embedding(self, images: Tensor) -> Tensor:
        """The model's unnormalised image embedding ``[b, embed_dim]``."""
        raise NotImplementedError

    def text_embedding(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The model's unnormalised text embedding ``[b, embed_dim]``."""
        raise NotImplementedError

    def _to_points(self, x: Tensor) -> Tensor:
        return self.topology.project(x).reshape(x.shape[0], self.topology.dim)

    def encode_image(self, images: Tensor) -> Tensor:
        """Images ``[b, 3, H, W]`` -> points ``[b, d]``."""
        return self._to_points(self.image_embedding(images))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Token ids ``[b, L]`` (and mask) -> points ``[b, d]``."""
        return self._to_points(self.text_embedding(input_ids, attention_mask))

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)

    def no_weight_decay_names(self) -> set[str]:
        """Trainable parameter names exempt from weight decay: every 1-d parameter (biases, norm
        gains, the logit scale) plus class/position embeddings."""
        return {
            n for n, p in self.named_parameters()
            if p.requires_grad and (p.ndim < 2 or any(part in n for part in _NO_DECAY_NAME_PARTS))
        }

    def _freeze_own_scale(self) -> None:
        # The wrapped model's logit scale (and SigLIP's bias) are superseded by self.logit_scale;
        # frozen so that the optimizer neither sees nor decays a parameter without gradient.
        for name in ("logit_scale", "logit_bias"):
            param = getattr(self.clip, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)


# --------------------------------------------------------------------------------- OpenCLIP

class OpenClipDualEncoder(_PretrainedAdapter):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` as a topoclip dual encoder (``self.clip``).

    ``logit_scale`` is a new learnable :class:`topoclip.LogitScale` starting at the model's
    own value; the model's ``logit_scale`` (and a SigLIP ``logit_bias``) are frozen and unused.
    ``image_features`` returns the pooled features before the image projection for open_clip's
    VisionTransformer and for timm towers with a separate projection head; for other towers
    (e.g. ModifiedResNet, whose attention pool ends in the projection) it falls back to the
    unnormalised image embedding -- ``image_features_kind`` says which.
    """

    def __init__(self, clip: nn.Module, topology: Topology | None = None,
                 max_logit_scale: float | None = DEFAULT_MAX_LOGIT_SCALE, embed_dim: int | None = None,
                 input_dtype: torch.dtype | None = None):
        for attr in ("encode_image", "encode_text", "visual", "logit_scale"):
            if not hasattr(clip, attr):
                raise ValueError(f"expected an open_clip CLIP/CustomTextCLIP model, got {type(clip).__name__} without .{attr}")
        if embed_dim is None:
            # open_clip's own towers record it; timm towers do not (load_openclip passes the config's).
            embed_dim = getattr(clip.visual, "output_dim", None)
            if embed_dim is None:
                raise ValueError(f"cannot read the embedding size of {type(clip.visual).__name__}; pass embed_dim")
        super().__init__(clip, embed_dim, topology, clip.logit_scale, max_logit_scale)
        self._freeze_own_scale()
        self.image_features_kind = "pre_projection" if self._pre_projection_path() else "embedding"
        # open_clip's fp16/bf16 precisions cast the weights (not all: norms and tokens may stay
        # fp32), so images must arrive in the cast dtype, as open_clip's own training loop does.
        if input_dtype is None:
            conv = getattr(clip.visual, "conv1", None)
            input_dtype = conv.weight.dtype if isinstance(conv, nn.Conv2d) else None
        self.input_dtype = input_dtype

    def _cast(self, images: Tensor) -> Tensor:
        return images if self.input_dtype is None else images.to(self.input_dtype)

    def image_embedding(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(self._cast(images), normalize=False)

    def text_embedding(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        # open_clip's text towers find padding themselves (causal mask + end-token pooling,
        # or the pad id for HF towers), so the mask is accepted for the interface and ignored.
        return self.clip.encode_text(input_ids, normalize=False)

    def _pre_projection_path(self) -> Callable[[Tensor], Tensor] | None:
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        visual = self.clip.visual
        if isinstance(visual, VisionTransformer) and hasattr(visual, "_embeds") and hasattr(visual, "_pool"):
            return lambda x: visual._pool(visual.transformer(visual._embeds(x)))[0]
        if isinstance(visual, TimmModel) and len(visual.head) and "pool" not in visual.head:
            return visual.trunk
        return None

    def image_head_parameters(self) -> list[nn.Parameter]:
        """The image projection (open_clip's ``visual.proj``, or a timm tower's head), which
        LP-FT's linear probe trains; an error for towers whose projection is inside a pool."""
        from open_clip.timm_model import TimmModel

        visual = self.clip.visual
        if isinstance(getattr(visual, "proj", None), nn.Parameter):
            return [visual.proj]
        if isinstance(visual, TimmModel) and len(visual.head) and "pool" not in visual.head:
            return list(visual.head.parameters())
        raise ValueError(f"LP-FT: the {type(visual).__name__} image tower has no separate projection to probe")

    def image_features(self, images: Tensor) -> Tensor:
        """Pooled image features for linear probes, ``[b, width]`` (see ``image_features_kind``)."""
        path = self._pre_projection_path()
        images = self._cast(images)
        return path(images) if path is not None else self.clip.encode_image(images, normalize=False)

    def no_weight_decay_names(self) -> set[str]:
        names = super().no_weight_decay_names()
        declared = getattr(self.clip, "no_weight_decay", None)
        if callable(declared):
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            names |= {f"clip.{n}" for n in declared() if f"clip.{n}" in trainable}
        return names


class OpenClipTokenizer:
    """An open_clip tokenizer in the TextTokenizer interface:
    ``tok(texts) -> dict(input_ids=LongTensor[b, L], attention_mask=LongTensor[b, L])``.

    The ids are exactly open_clip's (the layout its text tower was trained on). For the BPE
    ``SimpleTokenizer`` the mask covers start token through the first end token: ``ids != 0``
    would be wrong, because id 0 is also the BPE token ``!`` (e.g. in ``"!~"``). For
    tokenizers wrapping a Hugging Face tokenizer the mask is ``ids != pad_token_id``.
    Attributes: ``vocab_size``, ``pad_token_id``, ``cls_token_id`` (start-of-text),
    ``sep_token_id`` (end-of-text), ``context_length`` (fixed by the model's text tower).
    """

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        context_length = getattr(tokenizer, "context_length", None)
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"open_clip tokenizer {type(tokenizer).__name__} has no usable context_length ({context_length!r})")
        self.context_length = context_length
        if hasattr(tokenizer, "sot_token_id") and hasattr(tokenizer, "eot_token_id"):  # BPE SimpleTokenizer
            self.cls_token_id = int(tokenizer.sot_token_id)
            self.sep_token_id = int(tokenizer.eot_token_id)
            self.pad_token_id = 0  # SimpleTokenizer pads with zeros
            self.vocab_size = int(tokenizer.vocab_size)
            self._mask_to_end = True
        elif hasattr(tokenizer, "tokenizer"):  # HFTokenizer / SigLipTokenizer wrap a transformers tokenizer
            hf = tokenizer.tokenizer
            if hf.pad_token_id is None:
                raise ValueError(f"open_clip tokenizer {type(tokenizer).__name__}: the wrapped tokenizer has no pad token")
            start = hf.cls_token_id if hf.cls_token_id is not None else hf.bos_token_id
            end = hf.sep_token_id if hf.sep_token_id is not None else hf.eos_token_id
            self.cls_token_id = None if start is None else int(start)
            self.sep_token_id = None if end is None else int(end)
            self.pad_token_id = int(hf.pad_token_id)
            self.vocab_size = len(hf)
            self._mask_to_end = False
        else:
            raise ValueError(f"unsupported open_clip tokenizer type {type(tokenizer).__name__}")

    def __call__(self, texts: str | Sequence[str]) -> dict[str, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
        if not texts:
            empty = torch.zeros((0, self.context_length), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        ids = self._tok(texts, context_length=self.context_length).long()
        if self._mask_to_end:
            # SimpleTokenizer always ends a row with the end token (it overwrites the last
            # position on truncation), so the first end token marks the last real position.
            end = (ids == self.sep_token_id).int().argmax(dim=1, keepdim=True)
            mask = (torch.arange(ids.shape[1]).unsqueeze(0) <= end).long()
        else:
            mask = (ids != self.pad_token_id).long()
        return {"input_ids": ids, "attention_mask": mask}

    def __repr__(self) -> str:
        return (f"OpenClipTokenizer({type(self._tok).__name__}, vocab_size={self.vocab_size}, "
                f"context_length={self.context_length})")


_OPENCLIP_PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")


def load_openclip(
    model_name: str,
    pretrained_path: str | os.PathLike | None = None,
    topology: Topology | None = None,
    precision: str = "fp32",
    *,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    max_logit_scale: float | None = DEFAULT_MAX_LOGIT_SCALE,
) -> tuple[OpenClipDualEncoder, OpenClipTokenizer, Callable]:
    """Load an OpenCLIP model from a weights file: ``(model, tokenizer, image_transform)``.

    ``model_name`` is an architecture open_clip knows (built-in, registered with
    ``open_clip.add_model_config``, or ``local-dir:DIR`` holding ``open_clip_config.json`` and
    weights). ``pretrained_path`` is a ``.pt/.pth/.bin/.safetensors`` state dict; ``None``
    builds a randomly initialised model. A pretrained tag (``"openai"``, ...) or an
    ``hf-hub:`` name downloads and is refused unless ``allow_download=True``. The transform
    is open_clip's own evaluation transform (PIL image -> normalised float tensor).
    """
    import open_clip

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty OpenCLIP model name, got {model_name!r}")
    if precision not in _OPENCLIP_PRECISIONS:
        raise ValueError(f"precision must be one of {_OPENCLIP_PRECISIONS}, got {precision!r}")
    schema = next((name for name in ("hf-hub", "local-dir") if model_name.startswith(f"{name}:")), None)
    if schema == "local-dir":
        config_file = Path(model_name[len("local-dir:"):]) / "open_clip_config.json"
        if not config_file.is_file():
            raise ValueError(f"{model_name!r}: expected an OpenCLIP directory holding {os.fspath(config_file)!r}")
    if schema == "hf-hub" and not allow_download:
        raise ValueError(f"model_name {model_name!r} downloads from the Hugging Face Hub; pass allow_download=True "
                         f"or use 'local-dir:DIR' / a model name plus a weights file")
    if schema is None and open_clip.get_model_config(model_name) is None:
        raise ValueError(
            f"unknown OpenCLIP model_name {model_name!r}: not built in and not registered "
            f"(register a config with open_clip.add_model_config(path_to_json), or use 'local-dir:DIR')"
        )
    pretrained = None
    if pretrained_path is not None:
        pretrained = os.fspath(pretrained_path)
        if schema is not None:
            raise ValueError(f"pretrained_path is ignored by open_clip for {model_name!r}: weights come from the {schema} source")
        if not os.path.isfile(pretrained):
            if not allow_download:
                raise ValueError(
                    f"pretrained_path {pretrained!r} is not a file. Expected an OpenCLIP weights file "
                    f"({', '.join(WEIGHT_SUFFIXES)}); a pretrained tag would download weights, which needs allow_download=True"
                )
    cfg = open_clip.get_model_config(model_name) or {}
    try:
        clip, _, transform = open_clip.create_model_and_transforms(
            model_name,
            pretrained=pretrained,
            precision=precision,
            device=device,
            pretrained_image=False,
            # With no full checkpoint, a Hugging Face text tower would fetch its base weights.
            pretrained_text=allow_download,
        )
    except (RuntimeError, KeyError, OSError, AssertionError) as err:
        # open_clip asserts on shapes it resizes ("text pos_embed width changed!") and raises
        # RuntimeError on size mismatches: both mean the file holds another architecture.
        source = pretrained if pretrained is not None else model_name
        hint = (f" -- the weights in {source!r} do not match the architecture {model_name!r} (is --model-name right?)"
                if pretrained is not None and isinstance(err, (AssertionError, RuntimeError)) else "")
        raise ValueError(f"cannot load OpenCLIP model {model_name!r} from {source!r}: {err or type(err).__name__}{hint}") from err
    # HFTokenizer forwards extra kwargs to AutoTokenizer.from_pretrained: keep it offline
    # (SimpleTokenizer, the BPE vocabulary shipped inside open_clip, takes no such kwarg).
    uses_hf_tokenizer = bool(cfg.get("text_cfg", {}).get("hf_tokenizer_name"))
    # (and never runs a tokenizer directory's own code)
    kwargs = {"local_files_only": True, "trust_remote_code": False} if uses_hf_tokenizer and not allow_download else {}
    try:
        tokenizer = open_clip.get_tokenizer(model_name, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer of OpenCLIP model {model_name!r} offline: {err}") from err
    model = OpenClipDualEncoder(clip, topology, max_logit_scale, embed_dim=cfg.get("embed_dim"),
                                input_dtype=open_clip.get_input_dtype(precision))
    return model, OpenClipTokenizer(tokenizer), transform


# ----------------------------------------------------------------------------- Hugging Face

def _pooled(output: Any) -> Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the
    # projected embedding; transformers 4 returned the tensor itself.
    return output if isinstance(output, Tensor) else output.pooler_output


class HFClipDualEncoder(_PretrainedAdapter):
    """A ``transformers.CLIPModel`` as a topoclip dual encoder (``self.clip``).

    Embeddings are the projected ``get_image_features`` / ``get_text_features``;
    ``image_features`` is the vision tower's pooled (post-layernorm [CLS]) output before the
    projection. ``logit_scale`` is a new learnable LogitScale starting at the model's value;
    the model's own parameter is frozen and unused.
    """

    image_features_kind = "pre_projection"

    def __init__(self, clip: nn.Module, topology: Topology | None = None,
                 max_logit_scale: float | None = DEFAULT_MAX_LOGIT_SCALE):
        for attr in ("get_image_features", "get_text_features", "vision_model", "logit_scale"):
            if not hasattr(clip, attr):
                raise ValueError(f"expected a transformers CLIPModel, got {type(clip).__name__} without .{attr}")
        super().__init__(clip, int(clip.config.projection_dim), topology, clip.logit_scale, max_logit_scale)
        self._freeze_own_scale()

    def image_embedding(self, images: Tensor) -> Tensor:
        return _pooled(self.clip.get_image_features(pixel_values=images))

    def text_embedding(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return _pooled(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def image_head_parameters(self) -> list[nn.Parameter]:
        """``visual_projection``: the linear map LP-FT's probe trains."""
        return list(self.clip.visual_projection.parameters())

    def image_features(self, images: Tensor) -> Tensor:
        """Pooled vision features before the projection, ``[b, vision_hidden_size]``."""
        return self.clip.vision_model(pixel_values=images).pooler_output


_HF_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# PIL resampling codes (as stored in preprocessor_config.json) -> torchvision names.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{os.fspath(path)!r} is not readable JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)!r} should hold a JSON object")
    return data


def _edge(value: Any, where: str) -> int:
    """An image size from a preprocessor config: an int, or a dict with shortest_edge / height=width."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ValueError(f"{where}: unsupported image size {value!r} (expected an int, shortest_edge, or square height/width)")


class _ResizeCropTransform(ImageTransform):
    """ImageTransform whose resize (shorter side) and center-crop sizes differ, as CLIP
    image processors allow."""

    def __init__(self, resize: int, crop: int, mean, std, interpolation: str):
        super().__init__(crop, mean, std, interpolation)
        if not isinstance(resize, int) or resize < crop:
            raise ValueError(f"resize size {resize!r} must be an int >= the crop size {crop}")
        self.resize = resize

    def __call__(self, image):
        import torchvision.transforms.functional as TF

        from ..data.transforms import normalize_uint8, to_rgb

        image = to_rgb(image)
        image = TF.resize(image, self.resize, interpolation=self.interpolation, antialias=True)
        image = TF.center_crop(image, [self.image_size, self.image_size])
        return normalize_uint8(TF.pil_to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:
        return super().__repr__().replace("image_size=", f"resize={self.resize}, image_size=", 1)


def hf_image_transform(directory: str | os.PathLike, image_size: int) -> ImageTransform:
    """Eval transform from ``preprocessor_config.json`` (size, crop, mean, std, resample) if the
    directory has one, else resize/crop to ``image_size`` with CLIP's mean/std."""
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return ImageTransform(image_size, CLIP_MEAN, CLIP_STD)
    cfg = _read_json(path)
    where = os.fspath(path)
    crop = _edge(cfg["crop_size"], f"{where} crop_size") if cfg.get("do_center_crop", True) and "crop_size" in cfg else None
    resize = _edge(cfg["size"], f"{where} size") if "size" in cfg else (crop or image_size)
    crop = crop or resize
    mean = tuple(cfg.get("image_mean", CLIP_MEAN))
    std = tuple(cfg.get("image_std", CLIP_STD))
    resample = cfg.get("resample", 3)
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"{where}: unsupported resample {resample!r}")
    if crop != image_size:
        warnings.warn(f"{where}: crop size {crop} differs from the vision model's image_size {image_size}", stacklevel=2)
    if resize == crop:
        return ImageTransform(crop, mean, std, _PIL_RESAMPLE[resample])
    return _ResizeCropTransform(resize, crop, mean, std, _PIL_RESAMPLE[resample])


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    # transformers >= 4.56 calls it dtype (torch_dtype is deprecated); older releases only know torch_dtype.
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def load_hf_clip(
    directory: str | os.PathLike,
    topology: Topology | None = None,
    precision: str = "fp32",
    *,
    device: str | torch.device = "cpu",
    context_length: int | None = None,
    max_logit_scale: float | None = DEFAULT_MAX_LOGIT_SCALE,
) -> tuple[HFClipDualEncoder, TextTokenizer, ImageTransform]:
    """Load a Hugging Face CLIP directory (offline): ``(model, tokenizer, image_transform)``.

    The tokenizer is the directory's own (``AutoTokenizer``), wrapped in a
    :class:`TextTokenizer` with ``context_length = min(77, tokenizer max, model max positions)``
    unless given. The transform follows ``preprocessor_config.json`` when present.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{os.fspath(directory)!r} is not a Hugging Face model directory (no config.json)")
    model_type = _read_json(config_path).get("model_type")
    if model_type != "clip":
        raise ValueError(f"{os.fspath(config_path)!r} has model_type={model_type!r}; expected 'clip' (a CLIPModel)")
    if precision not in _HF_DTYPES:
        raise ValueError(f"precision must be one of {tuple(_HF_DTYPES)}, got {precision!r}")
    from transformers import AutoTokenizer, CLIPModel

    try:
        clip = CLIPModel.from_pretrained(str(directory), local_files_only=True, **_dtype_kwarg(_HF_DTYPES[precision]))
        hf_tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the CLIP model and tokenizer from {os.fspath(directory)!r}: {err}") from err
    clip.to(device)
    text_cfg = clip.config.text_config
    if context_length is None:
        limits = [DEFAULT_HF_CONTEXT_LENGTH, int(text_cfg.max_position_embeddings)]
        if getattr(hf_tok, "model_max_length", None):
            limits.append(int(hf_tok.model_max_length))
        context_length = min(limits)
    elif context_length > text_cfg.max_position_embeddings:
        raise ValueError(f"context_length={context_length} exceeds the text model's "
                         f"max_position_embeddings={text_cfg.max_position_embeddings}")
    tokenizer = TextTokenizer(hf_tok, context_length)
    if tokenizer.vocab_size > text_cfg.vocab_size:
        raise ValueError(f"{os.fspath(directory)!r}: tokenizer has {tokenizer.vocab_size} tokens, "
                         f"the text model only {text_cfg.vocab_size}")
    # The text tower pools at the first end token (config eos_token_id); a tokenizer ending
    # rows with another id would silently pool position 0.
    eos = text_cfg.eos_token_id
    if eos == 2:  # configs before transformers PR 24773: pools at the argmax id instead
        if tokenizer.sep_token_id != tokenizer.vocab_size - 1:
            warnings.warn(f"{os.fspath(directory)!r}: legacy eos_token_id=2 pools at the largest id, but the end token is "
                          f"{tokenizer.sep_token_id}, not the last vocabulary id", stacklevel=2)
    elif eos is not None and tokenizer.sep_token_id != eos:
        raise ValueError(f"{os.fspath(directory)!r}: the tokenizer's end token id {tokenizer.sep_token_id} differs from the "
                         f"text model's eos_token_id {eos}")
    transform = hf_image_transform(directory, int(clip.config.vision_config.image_size))
    return HFClipDualEncoder(clip, topology, max_logit_scale), tokenizer, transform


# ------------------------------------------------------------------------------- dispatcher

def load_pretrained(
    source: str | os.PathLike,
    *,
    model_name: str | None = None,
    topology: Topology | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any, Callable]:
    """Load ``(model, tokenizer, image_transform)`` from a pretrained model on disk.

    - a directory whose ``config.json`` has model_type "clip": Hugging Face CLIP;
    - a directory with ``open_clip_config.json``: OpenCLIP (``local-dir:``);
    - a weights file (.bin/.pt/.pth/.safetensors) plus ``model_name``: OpenCLIP;
    - a topoclip run, checkpoints or checkpoint directory (``topoclip.load_run``); it keeps
      its own topology.
    """
    # topoclip.runs builds on this module (a fine-tuning run's source is an OpenCLIP or HF
    # model), so it is imported when a run is actually opened.
    from topoclip import runs

    path = Path(source)
    where = os.fspath(path)
    if not path.exists():
        raise ValueError(f"pretrained source {where!r} does not exist (expected a model directory or weights file)")
    if runs.is_run(path):
        loaded = runs.load_run(path, device=device)
        if topology is not None and topology.name != loaded.topology.name:
            raise ValueError(f"{where}: a topoclip model keeps its topology ({loaded.topology.name}), got {topology.name}")
        return loaded.model, loaded.tokenizer, loaded.transform
    if path.is_dir():
        if (path / "config.json").is_file():
            if model_name is not None:
                raise ValueError(f"{where!r} is a Hugging Face directory; model_name={model_name!r} does not apply")
            return load_hf_clip(path, topology, precision, device=device)
        if (path / "open_clip_config.json").is_file():
            return load_openclip(f"local-dir:{where}", None, topology, precision, device=device)
        raise ValueError(
            f"{where!r} is neither a Hugging Face CLIP directory (config.json), an OpenCLIP directory "
            f"(open_clip_config.json) nor a topoclip checkpoint"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{where!r}: expected a weights file ({', '.join(WEIGHT_SUFFIXES)}) or a model directory")
    if model_name is None:
        raise ValueError(f"{where!r} is a weights file: give the OpenCLIP model_name (architecture) it belongs to")
    return load_openclip(model_name, path, topology, precision, device=device)
