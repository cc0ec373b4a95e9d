"""Batch collation for training pairs: stack images, tokenize captions in one batched call."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PairCollate:
    """``[(image [3,H,W], caption), ...] -> dict(images [b,3,H,W], input_ids, attention_mask)``.

    A class rather than a closure so DataLoader can pickle it into worker processes.
    """

    def __init__(self, tokenizer, trim_padding: bool = False) -> None:
        if not callable(tokenizer):
            raise ValueError(f"tokenizer must be callable (a TextTokenizer), got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        # Cut the columns that are padding in every caption of the batch: a text tower that
        # masks padding gives the same [CLS] output for them, at a fraction of the cost (the
        # shapes captions fill 20 of 24 positions at most). Only for towers whose positions
        # are not a fixed-size table (topoclip's own, not OpenCLIP's).
        self.trim_padding = bool(trim_padding)

    def __call__(self, batch: Sequence[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        if len(batch) == 0:
            raise ValueError("cannot collate an empty batch")
        for item in batch:
            if not (isinstance(item, (tuple, list)) and len(item) == 2
                    and isinstance(item[0], torch.Tensor) and isinstance(item[1], str)):
                raise ValueError(f"batch items must be (image tensor, caption str) pairs, got {type(item).__name__}")
        images, captions = zip(*batch)
        tokens = self.tokenizer(list(captions))
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if self.trim_padding:
            used = max(int(mask.sum(1).max()), 1)
            ids, mask = ids[:, :used].contiguous(), mask[:, :used].contiguous()
        return {"images": torch.stack(images, 0), "input_ids": ids, "attention_mask": mask}


def make_collate(tokenizer, trim_padding: bool = False) -> PairCollate:
    """Collate function for a DataLoader over pair datasets (see ``PairCollate``)."""
    return PairCollate(tokenizer, trim_padding)
