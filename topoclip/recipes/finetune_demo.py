"""The robust fine-tuning demonstration on the embedded data (``topoclip finetune-demo``).

1. Pretrain the default model on the default shapes (dark backgrounds): the "zero-shot" model.
2. Fine-tune it on a shifted distribution (light backgrounds) with FT, m²-Mix and m³-Mix, take
   WiSE-FT between the pretrained and the FT weights, and apply the embedding shift.
3. Evaluate every model on the fine-tuning distribution ("target") and the original one
   ("reference"), and write one table (Markdown + JSON) plus a claim-by-claim check of what the
   mixup paper reports: harder negatives, better uniformity and alignment, lower ECE, better
   R@1 than FT.

Every stage is a run directory under ``out``; finished stages are reused, so an interrupted
demo continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from topoclip.atomic import atomic_write_json
from topoclip.config import load_config, load_finetune_config
from topoclip.runs import RESULTS_FILE

from .finetune import format_finetune_table, run_finetune
from .pretrain import run

__all__ = ["run_demo", "check_claims", "DEMO_METHODS"]

# wise-ft trains plain FT and adds the WiSE-FT model, so FT needs no run of its own.
DEMO_METHODS = ("wise-ft", "m2mix", "m3mix", "embedding-shift")
PRETRAIN_DIR = "pretrain"


def _finished(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _pretrain(out: Path, steps: int, overrides: Sequence[str]) -> Path:
    run_dir = out / PRETRAIN_DIR
    if _finished(run_dir) is None:
        config = load_config(None, [
            f"train.steps={steps}", f"optim.warmup_steps={max(1, steps // 15)}", f"output.dir={out}",
            f"output.name={PRETRAIN_DIR}", "eval.enabled=false", "train.resume=true", *overrides,
        ])
        run(config, run_dir=run_dir)
    return run_dir


def _r1(evaluation: dict) -> float:
    retrieval = evaluation.get("retrieval", {})
    return 0.5 * (retrieval.get("i2t_R@1", math.nan) + retrieval.get("t2i_R@1", math.nan))


def _metric(evaluation: dict, group: str, key: str) -> float:
    value = evaluation.get("robustness", {}).get(group, {}).get(key)
    return math.nan if value is None else float(value)


def _ece(evaluation: dict) -> float:
    calib = evaluation.get("robustness", {}).get("calibration", {})
    keys = sorted(k for k in calib if k.startswith("i2t_ece_") or k.startswith("t2i_ece_"))
    if not keys:
        return math.nan
    largest = max(int(k.rsplit("_", 1)[1]) for k in keys)
    return 0.5 * (calib[f"i2t_ece_{largest}"] + calib[f"t2i_ece_{largest}"])


def check_claims(results: dict[str, dict]) -> list[dict[str, Any]]:
    """The mixup paper's claims against the demo's numbers, on the target distribution unless
    said otherwise. Each row: claim, the compared values, and whether it holds here."""
    models = {}
    for method, res in results.items():
        for key, evaluation in res.get("models", {}).items():
            name = {"finetuned": {"wise-ft": "FT"}.get(method, method), "zero_shot": "zero-shot"}.get(key, key)
            models.setdefault(name, evaluation)
    rows: list[dict[str, Any]] = []

    def add(claim: str, a: str, b: str, value, better: str) -> None:
        if a not in models or b not in models:
            return
        va, vb = value(models[a]), value(models[b])
        holds = va > vb if better == "higher" else va < vb
        rows.append({"claim": claim, a: va, b: vb, "holds": bool(holds) if math.isfinite(va) and math.isfinite(vb) else None})

    zs = models.get("zero-shot", {}).get("target", {})
    hard = zs.get("robustness", {}).get("hardness", {})
    if hard:
        va, vb = hard.get("mean_mixed", math.nan), hard.get("mean_original", math.nan)
        rows.append({
            "claim": "m²-Mix negatives are harder than the batch's own (mean similarity to the anchor, zero-shot model)",
            "mixed": va, "original": vb, "holds": bool(va > vb),
        })
    for mix in ("m2mix", "m3mix"):
        label = {"m2mix": "m²-Mix", "m3mix": "m³-Mix"}[mix]
        add(f"{label} retrieval R@1 (mean of I→T, T→I) beats FT on the target", mix, "FT", lambda e: _r1(e["target"]), "higher")
        add(f"{label} keeps more R@1 on the reference than FT", mix, "FT", lambda e: _r1(e["reference"]), "higher")
        add(f"{label} has lower ECE than FT", mix, "FT", lambda e: _ece(e["target"]), "lower")
        add(f"{label} has better (lower) uniformity than FT", mix, "FT", lambda e: _metric(e["target"], "geometry", "uniformity"), "lower")
        add(f"{label} has better (lower) alignment than FT", mix, "FT", lambda e: _metric(e["target"], "geometry", "alignment"), "lower")
    add("WiSE-FT keeps more R@1 on the reference than FT", "wise_ft", "FT", lambda e: _r1(e["reference"]), "higher")
    add("the embedding shift narrows the modality gap", "embedding_shift", "zero-shot",
        lambda e: _metric(e["target"], "geometry", "modality_gap"), "lower")
    return rows


def _claims_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| claim | values | holds here |", "|---|---|---|"]
    for row in rows:
        values = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("claim", "holds"))
        verdict = {True: "yes", False: "no", None: "n/a"}[row["holds"]]
        lines.append(f"| {row['claim']} | {values} | {verdict} |")
    return "\n".join(lines)


def run_demo(
    out: str | os.PathLike = "runs/finetune-demo",
    pretrain_steps: int = 600,
    finetune_steps: int = 300,
    lr: float = 3e-4,
    methods: Sequence[str] = DEMO_METHODS,
    pretrain_overrides: Sequence[str] = (),
    finetune_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run (or continue) the demonstration; returns the results per method plus the claims."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = _pretrain(out, pretrain_steps, pretrain_overrides)
    results: dict[str, dict] = {}
    for i, method in enumerate(methods):
        run_dir = out / method
        done = _finished(run_dir)
        if done is None:
            config = load_finetune_config(None, [
                f"source.path={source}", f"finetune.method={method}", f"train.steps={finetune_steps}", "train.epochs=null",
                f"optim.lr={lr}", f"output.dir={out}", f"output.name={method}", "train.resume=true",
                # the source's own evaluation is the same for every method: done once
                f"finetune.eval_zero_shot={'true' if i == 0 else 'false'}", *finetune_overrides,
            ])
            done = run_finetune(config, run_dir=run_dir)
        results[method] = done
    claims = check_claims(results)
    table = format_finetune_table(results)
    text = (
        f"Pretrained {pretrain_steps} steps on dark-background shapes; fine-tuned {finetune_steps} steps "
        f"(lr {lr:g}) on light-background shapes. target = light (fine-tuning) test split, "
        f"reference = dark (original) test split. R@1, zero-shot accuracy (mean over the tasks) and "
        f"ECE (15 bins) in %; uniformity, alignment and modality gap: lower is better.\n\n"
        f"{table}\n\n{_claims_markdown(claims)}\n"
    )
    (out / "table.md").write_text(text)
    atomic_write_json(out / "table.json", {"results": results, "claims": claims})
    print(text)
    print(f"table: {out / 'table.md'}")
    return {"results": results, "claims": claims}
