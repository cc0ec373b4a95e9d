"""`topoclip ablate`: grid files -> runs, the resumable runner, the table, CLIP_benchmark rows, plots."""

import base64
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.analysis.grid import config_differences, load_grid, parse_grid, select_runs
from topoclip.analysis.run_metrics import ANALYSIS_FILE, similarity_samples
from topoclip.analysis.table import clip_benchmark_rows, format_markdown, table_row
from topoclip.cli import main

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # pretrain.run applies train.threads process-wide; later tests get their threads back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SPHERE = {"name": "sphere", "topology.name": "sphere", "topology.dim": 16, "topology.n": None, "topology.m": None}
OBLIQUE = {"name": "ob", "topology.name": "oblique-inner", "topology.n": 4, "topology.m": 4, "topology.dim": 16}


def _spec(**extra):
    spec = {
        "base": "default.yaml",
        "axes": {
            "space": [SPHERE, OBLIQUE],
            "tokens": [{"name": "single"}, {"name": "multi", "model.num_tokens": "${topology.m}"}],
            "temperature": [{"model.logit_scale.init": 1.0, "model.logit_scale.learnable": False}, {}],
        },
    }
    spec.update(extra)
    return spec


def test_grid_is_the_product_of_axes_minus_exclusions_with_stable_names():
    grid = parse_grid(_spec(exclude=[{"space": "sphere", "tokens": "multi"}]), CONFIGS)
    assert len(grid.runs) == 2 * 2 * 2 - 2 and grid.num_excluded == 2
    names = [run.name for run in grid.runs]
    # First axis outermost; an unnamed value is named by its values; "{}" by "base".
    assert names == [
        "sphere__single__1.0-false", "sphere__single__base",
        "ob__single__1.0-false", "ob__single__base", "ob__multi__1.0-false", "ob__multi__base",
    ]
    by_name = {run.name: run for run in grid.runs}
    multi = by_name["ob__multi__base"]
    assert multi.axes == {"space": "ob", "tokens": "multi", "temperature": "base"}
    assert (multi.config.model.num_tokens, multi.config.topology.m) == (4, 4)  # "${topology.m}" resolved
    fixed = by_name["sphere__single__1.0-false"].config.model.logit_scale
    assert (fixed.init, fixed.learnable) == (1.0, False)
    # Fields no axis sets come from the base file.
    assert by_name["ob__single__base"].config.model.logit_scale.init == pytest.approx(14.285714285714286)
    # The same file always gives the same names.
    assert [r.name for r in parse_grid(_spec(exclude=[{"space": "sphere", "tokens": "multi"}]), CONFIGS).runs] == names


def test_reference_to_a_default_field_and_later_axis_wins():
    spec = {"base": "default.yaml", "axes": {
        "a": [{"name": "x", "train.seed": 3}],
        "b": [{"name": "y", "train.seed": 5, "train.batch_size": "${train.seed}"}],
    }}
    config = parse_grid(spec, CONFIGS).runs[0].config
    assert config.train.seed == 5 and config.train.batch_size == 5
    # pixel_noise is not in default.yaml: the reference reads the validated default (6.0).
    spec["axes"]["b"][0] = {"name": "y", "optim.warmup_steps": "${data.shapes.pixel_noise}"}
    assert parse_grid(spec, CONFIGS).runs[0].config.optim.warmup_steps == 6


