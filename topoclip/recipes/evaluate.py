"""Evaluation in the recipes: a run's default evaluation sets or its suites, the results in
topoclip's layout and in CLIP_benchmark's records, the printed summary, and ``topoclip eval``
on a saved run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from topoclip.atomic import atomic_write_json
from topoclip.config import EvalConfig
from topoclip.data import ClassificationSet, ImageFolderClassification, KarpathyRetrieval, RetrievalSet, ShapesData, make_shapes
from topoclip.data.shapes import ShapesConfig
from topoclip.dataclass_io import apply_overrides, from_dict, to_dict
from topoclip.devices import resolve_device
from topoclip.eval import EvalEntry, EvalRecord, nest_records, run_evaluation
from topoclip.eval.records import clip_benchmark_records, write_jsonl
from topoclip.eval.suites import build_entries, load_suite_file
from topoclip.runs import load_run, resolve_checkpoint

__all__ = ["eval_entries", "suite_entries", "evaluate_entries", "write_records", "shapes_eval_sets", "format_summary", "evaluate_checkpoint"]


def eval_entries(
    tasks: Sequence[ClassificationSet], retrieval_set: RetrievalSet | None, robustness: bool = True
) -> list[EvalEntry]:
    """Zero-shot on each classification set; R@K (and, with ``robustness``, calibration,
    geometry and mixup hardness) on the retrieval set, embedded once."""
    entries = [EvalEntry(task, ("zeroshot",)) for task in tasks]
    if retrieval_set is not None:
        entries.append(EvalEntry(retrieval_set, ("retrieval", "robustness") if robustness else ("retrieval",)))
    return entries


def suite_entries(eval_config: EvalConfig, transform) -> list[EvalEntry] | None:
    """The entries of the config's suites (``eval.suites`` and ``eval.suite_file``), or None
    when it names none. Every file is opened here, before any training or embedding."""
    suites = list(eval_config.suites)
    if eval_config.suite_file is not None:
        suites += load_suite_file(eval_config.suite_file)
    return build_entries(suites, transform, eval_config.robustness) if suites else None


def evaluate_entries(model, tokenizer, entries: Sequence[EvalEntry], batch_size: int, device,
                     plot_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], list[EvalRecord]]:
    """(the ``eval`` section of results.json, the records) of one evaluation."""
    records = run_evaluation(model, tokenizer, entries, batch_size, device, plot_dir)
    return nest_records(records), records


def model_label(model) -> str:
    """How a model is named in CLIP_benchmark's ``model`` field."""
    return f"topoclip {model.topology.label}"


def write_records(path: str | os.PathLike, records: Sequence[EvalRecord], model, pretrained: str) -> None:
    """``results.jsonl``: the records in CLIP_benchmark's schema."""
    write_jsonl(path, clip_benchmark_records(records, model_label(model), pretrained))


def shapes_eval_sets(data: ShapesData, eval_config: EvalConfig) -> tuple[list[ClassificationSet], RetrievalSet | None]:
    """The embedded data's test-split zero-shot tasks and retrieval set, as the config asks."""
    tasks = data.zeroshot_tasks("test") if eval_config.zeroshot else []
    return tasks, (data.retrieval_set("test") if eval_config.retrieval else None)


def _by_dataset(section: dict | None, marker: str) -> list[tuple[str, dict]]:
    """``[(" <dataset>", metrics)]`` of a task's section: keyed by dataset, or (one dataset)
    the metrics themselves, recognised by ``marker``."""
    if not section:
        return []
    if marker in section:
        return [("", section)]
    return [(f" {name}", metrics) for name, metrics in section.items()]


def format_number(value: float | None, spec: str) -> str:
    """``value`` in ``spec``; a missing value (null in a results file: no step was taken) as "-"."""
    return "-" if value is None else format(value, spec)


