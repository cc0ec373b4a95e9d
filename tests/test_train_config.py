"""Experiment config: YAML + dotted overrides with type conversion, validation naming the field."""

from pathlib import Path

import pytest

from topoclip.config import ExperimentConfig, config_from_dict, load_config, save_config
from topoclip.dataclass_io import parse_override

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("optim.lr=1e-3", lambda c: c.optim.lr, 1e-3),  # YAML 1.1 reads 1e-3 as a string
        ("optim.lr=2", lambda c: c.optim.lr, 2.0),
        ("optim.betas=[0.8, 0.9]", lambda c: c.optim.betas, (0.8, 0.9)),
        ("train.steps=1e3", lambda c: c.train.steps, 1000),
        ("train.resume=true", lambda c: c.train.resume, True),
        ("train.resume=False", lambda c: c.train.resume, False),
        ("optim.grad_clip=null", lambda c: c.optim.grad_clip, None),
        ("output.name=2024", lambda c: c.output.name, "2024"),
        ("topology.name=sphere", lambda c: (c.topology.name, c.topology.dim, c.topology.m), ("sphere", 128, None)),
        ("topology.m=4", lambda c: (c.topology.n, c.topology.m, c.topology.dim), (32, 4, 128)),
        ("data.shapes.heldout_combos=[[circle, red]]", lambda c: c.data.shapes.heldout_combos, (("circle", "red"),)),
        ("model.image.timm_kwargs={drop_path_rate: 0.1}", lambda c: c.model.image.timm_kwargs, {"drop_path_rate": 0.1}),
    ],
)
def test_overrides_are_converted_to_the_field_type(override, getter, expected):
    value = getter(config_from_dict({}, [override]))
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], r"^optim\.lrr: unknown key \(did you mean optim\.lr\?\)"),
        (["bogus.x=1"], r"^bogus: unknown key"),
        (["model.image.foo=1"], r"^model\.image\.foo: unknown key"),
        (["topology.n=5", "topology.dim=128"], r"^topology\.dim: n\*m = 5\*8 = 40 does not equal dim=128"),
        (["topology.dim=100"], r"^topology\.dim: 100 is not divisible by topology\.m=8"),
        (["topology.name=sphere", "topology.m=4"], r"^topology\.m: sphere has no blocks"),
        (["topology.name=torus"], r"^topology\.name: unknown topology 'torus'"),
        (["model.num_tokens=4"], r"^model\.num_tokens: multi-token models need num_tokens == topology\.m, got 4 != 8"),
        (["model.num_tokens=8", "topology.name=sphere"], r"^model\.num_tokens: 8 \[CLS\] tokens need an oblique"),
        (["optim.lr=-1"], r"^optim\.lr: must be > 0"),
        (["optim.lr=fast"], r"^optim\.lr: expected a number"),
        (["optim.betas=[0.9]"], r"^optim\.betas: expected 2 items"),
        (["optim.betas=[0.9, 1.5]"], r"^optim\.betas\[1\]: must lie in \[0, 1\)"),
        (["train.batch_size=1"], r"^train\.batch_size: must be >= 2"),
        (["train.steps=2.5"], r"^train\.steps: expected an integer"),
        (["train.steps=null"], r"^train\.steps: give exactly one of train\.steps and train\.epochs"),
        (["train.resume=maybe"], r"^train\.resume: expected true or false"),
        (["train.device=gpu0"], r"^train\.device: not a device"),
        (["optim.warmup_steps=5000"], r"^optim\.warmup_steps: 5000 is longer than the run"),
        (["schedule.name=linear"], r"^schedule\.name: must be one of \['cosine', 'constant'\]"),
        (["model.image.depth=0"], r"^model\.image\.depth must be an integer >= 1"),
        (["model.text.heads=3"], r"^model\.text\.heads=3 must divide model\.text\.width=128"),
        (["model.logit_scale.init=200"], r"^model\.logit_scale\.init=200\.0 exceeds"),
        (["data.shapes.noise=1.5"], r"^data\.shapes\.noise must be a number in \[0, 1\]"),
        (["model.image.img_size=64"], r"^model\.image\.img_size: 64 differs from data\.shapes\.image_size=32"),
        (["optim=3"], r"^optim: expected a mapping"),
        (["optim.lr.x=3"], r"^optim\.lr: expected a number"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, overrides)


def test_override_syntax_errors():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ValueError, match="expected key=value"):
            parse_override(bad)
    with pytest.raises(ValueError, match="^optim.lr: is a value, not a section"):
        config_from_dict({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])


