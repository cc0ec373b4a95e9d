"""Command line: ``topoclip train``, ``topoclip eval`` and ``topoclip data convert``.

    topoclip train [--config configs/X.yaml] [--resume [RUN_DIR]] [key=value ...]
    topoclip eval --checkpoint RUN_DIR_OR_CHECKPOINT [--data key=value ...] [--folder DIR ...]
                  [--karpathy JSON --image-root DIR] [--output FILE]
    topoclip data convert (--csv FILE | --shapes [key=value ...]) --out DIR [--maxcount N]

The parsed arguments are turned into an ``ExperimentConfig`` (or a few plain values) right
away; nothing below this module sees an argparse namespace.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

_DEBUG_ENV = "TOPOCLIP_DEBUG"  # set to 1 to get tracebacks instead of one-line errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topoclip",
        description="Contrastive image-text alignment with the embedding topology as a design choice.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser(
        "train",
        help="train a dual encoder from a YAML config, then evaluate it",
        description=(
            "Train a dual encoder from a YAML experiment config (default configs/default.yaml), "
            "write checkpoints, logs and results.json into the run directory, and print a "
            "summary. Any config field can be overridden as dotted key=value, "
            "e.g. optim.lr=1e-3 topology.name=sphere topology.dim=128."
        ),
    )
    train.add_argument("--config", type=Path, default=None, help="YAML experiment config (default: configs/default.yaml)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue from the latest checkpoint: of RUN_DIR (its saved config is used), "
        "or, without a value, of the config's run directory (same as train.resume=true)",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: zero-shot classification and retrieval",
        description=(
            "Evaluate a trained model: by default on the zero-shot tasks and the retrieval set of the "
            "embedded data it was trained on; with --folder / --karpathy on image folders and a "
            "Karpathy-style retrieval set instead."
        ),
    )
    ev.add_argument(
        "--checkpoint", required=True, type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory/file"
    )
    ev.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="key=value",
        help="data overrides on the checkpoint's data config, e.g. data.noise=0.0 (default: the data it was trained on)",
    )
    ev.add_argument(
        "--folder",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="zero-shot classification on an image folder (one sub-folder per class); repeatable",
    )
    ev.add_argument("--karpathy", type=Path, default=None, metavar="JSON", help="retrieval on a Karpathy-style JSON (COCO/Flickr30k)")
    ev.add_argument("--image-root", type=Path, default=None, metavar="DIR", help="directory of the --karpathy images")
    ev.add_argument("--split", default="test", help="split of the --karpathy JSON (default: test)")
    ev.add_argument("--output", type=Path, default=None, help="results JSON (default: eval_results.json in the run dir)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    ev.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: from the config)")

    data = sub.add_parser("data", help="data utilities: convert pairs into webdataset shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    convert = data_sub.add_parser(
        "convert",
        help="write webdataset tar shards (image + caption per sample)",
        description=(
            "Write webdataset shards from a CSV/TSV of (image path, caption) pairs, keeping the "
            "original image bytes, or from the embedded shapes generator (PNG). Shard names are "
            "OUT/shard-NNNNNN.tar."
        ),
    )
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, metavar="FILE", help="CSV/TSV with a header row (OpenCLIP layout)")
    source.add_argument("--shapes", action="store_true", help="the embedded captioned-shapes data")
    convert.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    convert.add_argument("--maxcount", type=int, default=10000, help="samples per shard (default 10000)")
    convert.add_argument("--sep", default="\t", help="CSV separator (default: tab)")
    convert.add_argument("--image-key", default="filepath", help="CSV column of image paths")
    convert.add_argument("--caption-key", default="title", help="CSV column of captions")
    convert.add_argument("--image-root", type=Path, default=None, help="root of relative image paths (default: the CSV's folder)")
    convert.add_argument("--split", default="train", help="shapes split to write (train/val/test)")
    convert.add_argument("overrides", nargs="*", metavar="key=value", help="shapes settings, e.g. num_train=5000 noise=0.1")
    return parser


def _fail(command: str, err: Exception, code: int) -> int:
    if os.environ.get(_DEBUG_ENV):
        raise err
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"topoclip {command}: error: {message}", file=sys.stderr)
    return code


def _train(args: argparse.Namespace) -> int:
    from topoclip.train.config import load_config, run_config_path
    from topoclip.train import experiment

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).is_dir():
        # `--resume key=value`: argparse took the first override for the optional RUN_DIR.
        args.overrides.insert(0, args.resume)
        args.resume = True
    try:
        if isinstance(args.resume, str):
            run_dir = Path(args.resume)
            config = load_config(run_config_path(run_dir), list(args.overrides) + ["train.resume=true"])
        else:
            overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
            config = load_config(args.config, overrides)
            run_dir = None
    except ValueError as err:
        return _fail("train", err, 2)
    try:
        experiment.run(config, run_dir=run_dir)
    except ValueError as err:
        return _fail("train", err, 1)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from topoclip.train import experiment

    try:
        experiment.evaluate_checkpoint(
            args.checkpoint,
            data_overrides=args.data,
            output=args.output,
            device=args.device,
            batch_size=args.batch_size,
            folders=args.folder,
            karpathy=args.karpathy,
            image_root=args.image_root,
            split=args.split,
        )
    except ValueError as err:
        return _fail("eval", err, 2)
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    from topoclip.data.shards import files_to_samples, tensor_pairs_to_samples, write_shards

    try:
        if args.csv is not None:
            from topoclip.data.pairs import CsvPairs

            sep = args.sep.encode().decode("unicode_escape")  # "\t" on the command line -> tab
            pairs = CsvPairs(args.csv, args.image_root, sep=sep, image_key=args.image_key, caption_key=args.caption_key)
            samples = files_to_samples(pairs.image_paths, pairs.captions)
            count = len(pairs)
        else:
            from topoclip.data.shapes import make_shapes
            from topoclip.train.dataclass_io import parse_override

            settings = {}
            for text in args.overrides:
                keys, value = parse_override(text)
                settings[".".join(keys)] = value
            data = make_shapes(None, **settings)
            split = data.split(args.split)
            samples = tensor_pairs_to_samples(split.images, split.captions)
            count = len(split)
        paths = write_shards(samples, args.out, maxcount=args.maxcount)
    except (ValueError, OSError) as err:
        return _fail("data convert", err, 2)
    print(f"wrote {count} samples into {len(paths)} shards in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "data":
        return _data_convert(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
