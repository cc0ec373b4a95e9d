"""The library never imports the application: geometry, losses, models, data, eval, the run
format and the config schema must not import the engine, the recipes, the command line, the
ablation/report tooling or the benchmarks -- not at the top of a module, not inside a function."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "topoclip"
APPLICATION = ("engine", "recipes", "cli", "analysis", "bench", "__main__")
LIBRARY_FILES = sorted(
    p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0].removesuffix(".py") not in APPLICATION
)


def _module_of(path: Path) -> list[str]:
    parts = ["topoclip", *path.relative_to(PACKAGE).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(source: str, package: list[str]) -> set[str]:
    """Every module ``source`` imports, relative imports resolved against ``package`` (the
    package the module sits in), wherever the import stands."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from topoclip import engine`
    return found


def _package_of(path: Path) -> list[str]:
    here = _module_of(path)
    return here if path.name == "__init__.py" else here[:-1]


def test_the_library_files_are_found():
    names = {".".join(_module_of(p)) for p in LIBRARY_FILES}
    assert {"topoclip.geometry", "topoclip.losses.contrastive", "topoclip.runs.loading", "topoclip.config.experiment",
            "topoclip.eval.embedded", "topoclip.models.pretrained", "topoclip.data.shapes"} <= names
    assert not any(n.startswith(("topoclip.engine", "topoclip.recipes", "topoclip.cli")) for n in names)


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_module_imports_no_application_module(path):
    modules = imported_modules(path.read_text(), _package_of(path))
    bad = sorted(m for m in modules if m.split(".")[:2] in [["topoclip", a] for a in APPLICATION])
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_the_check_sees_relative_imports_and_imports_inside_functions():
    source = "def f():\n    from ..engine import trainer\n    from topoclip.recipes.pretrain import run\n    from .. import cli\n"
    found = imported_modules(source, ["topoclip", "models"])
    assert {"topoclip.engine.trainer", "topoclip.recipes.pretrain", "topoclip.cli"} <= found


def test_the_config_schema_imports_no_heavy_library():
    # Reading and checking a config (what a typo in a key costs) needs none of them; the
    # command line answers config mistakes in a tenth of a second because of it.
    import subprocess
    import sys

    code = ("import sys, topoclip.config, topoclip.data.shapes_config, topoclip.losses.settings, topoclip.topology_names; "
            "print(sorted(m for m in ('torch', 'numpy', 'timm', 'transformers', 'torchvision', 'PIL') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