def test_yaml_file_base_merge_and_run_name(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  lr: 1e-3\n  weight_decay: 0.3\ntopology:\n  name: oblique-inner\n  n: 16\n  m: 8\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\noptim:\n  lr: 5e-4\ntopology:\n  name: sphere\n  n: null\n  m: null\n")
    cfg = load_config(child, ["train.steps=500"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (5e-4, 0.3)  # merged per field
    assert (cfg.topology.name, cfg.topology.dim) == ("sphere", 128)
    assert cfg.train.steps == 500 and cfg.output.name == "child"

    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("base: cyclic.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(cyclic)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "multi_token.yaml", ["optim.betas=[0.9, 0.95]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_default_yaml_is_the_default_config():
    cfg = load_config()  # no path: configs/default.yaml
    assert cfg == load_config(CONFIGS / "default.yaml")
    assert isinstance(cfg, ExperimentConfig) and cfg.output.name == "default"
    assert (cfg.topology.name, cfg.topology.n, cfg.topology.m, cfg.model.num_tokens) == ("oblique-inner", 16, 8, 1)


def test_shipped_configs_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    from topoclip.config import PACKAGED_CONFIGS, default_config_path, resolve_config_path

    monkeypatch.chdir(tmp_path)  # no configs/ here: as for a wheel install
    assert default_config_path() == PACKAGED_CONFIGS / "default.yaml" and default_config_path().is_file()
    assert resolve_config_path("sphere") == PACKAGED_CONFIGS / "sphere.yaml"
    assert resolve_config_path("ablation/table3.yaml") == PACKAGED_CONFIGS / "ablation" / "table3.yaml"
    assert load_config("sphere").topology.name == "sphere"
    assert resolve_config_path("nothing-like-this") == Path("nothing-like-this")  # the error names it later
    with pytest.raises(ValueError, match="nothing-like-this"):
        load_config("nothing-like-this")


# ------------------------------------------------------------ overrides in their natural form

@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["topology.name=sphere"], ("sphere", 128, None, None)),                    # the dimension stays
        (["topology.name=sphere", "topology.dim=64"], ("sphere", 64, None, None)),
        (["topology.name=euclidean", "topology.dim=32"], ("euclidean", 32, None, None)),
        (["topology.m=4"], ("oblique-inner", 128, 32, 4)),                          # n follows dim / m
        (["topology.dim=64"], ("oblique-inner", 64, 8, 8)),
        (["topology.name=oblique-geodesic"], ("oblique-geodesic", 128, 16, 8)),     # blocks kept
    ],
)
def test_topology_overrides_resize_what_depends_on_them(overrides, expected):
    t = load_config(None, overrides).topology
    assert (t.name, t.dim, t.n, t.m) == expected


def test_a_value_given_on_the_command_line_is_never_dropped():
    with pytest.raises(ValueError, match=r"topology\.n: sphere has no blocks"):
        load_config(None, ["topology.name=sphere", "topology.n=16"])


def test_steps_replace_epochs_and_a_short_run_gets_a_warmup_that_fits():
    from topoclip.config import load_finetune_config

    cfg = load_finetune_config(None, ["train.steps=20"])  # the file counts epochs
    assert (cfg.train.steps, cfg.train.epochs) == (20, None) and cfg.optim.warmup_for(20) == 2
    short = load_config(None, ["train.steps=5"])
    assert short.optim.warmup_steps is None and short.optim.warmup_for(5) == 0
    assert load_config(None).optim.warmup_for(900) == 60  # the default schedule is unchanged
    assert load_config(None, ["optim.warmup_ratio=0.5"]).optim.warmup_for(10) == 5


def test_explicit_steps_and_epochs_together_are_still_an_error():
    from topoclip.config import load_finetune_config

    with pytest.raises(ValueError, match="give exactly one of train.steps and train.epochs"):
        load_finetune_config(None, ["train.steps=20", "train.epochs=3"])


def test_a_format_1_finetune_config_is_upgraded():
    from topoclip.config import finetune_config_from_dict
    from topoclip.runs import RunInfo, upgrade_config

    old = {"finetune": {"method": "ft", "warmup_ratio": 0.1}, "optim": {"warmup_steps": 0}, "train": {"steps": 50, "epochs": None}}
    with pytest.raises(ValueError, match="finetune.warmup_ratio: unknown key"):
        finetune_config_from_dict(old)
    cfg = finetune_config_from_dict(upgrade_config(old, RunInfo("finetune", 1)))
    assert cfg.optim.warmup_ratio == 0.1 and cfg.optim.warmup_for(50) == 5
    assert upgrade_config(old, RunInfo("finetune", 2)) == old  # only format 1 is rewritten
