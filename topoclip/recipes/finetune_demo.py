"""The robust fine-tuning demonstration on the embedded data (``topoclip finetune-demo``),
judged against the spread over random seeds.

1. Pretrain the default model on the default shapes (dark backgrounds): the "zero-shot" model.
2. For each of ``seeds`` fine-tuning seeds, fine-tune it on a shifted distribution (light
   backgrounds) with every arm: FT (and WiSE-FT from it), m²-Mix along the geodesic and along
   the straight line, m³-Mix, LP-FT, LP-FT w/ m²-Mix, WiSE-FT w/ m²-Mix, and the embedding
   shift. Optionally (``temperatures``) FT and m²-Mix (geodesic and linear) at fixed
   temperatures: ECE against τ, and linear vs geodesic mixup at each τ.
3. Evaluate every model on the fine-tuning distribution ("target") and the original one
   ("reference"); write a table of mean ± std over the random seeds (Markdown + JSON) and check the
   claims of *Geodesic Multi-Modal Mixup for Robust Fine-Tuning* (Oh et al., NeurIPS 2023) one
   by one: a claim *holds* when the mean paired difference (same seed, same data order) is in
   the claimed direction and larger than its standard deviation over the random seeds; it *fails*
   when the difference is that large the other way; otherwise it is *within noise*.

Every stage is a run directory under ``out``; finished stages are reused, so an interrupted
demo continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from topoclip.atomic import atomic_write_json
from topoclip.config import load_config, load_finetune_config
from topoclip.runs import RESULTS_FILE

from .finetune import model_label, run_finetune
from .pretrain import run

__all__ = ["DemoArm", "DEMO_ARMS", "FULL", "run_demo", "check_claims", "seed_table"]

PRETRAIN_DIR = "pretrain"


@dataclass(frozen=True)
class DemoArm:
    """One fine-tuning run of the demo: its directory name, method and extra overrides."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()
    suffix: str = ""  # appended to the models' labels ("m²-Mix (linear)")


# wise-ft trains plain FT and adds the WiSE-FT model, so FT needs no run of its own; likewise
# wise-ft+m2mix gives m²-Mix and WiSE-FT w/ m²-Mix.
DEMO_ARMS = (
    DemoArm("wise-ft", "wise-ft"),
    DemoArm("wise-ft+m2mix", "wise-ft+m2mix"),
    DemoArm("m2mix-linear", "m2mix", ("finetune.mix_path=linear",), " (linear)"),
    DemoArm("m3mix", "m3mix"),
    DemoArm("lp-ft", "lp-ft"),
    DemoArm("lp-ft+m2mix", "lp-ft+m2mix"),
    DemoArm("embedding-shift", "embedding-shift"),
)
# The documented full run (`topoclip finetune-demo --full`): the demo at the sizes of the
# single-run fine-tuning defaults, plus the temperature sweep.
FULL = {"pretrain_steps": 900, "finetune_steps": 300, "seeds": 3, "num_train": 20000, "num_test": 1000,
        "temperatures": (0.01, 0.03, 0.07, 0.1)}


