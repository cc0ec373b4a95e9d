"""Grad-CAM overlays (Fig. 5 of *Design of the topology for contrastive visual-textual alignment*) for a few test pairs of a run, for its analysis and report.

Per pair, ``explain_pair`` writes the maps of the final matching score over image patches and
text tokens and, for a multi-token model, of its best-aligned tokens' own scores, plus one
``figure.png`` with all of them (the one the report embeds; the separate PNGs stay on disk).

    RUN_DIR/analysis/gradcam/pair0/{figure,full_image,full_text,token3_image,...}.png
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Sequence

import torch

from topoclip.eval.attribution import explain_pair
from topoclip.eval.embed import eval_mode

__all__ = ["GRADCAM_DIR", "best_tokens", "write_gradcam_overlays"]

logger = logging.getLogger(__name__)

GRADCAM_DIR = Path("analysis") / "gradcam"  # relative to the run directory


@torch.no_grad()
def best_tokens(model, tokenizer, image: torch.Tensor, caption: str, count: int) -> list[int]:
    """The ``count`` tokens (blocks) whose own score ``u_k . v_k`` is highest for this pair."""
    device = next(model.parameters()).device
    tokens = tokenizer([caption])
    with eval_mode(model):
        u = model.topology.blocks(model.encode_image(image.unsqueeze(0).to(device)))[0]
        v = model.topology.blocks(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)))[0]
    return (u * v).sum(-1).topk(min(count, u.shape[0])).indices.tolist()


def write_gradcam_overlays(
    model, tokenizer, pairs, run_dir: str | Path, count: int, tokens: int,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
) -> list[dict]:
    """Overlays of the first ``count`` (image, caption) ``pairs`` under ``run_dir/analysis/gradcam``.

    ``tokens`` individual tokens' maps per pair when the model has several [CLS] tokens (a
    single-token oblique model's blocks are not tokens and get none). Returns, per pair,
    ``{caption, tokens, figure, files}`` with paths relative to ``run_dir``. Earlier overlays
    are removed first so a smaller ``count`` leaves no stale files.
    """
    run_dir = Path(run_dir)
    out = run_dir / GRADCAM_DIR
    shutil.rmtree(out, ignore_errors=True)
    entries = []
    for i in range(min(count, len(pairs))):
        image, caption = pairs[i]
        blocks = best_tokens(model, tokenizer, image, caption, tokens) if model.num_tokens > 1 and tokens > 0 else []
        try:
            paths = explain_pair(model, image, caption, tokenizer, out / f"pair{i}", blocks=blocks, mean=mean, std=std)
        except ValueError as err:  # towers Grad-CAM cannot read (not a timm ViT + BERT): no overlays
            logger.warning("Grad-CAM overlays skipped: %s", err)
            return []
        entries.append({
            "caption": caption,
            "tokens": [int(k) for k in blocks],
            "figure": str(paths["figure"].relative_to(run_dir)),
            "files": sorted(str(p.relative_to(run_dir)) for p in paths.values()),
        })
    return entries
