"""One module per stage, each a function from artifacts plus the resolved recipe to artifacts.

A stage module has:
  * `DECLARATION`: a `pipeline.declaration.StageDeclaration`: its one-line help, product or lab, the artifacts it
    reads and writes, the recipe fields and options its result depends on. engine's plan and cache keys, the
    transaction's scope, config.json, the read inventory and `--help` are computed from it.
  * `Options`: a dataclass of its own flags (field names = argparse dests). A field whose metadata has
    `recipe="section.field"` stands for that recipe field: the CLI applies it to the recipe before
    validation (so config.json shows it) and the stage reads the recipe, not the option; `flag="--name"` in the
    metadata names the flag when it differs from the field (export's `--no-fp16` sets export.fp16=false).
  * `add_arguments(parser)`: its own flags only (the CLI adds the shared model flags).
  * `run(recipe, paths, options) -> int` (exit code), or `run(options)` when its declaration says
    `needs_recipe=False`.
  * optionally `without_recipe(options) -> bool` and `run_without_recipe(options, model_options) -> int`, for a
    stage that some runs need no recipe for (verify --dense/--sparse).
`run_stage` is the one place that runs a model-level stage (the CLI and `engine` call it): it records the
resolved recipe in config.json when the stage declares `config` among its writes, and makes the stage's writes
one set (pipeline/transaction.py) whose scope is what the declaration names, so a failed stage changes no
artifact and a write the declaration does not name fails the stage.
No stage module imports pipeline.cli or another stage module; `engine` reaches the others through
`load_stage` (tests/test_import_graph.py checks this).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

# stage name -> module, in the order `--help` lists them and `engine` runs the ones it runs; everything else
# about a stage is in its module's DECLARATION
STAGES = {
    "pretrain": "pipeline.stages.pretrain",
    "train-masks": "pipeline.stages.train_masks",
    "bake": "pipeline.stages.bake",
    "export": "pipeline.stages.export",
    "build": "pipeline.stages.build",
    "verify": "pipeline.stages.verify",
    "engine": "pipeline.stages.engine",
    "package": "pipeline.stages.package",
    "serve": "pipeline.stages.serve",
    "serve-check": "pipeline.stages.serve_check",
    "check-manifest": "pipeline.stages.check_manifest",
    "layers": "pipeline.stages.layers",
    "init-recipe": "pipeline.stages.init_recipe",
    "compare": "pipeline.stages.compare",
    "updatable": "pipeline.stages.updatable",
    "certify": "pipeline.stages.certify",
    "curves": "pipeline.stages.curves",
    "bench-train": "pipeline.stages.bench_train",
    "bench-masks": "pipeline.stages.bench_masks",
    "gpu-check": "pipeline.stages.gpu_check",
}


def declaration_of(module: ModuleType) -> Any:
    return module.DECLARATION


def stage_summaries() -> dict[str, tuple[str, str]]:
    """Stage name -> (kind, help) as each module's DECLARATION states them, read from its source without importing
    it: `--help` then needs none of the stages' libraries (tests/test_declarations.py checks both agree)."""
    found = {name: _declared_literals(module) for name, module in STAGES.items()}
    return {name: (values.get("kind", "product"), values.get("help", "")) for name, values in found.items()}


def engine_stages() -> list[str]:
    """The stages whose DECLARATION says `in_engine=True`, in registry order (read like `stage_summaries`, so
    engine imports only the stages it runs)."""
    return [name for name, module in STAGES.items() if _declared_literals(module).get("in_engine") is True]


def _declared_literals(module: str) -> dict[str, Any]:
    """The literal keyword arguments (kind, help, in_engine) of MODULE's `DECLARATION = StageDeclaration(...)`."""
    spec = importlib.util.find_spec(module)
    source = Path(spec.origin).read_text() if spec and spec.origin else ""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DECLARATION" for t in node.targets):
            call = node.value
            if isinstance(call, ast.Call):
                wanted = ("kind", "help", "in_engine")
                return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in wanted}
    return {}