@pytest.mark.parametrize(
    "change, message",
    [
        ({"axis": {}}, "axis: unknown grid key"),
        ({"axes": []}, "axes: expected a mapping"),
        ({"axes": {"space": []}}, "axes.space: expected a non-empty list"),
        ({"axes": {"space": ["sphere"]}}, "axes.space[0]: expected a mapping"),
        ({"axes": {"space": [{"name": "a"}, {"name": "a"}]}}, "axes.space[1].name: 'a' is used twice"),
        ({"axes": {"space": [{"name": "a b"}]}}, "axes.space[0].name: must be a plain name"),
        ({"axes": {"embedding": [{}]}}, "axes.embedding: the name is a column of the table"),
        ({"exclude": [{"colour": "red"}]}, "exclude[0].colour: no such axis"),
        ({"exclude": [{"space": "cube"}]}, "exclude[0].space: no value named 'cube'"),
        ({"exclude": [{"space": ["sphere", "ob"]}]}, "exclude: every combination of the axes is excluded"),
        ({"analysis": {"probe_task": "texture"}}, "analysis.probe_task: must be one of"),
        ({"analysis": {"ood_shapes": {"image_size": 64}}}, "analysis.ood_shapes.image_size"),
        ({"analysis": {"subset_task": "texture"}}, "analysis.subset_task: must be one of"),
        ({"analysis": {"subset_draws": 0}}, "analysis.subset_draws: must be >= 1"),
        ({"analysis": {"gradcam_pairs": -1}}, "analysis.gradcam_pairs: must be >= 0"),
        ({"overrides": "train.steps=3"}, "overrides: expected a list"),
        ({"base": "missing.yaml"}, "file not found"),
    ],
)
def test_bad_grid_files_raise_naming_the_field(change, message):
    spec = _spec()
    spec.update(change)
    with pytest.raises(ValueError) as err:
        parse_grid(spec, CONFIGS)
    assert message in str(err.value)


def test_invalid_combination_names_the_run_and_field():
    # multi-token on the sphere is invalid: the error names the run and the config field.
    with pytest.raises(ValueError) as err:
        parse_grid(_spec(), CONFIGS)
    assert str(err.value).startswith("run sphere__multi__1.0-false: model.num_tokens:")
    spec = _spec(exclude=[{"space": "sphere", "tokens": "multi"}])
    spec["axes"]["tokens"][1]["model.num_tokens"] = "${topology.nope}"
    with pytest.raises(ValueError, match=r"run ob__multi__1.0-false: model.num_tokens: \$\{topology.nope\} names no config field"):
        parse_grid(spec, CONFIGS)


def test_shipped_grids_expand_and_validate():
    sizes = {}
    for path in sorted((CONFIGS / "ablation").glob("*.yaml")):
        grid = load_grid(path)
        sizes[path.stem] = len(grid.runs)
        steps = 300 if path.stem in ("beyond", "noise_lorentz") else 400  # the newer grids are shorter
        assert all(run.config.train.steps == steps and run.config.data.shapes.num_train == 5120 for run in grid.runs), path
    assert sizes == {"table3": 16, "table4_8": 9, "noise": 10, "seeds": 9, "beyond": 24, "noise_lorentz": 5}
    beyond = load_grid(CONFIGS / "ablation" / "beyond.yaml")
    assert {(r.config.topology.name, r.config.loss.kind) for r in beyond.runs} == {
        (t, k) for t in ("sphere", "oblique-inner", "oblique-geodesic", "lorentz") for k in ("softmax", "sigmoid")}
    sigmoid = [r.config.model for r in beyond.runs if r.config.loss.kind == "sigmoid"]
    assert {(m.logit_bias, m.logit_scale.init) for m in sigmoid} == {(-10.0, 10.0)}  # SigLIP's initialisation
    seeds = load_grid(CONFIGS / "ablation" / "seeds.yaml")
    assert sorted({r.config.train.seed for r in seeds.runs}) == [0, 1, 2]
    assert len({r.config.data.shapes.seed for r in seeds.runs}) == 1  # one data set, three trainings
    table3 = load_grid(CONFIGS / "ablation" / "table3.yaml")
    inits = sorted({(r.config.model.logit_scale.init, r.config.model.logit_scale.learnable) for r in table3.runs})
    assert inits == [(1.0, False), (1.0, True), (pytest.approx(math.exp(2.64), rel=1e-4), True), (pytest.approx(math.exp(5.31), rel=1e-4), True)]
    assert {r.config.topology.name for r in table3.runs} == {"sphere", "euclidean", "oblique-geodesic", "oblique-inner"}
    multi = [r for r in load_grid(CONFIGS / "ablation" / "table4_8.yaml").runs if r.axes["tokens"] == "multi"]
    assert sorted((r.config.topology.n, r.config.model.num_tokens) for r in multi) == [(4, 32), (16, 8), (64, 2)]
    assert all(r.config.topology.n * r.config.topology.m == 128 for r in load_grid(CONFIGS / "ablation" / "table4_8.yaml").runs
               if r.config.topology.m)


