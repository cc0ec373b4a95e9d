"""Text tokenizer: layout (start token, padding, truncation), save/load, Hugging Face directories."""

from __future__ import annotations

import inspect
import json
import pickle

import pytest
import torch

from topoclip.data.tokenizer import SETTINGS_FILE, TextTokenizer, build_tokenizer

CAPTIONS = [
    "a small red circle on the left",
    "a picture of a blue square",
    "there is a large green triangle at the top",
    "a red circle and a blue square",
] * 20


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CAPTIONS, vocab_size=200, context_length=10)


def vocab_id(t: TextTokenizer, token: str) -> int:
    return t._tok.token_to_id(token)


def test_special_token_ids(tok):
    assert tok.pad_token_id == 0  # [PAD] first
    assert [vocab_id(tok, s) for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert tok.cls_token_id == 2 and tok.sep_token_id == 3 and tok.unknown_token_id() == 1
    assert tok.context_length == 10 and tok.vocab_size == tok._tok.get_vocab_size()


def test_layout_against_vocabulary(tok):
    out = tok(["a red circle", "A RED Circle", "", "a zebra"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == (4, 10) == mask.shape
    words = [vocab_id(tok, w) for w in ("a", "red", "circle")]
    assert None not in words  # whole words of the training text are in the vocabulary
    expected = [2, *words, 3] + [0] * 5
    assert ids[0].tolist() == expected
    assert mask[0].tolist() == [1] * 5 + [0] * 5
    assert torch.equal(ids[1], ids[0])  # lower-cased
    assert ids[2].tolist() == [2, 3] + [0] * 8 and mask[2].sum() == 2
    # A word made of unseen letters cannot be spelled with the learned pieces -> [UNK].
    assert ids[3, 1] == vocab_id(tok, "a") and ids[3, 2] == tok.unknown_token_id()
    assert (ids[:, 0] == tok.cls_token_id).all()


def test_truncation_keeps_end_token(tok):
    long = "a small red circle on the left and a large blue square at the top"
    out = tok([long])
    ids, mask = out["input_ids"][0], out["attention_mask"][0]
    full = [vocab_id(tok, w) for w in long.split()]
    assert ids.tolist() == [2, *full[:8], 3]
    assert mask.tolist() == [1] * 10
    assert tok.decode(ids) == "a small red circle on the left and"  # 8 = 10 - 2 text tokens


def test_single_string_and_encode(tok):
    assert torch.equal(tok("a red circle")["input_ids"], tok(["a red circle"])["input_ids"])
    assert tok.encode("a red circle") == [2, vocab_id(tok, "a"), vocab_id(tok, "red"), vocab_id(tok, "circle"), 3]
    with pytest.raises(TypeError):
        tok(["ok", 3])


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    settings = json.loads((tmp_path / "tok" / SETTINGS_FILE).read_text())
    assert settings["context_length"] == 10 and settings["backend"] == "tokenizers"
    loaded = TextTokenizer.load(tmp_path / "tok")
    texts = CAPTIONS[:4] + ["an unseen zebra", "", "a small red circle on the left and a large blue square"]
    a, b = tok(texts), loaded(texts)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert (loaded.vocab_size, loaded.pad_token_id, loaded.cls_token_id) == (tok.vocab_size, 0, 2)
    longer = TextTokenizer.load(tmp_path / "tok", context_length=16)
    assert longer(["a red circle"])["input_ids"].shape == (1, 16)
    # Pickles (DataLoader workers get a copy of the collate function and its tokenizer).
    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again(texts)["input_ids"], a["input_ids"])


def test_saved_tokenizer_json_is_usable_on_its_own(tok, tmp_path):
    # Other tools reading tokenizer.json get the same [CLS] ... [SEP] layout.
    from tokenizers import Tokenizer

    tok.save(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.encode("a red circle").ids == tok.encode("a red circle")


def test_hf_tokenizer_directory(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square", "##s", "big"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary file as `vocab`, earlier releases as `vocab_file`.
    arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    hf = BertTokenizerFast(**{arg: str(tmp_path / "vocab.txt")}, do_lower_case=True)
    assert len(hf) == len(vocab)
    hf.save_pretrained(tmp_path / "hf")
    t = TextTokenizer.load(tmp_path / "hf", context_length=8)
    idx = {w: i for i, w in enumerate(vocab)}
    assert (t.cls_token_id, t.sep_token_id, t.pad_token_id) == (idx["[CLS]"], idx["[SEP]"], idx["[PAD]"])
    assert t.vocab_size == len(vocab)
    out = t(["A red circle", "big blue squares zebra", "a a a a a a a a a a"])
    assert out["input_ids"][0].tolist() == [2, 5, 6, 7, 3, 0, 0, 0]
    assert out["input_ids"][1].tolist() == [2, 11, 8, 9, 10, 1, 3, 0]  # word pieces, unknown word
    assert out["input_ids"][2].tolist() == [2] + [5] * 6 + [3]  # truncated, end token kept
    assert out["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 7 + [0], [1] * 8]
    # Saving a wrapped HF tokenizer and loading it again keeps ids and context length.
    t.save(tmp_path / "again")
    t2 = TextTokenizer.load(tmp_path / "again")
    assert t2.context_length == 8 and torch.equal(t2(["a big red square"])["input_ids"], t(["a big red square"])["input_ids"])
    # Without a context length, a plain HF directory gets min(77, model_max_length).
    assert TextTokenizer.load(tmp_path / "hf").context_length == 77


_LOAD_WITHOUT_STDIN = """
import sys
from topoclip.data import TextTokenizer
try:
    t = TextTokenizer.load(sys.argv[1], context_length=8)
    print("loaded", type(t._backend).__name__ if hasattr(t, "_backend") else "")
except ValueError as err:
    print("refused", err)
"""


def test_a_tokenizer_directory_s_own_code_is_never_run_nor_asked_about(tmp_path):
    """An auto_map in tokenizer_config.json asks transformers to import the directory's Python;
    topoclip loads with trust_remote_code=False: no prompt (stdin is closed here), no code run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    BertTokenizerFast(**{arg: str(tmp_path / "vocab.txt")}).save_pretrained(tmp_path / "evil")
    marker = tmp_path / "code-ran"
    (tmp_path / "evil" / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import BertTokenizerFast as EvilTokenizer\n")
    config_file = tmp_path / "evil" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    config_file.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_STDIN, str(tmp_path / "evil")], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert not marker.exists(), proc.stdout + proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr  # transformers' prompt, shown when the flag is left out
    assert proc.stdout.startswith(("loaded", "refused")), proc.stdout + proc.stderr
    if proc.stdout.startswith("refused"):
        assert str(tmp_path / "evil") in proc.stdout


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(context_length=1), "context_length"),
        (dict(context_length=8.0), "context_length"),
        (dict(vocab_size=3), "vocab_size"),
        (dict(min_frequency=0), "min_frequency"),
    ],
)
def test_build_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_tokenizer(CAPTIONS, **kwargs)


def test_build_needs_text():
    with pytest.raises(ValueError, match="texts"):
        build_tokenizer(["", "   "])
    with pytest.raises(ValueError, match="texts"):
        build_tokenizer("a single string")


def test_load_errors_name_the_directory(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        TextTokenizer.load(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("not a tokenizer")
    with pytest.raises(ValueError, match="junk"):
        TextTokenizer.load(tmp_path / "junk")


def test_build_is_deterministic_and_covers_unseen_words():
    from topoclip.data.tokenizer import build_tokenizer

    captions = ["a small red circle on the left", "a large blue square", "two red circles", "a blue ring at the top"] * 3
    first = build_tokenizer(captions, vocab_size=200, context_length=12)
    for _ in range(4):
        again = build_tokenizer(captions, vocab_size=200, context_length=12)
        assert again._tok.get_vocab() == first._tok.get_vocab()
    ids = first(["a red circle", "a purple circle"])["input_ids"]
    assert first.unknown_token_id() not in ids[0].tolist()
    assert first.unknown_token_id() not in ids[1].tolist()  # "purple" spelled from characters
