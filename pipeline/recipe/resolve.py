"""From the command line to the resolved, validated recipe of a run, and its record `config.json`.

Order: the recipe (name or file), then `--weights`/`--data`, the model flags (`--input-size`, `--mean`,
`--std`, `--num-classes`, `--classifier`), every `--set`, then each stage flag that stands for a recipe
field (e.g. verify's `--min-coverage`). The result is validated before any stage does work.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import ensure_dir, write_json
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import CHANNELS, Recipe, apply_override, set_field, validate
from pipeline.recipe.registry import get_recipe


@dataclass
class ModelOptions:
    """The flags every model-level stage shares (see pipeline.cli.add_model_arguments)."""

    model: str = "fmnist_resnet"
    out: str = "engines"
    weights: str | None = None
    data: str | None = None
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, in order
    input_size: str | None = None  # H (square, channels from the recipe) or C,H,W
    mean: str | None = None
    std: str | None = None
    num_classes: int | None = None
    classifier: str | None = None


def resolve_recipe(options: ModelOptions, stage_fields: dict[str, tuple[str, Any]] | None = None) -> Recipe:
    """The validated recipe with every flag applied. `stage_fields`: recipe key -> (flag, value) of a stage's flags."""
    recipe = get_recipe(options.model)
    if options.weights:
        recipe.weights = options.weights
    if options.data:
        if options.data in ("synthetic", "fashion_mnist"):
            recipe.data.kind = options.data
        else:
            if not Path(options.data).is_dir():
                raise PipelineError(f"--data {options.data}: no such folder; pass a dataset folder or synthetic")
            recipe.data.root = options.data
            if recipe.data.kind == "synthetic":
                recipe.data.kind = "imagefolder"
    if options.input_size is not None:
        apply_input_size(recipe, options.input_size)
    for flag, key, value in (("--mean", "preprocess.mean", options.mean), ("--std", "preprocess.std", options.std),
                             ("--num-classes", "num_classes", options.num_classes),
                             ("--classifier", "classifier", options.classifier)):
        if value is not None:
            set_field(recipe, key, value if isinstance(value, str) else int(value), f"{flag} {value}")
    for assignment in options.overrides:
        apply_override(recipe, assignment)
    for key, (flag, value) in (stage_fields or {}).items():  # a stage's own flag beats a general --set
        set_field(recipe, key, value, f"{flag} {value}")
    validate(recipe, origin=f"model {recipe.name} (recipe and flags)")
    if recipe.data.kind == "imagefolder" and not recipe.data.root and recipe.weights != "random":
        raise PipelineError(f"model {recipe.name} reads ImageNet-style folders: pass --data DIR (with train/ "
                            "and val/) or --data synthetic for a smoke run")
    if recipe.data.kind == "imagefolder" and not recipe.data.root:
        print(f"note: {recipe.name} with random weights and no --data: using synthetic data (accuracy means nothing)",
              file=sys.stderr)
        recipe.data.kind = "synthetic"
    return recipe


def apply_input_size(recipe: Recipe, text: str) -> None:
    """`--input-size 224` (square, the recipe's channels) or `3,224,224`; crop, resize and colour follow."""
    parts = [part.strip() for part in text.split(",")]
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 3) or any(n < 1 for n in numbers):
        raise PipelineError(f"--input-size {text}: not valid; valid: one positive size (224) or C,H,W (3,224,224)")
    if len(numbers) == 1:
        numbers = [recipe.input_shape[0] if recipe.input_shape else 3, numbers[0], numbers[0]]
    channels, height, width = numbers
    if height != width:
        raise PipelineError(f"--input-size {text}: not valid; valid: square inputs only (H = W)")
    pre = recipe.preprocess
    if pre.resize:  # keep the recipe's resize/crop ratio, e.g. 256/224
        pre.resize = round(height * pre.resize / pre.crop)
    pre.crop = height
    colour = {count: name for name, count in CHANNELS.items()}.get(channels)
    if colour:
        pre.color = colour
    recipe.input_shape = numbers


def write_config(recipe: Recipe, paths: ArtifactPaths) -> None:
    """Record the resolved config; a stage calls this with its own artifacts, once nothing can fail any more
    (a failed stage changes no artifact, config.json included)."""
    ensure_dir(paths.root)
    write_json(paths.config, recipe.to_dict())
