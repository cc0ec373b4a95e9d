"""Command line: ``topoclip train``, ``topoclip eval`` and ``topoclip data convert``.

    topoclip train [--config configs/X.yaml] [--resume [RUN_DIR]] [key=value ...]
    topoclip eval --checkpoint RUN_DIR_OR_CHECKPOINT [--data key=value ...] [--folder DIR ...]
                  [--karpathy JSON --image-root DIR] [--suite FILE] [--output FILE]
    topoclip data convert (--csv FILE | --shapes [key=value ...]) --out DIR [--maxcount N]
    topoclip data digits --out DIR
    topoclip finetune --from PATH [--model-name NAME] [--method M] [--config F] [key=value ...]
    topoclip finetune-demo [--out DIR] [--seeds K] [--full] [--temperatures TAU ...] [key=value ...]
    topoclip ablate --grid configs/ablation/X.yaml [--out DIR] [--list] [key=value ...]
    topoclip report RUN_OR_GRID_DIR [--output FILE]
    topoclip bench loss|max-batch|train-step|gpu [options]

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
            "Karpathy-style retrieval set, or with --suite on the datasets of a suite file. Writes "
            "the results JSON and the same as CLIP_benchmark records (.jsonl beside it)."
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
        help="data overrides on the checkpoint's data config, e.g. data.shapes.noise=0.0 (default: the data it was trained on)",
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
    ev.add_argument("--suite", type=Path, default=None, metavar="FILE",
                    help="evaluate on a suite file instead: a YAML/JSON list of {name, task, data} "
                    "(zeroshot / retrieval / linear_probe on your folders, CSVs or Karpathy JSONs)")
    ev.add_argument("--output", type=Path, default=None, help="results JSON (default: eval_results.json in the run dir)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    ev.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: from the config)")

    data = sub.add_parser("data", help="data utilities: convert pairs into webdataset shards, write the digits example")
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
    convert.add_argument("--no-shuffle", action="store_true",
                         help="keep the input order (default: a seeded shuffle, so that a file sorted by class "
                         "does not give batches of one class)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    convert.add_argument("overrides", nargs="*", metavar="key=value", help="shapes settings, e.g. num_train=5000 noise=0.1")
    digits = data_sub.add_parser(
        "digits",
        help="write scikit-learn's 1,797 handwritten digits as PNGs, CSVs, class folders and a suite",
        description=(
            "Real images to try topoclip on, written as your own data would be: DIR/images/*.png, "
            "DIR/train.tsv and DIR/test.tsv (filepath, title, label), class folders DIR/train/ and "
            "DIR/test/, classnames.txt, templates.json and suite.yaml (zero-shot, retrieval, linear probe). "
            "Needs scikit-learn, which ships the digits: nothing is downloaded."
        ),
    )
    digits.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    digits.add_argument("--test-fraction", type=float, default=0.3, help="stratified test split (default 0.3)")
    digits.add_argument("--seed", type=int, default=0, help="seed of the split and the captions' phrasing")
    _add_finetune_parser(sub)
    _add_finetune_demo_parser(sub)
    _add_ablate_parsers(sub)
    _add_bench_parsers(sub)
    return parser


def _add_finetune_parser(sub) -> None:
    ft = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model (FT, m2/m3-Mix, WiSE-FT, embedding shift) and evaluate it",
        description=(
            "Fine-tune a pretrained dual encoder -- a topoclip run, an OpenCLIP weights file "
            "(with --model-name) or directory, or a Hugging Face CLIP directory -- on the "
            "embedded shapes data (by default a shifted distribution: light backgrounds), then "
            "evaluate it on that distribution and on the original one. Any field of the "
            "fine-tuning config can be overridden as dotted key=value, e.g. optim.lr=1e-4 "
            "finetune.mixup.m2=0.05 train.steps=200."
        ),
    )
    ft.add_argument("--from", dest="source", type=Path, default=None, metavar="PATH",
                    help="the pretrained model: topoclip run/checkpoint dir, OpenCLIP weights file or dir, HF CLIP dir")
    ft.add_argument("--model-name", default=None, help="OpenCLIP architecture of a weights file, e.g. ViT-B-32")
    ft.add_argument("--method", default=None, help="ft, m2mix, vmix, lmix, vlmix, m3mix, wise-ft or embedding-shift (default: ft)")
    ft.add_argument("--config", type=Path, default=None, help="YAML fine-tuning config (default: built-in defaults, see configs/finetune.yaml)")
    ft.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue a fine-tuning run from its latest checkpoint")
    ft.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")


def _add_finetune_demo_parser(sub) -> None:
    demo = sub.add_parser(
        "finetune-demo",
        help="pretrain on the shapes, fine-tune on a shifted distribution with every method over seeds, judge the claims",
        description=(
            "The robust fine-tuning demonstration on the embedded data: pretrain on dark-background "
            "shapes, fine-tune on light-background shapes with FT, m2-Mix (geodesic and linear), m3-Mix, "
            "LP-FT, LP-FT w/ m2-Mix, WiSE-FT, WiSE-FT w/ m2-Mix and the embedding shift over --seeds "
            "fine-tuning seeds, evaluate everything on both distributions, and check the paper's claims "
            "against the spread over random seeds. Writes OUT/table.md and OUT/table.json; finished stages are reused. "
            "The default takes about 10 minutes on 2 CPU cores; --full runs the larger documented one."
        ),
    )
    demo.add_argument("--out", type=Path, default=Path("runs/finetune-demo"), help="output directory (default: runs/finetune-demo)")
    demo.add_argument("--pretrain-steps", type=int, default=None, help="steps of pretraining (default 500; --full 900)")
    demo.add_argument("--steps", type=int, default=None, help="steps of each fine-tuning run (default 40; --full 300)")
    demo.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per method (default 3)")
    demo.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate (default 3e-4)")
    # One comma-separated value, so that key=value overrides after it stay overrides.
    demo.add_argument("--temperatures", type=_float_list, default=None, metavar="TAU,TAU,...",
                      help="also fine-tune FT and m2-Mix at these fixed temperatures, for ECE against tau "
                      "(default none; --full 0.01,0.03,0.07,0.1)")
    demo.add_argument("--full", action="store_true",
                      help="the documented full demo: 900 pretraining and 300 fine-tuning steps, 20000 training "
                      "and 1000 test pairs, 3 seeds, the temperature sweep")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="fine-tuning config overrides, e.g. finetune.mixup.m2=0.05")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.01,0.07, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _finetune_demo(args: argparse.Namespace) -> int:
    from topoclip.recipes.finetune_demo import FULL, run_demo

    sizes = dict(FULL) if args.full else {"pretrain_steps": 500, "finetune_steps": 40, "seeds": 3, "num_train": None,
                                          "num_test": 500, "temperatures": ()}
    for flag, key in (("pretrain_steps", "pretrain_steps"), ("steps", "finetune_steps"), ("seeds", "seeds"),
                      ("temperatures", "temperatures")):
        if getattr(args, flag) is not None:
            sizes[key] = getattr(args, flag)
    for flag, key in (("pretrain-steps", "pretrain_steps"), ("steps", "finetune_steps"), ("seeds", "seeds")):
        if sizes[key] < 1:
            return _fail("finetune-demo", ValueError(f"--{flag}: must be >= 1"), 2)
    try:
        run_demo(args.out, lr=args.lr, finetune_overrides=args.overrides, **sizes)
    except ValueError as err:
        return _fail("finetune-demo", err, 1)
    return 0


def _no_config_beside_resume(config, run_dir) -> None:
    """A resumed run uses its own config; a second one given beside it would be ignored."""
    if config is not None:
        raise ValueError(f"--config: a resumed run uses its own config ({Path(run_dir) / 'config.yaml'}); "
                         f"give key=value overrides for what may change (train.steps, eval, logging)")


def _saved_config(run_dir, kind: str, other_command: str) -> dict:
    """The config a run was started with, upgraded to the current schema; a run of another kind
    is an error that names the command for it."""
    from topoclip.runs import read_run_config

    saved, info = read_run_config(run_dir)
    if info.kind != kind:
        raise ValueError(f"resume: {run_dir} is a {info.kind} run; continue it with `{other_command} {run_dir}`")
    return saved


def _finetune(args: argparse.Namespace) -> int:
    from topoclip.config import finetune_config_from_dict, load_finetune_config

    overrides = []
    if args.source is not None:
        overrides.append(f"source.path={args.source}")
    if args.model_name is not None:
        overrides.append(f"source.model_name={args.model_name}")
    if args.method is not None:
        overrides.append(f"finetune.method={args.method}")
    try:
        if args.resume is not None:
            _no_config_beside_resume(args.config, args.resume)
            saved = _saved_config(args.resume, "finetune", "topoclip train --resume")
            config = finetune_config_from_dict(saved, overrides + list(args.overrides) + ["train.resume=true"])
        else:
            config = load_finetune_config(args.config, overrides + list(args.overrides))
    except ValueError as err:
        return _fail("finetune", err, 2)
    try:
        from topoclip.recipes.finetune import run_finetune  # the towers load here, after the config is known good

        run_finetune(config, run_dir=args.resume)
    except (ValueError, OSError) as err:  # OSError: a disk or path, in one line
        return _fail("finetune", err, 1)
    return 0


def _fail(command: str, err: Exception, code: int) -> int:
    if os.environ.get(_DEBUG_ENV):
        raise err
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"topoclip {command}: error: {message}", file=sys.stderr)
    return code


def _train(args: argparse.Namespace) -> int:
    from topoclip.config import config_from_dict, load_config

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).is_dir():
        # `--resume key=value`: argparse took the first override for the optional RUN_DIR.
        args.overrides.insert(0, args.resume)
        args.resume = True
    try:
        if isinstance(args.resume, str):
            run_dir = Path(args.resume)
            _no_config_beside_resume(args.config, run_dir)
            saved = _saved_config(run_dir, "pretrain", "topoclip finetune --resume")
            config = config_from_dict(saved, list(args.overrides) + ["train.resume=true"])
        else:
            overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
            config = load_config(args.config, overrides)
            run_dir = None
    except ValueError as err:
        return _fail("train", err, 2)
    try:
        from topoclip.recipes.pretrain import run

        run(config, run_dir=run_dir)
    except (ValueError, OSError) as err:  # OSError: a disk or path, in one line
        return _fail("train", err, 1)
    return 0


def _eval(args: argparse.Namespace) -> int:

    try:
        from topoclip.recipes.evaluate import evaluate_checkpoint

        evaluate_checkpoint(
            args.checkpoint,
            data_overrides=args.data,
            output=args.output,
            device=args.device,
            batch_size=args.batch_size,
            folders=args.folder,
            karpathy=args.karpathy,
            image_root=args.image_root,
            split=args.split,
            suite=args.suite,
        )
    except ValueError as err:
        return _fail("eval", err, 2)
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "digits":
        from topoclip.data.digits import write_digits

        try:
            counts = write_digits(args.out, args.test_fraction, args.seed)
        except (ValueError, OSError) as err:
            return _fail("data digits", err, 2)
        out = args.out
        print(f"wrote {counts['train']} training and {counts['test']} test digits into {out}; try:")
        print(f"  topoclip train data.source=csv data.csv.path={out}/train.tsv data.csv.holdout=0.1 "
              f"eval.suite_file={out}/suite.yaml output.name=digits")
        print(f"  topoclip eval --checkpoint runs/digits --suite {out}/suite.yaml")
        return 0
    return _data_convert(args)


def _data_convert(args: argparse.Namespace) -> int:
    from topoclip.data.shards import files_to_samples, tensor_pairs_to_samples, write_shards

    try:
        if args.csv is not None:
            from topoclip.data.pairs import CsvPairs

            sep = args.sep.encode().decode("unicode_escape")  # "\t" on the command line -> tab
            pairs = CsvPairs(args.csv, args.image_root, sep=sep, image_key=args.image_key, caption_key=args.caption_key)
            order = _order(len(pairs), args)
            skipped: list[str] = []
            samples = files_to_samples([pairs.image_paths[i] for i in order], [pairs.captions[i] for i in order], skipped)
        else:
            from topoclip.data.shapes import make_shapes
            from topoclip.dataclass_io import parse_override

            settings = {}
            for text in args.overrides:
                keys, value = parse_override(text)
                settings[".".join(keys)] = value
            data = make_shapes(None, **settings)
            split = data.split(args.split)
            order = _order(len(split), args)
            samples = tensor_pairs_to_samples(split.images[order], [split.captions[i] for i in order])
            skipped = []
        paths = write_shards(samples, args.out, maxcount=args.maxcount)
    except (ValueError, OSError) as err:
        return _fail("data convert", err, 2)
    from topoclip.data.shards import SIZES_FILE, dataset_size

    left_out = f"; {len(skipped)} images that do not decode left out (first: {skipped[0]})" if skipped else ""
    shuffled = "in input order" if args.no_shuffle else f"shuffled with seed {args.seed}"
    print(f"wrote {dataset_size(str(args.out))} samples ({shuffled}) into {len(paths)} shards in {args.out}, "
          f"counts in {SIZES_FILE}{left_out}")
    return 0


def _order(n: int, args: argparse.Namespace) -> list[int]:
    if args.no_shuffle:
        return list(range(n))
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()


def _add_ablate_parsers(sub) -> None:
    ablate = sub.add_parser(
        "ablate",
        help="train and evaluate a grid of configs; write one table (Markdown, CSV, JSON) and plots",
        description=(
            "Run every combination of a grid file's axes (topology, temperature, oblique structure, "
            "tokens, caption noise, ...) as its own run under OUT/runs/, skipping finished runs and "
            "resuming interrupted ones; then write OUT/table.{md,csv,json}, CLIP_benchmark-style "
            "rows (OUT/clip_benchmark.jsonl) and plots (OUT/plots/). key=value overrides apply to "
            "every run, e.g. train.steps=50 for a quick look."
        ),
    )
    ablate.add_argument("--grid", type=Path, required=True, help="grid YAML, e.g. configs/ablation/table3.yaml")
    ablate.add_argument("--out", type=Path, default=None, help="grid directory (default: runs/ablation/<grid file name>)")
    ablate.add_argument("--list", action="store_true", help="print the runs the grid expands to and exit")
    ablate.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="train only the runs whose names match this shell pattern, e.g. 'e0-fixed__*' "
                        "(repeatable); the table still lists every finished run of the grid")
    ablate.add_argument("--device", default=None, help="device of every run (default: each config's train.device)")
    ablate.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")

    report = sub.add_parser(
        "report",
        help="write a self-contained HTML page with the tables and plots of a run or grid directory",
        description=(
            "Write DIR/report.html (or --output): for a grid directory the ablation table and its "
            "plots, for a run directory its results, analysis and plots; images are embedded, so "
            "the page is a single file."
        ),
    )
    report.add_argument("directory", type=Path, metavar="RUN_OR_GRID_DIR")
    report.add_argument("--output", type=Path, default=None, help="HTML file (default: DIR/report.html)")


def _ablate(args: argparse.Namespace) -> int:
    from topoclip.analysis import load_grid, run_grid
    from topoclip.analysis.grid import select_runs

    try:
        grid = load_grid(args.grid, list(args.overrides))
        selected = select_runs(grid, args.only).runs
    except ValueError as err:
        return _fail("ablate", err, 2)
    if args.list:
        for run in selected:
            print(run.name)
        print(f"{len(selected)} runs ({grid.num_excluded} combinations excluded)")
        return 0
    out = args.out if args.out is not None else Path("runs") / "ablation" / args.grid.stem
    try:
        run_grid(grid, out, device=args.device, only=args.only)
    except ValueError as err:
        return _fail("ablate", err, 1)
    return 0


def _report(args: argparse.Namespace) -> int:
    from topoclip.analysis import write_report

    try:
        path = write_report(args.directory, args.output)
    except ValueError as err:
        return _fail("report", err, 2)
    print(f"report: {path}")
    return 0


def _add_bench_parsers(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks: loss vs OpenCLIP and the GEMM floor, largest exact batch, training step vs OpenCLIP",
        description="Measure, side by side in one run, and print Markdown tables with the ratios.",
    )
    actions = bench.add_subparsers(dest="bench_action", metavar="ACTION")
    actions.required = True
    loss = actions.add_parser(
        "loss",
        help="loss fwd+bwd time and peak memory per topology, plain and tiled, vs OpenCLIP ClipLoss and the floor",
        description=(
            "One child process per (method, batch): median fwd+bwd time and peak memory growth of the "
            "three-GEMM floor, OpenCLIP's ClipLoss and each topology's ContrastiveLoss, plain and (with "
            "--tiled, and always from b = 16384 on) tiled. Plain methods whose b x b matrices would not "
            "fit in the free memory are skipped."
        ),
    )
    loss.add_argument("--batch", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    loss.add_argument("--dim", type=int, default=512)
    loss.add_argument("--topologies", nargs="+", default=None, metavar="NAME",
                      help="sphere euclidean oblique-inner oblique-geodesic lorentz (default: all; oblique as Ob(dim/8, 8))")
    loss.add_argument("--tiled", action="store_true", help="also measure the tiled loss below b = 16384")
    loss.add_argument("--sigmoid", action="store_true",
                      help="also the sigmoid loss on each topology, beside OpenCLIP's SigLipLoss")
    loss.add_argument("--no-openclip", action="store_true", help="leave out OpenCLIP's ClipLoss (and SigLipLoss)")
    loss.add_argument("--tile-size", type=int, default=1024)
    loss.add_argument("--repeats", type=int, default=5,
                      help="rounds of (floor, method) at least, after one warm-up; more until the spread is small")
    loss.add_argument("--budget", type=float, default=30.0,
                      help="seconds of timed rounds per method at most (then a wide spread is marked unstable)")
    loss.add_argument("--target-spread", type=float, default=0.10,
                      help="stop when the interquartile range of the ratio is this fraction of its median")
    loss.add_argument("--output", type=Path, default=None, help="also write the Markdown table (and machine line) here")
    loss.add_argument("--memory-gib", type=float, default=None, help="memory budget for skipping (default: free memory)")
    loss.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    mb = actions.add_parser(
        "max-batch",
        help="largest global batch whose exact training step (tiled loss + gradient cache) fits in a memory limit",
        description=(
            "Doubling search (then --bisect trials) for the largest global batch for which one exact "
            "training step of the default model, with the tiled loss and the gradient cache, completes "
            "with a resident peak under --limit-gib; each trial runs in its own process."
        ),
    )
    mb.add_argument("--limit-gib", type=float, default=24.0)
    mb.add_argument("--chunk", type=int, default=256, help="gradient-cache chunk (train.grad_cache_chunk)")
    mb.add_argument("--start", type=int, default=8192)
    mb.add_argument("--max", type=int, default=131072, dest="max_batch", help="stop doubling here")
    mb.add_argument("--bisect", type=int, default=0, help="bisection trials after the doubling")
    mb.add_argument("--tile-size", type=int, default=1024)
    mb.add_argument("--timeout", type=float, default=None, help="seconds per trial (default: none)")
    mb.add_argument("--config", type=Path, default=None, help="model config (default: configs/default.yaml)")
    mb.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.image.depth=2")

    ts = actions.add_parser(
        "train-step",
        help="training step time of topoclip's Trainer vs OpenCLIP's own step on the same OpenCLIP model",
        description=(
            "Same random-init OpenCLIP model, batch, precision (fp32) and AdamW: OpenCLIP's training step "
            "vs Trainer.train_step on the OpenClipDualEncoder of a copy, alternating; prints the ratio of medians."
        ),
    )
    ts.add_argument("--batch", type=int, default=256)
    ts.add_argument("--model", default="topoclip-bench-small",
                    help="open_clip architecture (random init): topoclip-bench-small, topoclip-bench-tiny or a built-in name")
    ts.add_argument("--steps", type=int, default=5, help="timed steps of each (after one warm-up step)")

    gpu = actions.add_parser(
        "gpu",
        help="the GPU benchmark in one go (loss table, a 65,536-batch exact step, the step vs OpenCLIP, 2-GPU nccl)",
        description=(
            "On a CUDA machine, in about 8 minutes: the loss of every topology, plain and tiled, b = 8,192 to "
            "131,072, fp32 and bf16, beside OpenCLIP's ClipLoss / SigLipLoss and the GEMM floor; one exact "
            "training step of a ViT-B/16-sized model at a global batch of 65,536 (gradient cache, bf16); the "
            "training step against OpenCLIP's own; two nccl processes when there are two GPUs. One Markdown file."
        ),
    )
    gpu.add_argument("--output", type=Path, default=Path("bench-gpu.md"), help="the Markdown file (default bench-gpu.md)")
    gpu.add_argument("--tiny", action="store_true", help="the same plan at toy sizes on the CPU (a check, not a measurement)")


def _bench(args: argparse.Namespace) -> int:
    try:
        if args.bench_action == "loss":
            import torch

            from topoclip.bench.loss import TOPOLOGIES, format_table, identical_paths_agree, run_loss_bench
            from topoclip.bench.rounds import load_average, machine_line

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            before = machine_line()
            print(f"{before}; device {device}, d={args.dim}", file=sys.stderr)
            rows = run_loss_bench(args.batch, args.dim, args.topologies or TOPOLOGIES, args.tiled, args.repeats,
                                  device, args.tile_size, args.memory_gib, openclip=not args.no_openclip,
                                  sigmoid=args.sigmoid, budget_seconds=args.budget, target_spread=args.target_spread)
            lines = [f"Machine: {before}; device {device}, d = {args.dim}", "", format_table(rows), "",
                     *identical_paths_agree(rows), f"After the run: {load_average()}"]
            text = "\n".join(lines)
            print(text)
            if args.output is not None:
                from topoclip.atomic import atomic_write_text

                atomic_write_text(args.output, text + "\n")
        elif args.bench_action == "max-batch":
            from topoclip.bench.max_batch import format_trials, run_max_batch

            result = run_max_batch(args.limit_gib, args.chunk, args.start, args.max_batch, args.bisect, args.tile_size,
                                   args.timeout, str(args.config) if args.config else None, list(args.overrides))
            print(format_trials(result))
        elif args.bench_action == "gpu":
            from topoclip.bench.gpu import run_gpu_bench

            text = run_gpu_bench(args.output, tiny=args.tiny)
            if text is not None:
                print(text)
                print(f"written: {args.output}", file=sys.stderr)
        else:
            from topoclip.bench.train_step import format_result, run_train_step_bench

            print(format_result(run_train_step_bench(args.batch, args.model, args.steps)))
    except ValueError as err:
        return _fail("bench", err, 2)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "finetune":
        return _finetune(args)
    if args.command == "finetune-demo":
        return _finetune_demo(args)
    if args.command == "data":
        return _data(args)
    if args.command == "ablate":
        return _ablate(args)
    if args.command == "report":
        return _report(args)
    if args.command == "bench":
        return _bench(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
