"""No stage module imports the CLI or another stage module (issue 9): stages are functions that the
CLI and `engine` call; shared helpers live in the step packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STAGES_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "stages"
STAGE_MODULES = {path.stem for path in STAGES_DIR.glob("*.py") if path.stem != "__init__"}


def forbidden_imports(source: str, module: str, stage_modules: set[str] = STAGE_MODULES) -> list[str]:
    """Imports in `source` (the stage module `module`) of pipeline.cli or of another stage module."""
    imported = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to pipeline.stages (level 1) or pipeline (level 2)
                parent = ["pipeline", "stages"][: 3 - node.level]
                base = ".".join(parent + ([base] if base else []))
            imported.append(base)
            if base == "pipeline":  # `from pipeline import cli`
                imported += [f"pipeline.{alias.name}" for alias in node.names]
            if base == "pipeline.stages":  # `from pipeline.stages import export` imports a stage module
                imported += [f"{base}.{alias.name}" for alias in node.names if alias.name in stage_modules]
    own = f"pipeline.stages.{module}"
    return [
        name
        for name in imported
        if name == "pipeline.cli"
        or name.startswith("pipeline.cli.")
        or (name.startswith("pipeline.stages.") and name.split(".")[2] != module and name != own)
    ]


def test_the_checker_catches_each_kind_of_bad_import():
    assert forbidden_imports("from pipeline.cli import add_model_arguments", "bake") == ["pipeline.cli"]
    assert forbidden_imports("import pipeline.cli", "bake") == ["pipeline.cli"]
    assert forbidden_imports("def f():\n    from pipeline.stages.build import engine_path\n", "verify") == [
        "pipeline.stages.build"
    ]
    assert forbidden_imports("from pipeline.stages import export as stage", "engine") == ["pipeline.stages.export"]
    assert forbidden_imports("from .build import engine_path", "verify") == ["pipeline.stages.build"]
    assert forbidden_imports("from .. import cli", "verify") == ["pipeline.cli"]
    assert forbidden_imports("from pipeline import cli", "verify") == ["pipeline.cli"]
    assert forbidden_imports("from ..cli import main", "verify") == ["pipeline.cli"]


def test_the_stage_registry_and_step_packages_are_allowed():
    # engine reaches the other stages through pipeline.stages.load_stage, which names no stage module
    assert (
        forbidden_imports(
            "from pipeline.stages import STAGES, load_stage\nfrom pipeline.masks import checkpoint\n"
            "from pipeline.backends.build_report import BuildReport",
            "engine",
        )
        == []
    )


@pytest.mark.parametrize("module", sorted(STAGE_MODULES))
def test_no_stage_imports_the_cli_or_another_stage(module):
    assert forbidden_imports((STAGES_DIR / f"{module}.py").read_text(), module) == []


def pipeline_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return {name for name in names if name.startswith("pipeline.")}


@pytest.mark.parametrize("path", sorted((STAGES_DIR.parent / "recipe").glob("*.py")), ids=lambda p: p.name)
def test_recipes_depend_on_no_later_step(path):
    """The recipe is what every step reads, so it imports none of them (e.g. not the package step's tables)."""
    later = (
        "pipeline.stages",
        "pipeline.masks",
        "pipeline.export",
        "pipeline.backends",
        "pipeline.verify",
        "pipeline.package",
        "pipeline.cli",
    )
    allowed: set[str] = set()  # empty: masks.method, the one field that needed the mask registry, is gone
    assert sorted(name for name in pipeline_imports(path.read_text()) - allowed if name.startswith(later)) == []