def format_summary(results: dict[str, Any]) -> str:
    """A short table of the headline numbers."""
    lines = []
    train = results.get("train")
    if train:
        total = f" ({results['total_seconds']:.0f}s in all)" if "total_seconds" in results else ""
        lines.append(
            f"trained {train['steps']} steps in {train['seconds']:.0f}s{total}; final loss {format_number(train['final_loss'], '.3f')}, "
            f"scale {format_number(train['final_scale'], '.2f')}, skipped steps {train['skipped_steps']}"
        )
    zeroshot = results.get("eval", {}).get("zeroshot", {})
    if zeroshot:
        lines.append(f"{'zero-shot task':<16}{'top1':>8}{'top5':>8}")
        for name, metrics in zeroshot.items():
            lines.append(f"{name:<16}{100 * metrics['top1']:>7.1f}%{100 * metrics.get('top5', float('nan')):>7.1f}%")
    evaluated = results.get("eval", {})
    for name, retrieval in _by_dataset(evaluated.get("retrieval"), "i2t_R@1"):
        lines.append(f"{'retrieval' + name:<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
        for direction in ("i2t", "t2i"):
            cells = "".join(f"{100 * retrieval.get(f'{direction}_R@{k}', float('nan')):>7.1f}%" for k in (1, 5, 10))
            lines.append(f"{direction:<16}{cells}")
    for name, robustness in _by_dataset(evaluated.get("robustness"), "calibration"):
        def num(x):  # None: a non-finite value made JSON-safe
            return "n/a" if x is None else f"{x:.3f}"

        cal, geo, hard = robustness["calibration"], robustness["geometry"], robustness["hardness"]
        b = cal["reliability_bins"]
        lines.append(f"{'ECE (' + str(b) + ' bins)' + name:<16}i2t {num(cal[f'i2t_ece_{b}'])}  t2i {num(cal[f't2i_ece_{b}'])}")
        lines.append(
            f"{'geometry':<16}align {num(geo['alignment'])}  unif {num(geo['uniformity'])}  "
            f"gap {num(geo['modality_gap'])}  (lower is better)"
        )
        lines.append(
            f"{'mixup hardness':<16}similarity to positives {num(hard['mean_positive'])}, original negatives "
            f"{num(hard['mean_original'])}, mixed negatives {num(hard['mean_mixed'])} (lam {hard['lam']:g})"
        )
    for name, probe in _by_dataset(evaluated.get("linear_probe"), "top1"):
        lines.append(f"{'linear probe' + name:<16}{100 * probe['top1']:>7.1f}%  ({probe['n_train']} training images)")
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_overrides: Sequence[str] = (),
    output: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    folders: Sequence[str | os.PathLike] = (),
    karpathy: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
    suite: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model and write the results JSON (and its CLIP_benchmark records,
    ``<output stem>.jsonl``).

    ``suite``: a suite file (see ``topoclip.config.SuiteConfig``) to evaluate on instead.

    Without ``folders``/``karpathy`` it evaluates on the embedded data of its config (with
    ``data.*`` overrides applied). ``folders``: image-folder classification sets for
    zero-shot; ``karpathy``: a Karpathy-style JSON retrieval set whose images are under
    ``image_root``. Real images are resized to the size the model was trained on.
    Robustness plots (``eval.robustness``) go to ``<output stem>_plots/`` beside the JSON.
    """
    ckpt = resolve_checkpoint(checkpoint)
    for text in data_overrides:
        if not text.startswith("data.shapes."):
            raise ValueError(f"--data {text}: data overrides must start with data.shapes., e.g. data.shapes.noise=0.0")
    if karpathy is not None and image_root is None:
        raise ValueError("--image-root: needed with --karpathy (the directory the JSON's file names are under)")
    # A trained or a fine-tuned run: the model, its tokenizer and the data it was trained on.
    loaded = load_run(ckpt)
    model, tokenizer, eval_config = loaded.model, loaded.tokenizer, loaded.eval
    bs = batch_size if batch_size is not None else eval_config.batch_size
    if bs < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {bs}")

    if suite is not None:
        if folders or karpathy is not None:
            raise ValueError("--suite: give the suite file or --folder / --karpathy, not both")
        entries = build_entries(load_suite_file(suite), loaded.transform, eval_config.robustness)
    elif folders or karpathy is not None:
        image = dict(image_size=loaded.image_size, mean=loaded.mean, std=loaded.std)
        # verify: drop unreadable files up front, so every image is evaluated once under its own label.
        tasks = [ImageFolderClassification(folder, verify=True, **image) for folder in folders]
        retrieval_set = KarpathyRetrieval(karpathy, image_root, split, **image) if karpathy is not None else None
        entries = eval_entries(tasks, retrieval_set, eval_config.robustness)
    else:
        shapes = apply_overrides({"shapes": to_dict(loaded.data or loaded.reference)}, [t[len("data."):] for t in data_overrides])
        data = make_shapes(from_dict(ShapesConfig, shapes["shapes"], "data.shapes"))
        entries = eval_entries(*shapes_eval_sets(data, eval_config), eval_config.robustness)

    dev = resolve_device(device)
    model.to(dev)
    out = Path(output) if output is not None else ckpt.parent.parent / "eval_results.json"
    # <stem>_plots beside the JSON: never overwrites the training run's own plots/.
    plot_dir = out.parent / f"{out.stem}_plots"
    nested, records = evaluate_entries(model, tokenizer, entries, bs, dev, plot_dir)
    results = {"checkpoint": str(ckpt), "eval": nested}
    atomic_write_json(out, results)
    write_records(out.with_suffix(".jsonl"), records, model, str(ckpt.parent.parent))
    print(format_summary(results))
    print(f"results: {out}")
    return results
