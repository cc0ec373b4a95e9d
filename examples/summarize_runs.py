"""Mean ± std over training seeds of runs named <space>-seed<k>, from their CLIP_benchmark
records (results.jsonl): one Markdown row per space.

    python examples/summarize_runs.py runs/digits-example/runs
"""

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = [  # (dataset, metric, header)
    ("digits", "acc1", "zero-shot acc1"),
    ("digits", "mean_per_class_recall", "zero-shot mean per-class recall"),
    ("digits-captions", "text_retrieval_recall@1", "I→T R@1"),
    ("digits-captions", "image_retrieval_recall@1", "T→I R@1"),
    ("digits-probe", "lp_acc1", "linear probe"),
]


def main(runs_dir: str) -> None:
    values = defaultdict(lambda: defaultdict(list))
    scales = defaultdict(list)
    for run in sorted(Path(runs_dir).iterdir()):
        match = re.fullmatch(r"(.+)-seed(\d+)", run.name)
        if not match or not (run / "results.jsonl").is_file():
            continue
        space = match.group(1)
        for row in map(json.loads, (run / "results.jsonl").read_text().splitlines()):
            for dataset, metric, header in COLUMNS:
                if row["dataset"] == dataset and metric in row["metrics"]:
                    values[space][header].append(100 * row["metrics"][metric])
        scales[space].append(json.loads((run / "results.json").read_text())["train"]["final_scale"])
    headers = [h for _, _, h in COLUMNS]
    print("| space | seeds | " + " | ".join(headers) + " | final scale |")
    print("|---|---:|" + "---:|" * (len(headers) + 1))
    for space, cells in values.items():
        def cell(xs):
            return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"

        seeds = len(scales[space])
        scale = f"{statistics.mean(scales[space]):.1f}"
        print(f"| {space} | {seeds} | " + " | ".join(cell(cells[h]) for h in headers) + f" | {scale} |")


if __name__ == "__main__":
    main(sys.argv[1])