def run_stage(module: ModuleType, recipe: Any, paths: Any, options: Any) -> int:
    """Run a model-level stage: config.json and every file the stage writes stay only if it succeeds (or fails a
    gate, whose report must stay); training checkpoints always stay, for --resume. The stage may write only
    what its declaration names."""
    from pipeline.declaration import StageRun
    from pipeline.lock import is_main_process
    from pipeline.recipe.resolve import write_config

    declared = StageRun(declaration_of(module), recipe, paths, options)
    if not is_main_process():  # under torchrun, rank 0 writes the artifacts
        return int(module.run(stage_recipe(module, declared), paths, options) or 0)
    if not declared.declaration.groups_writes:
        recover_folder(paths.root)
        return int(module.run(recipe, paths, options) or 0)

    def stage() -> int:
        used = stage_recipe(module, declared)  # what the stage runs with is what config.json records
        if declared.declaration.records_config:
            write_config(used, paths)
        return int(module.run(used, paths, options) or 0)

    return as_one_set(paths.root, stage, scope=declared.scope(), stage=module.__name__.rsplit(".", 1)[-1])


def stage_recipe(module: ModuleType, declared: Any) -> Any:
    """The recipe a stage runs with: where its declaration reads preprocess_choice.json, the recorded evaluation
    transform applied (measured first where the stage also declares writing it, unless the module says
    `MEASURES_PREPROCESSING = True`: it measures in its run, after its own input checks, and rewrites config.json),
    else the resolved recipe."""
    from pipeline.recipe.resolve import with_measured_preprocessing

    paths = declared.paths
    if Path(paths.preprocess_choice) not in declared.read_paths():
        return declared.recipe
    measure = Path(paths.preprocess_choice) in declared.write_paths()
    measure = measure and not getattr(module, "MEASURES_PREPROCESSING", False)
    return with_measured_preprocessing(declared.recipe, paths, measure)


def recover_folder(root: Any) -> None:
    """Put back what a run killed mid-stage in `root` had half written (pipeline/transaction.py), and say so."""
    from pipeline.transaction import recover

    restored = recover(root)
    if restored:
        print(
            f"note: an earlier run in {root} was killed mid-stage; put back its files as they were before "
            f"it: {', '.join(restored)}",
            flush=True,
        )


def as_one_set(root: Any, write: Callable[[], int], scope: list[Path] | None = None, stage: str = "") -> int:
    """`write()` with every file it writes as one set under `root`: kept when it returns or fails a gate (whose
    report must stay), all put back when it raises anything else. SCOPE (None: any path) is what STAGE may write.
    Also for stages that run without a recipe."""
    from pipeline.errors import GateFailed
    from pipeline.transaction import Transaction

    recover_folder(root)
    with Transaction(root, commit_on=(GateFailed,), scope=scope, owner=stage):
        return write()


def load_stage(name: str) -> ModuleType:
    return importlib.import_module(STAGES[name])


def needs_recipe(module: ModuleType) -> bool:
    return bool(declaration_of(module).needs_recipe)


def runs_without_recipe(module: ModuleType, options: Any) -> bool:
    """Whether this run of a recipe stage takes no recipe: the stage's `without_recipe(options)` says so, and then
    the CLI calls `run_without_recipe(options, model_options)` (the shared model flags as given, None if not)."""
    check = getattr(module, "without_recipe", None)
    return bool(check is not None and check(options))


def recipe_fields(options: Any) -> dict[str, tuple[str, Any]]:
    """recipe key -> (flag, value) of the options that stand for recipe fields and were given."""
    found = {}
    for item in dataclasses.fields(options):
        key = item.metadata.get("recipe")
        value = getattr(options, item.name)
        if key and value is not None:
            found[key] = (item.metadata.get("flag") or "--" + item.name.replace("_", "-"), value)
    return found
