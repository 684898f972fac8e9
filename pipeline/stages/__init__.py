"""One module per stage, each a function from artifacts plus the resolved recipe to artifacts.

A stage module has:
  * `Options`: a dataclass of its own flags (field names = argparse dests). A field whose metadata has
    `recipe="section.field"` stands for that recipe field: the CLI applies it to the recipe before
    validation (so config.json shows it) and the stage reads the recipe, not the option.
  * `add_arguments(parser)`: its own flags only (the CLI adds the shared model flags).
  * `run(recipe, paths, options) -> int` (exit code), or `run(options)` when `NEEDS_RECIPE = False`.
  * optionally `without_recipe(options) -> bool` and `run_without_recipe(options, model_options) -> int`, for a
    stage that some runs need no recipe for (verify --dense/--sparse).
`run_stage` is the one place that runs a model-level stage (the CLI and `engine` call it): it records the
resolved recipe in config.json and makes the stage's writes one set (pipeline/transaction.py), so a failed
stage changes no artifact. A stage that only reads the model folder sets `RECORDS_CONFIG = False`; `engine`,
whose sub-stages each form their own set, also sets `GROUPS_WRITES = False`.
No stage module imports pipeline.cli or another stage module; `engine` reaches the others through
`load_stage` (tests/test_import_graph.py checks this).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

# stage name -> (module, one-line help)
STAGES = {
    "pretrain": ("pipeline.stages.pretrain", "train the demo network's dense weights (cached)"),
    "train-masks": ("pipeline.stages.train_masks", "learn N:M masks on frozen weights (Gumbel-Softmax)"),
    "bake": ("pipeline.stages.bake", "write masks.pt and sparse.pt from the learned masks (or re-apply masks)"),
    "export": ("pipeline.stages.export", "write dense/sparse ONNX (FP32 and FP16)"),
    "build": ("pipeline.stages.build", "build dense and sparse engines with a backend"),
    "verify": ("pipeline.stages.verify", "accuracy, latency and coverage of the engines; CI gates"),
    "engine": ("pipeline.stages.engine", "run every stage, skipping those whose inputs did not change"),
    "package": ("pipeline.stages.package", "write Triton model repositories (production and CPU flavours)"),
    "serve": ("pipeline.stages.serve", "run tritonserver (CPU repository) in the foreground on 127.0.0.1"),
    "serve-check": ("pipeline.stages.serve_check", "start tritonserver, check predictions, errors, load, crash"),
    "check-manifest": ("pipeline.stages.check_manifest", "verify an artifact folder against manifest.json"),
    "compare": ("pipeline.stages.compare", "compare mask methods on the evaluation set"),
    "updatable": ("pipeline.stages.updatable", "fine-tune the dense weights, re-apply the old masks, compare"),
    "certify": ("pipeline.stages.certify", "stability bounds of the masked classifier (paper, sec. 3.2)"),
    "bench-train": ("pipeline.stages.bench_train", "time a mask-training step against a dense training step"),
    "gpu-check": ("pipeline.stages.gpu_check", "CUDA mask training, cuSPARSELt 2:4 GEMMs and TensorRT engines (GPU)"),
    "bench-masks": (
        "pipeline.stages.bench_masks",
        "time to accuracy of mask training: full budget against the plateau rule, read off one run",
    ),
    "curves": ("pipeline.stages.curves", "plot top-1 against mask-training steps for every run of a model"),
    "layers": ("pipeline.stages.layers", "list masked and skipped layers with reasons and MAC shares"),
    "init-recipe": ("pipeline.stages.init_recipe", "write a recipe file for your own model and print the next command"),
}


def run_stage(module: ModuleType, recipe: Any, paths: Any, options: Any) -> int:
    """Run a model-level stage: config.json and every file the stage writes stay only if it succeeds (or fails a
    gate, whose report must stay); training checkpoints always stay, for --resume."""
    from pipeline.lock import is_main_process
    from pipeline.recipe.resolve import write_config

    if not is_main_process():
        return int(module.run(recipe, paths, options) or 0)  # under torchrun, rank 0 writes the artifacts
    if not getattr(module, "GROUPS_WRITES", True):
        recover_folder(paths.root)
        return int(module.run(recipe, paths, options) or 0)

    def stage() -> int:
        if getattr(module, "RECORDS_CONFIG", True):
            write_config(recipe, paths)
        return int(module.run(recipe, paths, options) or 0)

    return as_one_set(paths.root, stage)


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


def as_one_set(root: Any, write: Callable[[], int]) -> int:
    """`write()` with every file it writes as one set under `root`: kept when it returns or fails a gate (whose
    report must stay), all put back when it raises anything else. Also for stages that run without a recipe."""
    from pipeline.errors import GateFailed
    from pipeline.transaction import Transaction

    recover_folder(root)
    with Transaction(root, commit_on=(GateFailed,)):
        return write()


def load_stage(name: str) -> ModuleType:
    return importlib.import_module(STAGES[name][0])


def needs_recipe(module: ModuleType) -> bool:
    return getattr(module, "NEEDS_RECIPE", True)


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
            found[key] = ("--" + item.name.replace("_", "-"), value)
    return found
