"""Text tokenizer: a WordPiece trained on the captions, or any Hugging Face tokenizer on disk.

Output layout (what the text towers rely on): ``input_ids[:, 0]`` is ALWAYS the start/[CLS]
token, then the text tokens, then the end/[SEP] token, then padding with ``pad_token_id``;
texts longer than ``context_length`` lose tokens from the end of the text but keep the end
token. ``attention_mask`` is 1 on start, text and end tokens, 0 on padding.

We assemble that layout ourselves from the tokenizer's raw (special-token-free) ids rather
than trusting each tokenizer's own post-processor, so the layout is identical for our
WordPiece, BERT, CLIP or GPT-style tokenizers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from topoclip.atomic import atomic_write_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first -> id 0
SETTINGS_FILE = "topoclip_tokenizer.json"
TOKENIZER_FILE = "tokenizer.json"
_FORMAT_VERSION = 1
# Used when a Hugging Face directory is loaded without a context length: CLIP's length, capped
# by what the tokenizer declares it supports.
DEFAULT_HF_CONTEXT_LENGTH = 77


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for start and end tokens), got {context_length!r}")
    return context_length


class TextTokenizer:
    """Batch tokenizer: ``tok(texts) -> dict(input_ids=LongTensor[b,L], attention_mask=LongTensor[b,L])``.

    Wraps a ``tokenizers.Tokenizer`` (the one ``build_tokenizer`` trains) or a Hugging Face
    ``PreTrainedTokenizerBase``. Attributes: ``vocab_size``, ``pad_token_id``, ``cls_token_id``,
    ``sep_token_id``, ``context_length``.
    """

    def __init__(
        self,
        tokenizer,
        context_length: int = 32,
        *,
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        pad_token: str = "[PAD]",
    ) -> None:
        self.context_length = _check_context_length(context_length)
        self._tok = tokenizer
        if isinstance(tokenizer, Tokenizer):
            self._backend = "tokenizers"
            ids = {}
            for field, token in (("cls_token", cls_token), ("sep_token", sep_token), ("pad_token", pad_token)):
                tid = tokenizer.token_to_id(token)
                if tid is None:
                    raise ValueError(f"{field} {token!r} is not in the tokenizer's vocabulary")
                ids[field] = tid
            self.cls_token_id, self.sep_token_id, self.pad_token_id = ids["cls_token"], ids["sep_token"], ids["pad_token"]
            self._special = {"cls_token": cls_token, "sep_token": sep_token, "pad_token": pad_token}
            self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        elif hasattr(tokenizer, "convert_tokens_to_ids") and callable(tokenizer):
            self._backend = "transformers"
            # BERT-style tokenizers call them CLS/SEP, GPT/CLIP-style BOS/EOS.
            start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
            end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
            if start is None or end is None:
                raise ValueError(
                    f"tokenizer {type(tokenizer).__name__} needs a start token (cls or bos) and an end token "
                    f"(sep or eos); got start={start}, end={end}"
                )
            pad = tokenizer.pad_token_id
            if pad is None:
                # Padding positions are masked out, so any id works; the end token is what
                # GPT/CLIP-style tokenizers conventionally pad with.
                pad = end
            self.cls_token_id, self.sep_token_id, self.pad_token_id = int(start), int(end), int(pad)
            self._special = {}
            self.vocab_size = len(tokenizer)
        else:
            raise ValueError(
                f"tokenizer must be a tokenizers.Tokenizer or a transformers tokenizer, got {type(tokenizer).__name__}"
            )

    # -- encoding -----------------------------------------------------------------------------
    def _raw_ids(self, texts: list[str]) -> list[list[int]]:
        if self._backend == "tokenizers":
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
        L = self.context_length
        input_ids = np.full((len(texts), L), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(texts), L), dtype=np.int64)
        input_ids[:, 0] = self.cls_token_id
        for row, ids in enumerate(self._raw_ids(texts) if texts else []):
            ids = ids[: L - 2]  # keep room for the end token: truncation never drops it
            n = len(ids)
            input_ids[row, 1 : 1 + n] = ids
            input_ids[row, 1 + n] = self.sep_token_id
            attention_mask[row, : n + 2] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}

    def encode(self, text: str) -> list[int]:
        """Ids of one text with start/end tokens, without padding."""
        out = self([text])
        return out["input_ids"][0][out["attention_mask"][0].bool()].tolist()

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if skip_special_tokens:
            drop = {self.cls_token_id, self.sep_token_id, self.pad_token_id}
            ids = [i for i in ids if i not in drop]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def unknown_token_id(self) -> int | None:
        """Id of the unknown token, if the tokenizer has one (useful to check vocabulary coverage)."""
        if self._backend == "tokenizers":
            return self._tok.token_to_id("[UNK]")
        return self._tok.unk_token_id

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (or the HF files) plus ``topoclip_tokenizer.json`` settings."""
        settings = {
            "format_version": _FORMAT_VERSION,
            "backend": self._backend,
            "context_length": self.context_length,
            **self._special,
        }

        def write(tmp: Path) -> None:
            if self._backend == "tokenizers":
                self._tok.save(str(tmp / TOKENIZER_FILE))
            else:
                self._tok.save_pretrained(str(tmp))
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")

        # All files or none: a kill between the vocabulary and the settings would leave a
        # directory that later loads fail on with a misleading message.
        atomic_write_dir(directory, write)

    @classmethod
    def load(cls, directory: str | os.PathLike, context_length: int | None = None) -> "TextTokenizer":
        """Load a tokenizer saved by ``save``, or any Hugging Face tokenizer directory (offline).

        ``context_length`` overrides the saved one; for a plain HF directory it defaults to
        ``min(77, tokenizer.model_max_length)``.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"tokenizer directory {os.fspath(directory)!r} does not exist")
        settings_path = directory / SETTINGS_FILE
        settings: dict = {}
        if settings_path.is_file():
            try:
                settings = json.loads(settings_path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{os.fspath(settings_path)!r} is not valid JSON: {err}") from err
            if settings.get("format_version") != _FORMAT_VERSION:
                raise ValueError(
                    f"{os.fspath(settings_path)!r}: unsupported format_version {settings.get('format_version')!r}"
                )
        if settings.get("backend") == "tokenizers":
            tok = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
            return cls(
                tok,
                context_length if context_length is not None else int(settings["context_length"]),
                cls_token=settings.get("cls_token", "[CLS]"),
                sep_token=settings.get("sep_token", "[SEP]"),
                pad_token=settings.get("pad_token", "[PAD]"),
            )
        # Imported here: transformers is heavy and only needed for foreign tokenizers.
        from transformers import AutoTokenizer

        try:
            # Never run a directory's own Python (an auto_map in tokenizer_config.json), and
            # never ask: batch jobs have no stdin to answer a prompt.
            hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{os.fspath(directory)!r} holds neither a topoclip tokenizer nor a Hugging Face tokenizer: {err}"
            ) from err
        if context_length is None:
            context_length = settings.get("context_length")
        if context_length is None:
            max_len = getattr(hf, "model_max_length", None) or DEFAULT_HF_CONTEXT_LENGTH
            context_length = int(min(DEFAULT_HF_CONTEXT_LENGTH, max_len))
        return cls(hf, context_length)

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(backend={self._backend!r}, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length})"
        )


def _whole_word_vocab(texts, normalizer, pre_tokenizer, vocab_size: int, min_frequency: int) -> dict[str, int] | None:
    """A deterministic WordPiece vocabulary when every word fits: the special tokens, every
    character (alone and as a ##continuation, so unseen words still tokenise), then the
    words by descending count and alphabetically. None when the corpus is too large for it.

    The library's trainer breaks merge ties in hash-map order, so the same captions could give
    different vocabularies (and so different models) from run to run; small caption sets, like
    the embedded data's, get this exact, reproducible vocabulary instead.
    """
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for word in counts for c in word})
    words = sorted((w for w, c in counts.items() if c >= min_frequency and len(w) > 1), key=lambda w: (-counts[w], w))
    tokens = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars] + words
    if len(tokens) > vocab_size:
        return None
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    context_length: int = 32,
    min_frequency: int = 1,
) -> TextTokenizer:
    """Train a lower-casing BERT-style WordPiece on ``texts`` ([PAD]=0, [UNK], [CLS], [SEP], [MASK])."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int > {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    _check_context_length(context_length)
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("texts must contain at least one non-empty string to train the tokenizer on")

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = _whole_word_vocab(texts, normalizer, pre_tokenizer, vocab_size, min_frequency)
    if vocab is not None:
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    if vocab is None:
        # Large corpora: the library's WordPiece trainer. Its merges break ties in hash-map
        # order, so two builds can differ; a run saves its tokenizer, and resume reloads it.
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
        tok.train_from_iterator(texts, trainer=trainer)
    # The saved tokenizer.json should also work on its own (e.g. with transformers), so give
    # it the usual BERT post-processor; TextTokenizer itself does not rely on it.
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return TextTokenizer(tok, context_length)