def test_select_runs_and_config_differences():
    grid = parse_grid(_spec(exclude=[{"space": "sphere", "tokens": "multi"}]), CONFIGS)
    assert [r.name for r in select_runs(grid, ["ob__multi__*"]).runs] == ["ob__multi__1.0-false", "ob__multi__base"]
    with pytest.raises(ValueError, match="--only: no run matches zzz"):
        select_runs(grid, ["zzz"])
    a, b = grid.runs[0].config, grid.runs[1].config
    assert config_differences(a, b) == ["model.logit_scale.init", "model.logit_scale.learnable"]
    assert config_differences(a, a) == []


# --- metrics against hand-computed values -------------------------------------------------

class _FixedEncoder(torch.nn.Module):
    """Returns given points for images (by position) and texts (by caption index)."""

    def __init__(self, topology, image_points, text_points):
        super().__init__()
        self.topology = topology
        self.image_points, self.text_points = image_points, text_points
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, images):
        return self.image_points[images[:, 0, 0, 0].long()]

    def encode_text(self, input_ids, attention_mask):
        return self.text_points[input_ids[:, 0]]


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n):
        self.captions = [str(i) for i in range(n)]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return torch.full((3, 2, 2), float(i)), self.captions[i]


def test_similarity_samples_match_hand_computed_values():
    import topoclip

    topo = topoclip.topology("sphere", dim=2)
    c, s = math.cos(0.3), math.sin(0.3)
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [c, s]])
    v = torch.tensor([[c, s], [0.0, -1.0], [1.0, 0.0]])
    model = _FixedEncoder(topo, u, v)
    def tokenizer(texts):
        return {"input_ids": torch.tensor([[int(t)] for t in texts]), "attention_mask": torch.ones(len(texts), 1)}
    values, geometry = similarity_samples(model, tokenizer, _Pairs(3), max_pairs=3, samples=100, batch_size=2, device="cpu")
    def dot(a, b):
        return float(a @ b)
    assert sorted(values["positive"]) == pytest.approx(sorted([c, -1.0, c]))
    assert sorted(values["negative"]) == pytest.approx(sorted([dot(u[i], v[j]) for i in range(3) for j in range(3) if i != j]))
    assert sorted(values["image-image"]) == pytest.approx(sorted([0.0, c, s]))
    assert sorted(values["text-text"]) == pytest.approx(sorted([-s, c, 0.0]))
    align = np.mean([float((u[i] - v[i]).pow(2).sum()) for i in range(3)])
    assert geometry["alignment"] == pytest.approx(align, rel=1e-6)
    points = torch.cat([u, v])
    sq = [float((points[i] - points[j]).pow(2).sum()) for i in range(6) for j in range(6) if i != j]
    assert geometry["uniformity"] == pytest.approx(math.log(np.mean(np.exp(-2.0 * np.array(sq)))), rel=1e-5)
    # Subsampling keeps `samples` of each kind's values, drawn from them.
    few, _ = similarity_samples(model, tokenizer, _Pairs(3), max_pairs=3, samples=2, batch_size=2, device="cpu")
    for kind, all_values in values.items():
        assert len(few[kind]) == 2
        assert all(np.isclose(all_values, x).any() for x in few[kind])


