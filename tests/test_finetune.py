"""Fine-tuning: WiSE-FT weight interpolation, the embedding shift, and `topoclip finetune`
end to end from a topoclip run, a tiny OpenCLIP weights file and a tiny Hugging Face CLIP
directory (all made here, offline), including exact resume of a mixup run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import topoclip
from topoclip.cli import main
from topoclip.config import FinetuneConfig, load_config, load_finetune_config
from topoclip.data import build_tokenizer, make_collate, make_shapes
from topoclip.eval import EmbeddingShiftModel, estimate_modality_gap
from topoclip.eval.geometry_metrics import embedding_shift, modality_gap
from topoclip.models import ImageTowerConfig, ModelConfig, TextTowerConfig, build_model, interpolate_weights, wise_ft
from topoclip.recipes import pretrain
from topoclip.recipes.finetune import run_finetune
from topoclip.runs import load_run
from topoclip.runs.checkpoint import latest_checkpoint

TINY_OPENCLIP = "topoclip-test-tiny"  # registered by the openclip_files fixture (conftest.py)

TINY_DATA = [
    "data.shapes.num_train=48",
    "data.shapes.num_val=4",
    "data.shapes.num_test=24",
    "data.shapes.zeroshot_tasks=[shape,colour]",
    "train.batch_size=8",
    "train.steps=4",
    "train.epochs=null",
    "train.checkpoint_every=0",
    "eval.batch_size=32",
    "logging.progress=false",
    "logging.tensorboard=false",
]


def _tiny_model(seed, topology=None, vocab_size=50):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        image=ImageTowerConfig(img_size=32, patch_size=8, depth=1, width=32, heads=2),
        text=TextTowerConfig(width=32, depth=1, heads=2, context_length=16),
    )
    return build_model(cfg, topology or topoclip.topology("oblique-inner", n=4, m=4), vocab_size=vocab_size, pad_token_id=0).eval()


def _inputs(b=5):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (b, 16), generator=g)
    ids[:, 0] = 2
    return torch.randn(b, 3, 32, 32, generator=g), ids, torch.ones_like(ids)


# --------------------------------------------------------------------------------- WiSE-FT

def test_wise_ft_endpoints_reproduce_each_model_and_the_middle_is_the_average():
    a, b = _tiny_model(0), _tiny_model(1)
    images, ids, mask = _inputs()
    with torch.no_grad():
        outputs = {name: m(images, ids, mask) for name, m in (("a", a), ("b", b))}
        for alpha, name in ((0.0, "a"), (1.0, "b")):
            mixed = wise_ft(a, b, alpha, into=_tiny_model(2))
            u, v = mixed(images, ids, mask)
            assert torch.equal(u, outputs[name][0]) and torch.equal(v, outputs[name][1]), alpha
    half = interpolate_weights(a, b, 0.5)
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in half.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (sa[key] + sb[key]) / 2, rtol=0, atol=1e-6)
    target = wise_ft(a, b, 0.25)
    assert target is a  # loads into the zero-shot model by default


def test_wise_ft_refuses_models_that_differ():
    a = _tiny_model(0)
    other = _tiny_model(0, topology=topoclip.topology("sphere", dim=32))
    with pytest.raises(ValueError, match="shapes differ|differ in their parameters"):
        interpolate_weights(a, other, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_weights(a, a, float("nan"))


# ------------------------------------------------------------------------- embedding shift

def test_embedding_shift_model_applies_the_measured_gap():
    data = make_shapes(None, num_train=20, num_val=2, num_test=2)
    tok = build_tokenizer(data.captions("train"), 60, 16)
    model = _tiny_model(0, vocab_size=tok.vocab_size)
    collate = make_collate(tok)
    gap = estimate_modality_gap(model, data.train, collate, batch_size=7)
    batch = collate([data.train[i] for i in range(len(data.train))])
    with torch.no_grad():
        v, t = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(gap, modality_gap(v, t), rtol=0, atol=1e-6)
    shifted = EmbeddingShiftModel(model, gap, c=1.0)
    with torch.no_grad():
        sv, st = shifted(batch["images"], batch["input_ids"], batch["attention_mask"])
    ev, et = embedding_shift(model.topology, v, t, c=1.0, gap=gap)
    torch.testing.assert_close(sv, ev, rtol=0, atol=1e-6)
    torch.testing.assert_close(st, et, rtol=0, atol=1e-6)
    blocks = sv.view(len(sv), 4, 4).norm(dim=-1)
    torch.testing.assert_close(blocks, torch.ones_like(blocks))  # still on Ob(4, 4)
    assert modality_gap(sv, st).norm() < 0.5 * gap.norm()
    with pytest.raises(ValueError, match="gap"):
        EmbeddingShiftModel(model, torch.zeros(3))


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def topoclip_run(tmp_path_factory):
    """A tiny topoclip run (a few steps on the default dark-background shapes)."""
    root = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(None, TINY_DATA + [
        f"output.dir={root}", "output.name=pre", "optim.warmup_steps=1", "eval.enabled=false",
        "model.image.depth=1", "model.image.width=32", "model.image.heads=2",
        "model.text.depth=1", "model.text.width=32", "model.text.heads=2",
    ])
    pretrain.run(cfg)
    return root / "pre"


def test_wise_ft_from_a_topoclip_run_evaluates_every_model_on_both_distributions(topoclip_run, tmp_path):
    cfg = load_finetune_config(None, TINY_DATA + [
        f"source.path={topoclip_run}", "finetune.method=wise-ft", "finetune.wise_alpha=0.25",
        "optim.lr=1e-3", f"output.dir={tmp_path}",
    ])
    assert cfg.optim.warmup_for(4) == 0  # 10% of 4 steps, rounded
    results = run_finetune(cfg)
    run_dir = tmp_path / "finetune-wise-ft"
    assert json.loads((run_dir / "results.json").read_text())["method"] == "wise-ft"
    assert set(results["models"]) == {"zero_shot", "finetuned", "wise_ft"}
    for evaluation in results["models"].values():
        for dist in ("target", "reference"):
            assert {"zeroshot", "retrieval", "robustness"} <= set(evaluation[dist])
    # The saved WiSE-FT weights are the lerp of the source and the fine-tuned weights.
    source = load_run(topoclip_run).model.state_dict()
    tuned = load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
    wise = load_file(str(run_dir / "wise_ft" / "model.safetensors"))
    for key in ("logit_scale.log_scale", "projection.image.weight") if "projection.image.weight" in wise else ("logit_scale.log_scale",):
        torch.testing.assert_close(wise[key], source[key] + 0.25 * (tuned[key] - source[key]), rtol=0, atol=1e-6)
    changed = [k for k in tuned if tuned[k].is_floating_point() and not torch.equal(tuned[k], source[k])]
    assert changed, "fine-tuning changed no weight"
    # the target distribution is the light background, the reference the source's dark one
    assert results["models"]["zero_shot"]["target"] != results["models"]["zero_shot"]["reference"]
    # the fine-tuned run reloads (for `topoclip eval` and as a new source)
    again = load_run(run_dir)
    assert "fine-tuned from" in again.description
    assert torch.equal(again.model.state_dict()["logit_scale.log_scale"], tuned["logit_scale.log_scale"])


def test_mixup_finetune_resumes_exactly(topoclip_run, tmp_path):
    common = TINY_DATA + [f"source.path={topoclip_run}", "finetune.method=m3mix", "optim.lr=1e-3",
                          "finetune.eval_zero_shot=false", "eval.enabled=false"]
    straight = run_finetune(load_finetune_config(None, common + [f"output.dir={tmp_path / 'a'}"]))
    part = load_finetune_config(None, common + [f"output.dir={tmp_path / 'b'}", "train.checkpoint_every=2"])
    run_finetune(part)
    run_b = tmp_path / "b" / "finetune-m3mix"
    # Drop the final checkpoint, as if the run had died after step 2, and continue it: the
    # mixup lambdas, data order and RNG must replay exactly.
    final = latest_checkpoint(run_b)
    assert final.name.endswith("4")
    shutil.rmtree(final)
    assert latest_checkpoint(run_b).name.endswith("2")
    again = load_finetune_config(None, common + [f"output.dir={tmp_path / 'b'}", "train.checkpoint_every=2", "train.resume=true"])
    resumed = run_finetune(again, run_dir=run_b)
    assert resumed["train"]["steps"] == 4
    a = load_file(str(latest_checkpoint(tmp_path / "a" / "finetune-m3mix") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(run_b) / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight["train"]["final_loss"] == resumed["train"]["final_loss"]


def test_embedding_shift_method_trains_nothing(topoclip_run, tmp_path):
    results = run_finetune(load_finetune_config(None, TINY_DATA + [
        f"source.path={topoclip_run}", "finetune.method=embedding-shift", f"output.dir={tmp_path}", "eval.robustness=true",
    ]))
    assert set(results["models"]) == {"zero_shot", "embedding_shift"}
    assert "train" not in results
    assert latest_checkpoint(tmp_path / "finetune-embedding-shift") is None
    gap_before = results["models"]["zero_shot"]["target"]["robustness"]["geometry"]["modality_gap"]
    gap_after = results["models"]["embedding_shift"]["target"]["robustness"]["geometry"]["modality_gap"]
    assert gap_after < gap_before


def test_m2mix_finetune_from_an_openclip_weights_file(openclip_files, tmp_path):
    _, root = openclip_files
    code = main(["finetune", "--from", str(root / "tiny.pt"), "--model-name", TINY_OPENCLIP, "--method", "m2mix",
                 *TINY_DATA, "optim.lr=1e-3", f"output.dir={tmp_path}", "eval.robustness=false"])
    assert code == 0
    results = json.loads((tmp_path / "finetune-m2mix" / "results.json").read_text())
    assert results["train"]["steps"] == 4 and results["train"]["skipped_steps"] == 0
    log = [json.loads(line) for line in (tmp_path / "finetune-m2mix" / "log.jsonl").read_text().splitlines()]
    assert all("loss_m2" in row and "lam_m2" in row for row in log)  # the mixup term was trained
    assert "loss_v" not in log[0]
    tuned = load_file(str(latest_checkpoint(tmp_path / "finetune-m2mix") / "model.safetensors"))
    original = torch.load(root / "tiny.pt", weights_only=True)
    assert not torch.equal(tuned["clip.visual.conv1.weight"], original["visual.conv1.weight"])


def test_ft_from_a_hugging_face_directory_on_the_oblique_manifold(hf_dir, tmp_path):
    _, _, root = hf_dir
    results = run_finetune(load_finetune_config(None, TINY_DATA + [
        f"source.path={root}", "source.topology=oblique-inner", "source.m=4", "optim.lr=1e-3", "finetune.eval_zero_shot=false",
        f"output.dir={tmp_path}", "eval.robustness=false",
    ]))
    assert results["train"]["steps"] == 4
    tuned = load_run(tmp_path / "finetune-ft")
    assert tuned.model.topology.name == "oblique-inner" and tuned.model.topology.num_blocks == 4
    assert tuned.image_size == 32 and tuned.mean == (0.5, 0.5, 0.5)


def test_finetune_config_errors_name_the_field(tmp_path, topoclip_run):
    with pytest.raises(ValueError, match="finetune.method"):
        load_finetune_config(None, ["finetune.method=mixup"])
    with pytest.raises(ValueError, match="finetune.mixup.m2"):
        load_finetune_config(None, ["finetune.method=m2mix", "finetune.mixup.m2=0"])
    with pytest.raises(ValueError, match="finetune.wise_alpha"):
        load_finetune_config(None, ["finetune.wise_alpha=1.5"])
    with pytest.raises(ValueError, match="source.path"):
        run_finetune(FinetuneConfig(), run_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="source.topology"):
        run_finetune(load_finetune_config(None, TINY_DATA + [f"source.path={topoclip_run}", "source.topology=sphere"]), run_dir=tmp_path / "y")
    assert main(["finetune", "--from", str(tmp_path / "missing")]) == 1
    assert main(["finetune", "--method", "nope"]) == 2


def test_finetune_demo_over_seeds_judges_the_claims_then_reuses_finished_stages(tmp_path):
    from topoclip.recipes.finetune_demo import run_demo

    tiny_model = ["model.image.depth=1", "model.image.width=32", "model.image.heads=2",
                  "model.text.depth=1", "model.text.width=32", "model.text.heads=2"]
    kwargs = dict(pretrain_steps=3, finetune_steps=2, lr=1e-3, seeds=2, temperatures=(0.05,), num_train=48, num_test=24,
                  pretrain_overrides=TINY_DATA[:-2] + tiny_model + ["logging.progress=false"], finetune_overrides=TINY_DATA)
    demo = run_demo(tmp_path, **kwargs)
    table = (tmp_path / "table.md").read_text()
    for label in ("zero-shot", "| FT", "WiSE-FT", "m²-Mix", "m²-Mix (linear)", "m³-Mix", "LP-FT", "LP-FT w/ m²-Mix",
                  "WiSE-FT w/ m²-Mix", "embedding shift", "τ = 0.05"):
        assert label in table, label
    # every trained cell is a mean over the 2 seeds (a std is shown); zero-shot is evaluated once
    assert demo["table"]["FT"]["target R@1"][1] >= 0 and len(demo["results"]) == 2
    claims = {row["claim"]: row for row in demo["claims"]}
    assert any("harder" in c for c in claims) and any("geodesic" in c for c in claims) and any("SIMAT" in c for c in claims)
    for row in demo["claims"]:
        assert row["verdict"] in ("holds", "fails", "within noise", "n/a")
        if "harder" not in row["claim"]:
            assert row["seeds"] == 2
    from topoclip.atomic import json_safe

    assert json.loads((tmp_path / "table.json").read_text())["claims"] == json_safe(demo["claims"])
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("results.json")}
    assert len(stamps) == 1 + 2 * (7 + 3)  # pretrain + 2 seeds x (7 arms + FT, m²-Mix, linear m²-Mix at one τ)
    assert any(row["claim"].endswith("at τ = 0.05") for row in demo["claims"]) and "r1" in demo["ece_sweep"]
    run_demo(tmp_path, **kwargs)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("results.json")} == stamps


def test_a_claim_holds_only_beyond_the_seed_spread():
    from topoclip.recipes.finetune_demo import _verdict

    assert _verdict([1.0, 1.2, 0.9])[0] == "holds"
    assert _verdict([1.0, -0.8, 0.3])[0] == "within noise"
    assert _verdict([-2.0, -2.5, -1.5])[0] == "fails"
    assert _verdict([0.5])[0] == "holds (one seed)"


def test_topoclip_eval_and_load_pretrained_open_a_finetuned_run(topoclip_run, tmp_path):
    from topoclip.models import load_pretrained

    run_finetune(load_finetune_config(None, TINY_DATA + [
        f"source.path={topoclip_run}", "optim.lr=1e-3", f"output.dir={tmp_path}",
        "finetune.eval_zero_shot=false", "eval.robustness=false",
    ]))
    run_dir = tmp_path / "finetune-ft"
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--output", str(out), "--data", "data.shapes.background=dark"]) == 0
    dark = json.loads(out.read_text())["eval"]
    assert main(["eval", "--checkpoint", str(run_dir), "--output", str(out)]) == 0
    light = json.loads(out.read_text())["eval"]  # default: the fine-tuning (light) distribution
    results = json.loads((run_dir / "results.json").read_text())["models"]["finetuned"]
    assert light["retrieval"] == results["target"]["retrieval"]
    assert dark["retrieval"] == results["reference"]["retrieval"]
    model, tokenizer, transform = load_pretrained(run_dir)
    assert transform.image_size == 32 and model.topology.name == "oblique-inner"


def test_shipped_finetune_config_spells_out_the_defaults():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "finetune.yaml"
    assert load_finetune_config(path) == FinetuneConfig()


def _write_pairs(root, n_images=12, rows_per_image=(1, 2)):
    """PNG files of shapes images and a TSV with 1-2 rows (captions) per image."""
    from PIL import Image

    data = make_shapes(None, num_train=n_images, num_val=1, num_test=1, background="light")
    lines = ["filepath\ttitle"]
    for i in range(n_images):
        name = f"img{i:03d}.png"
        Image.fromarray(data.train.images[i].permute(1, 2, 0).numpy()).save(root / name)
        for r in range(rows_per_image[i % len(rows_per_image)]):
            lines.append(f"{name}\t{data.train.captions[i]}{' again' if r else ''}")
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n")
    return root / "pairs.tsv"


def test_holdout_split_is_by_image_file_and_groups_captions(tmp_path):
    from topoclip.data import CsvPairs, holdout_split

    pairs = CsvPairs(_write_pairs(tmp_path), image_size=32)
    train, held = holdout_split(pairs, 0.25, seed=0)
    assert len(held) == 3  # 25% of 12 files
    train_files = {pairs.image_paths[i] for i in train.indices}
    held_files = {pairs.image_paths[r] for r in held._rows}
    assert not train_files & held_files and len(train_files | held_files) == 12
    assert len(train) + len(held.captions) == len(pairs)
    # captions of the same file point at the same image; the image loads as that file
    for caption, image in zip(held.captions, held.caption_to_image.tolist()):
        row = next(r for r in range(len(pairs)) if pairs.captions[r] == caption)
        assert pairs.image_paths[row] == pairs.image_paths[held._rows[image]]
    assert torch.equal(held[0], pairs[held._rows[0]][0])
    again, _ = holdout_split(pairs, 0.25, seed=0)
    assert again.indices == train.indices
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(pairs, 1.0)


def test_finetune_on_csv_pairs_evaluates_on_the_held_out_images(topoclip_run, tmp_path):
    tsv = _write_pairs(tmp_path)
    results = run_finetune(load_finetune_config(None, TINY_DATA + [
        f"source.path={topoclip_run}", "data.source=csv", f"data.csv.path={tsv}", "data.csv.holdout=0.25",
        "optim.lr=1e-3", f"output.dir={tmp_path}", "finetune.eval_zero_shot=false", "train.batch_size=4",
    ]))
    target = results["models"]["finetuned"]["target"]
    assert "zeroshot" not in target and target["robustness"]["num_images"] == 3
    assert results["train"]["steps"] == 4
    with pytest.raises(ValueError, match="data.csv.path"):
        load_finetune_config(None, ["data.source=csv"])


def _finetune_worker(rank, world, init_file, overrides):
    import os

    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        run_finetune(load_finetune_config(None, overrides))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["ft", "lp-ft"])  # lp-ft: two trainers (two DDP wrappers) in turn
def test_two_process_finetune_equals_one_process(topoclip_run, tmp_path, method):
    import torch.multiprocessing as mp

    common = TINY_DATA + [f"source.path={topoclip_run}", "optim.lr=1e-4", "eval.enabled=false", "train.device=cpu",
                          f"finetune.method={method}"]
    mp.spawn(_finetune_worker, args=(2, str(tmp_path / "init"), common + [f"output.dir={tmp_path / 'two'}"]), nprocs=2)
    run_finetune(load_finetune_config(None, common + [f"output.dir={tmp_path / 'one'}"]))
    two = load_file(str(latest_checkpoint(tmp_path / "two" / f"finetune-{method}") / "model.safetensors"))
    one = load_file(str(latest_checkpoint(tmp_path / "one" / f"finetune-{method}") / "model.safetensors"))
    source = load_run(topoclip_run).model.state_dict()
    assert any(not torch.equal(one[k], source[k]) for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=key)
    steps = 4 if method == "ft" else 2  # lp-ft: 2 probe steps, then 2 of fine-tuning
    assert json.loads((tmp_path / "two" / f"finetune-{method}" / "results.json").read_text())["train"]["steps"] == steps
    assert len((tmp_path / "two" / f"finetune-{method}" / "log.jsonl").read_text().splitlines()) == steps  # rank 0 logs alone


def test_a_partial_config_file_keeps_the_finetuning_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  weight_decay: 0.05\nfinetune:\n  method: m3mix\n")
    cfg = load_finetune_config(path, ["train.steps=50", "train.epochs=null"])
    assert cfg.optim.lr == 1e-5 and cfg.optim.weight_decay == 0.05  # not the training lr 1e-3
    assert cfg.optim.warmup_for(50) == 5 and cfg.output.name == "finetune-m3mix"


def test_fine_tuning_evaluates_its_target_during_training(topoclip_run, tmp_path):
    cfg = load_finetune_config(None, TINY_DATA + [
        f"source.path={topoclip_run}", "finetune.eval_zero_shot=false", "eval.robustness=false",
        "eval.every=2", "eval.best=shape/top1", f"output.dir={tmp_path}",
    ])
    run_finetune(cfg)
    lines = [json.loads(line) for line in (tmp_path / "finetune-ft" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] and "shape/top1" in lines[0] and "val/loss" not in lines[0]
    assert (tmp_path / "finetune-ft" / "checkpoints" / "best" / "model.safetensors").is_file()
