"""The topology names a config checks (torch-free) and the builders geometry holds agree."""

import pytest

from topoclip import geometry, topology_names


def test_every_known_name_has_a_builder_and_back():
    assert set(geometry._REGISTRY) == set(topology_names.available_topologies())


def test_blockwise_names_build_blocks():
    for name in topology_names.available_topologies():
        if name == "product":
            continue
        built = geometry.topology(name, dim=16, m=4) if topology_names.is_blockwise(name) else geometry.topology(name, dim=16)
        assert built.blockwise == topology_names.is_blockwise(name), name


def test_a_registered_topology_is_known_to_configs(monkeypatch):
    monkeypatch.setattr(topology_names, "_KINDS", dict(topology_names._KINDS))
    monkeypatch.setattr(geometry, "_REGISTRY", dict(geometry._REGISTRY))
    geometry.register_topology("my-sphere", lambda dim=None, n=None, m=None: geometry.Sphere(dim), blockwise=False)
    from topoclip.config import load_config

    cfg = load_config(overrides=["topology.name=my-sphere", "topology.dim=32", "model.num_tokens=1"])
    assert cfg.topology.build().dim == 32
    with pytest.raises(ValueError, match="already registered"):
        geometry.register_topology("my-sphere", lambda **_: geometry.Sphere(8))