ANALYSIS = {
    "topology": {"label": "Ob(4,4) inner"},
    "temperature": {"init_scale": 1.0, "learnable": False, "final_scale": 1.0, "final_temperature": 1.0},
    "retrieval": {"i2t_R@1": 0.25, "i2t_R@5": 0.5, "t2i_R@1": 0.125},
    "zeroshot_top1": {"shape": 0.5, "colour": 0.25},
    "zeroshot_mean_top1": 0.375,
    "linear_probe": {"task": "shape", "top1": 0.875},
    "map_at_r": {"i2t_mAP@R": 0.5, "i2t_R-P": 0.375, "t2i_mAP@R": 0.0625, "t2i_R-P": 0.125},
    "convergence": {"step": None, "steps": 10, "steps_per_epoch": 4},
    "geometry": {"in-domain": {"alignment": 1.5, "uniformity": -2.0}},
    "train_seconds": 3.0,
}


def test_table_row_markdown_and_clip_benchmark_rows():
    row = table_row("ob__fixed", {"space": "ob"}, ANALYSIS)
    assert row["i2t_R@1"] == 0.25 and row["t2i_R@1"] == 0.125 and row["zeroshot_acc"] == 0.375
    assert row["linear_probe_acc"] == 0.875 and row["converge_step"] is None
    md = format_markdown([row], ["space"]).splitlines()
    assert md[0].startswith("| run | space | embedding |")
    assert row["i2t_mAP@R"] == 0.5 and row["t2i_R-P"] == 0.125
    assert md[2] == "| ob__fixed | ob | Ob(4,4) inner | 1 | no | 25.0 | 12.5 | 50.0 | 37.5 | 6.2 | 12.5 | 37.5 | 87.5 | 1 | 1.0000 | fixed |"
    learned = dict(ANALYSIS, temperature=dict(ANALYSIS["temperature"], learnable=True))
    assert format_markdown([table_row("x", {}, learned)], []).splitlines()[2].endswith("| - |")  # never settled

    rows = clip_benchmark_rows("topoclip-Ob", "grid/ob__fixed", ANALYSIS)
    assert all(set(r) == {"dataset", "model", "pretrained", "language", "task", "metrics"} for r in rows)
    by_task = {(r["task"], r["dataset"]): r["metrics"] for r in rows}
    assert by_task[("zeroshot_classification", "shapes_shape")] == {"acc1": 0.5}
    # CLIP_benchmark names retrieval by what is retrieved: image retrieval = text query (T->I).
    assert by_task[("zeroshot_retrieval", "shapes_retrieval")] == {
        "text_retrieval_recall@1": 0.25, "text_retrieval_recall@5": 0.5, "image_retrieval_recall@1": 0.125,
        "text_retrieval_map@r": 0.5, "text_retrieval_r_precision": 0.375,
        "image_retrieval_map@r": 0.0625, "image_retrieval_r_precision": 0.125}
    assert by_task[("linear_probe", "shapes_shape")] == {"lp_acc1": 0.875}


# --- the runner end to end on a tiny grid -------------------------------------------------

TINY = TINY_TOWERS + QUIET_RUN + [
    "train.steps=5",
    "train.batch_size=16",
    "train.checkpoint_every=3",
    "optim.warmup_steps=1",
    "data.shapes.num_train=64",
    "data.shapes.num_val=8",
    "data.shapes.num_test=40",
    "eval.batch_size=64",
    "train.threads=1",  # tiny ops: a second intra-op thread only waits on a busy machine
]


