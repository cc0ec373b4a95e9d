"""LP-FT, methods that compose (a base with mixups: wise-ft+m2mix, lp-ft+m2mix), and mixup
along the straight line versus the geodesic."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import topoclip
from tests.test_finetune import TINY_DATA, topoclip_run  # noqa: F401  (the module's run fixture)
from topoclip.cli import main
from topoclip.config import load_finetune_config, split_method
from topoclip.losses.mixup import M3MixLoss, MixupConfig, geodesic_mix, linear_mix, m2_mix_loss, mix
from topoclip.recipes.finetune import LP_DIR, lp_ft_configs, model_label, run_finetune
from topoclip.runs import load_run, read_jsonl
from topoclip.runs.checkpoint import latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the grammar

def test_a_method_is_a_base_with_mixups():
    assert split_method("ft") == ("ft", ())
    assert split_method("m2mix") == ("ft", ("m2mix",))
    assert split_method("wise-ft+m2mix") == ("wise-ft", ("m2mix",))
    assert split_method("lp-ft+vmix+lmix") == ("lp-ft", ("vmix", "lmix"))
    cfg = load_finetune_config(None, ["finetune.method=lp-ft+m3mix"]).finetune
    assert cfg.base == "lp-ft" and cfg.mixup_terms == ("m2", "v", "l", "vl")
    assert load_finetune_config(None, ["finetune.method=wise-ft+vmix"]).finetune.mixup_weights().m2 == 0
    for bad, match in (("wise-ft+nope", "unknown method 'nope'"), ("embedding-shift+m2mix", "trains nothing"),
                       ("ft+m2mix+m2mix", "twice"), ("wise-ft+ft", "unknown method 'ft'")):
        with pytest.raises(ValueError, match=match):
            load_finetune_config(None, [f"finetune.method={bad}"])
    with pytest.raises(ValueError, match="finetune.mix_path"):
        load_finetune_config(None, ["finetune.mix_path=straight"])
    with pytest.raises(ValueError, match="finetune.lp_ratio"):
        load_finetune_config(None, ["finetune.lp_ratio=1.0"])


def test_lp_ft_splits_the_run_and_the_probe_takes_a_larger_step():
    cfg = load_finetune_config(None, ["finetune.method=lp-ft+m2mix", "finetune.lp_ratio=0.25", "optim.lr=1e-4",
                                      "optim.warmup_steps=10"])
    lp, ft = lp_ft_configs(cfg, 40)
    assert (lp.train.steps, ft.train.steps) == (10, 30) and lp.train.epochs is None
    assert lp.optim.lr == pytest.approx(1e-3) and ft.optim.lr == 1e-4
    assert lp.finetune.mixup_terms == () and ft.finetune.mixup_terms == ("m2",)  # the probe is plain
    assert lp.optim.warmup_steps == 10 and ft.optim.warmup_steps == 10
    with pytest.raises(ValueError, match="leaves none for fine-tuning"):
        lp_ft_configs(cfg, 1)


def test_the_tables_name_each_model_as_the_paper_does():
    assert model_label("m2mix") == "m²-Mix" and model_label("ft") == "FT" and model_label("wise-ft") == "FT"
    assert model_label("wise-ft", "wise_ft") == "WiSE-FT"
    assert model_label("wise-ft+m2mix", "wise_ft") == "WiSE-FT w/ m²-Mix"
    assert model_label("wise-ft+m2mix") == "m²-Mix"  # its fine-tuned model, before the interpolation
    assert model_label("lp-ft+m2mix") == "LP-FT w/ m²-Mix" and model_label("vmix+lmix") == "V-Mix + L-Mix"
    assert model_label("m3mix", "zero_shot") == "zero-shot"


# --------------------------------------------------------------------------- linear mixup

@pytest.mark.parametrize("name", ["sphere", "oblique-inner", "euclidean"])
def test_linear_mix_is_the_projected_straight_line(name):
    topo = topoclip.topology(name, dim=12, **({"m": 3} if name == "oblique-inner" else {}))
    g = torch.Generator().manual_seed(0)
    a, b = topo.project(torch.randn(5, 12, generator=g)), topo.project(torch.randn(5, 12, generator=g))
    lam = 0.3
    got = linear_mix(topo, a, b, lam)
    if name == "euclidean":
        want = lam * a + (1 - lam) * b
        torch.testing.assert_close(geodesic_mix(topo, a, b, lam), want)  # the two paths agree here
    else:
        blocks = (lam * a + (1 - lam) * b).reshape(5, -1, 4 if name == "oblique-inner" else 12)
        want = (blocks / blocks.norm(dim=-1, keepdim=True)).reshape(5, 12)
        # on a curved space the two paths differ between the ends
        assert (geodesic_mix(topo, a, b, lam) - got).abs().max() > 1e-3
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(mix(topo, a, b, 1.0, "linear"), a)
    torch.testing.assert_close(mix(topo, a, b, 0.0, "linear"), b)


def test_linear_mix_is_finite_at_antipodes_and_in_half_precision():
    topo = topoclip.topology("oblique-inner", dim=8, m=2)
    a = topo.project(torch.randn(3, 8))
    out = linear_mix(topo, a, -a, 0.5)  # the line passes through zero
    assert torch.isfinite(out).all() and torch.allclose(out.reshape(3, 2, 4).norm(dim=-1), torch.ones(3, 2))
    half = linear_mix(topo, a.half(), a.flip(0).half(), 0.4)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_the_mixup_loss_follows_its_path():
    topo = topoclip.topology("sphere", dim=8)
    g = torch.Generator().manual_seed(1)
    image, text = topo.project(torch.randn(6, 8, generator=g)), topo.project(torch.randn(6, 8, generator=g))
    weights = MixupConfig(m2=1.0, v=0, l=0, vl=0)
    losses = {path: M3MixLoss(topo, weights, seed=0, path=path)(image, text, 10.0, return_details=True)[1]
              for path in ("geodesic", "linear")}
    lam = losses["linear"]["lam_m2"]
    assert lam == losses["geodesic"]["lam_m2"]  # same draw
    assert losses["linear"]["loss_m2"] == pytest.approx(float(m2_mix_loss(topo, image, text, weights.m2_scale, lam, "linear")))
    assert losses["linear"]["loss_m2"] != pytest.approx(losses["geodesic"]["loss_m2"])
    with pytest.raises(ValueError, match="mix path"):
        M3MixLoss(topo, weights, path="curvy")


# ------------------------------------------------------------------------------ end to end

def test_lp_ft_probes_the_image_projection_then_fine_tunes_everything(topoclip_run, tmp_path):  # noqa: F811
    cfg = load_finetune_config(None, TINY_DATA + [
        f"source.path={topoclip_run}", "finetune.method=lp-ft+m2mix", "optim.lr=1e-3", "finetune.eval_zero_shot=false",
        f"output.dir={tmp_path}", "eval.robustness=false",
    ])
    results = run_finetune(cfg)
    run_dir = tmp_path / "finetune-lp-ft+m2mix"
    assert results["train_lp"]["steps"] == 2 and results["train"]["steps"] == 2  # 4 steps, half each
    source = load_run(topoclip_run).model.state_dict()
    probed = load_file(str(latest_checkpoint(run_dir / LP_DIR) / "model.safetensors"))
    moved = {k for k in probed if probed[k].is_floating_point() and not torch.equal(probed[k], source[k])}
    assert moved and moved <= {"image_proj.linear.weight", "logit_scale.log_scale"}, moved
    assert "image_proj.linear.weight" in moved
    tuned = load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
    for tower in ("image.", "text."):  # the towers themselves move in the second stage
        assert any(not torch.equal(tuned[k], source[k]) for k in tuned if k.startswith(tower) and tuned[k].is_floating_point())
    # the probe is plain contrastive; the fine-tuning stage carries the mixup
    assert all("loss_m2" not in row for row in read_jsonl(run_dir / LP_DIR / "log.jsonl"))
    assert all("loss_m2" in row for row in read_jsonl(run_dir / "log.jsonl"))
    # a resume of the finished run keeps its results
    written = (run_dir / "results.json").read_bytes()
    assert main(["finetune", "--resume", str(run_dir)]) == 0
    assert (run_dir / "results.json").read_bytes() == written


def test_wise_ft_composes_with_m2mix(topoclip_run, tmp_path):  # noqa: F811
    results = run_finetune(load_finetune_config(None, TINY_DATA + [
        f"source.path={topoclip_run}", "finetune.method=wise-ft+m2mix", "optim.lr=1e-3", "finetune.eval_zero_shot=false",
        f"output.dir={tmp_path}", "eval.robustness=false", "finetune.mix_path=linear",
    ]))
    run_dir = tmp_path / "finetune-wise-ft+m2mix"
    assert set(results["models"]) == {"finetuned", "wise_ft"}
    # the embedding arithmetic is part of the fine-tuning evaluation, on both distributions
    for dist in ("target", "reference"):
        simat = results["models"]["wise_ft"][dist]["arithmetic"]
        assert simat["lambda"] == 1.0 and simat["queries"] > 0 and 0.0 <= simat["r1"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert any(r["task"] == "embedding_arithmetic" and "simat_r1" in r["metrics"] for r in rows)
    assert (run_dir / "wise_ft" / "model.safetensors").is_file()
    assert all("loss_m2" in row for row in read_jsonl(run_dir / "log.jsonl"))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]


# ----------------------------------------------------------------------- few-shot adaptation

def test_few_shot_adaptation_on_k_shots_of_a_folder_scored_on_the_test_split_and_its_shifts(tmp_path):
    pytest.importorskip("sklearn")
    from tests.helpers import QUIET_RUN, TINY_TOWERS
    from topoclip.config import load_config
    from topoclip.data.digits import SHIFTS, write_digits
    from topoclip.recipes import pretrain
    from topoclip.recipes.finetune import format_finetune_table

    digits = tmp_path / "digits"
    write_digits(digits)
    assert sorted(p.name for p in (digits / "shifted").iterdir()) == sorted(SHIFTS)
    # the shifted copies are the test split's images, changed
    test_files = sorted(p.name for p in (digits / "test").rglob("*.png"))
    assert sorted(p.name for p in (digits / "shifted" / "inverted").rglob("*.png")) == test_files
    pretrain.run(load_config(None, [*TINY_TOWERS, *QUIET_RUN, "data.source=csv", f"data.csv.path={digits / 'train.tsv'}",
                                    "train.steps=2", "train.batch_size=16", "eval.enabled=false", f"output.dir={tmp_path}",
                                    "output.name=pre"]))
    results = run_finetune(load_finetune_config(None, [
        f"source.path={tmp_path / 'pre'}", "finetune.method=m2mix", "data.source=folder",
        f"data.folder.root={digits / 'train'}", "data.folder.shots_per_class=2", f"data.folder.classnames={digits / 'classnames.txt'}",
        f"data.folder.templates={digits / 'templates.json'}", f"eval.suite_file={digits / 'shifted-suite.yaml'}",
        "train.steps=3", "train.batch_size=10", "optim.lr=1e-3", "finetune.simat_lambda=null", *QUIET_RUN,
        f"output.dir={tmp_path}", "output.name=fewshot", "eval.robustness=false",
    ]))
    log = read_jsonl(tmp_path / "fewshot" / "log.jsonl")
    assert [r["epoch"] for r in log] == [0, 0, 1]  # 2 shots x 10 classes = 20 pairs: 2 batches of 10 an epoch
    for model in ("zero_shot", "finetuned"):
        zeroshot = results["models"][model]["target"]["zeroshot"]
        assert set(zeroshot) == {"digits", *(f"digits-{s}" for s in SHIFTS)}
        assert all(0.0 <= m["top1"] <= 1.0 for m in zeroshot.values())
    assert "Target datasets" in format_finetune_table({"m2mix": results}) and "digits-inverted top1" in format_finetune_table({"m2mix": results})


def test_m2mix_fine_tuning_of_a_sigmoid_run_uses_the_sigmoid_form(tmp_path, topoclip_run):  # noqa: F811
    from tests.helpers import QUIET_RUN, TINY_TOWERS
    from topoclip.config import load_config
    from topoclip.recipes import pretrain

    pretrain.run(load_config(None, [*TINY_TOWERS, *QUIET_RUN, "loss.kind=sigmoid", "data.shapes.num_train=48",
                                    "data.shapes.num_val=4", "data.shapes.num_test=24", "train.batch_size=8", "train.steps=2",
                                    "eval.enabled=false", f"output.dir={tmp_path}", "output.name=sig"]))
    common = TINY_DATA + ["finetune.method=m2mix", "loss.kind=sigmoid", "finetune.eval_zero_shot=false",
                          "eval.robustness=false", "finetune.simat_lambda=null", f"output.dir={tmp_path}"]
    run_finetune(load_finetune_config(None, [*common, f"source.path={tmp_path / 'sig'}", "output.name=ft-sig"]))
    log = read_jsonl(tmp_path / "ft-sig" / "log.jsonl")
    assert all("loss_m2" in r for r in log)
    before, after = load_run(tmp_path / "sig").model.logit_bias.value, load_run(tmp_path / "ft-sig").model.logit_bias.value
    assert after != before  # the bias fine-tunes with the model
    # a source trained with the softmax loss has no bias: it gets one at finetune.logit_bias,
    # which trains, is saved, loads back with the fine-tuned model and enters WiSE-FT's average
    assert load_run(topoclip_run).model.logit_bias is None
    wise = [*common[:-1], "finetune.method=wise-ft+m2mix", "finetune.logit_bias=-4.0", f"output.dir={tmp_path}"]
    run_finetune(load_finetune_config(None, [*wise, f"source.path={topoclip_run}", "output.name=ft-none"]))
    finetuned = load_run(tmp_path / "ft-none").model.logit_bias.value
    assert finetuned != -4.0 and math.isfinite(finetuned)
    wise_bias = load_file(tmp_path / "ft-none" / "wise_ft" / "model.safetensors")["logit_bias.bias"]
    assert float(wise_bias) == pytest.approx((-4.0 + finetuned) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="finetune.logit_bias: only the sigmoid loss"):
        load_finetune_config(None, ["finetune.logit_bias=-4"])