def _finished(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _pretrain(out: Path, steps: int, overrides: Sequence[str]) -> Path:
    run_dir = out / PRETRAIN_DIR
    if _finished(run_dir) is None:
        config = load_config(None, [
            f"train.steps={steps}", f"output.dir={out}", f"output.name={PRETRAIN_DIR}", "eval.enabled=false",
            # fp32 as the documented claims were measured (the default config's auto is bf16 on AMX CPUs)
            "train.resume=true", "train.precision=fp32", *overrides,
        ])
        run(config, run_dir=run_dir)
    return run_dir


# ------------------------------------------------------------------------------- the metrics

def _r1(evaluation: dict) -> float:
    retrieval = evaluation.get("retrieval", {})
    return 100 * 0.5 * (retrieval.get("i2t_R@1", math.nan) + retrieval.get("t2i_R@1", math.nan))


def _zero_shot(evaluation: dict) -> float:
    tasks = evaluation.get("zeroshot", {})
    return 100 * statistics.fmean(m["top1"] for m in tasks.values()) if tasks else math.nan


def _metric(evaluation: dict, group: str, key: str) -> float:
    value = evaluation.get("robustness", {}).get(group, {}).get(key)
    return math.nan if value is None else float(value)


def _ece(evaluation: dict) -> float:
    calib = evaluation.get("robustness", {}).get("calibration", {})
    keys = [k for k in calib if k.startswith(("i2t_ece_", "t2i_ece_"))]
    if not keys:
        return math.nan
    largest = max(int(k.rsplit("_", 1)[1]) for k in keys)
    return 100 * 0.5 * (calib[f"i2t_ece_{largest}"] + calib[f"t2i_ece_{largest}"])


def _simat(evaluation: dict) -> float:
    return 100 * evaluation.get("arithmetic", {}).get("r1", math.nan)


# column -> (what it reads from a model's evaluation, lower is better?)
COLUMNS: dict[str, tuple[Callable[[dict], float], bool]] = {
    "target R@1": (lambda e: _r1(e.get("target", {})), False),
    "target zero-shot": (lambda e: _zero_shot(e.get("target", {})), False),
    "target ECE": (lambda e: _ece(e.get("target", {})), True),
    "uniformity": (lambda e: _metric(e.get("target", {}), "geometry", "uniformity"), True),
    "alignment": (lambda e: _metric(e.get("target", {}), "geometry", "alignment"), True),
    "gap": (lambda e: _metric(e.get("target", {}), "geometry", "modality_gap"), True),
    "SIMAT R@1": (lambda e: _simat(e.get("target", {})), False),
    "reference R@1": (lambda e: _r1(e.get("reference", {})), False),
    "reference zero-shot": (lambda e: _zero_shot(e.get("reference", {})), False),
}


def _models(results: dict[str, dict], arms: dict[str, DemoArm]) -> dict[str, dict]:
    """label -> evaluation of every model in one seed's results (by arm name)."""
    models: dict[str, dict] = {}
    for name, res in results.items():
        arm = arms[name]
        for key, evaluation in res.get("models", {}).items():
            label = model_label(arm.method, key) + ("" if key in ("zero_shot", "embedding_shift") else arm.suffix)
            models.setdefault(label, evaluation)
    return models


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def seed_table(per_seed: Sequence[dict[str, dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """label -> column -> (mean, std) over the random seeds that have the model."""
    labels = list(dict.fromkeys(label for models in per_seed for label in models))
    return {
        label: {col: _mean_std([read(models[label]) for models in per_seed if label in models])
                for col, (read, _) in COLUMNS.items()}
        for label in labels
    }


def _table_markdown(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    columns = list(COLUMNS)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, cells in table.items():
        shown = []
        for col in columns:
            mean, std = cells[col]
            digits = 3 if col in ("uniformity", "alignment", "gap") else 1
            shown.append("–" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- the claims

def _verdict(differences: Sequence[float]) -> tuple[str, float, float]:
    """(verdict, mean, std) of paired differences oriented so that > 0 means the claim's way."""
    finite = [d for d in differences if math.isfinite(d)]
    if not finite:
        return "n/a", math.nan, math.nan
    mean = statistics.fmean(finite)
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    if len(finite) < 2:
        return ("holds (one seed)" if mean > 0 else "fails (one seed)"), mean, std
    if abs(mean) > std:
        return ("holds" if mean > 0 else "fails"), mean, std
    return "within noise", mean, std


# (claim, model A, model B, column): A is better than B in that column.
CLAIMS = (
    ("m²-Mix retrieval R@1 beats FT on the target", "m²-Mix", "FT", "target R@1"),
    ("m²-Mix keeps more R@1 on the reference than FT (robustness)", "m²-Mix", "FT", "reference R@1"),
    ("m²-Mix has better (lower) uniformity than FT", "m²-Mix", "FT", "uniformity"),
    ("m²-Mix has better (lower) alignment than FT", "m²-Mix", "FT", "alignment"),
    ("m²-Mix has lower ECE than FT", "m²-Mix", "FT", "target ECE"),
    ("m²-Mix embedding arithmetic (SIMAT R@1) beats FT", "m²-Mix", "FT", "SIMAT R@1"),
    ("geodesic m²-Mix beats linear m²-Mix on the target", "m²-Mix", "m²-Mix (linear)", "target R@1"),
    ("geodesic m²-Mix keeps more reference R@1 than linear", "m²-Mix", "m²-Mix (linear)", "reference R@1"),
    ("m³-Mix retrieval R@1 beats FT on the target", "m³-Mix", "FT", "target R@1"),
    ("m³-Mix has lower ECE than FT", "m³-Mix", "FT", "target ECE"),
    ("LP-FT w/ m²-Mix beats LP-FT on the target", "LP-FT w/ m²-Mix", "LP-FT", "target R@1"),
    ("WiSE-FT w/ m²-Mix keeps more reference R@1 than WiSE-FT", "WiSE-FT w/ m²-Mix", "WiSE-FT", "reference R@1"),
    ("WiSE-FT keeps more reference R@1 than FT", "WiSE-FT", "FT", "reference R@1"),
    ("LP-FT keeps more reference R@1 than FT", "LP-FT", "FT", "reference R@1"),
    ("the embedding shift narrows the modality gap", "embedding shift", "zero-shot", "gap"),
)


def check_claims(per_seed: Sequence[dict[str, dict]]) -> list[dict[str, Any]]:
    """Each claim against the random seeds: the paired differences, their mean and std, the verdict."""
    rows: list[dict[str, Any]] = []
    zero_shot = next((models["zero-shot"] for models in per_seed if "zero-shot" in models), None)
    hard = (zero_shot or {}).get("target", {}).get("robustness", {}).get("hardness", {})
    if hard:
        mixed, original = hard.get("mean_mixed", math.nan), hard.get("mean_original", math.nan)
        rows.append({"claim": "m²-Mix negatives are harder than the batch's own (mean similarity to the anchor, "
                              "zero-shot model; measured once, no seed spread)",
                     "a": "mixed", "b": "original", "mean_a": mixed, "mean_b": original, "difference": mixed - original,
                     "std": math.nan, "seeds": 1, "verdict": "holds" if mixed > original else "fails"})
    for claim, a, b, column in CLAIMS:
        read, lower = COLUMNS[column]
        pairs = [(read(m[a]), read(m[b] if b != "zero-shot" else (zero_shot or {}))) for m in per_seed if a in m and (b in m or b == "zero-shot")]
        if not pairs:
            continue
        sign = -1.0 if lower else 1.0
        verdict, mean, std = _verdict([sign * (va - vb) for va, vb in pairs])
        rows.append({"claim": claim, "a": a, "b": b, "column": column, "mean_a": _mean_std([p[0] for p in pairs])[0],
                     "mean_b": _mean_std([p[1] for p in pairs])[0], "difference": mean, "std": std, "seeds": len(pairs),
                     "verdict": verdict})
    return rows


def _claims_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| claim | A | B | mean paired difference (claim's way) ± std | seeds | verdict |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        std = "" if not math.isfinite(r["std"]) else f" ± {r['std']:.3g}"
        lines.append(f"| {r['claim']} | {r['a']} {r['mean_a']:.4g} | {r['b']} {r['mean_b']:.4g} | "
                     f"{r['difference']:+.3g}{std} | {r['seeds']} | {r['verdict']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------- temperature sweep

# The sweep's arms: (directory stem, method, overrides, label).
SWEEP_ARMS = (("ft", "ft", (), "FT"), ("m2mix", "m2mix", (), "m²-Mix"),
              ("m2mix-linear", "m2mix", ("finetune.mix_path=linear",), "m²-Mix (linear)"))


def _sweep_table(per_seed_sweep: Sequence[dict[float, dict[str, dict]]], temperatures: Sequence[float],
                 column: str, labels: Sequence[str]) -> tuple[str, dict]:
    """One column against the fixed fine-tuning temperature (mean ± std over the random seeds)."""
    read, _ = COLUMNS[column]
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for label in labels:
        out[label] = {str(t): _mean_std([read(sweep[t][label]) for sweep in per_seed_sweep if label in sweep.get(t, {})])
                      for t in temperatures}
    header = "| model | " + " | ".join(f"τ = {t:g}" for t in temperatures) + " | spread over τ |"
    lines = [header, "|---|" + "---:|" * (len(temperatures) + 1)]
    for label, cells in out.items():
        means = [cells[str(t)][0] for t in temperatures if math.isfinite(cells[str(t)][0])]
        spread = max(means) - min(means) if means else math.nan
        lines.append(f"| {label} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in (cells[str(t)] for t in temperatures))
                     + f" | {spread:.1f} |")
    return "\n".join(lines), out


def _sweep_claims(per_seed_sweep: Sequence[dict[float, dict[str, dict]]], temperatures: Sequence[float]) -> list[dict]:
    """Geodesic vs linear m²-Mix at each temperature (the paper's linear-vs-geodesic table)."""
    read, _ = COLUMNS["target R@1"]
    rows = []
    for t in temperatures:
        pairs = [(read(s[t]["m²-Mix"]), read(s[t]["m²-Mix (linear)"])) for s in per_seed_sweep
                 if "m²-Mix" in s.get(t, {}) and "m²-Mix (linear)" in s.get(t, {})]
        verdict, mean, std = _verdict([a - b for a, b in pairs])
        rows.append({"claim": f"geodesic m²-Mix beats linear m²-Mix on the target at τ = {t:g}", "a": "m²-Mix",
                     "b": "m²-Mix (linear)", "column": "target R@1", "mean_a": _mean_std([p[0] for p in pairs])[0],
                     "mean_b": _mean_std([p[1] for p in pairs])[0], "difference": mean, "std": std, "seeds": len(pairs),
                     "verdict": verdict})
    return rows


# ------------------------------------------------------------------------------------- run

def run_demo(
    out: str | os.PathLike = "runs/finetune-demo",
    pretrain_steps: int = 500,
    finetune_steps: int = 40,
    lr: float = 3e-4,
    seeds: int = 3,
    arms: Sequence[DemoArm] = DEMO_ARMS,
    temperatures: Sequence[float] = (),
    num_train: int | None = None,
    num_test: int = 500,
    pretrain_overrides: Sequence[str] = (),
    finetune_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run (or continue) the demonstration; returns the per-seed results, the table and the
    claims. ``num_train`` (default: just the pairs the steps use) and ``num_test`` size the
    fine-tuning distribution's splits."""
    if seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {seeds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = _pretrain(out, pretrain_steps, pretrain_overrides)
    by_name = {arm.name: arm for arm in arms}
    sizes = [f"data.shapes.num_train={num_train or 128 * finetune_steps}", f"data.shapes.num_test={num_test}"]

    def finetune(seed: int, name: str, method: str, extra: Sequence[str], zero_shot: bool) -> dict:
        run_dir = out / f"seed{seed}" / name
        done = _finished(run_dir)
        if done is None:
            config = load_finetune_config(None, [
                f"source.path={source}", f"finetune.method={method}", f"train.steps={finetune_steps}", f"optim.lr={lr}",
                f"train.seed={seed}", *sizes, f"output.dir={run_dir.parent}", f"output.name={name}", "train.resume=true",
                f"finetune.eval_zero_shot={'true' if zero_shot else 'false'}", *extra, *finetune_overrides,
            ])
            done = run_finetune(config, run_dir=run_dir)
        return done

    per_seed_results, per_seed, per_seed_sweep = [], [], []
    for seed in range(seeds):
        # the source's own evaluation does not depend on the fine-tuning seed: done once
        results = {arm.name: finetune(seed, arm.name, arm.method, arm.overrides, zero_shot=(seed == 0 and i == 0))
                   for i, arm in enumerate(arms)}
        per_seed_results.append(results)
        per_seed.append(_models(results, by_name))
        sweep: dict[float, dict[str, dict]] = {}
        for t in temperatures:
            for stem, method, extra, label in SWEEP_ARMS:
                res = finetune(seed, f"{stem}-t{t:g}", method, (*extra, f"finetune.temperature={t}"), zero_shot=False)
                sweep.setdefault(t, {})[label] = res["models"]["finetuned"]
        per_seed_sweep.append(sweep)

    table = seed_table(per_seed)
    claims = check_claims(per_seed)
    text = (
        f"Pretrained {pretrain_steps} steps on dark-background shapes; fine-tuned {finetune_steps} steps "
        f"(lr {lr:g}) on light-background shapes, over {seeds} fine-tuning seed(s): mean ± std. target = light "
        f"(fine-tuning) test split, reference = dark (original) test split. R@1 (mean of I→T and T→I), zero-shot "
        f"accuracy (mean over the tasks), ECE (15 bins, mean of both directions) and SIMAT R@1 in %; uniformity, "
        f"alignment and modality gap: lower is better.\n\n{_table_markdown(table)}\n\n"
        f"A claim holds when the mean paired difference (same seed) is in its direction and larger than the "
        f"difference's standard deviation over the random seeds.\n\n{_claims_markdown(claims)}\n"
    )
    sweep_json = None
    if temperatures:
        ece_text, ece = _sweep_table(per_seed_sweep, temperatures, "target ECE", ("FT", "m²-Mix"))
        r1_text, r1 = _sweep_table(per_seed_sweep, temperatures, "target R@1", ("FT", "m²-Mix", "m²-Mix (linear)"))
        sweep_claims = _sweep_claims(per_seed_sweep, temperatures)
        claims += sweep_claims
        sweep_json = {"ece": ece, "r1": r1}
        text += (f"\nECE (%) against the fine-tuning temperature τ (logit scale fixed at 1/τ):\n\n{ece_text}\n"
                 f"\nTarget R@1 (%) against τ, geodesic vs linear mixup:\n\n{r1_text}\n\n{_claims_markdown(sweep_claims)}\n")
    (out / "table.md").write_text(text)
    atomic_write_json(out / "table.json", {"table": table, "claims": claims, "ece_sweep": sweep_json,
                                           "results": per_seed_results})
    print(text)
    print(f"table: {out / 'table.md'}")
    return {"results": per_seed_results, "table": table, "claims": claims, "ece_sweep": sweep_json}