def _tiny_grid(tmp_path: Path) -> Path:
    sphere_fixed = dict(SPHERE, **{"model.logit_scale.init": 1.0, "model.logit_scale.learnable": False})
    spec = {
        "base": str(CONFIGS / "default.yaml"),
        "overrides": TINY,
        "axes": {
            "space": [sphere_fixed, OBLIQUE],
            "tokens": [{"name": "single"}, {"name": "multi", "model.num_tokens": "${topology.m}"}],
        },
        "exclude": [{"space": "sphere", "tokens": "multi"}, {"space": "ob", "tokens": "single"}],
        "analysis": {"probe_train_size": 40, "similarity_pairs": 30, "similarity_samples": 200,
                     "subset_draws": 2, "gradcam_pairs": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def results_caption(out: Path, run: str) -> str:
    """The first test caption of a grid run's data (the first pair Grad-CAM explains)."""
    from topoclip.config import load_config
    from topoclip.data.shapes import make_shapes
    from topoclip.runs import run_config_path

    return make_shapes(load_config(run_config_path(out / "runs" / run)).data.shapes).test.captions[0]


def _map_at_r_by_hand(scores: torch.Tensor, positive: torch.Tensor) -> tuple[float, float]:
    """Mean mAP@R and R-Precision over the rows of ``scores``, one query at a time."""
    aps, rps = [], []
    for row, pos in zip(scores.tolist(), positive.tolist()):
        r = sum(pos)
        ranked = sorted(range(len(row)), key=lambda j: -row[j])[:r]  # no ties in float scores here
        hits, ap = 0, 0.0
        for i, j in enumerate(ranked, 1):
            if pos[j]:
                hits += 1
                ap += hits / i
        aps.append(ap / r)
        rps.append(hits / r)
    return float(np.mean(aps)), float(np.mean(rps))


def _check_map_at_r(run_dir: Path, row: dict) -> None:
    """The table's mAP@R / R-P equal a by-hand computation on the run's test retrieval set."""
    import topoclip
    from topoclip.config import load_config
    from topoclip.data import make_shapes
    from topoclip.eval import embed_images, embed_texts
    from topoclip.runs import run_config_path

    run = topoclip.load_run(run_dir)
    model, tokenizer = run.model, run.tokenizer
    retrieval = make_shapes(load_config(run_config_path(run_dir)).data.shapes).retrieval_set("test")
    u = embed_images(model, retrieval, 64, "cpu", progress=False)
    v = embed_texts(model, list(retrieval.captions), tokenizer, 64, "cpu", progress=False)
    scores = model.topology.similarity(u, v)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[retrieval.caption_to_image, torch.arange(len(retrieval.captions))] = True
    assert positive.sum(1).min() >= 2  # several positives per image query
    for direction, (s, p) in {"i2t": (scores, positive), "t2i": (scores.T, positive.T)}.items():
        ap, rp = _map_at_r_by_hand(s, p)
        assert row[f"{direction}_mAP@R"] == pytest.approx(ap, abs=1e-5), direction
        assert row[f"{direction}_R-P"] == pytest.approx(rp, abs=1e-5), direction


def _mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_runner_trains_skips_finished_runs_and_reruns_only_missing_ones(tmp_path, capsys):
    grid_file, out = _tiny_grid(tmp_path), tmp_path / "grid"
    # --only trains a part of the grid; the table lists what has finished.
    assert main(["ablate", "--grid", str(grid_file), "--out", str(out), "--only", "sphere*"]) == 0
    log = capsys.readouterr().out
    assert "[1/1] sphere__single: trained" in log and "ob__multi" not in log
    assert "1 runs of the grid have not finished yet" in log
    assert [r["run"] for r in json.loads((out / "table.json").read_text())["rows"]] == ["sphere__single"]
    assert main(["ablate", "--grid", str(grid_file), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[1/2] sphere__single: done already" in log and "[2/2] ob__multi: trained" in log

    table = json.loads((out / "table.json").read_text())
    assert [r["run"] for r in table["rows"]] == ["sphere__single", "ob__multi"] and table["axes"] == ["space", "tokens"]
    for row in table["rows"]:
        run_dir = out / "runs" / row["run"]
        results = json.loads((run_dir / "results.json").read_text())
        analysis = json.loads((run_dir / ANALYSIS_FILE).read_text())
        tops = [m["top1"] for m in results["eval"]["zeroshot"].values()]
        assert row["zeroshot_acc"] == pytest.approx(sum(tops) / len(tops))
        assert row["i2t_R@1"] == results["eval"]["retrieval"]["i2t_R@1"]
        assert row["temperature_final"] == pytest.approx(1.0 / row["scale_final"])
        assert 0.0 <= row["linear_probe_acc"] <= 1.0 and analysis["linear_probe"]["n_train"] == 40
        assert row["steps_per_epoch"] == 64 // 16 and row["steps"] == 5
        _check_map_at_r(run_dir, row)
        # Grad-CAM: one pair (the grid's gradcam_pairs), final score + 2 tokens for the multi-token run.
        (pair,) = analysis["gradcam"]
        assert pair["caption"] == results_caption(out, row["run"])
        multi = row["run"] == "ob__multi"
        assert len(pair["tokens"]) == (2 if multi else 0) and all(0 <= k < 4 for k in pair["tokens"])
        expected = {"figure", "full_image", "full_text", *(f"token{k}_{x}" for k in pair["tokens"] for x in ("image", "text"))}
        assert {Path(f).stem for f in pair["files"]} == expected
        for f in pair["files"]:
            assert (run_dir / f).read_bytes()[:8] == PNG_MAGIC and (run_dir / f).stat().st_size > 1000, f
        assert sorted(p.name for p in (run_dir / "analysis/gradcam").iterdir()) == ["pair0"]
    fixed, learned = table["rows"]
    # Token subsets: only the multi-token run; using all 4 tokens is the full model's zero-shot accuracy.
    assert json.loads((out / "runs/sphere__single" / ANALYSIS_FILE).read_text())["token_subsets"] is None
    subsets = json.loads((out / "runs/ob__multi" / ANALYSIS_FILE).read_text())["token_subsets"]
    assert subsets["task"] == "shape" and [r["size"] for r in subsets["rows"]] == [1, 2, 4]
    assert [r["draws"] for r in subsets["rows"]] == [2, 2, 1]  # C(4, 4) = 1 subset only
    for r in subsets["rows"]:
        assert r["mean"] == pytest.approx(np.mean(r["accuracies"])) and r["std"] == pytest.approx(np.std(r["accuracies"]))
        assert all(len(s) == r["size"] for s in r["subsets"])
    full = json.loads((out / "runs/ob__multi/results.json").read_text())["eval"]["zeroshot"]["shape"]["top1"]
    assert (subsets["rows"][-1]["mean"], subsets["rows"][-1]["std"]) == (pytest.approx(full), 0.0)
    assert list(table["token_subsets"]) == ["ob__multi"]
    assert table["token_subsets"]["ob__multi"]["rows"][0] == {k: subsets["rows"][0][k] for k in ("size", "mean", "std", "draws")}
    assert (fixed["learnable"], fixed["scale_final"], fixed["converge_step"]) == (False, 1.0, None)
    # The learned run's converge step is the epoch rule applied to its logged scales.
    from topoclip.eval.convergence import temperature_convergence_step

    logged = [(json.loads(x)["step"], json.loads(x)["scale"]) for x in (out / "runs/ob__multi/log.jsonl").read_text().splitlines()]
    assert learned["converge_step"] == temperature_convergence_step(logged, 4)
    assert "| sphere__single | sphere | single | Sphere(16) | 1 | no |" in (out / "table.md").read_text()
    assert (out / "table.csv").read_text().splitlines()[0].startswith("run,space,tokens,embedding,")

    bench = [json.loads(line) for line in (out / "clip_benchmark.jsonl").read_text().splitlines()]
    assert bench == json.loads((out / "clip_benchmark.json").read_text())
    assert len(bench) == 2 * (4 + 1 + 1)  # 4 zero-shot tasks, retrieval, linear probe per run
    assert all({"dataset", "model", "task", "metrics"} <= set(r) for r in bench)
    retrieval_rows = [r["metrics"] for r in bench if r["task"] == "zeroshot_retrieval"]
    for metrics, row in zip(retrieval_rows, table["rows"]):
        assert (metrics["text_retrieval_map@r"], metrics["image_retrieval_r_precision"]) == (row["i2t_mAP@R"], row["t2i_R-P"])

    pngs = [out / "plots/temperature.png", out / "plots/uniformity_alignment.png",
            out / "plots/similarity/sphere__single.png", out / "plots/similarity/ob__multi.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, png

    # Second invocation: nothing is retrained or re-analysed, the table is byte-identical.
    runs_before, table_before = _mtimes(out / "runs"), (out / "table.md").read_text()
    json_before = (out / "table.json").read_text()
    assert main(["ablate", "--grid", str(grid_file), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("done already") == 2 and "trained" not in log
    assert _mtimes(out / "runs") == runs_before
    assert (out / "table.md").read_text() == table_before and (out / "table.json").read_text() == json_before

    # Losing one run's results reruns that run only.
    (out / "runs/ob__multi/results.json").unlink()
    assert main(["ablate", "--grid", str(grid_file), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[1/2] sphere__single: done already" in log and "[2/2] ob__multi: trained" in log
    after = _mtimes(out / "runs")
    assert {k: v for k, v in after.items() if k.startswith("sphere__single")} == {
        k: v for k, v in runs_before.items() if k.startswith("sphere__single")}
    # ... and analyses it again (its cached analysis belonged to the old results).
    analysis_file = f"ob__multi/{ANALYSIS_FILE}"
    assert after[analysis_file] != runs_before[analysis_file]
    assert json.loads((out / "runs" / analysis_file).read_text())["results_sha256"] == hashlib.sha256(
        (out / "runs/ob__multi/results.json").read_bytes()).hexdigest()

    # A finished run trained with another config is an error, not a stale row.
    assert main(["ablate", "--grid", str(grid_file), "--out", str(out), "optim.lr=5e-4"]) == 1
    assert "was trained with a different config (optim.lr)" in capsys.readouterr().err

    # The grid report: the table and every plot, embedded.
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<table>" in page and "sphere__single" in page and "Sphere(16)" in page
    assert page.count('src="data:image/png;base64,') == len(pngs) + 2 and "src=\"http" not in page  # + 1 Grad-CAM figure per run
    for name in ("sphere__single", "ob__multi"):
        figure = (out / "runs" / name / "analysis/gradcam/pair0/figure.png").read_bytes()
        assert base64.b64encode(figure).decode() in page
    assert page.count("Token subsets") == 1 and "I→T mAP@R" in page


def test_cli_list_and_errors(tmp_path, capsys):
    grid_file = _tiny_grid(tmp_path)
    assert main(["ablate", "--grid", str(grid_file), "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["sphere__single", "ob__multi", "2 runs (2 combinations excluded)"]
    assert main(["ablate", "--grid", str(tmp_path / "nope.yaml")]) == 2
    assert "topoclip ablate: error: grid: file not found" in capsys.readouterr().err
    assert main(["ablate", "--grid", str(grid_file), "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_grid_on_your_own_data_has_its_suites_as_columns(tmp_path):
    from tests.test_eval_suites import write_suite
    from topoclip.analysis import load_grid, run_grid, write_report

    suite = write_suite(tmp_path)
    grid = tmp_path / "mine.yaml"
    grid.write_text(yaml.safe_dump({
        "base": str(CONFIGS / "default.yaml"),
        "overrides": [*TINY_TOWERS, *QUIET_RUN, "data.source=csv", f"data.csv.path={tmp_path / 'pairs.tsv'}",
                      "data.csv.holdout=0.3", f"eval.suite_file={suite}", "eval.robustness=false",
                      "train.steps=2", "train.batch_size=4"],
        "axes": {"space": [{"name": "sphere", "topology.name": "sphere"}, {"name": "ob", "topology.name": "oblique-inner"}]},
    }))
    rows = run_grid(load_grid(grid), tmp_path / "out", echo=lambda m: None)
    assert [r["embedding"] for r in rows] == ["Sphere(128)", "Ob(16,8) inner"]
    table = (tmp_path / "out" / "table.md").read_text()
    for column in ("shapes-folder/acc1", "pairs/text_retrieval_recall@1", "probe/lp_acc1"):
        assert column in table.splitlines()[0]
        assert all(0.0 <= r[column] <= 1.0 for r in rows)
    bench = [json.loads(line) for line in (tmp_path / "out" / "clip_benchmark.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in bench} == {"shapes-folder", "letters", "pairs", "karpathy", "probe"}
    assert write_report(tmp_path / "out").is_file()
