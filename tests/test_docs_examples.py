"""Every `topoclip` command in the README and docs/ parses as written, and every training or
fine-tuning command's config validates as written (the natural forms: `topology.name=sphere
topology.dim=128`, `train.steps=N` on a fine-tuning config). Commands that need files that
only a user has (weights, a run, pairs) are checked up to their config."""

import re
import shlex
from pathlib import Path

import pytest

from topoclip.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands() -> list[tuple[str, str]]:
    """(page, command) for each `topoclip ...` line of a bash block (continuations joined,
    comments dropped)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("topoclip "):
                    found.append((page.name, line))
    return found


COMMANDS = commands()


def test_the_pages_hold_commands():
    assert len(COMMANDS) >= 20 and any(c.startswith("topoclip train") for _, c in COMMANDS)


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_a_documented_command_parses_and_its_config_validates(page, command, monkeypatch, tmp_path):
    import json

    from topoclip.config import load_config, load_finetune_config

    # A working directory as the pages assume one: the checkout's configs, and the shards that
    # the page's `topoclip data convert` line wrote just before (their recorded count).
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "sizes.json").write_text(json.dumps({"shard-000000.tar": 1000}))
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)[1:]
    # [--max 131072]-style optional parts of a usage line: the command without them.
    argv = [a for a in argv if not (a.startswith("[") or a.endswith("]"))]
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.resume is None:
        load_config(args.config, args.overrides)
    elif args.command == "finetune" and args.resume is None:
        extra = [f"source.path={args.source}"] if args.source else []
        extra += [f"finetune.method={args.method}"] if args.method else []
        if args.model_name:
            extra.append(f"source.model_name={args.model_name}")
        load_finetune_config(args.config, extra + list(args.overrides))


def _help_overrides(command: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return [o.rstrip(".") for o in re.findall(r"\b[a-z_]+(?:\.[a-z_0-9]+)+=[^\s,)]+", sub.description or "")]


def test_the_overrides_in_the_help_texts_validate(monkeypatch):
    from topoclip.config import load_config, load_finetune_config

    monkeypatch.chdir(ROOT)
    train, finetune = _help_overrides("train"), _help_overrides("finetune")
    assert "topology.name=sphere" in train and "train.steps=200" in finetune
    load_config(None, train)
    load_finetune_config(None, finetune)  # train.steps on a config that counts epochs
