"""From the command line to the resolved, validated recipe of a run, and its record `config.json`.

Order: the recipe (a registered name, a recipe file, or a model source spec on the `_user` base recipe), then
`--weights`/`--data`, the model flags (`--input-size`, `--mean`, `--std`, `--num-classes`, `--classifier`),
every `--set`, then each stage flag that stands for a recipe field (e.g. verify's `--min-masked-coverage`). What is
still open is then taken from the inputs: the head size from the weights file, the labels from the image
folder's class names. The result is validated before any stage does work.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import ensure_dir, write_json
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import (
    CHANNELS,
    Recipe,
    apply_override,
    freeze,
    recipe_from_dict,
    set_field,
    thawed,
    validate,
    with_fields,
)
from pipeline.recipe.labels import imagefolder_labels
from pipeline.recipe.preprocessing import describe as describe_preprocessing
from pipeline.recipe.preprocessing import fit_to_folder, parse_resize, validation_warning
from pipeline.recipe.registry import get_recipe, is_recipe_path, read_recipe_data, recipes_dir
from pipeline.recipe.sources import PythonSource, is_source_spec, resolve_source
from pipeline.recipe.weight_files import infer_num_classes, read_weight_file
from pipeline.recipe.weights import NAMED_WEIGHTS, head_size

USER_BASE = "_user"
WARNING = "warning: "  # notes starting with it are valid but probably wrong inputs, printed on stderr  # models/_user.toml: the settings around a model given as a source spec


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
    resize: str | None = None  # --resize auto | none | N
    skip_bad_images: bool = False


def resolve_recipe(options: ModelOptions, stage_fields: dict[str, tuple[str, Any]] | None = None) -> Recipe:
    """The validated recipe with every flag applied, frozen (pipeline.recipe.config.freeze: library code cannot
    change it; `with_fields` makes a changed copy through the override path). `stage_fields`: recipe key ->
    (flag, value) of a stage's flags."""
    recipe, notes = recipe_with_flags(options, stage_fields)
    if recipe.data.kind == "imagefolder" and not recipe.data.root and recipe.weights != "random":
        raise PipelineError(
            f"model {recipe.name} reads ImageNet-style folders: pass --data DIR (with train/ "
            "and val/) or --data synthetic for a smoke run"
        )
    if recipe.data.kind == "imagefolder" and not recipe.data.root:
        notes.append(f"{recipe.name} with random weights and no --data: using synthetic data (accuracy means nothing)")
        recipe.data.kind = "synthetic"
    for note in notes:  # on stdout: stderr carries the one `error:` line of a run a later check rejects
        if note.startswith(WARNING):
            print(note, file=sys.stderr, flush=True)
        else:
            print(f"note: {note}", flush=True)
    return freeze(recipe)


PREPROCESS_CHOICE_FIELDS = ("resize", "resize_shape", "interpolation")  # what a measured choice sets


def with_measured_preprocessing(recipe: Recipe, paths: ArtifactPaths, measure: bool, model: Any = None) -> Recipe:
    """RECIPE with the evaluation transform recorded in preprocess_choice.json (pipeline/data/preprocess_choice.py),
    as a new frozen recipe through the override path; with MEASURE, measured (on MODEL, the dense model, loaded
    when None) and recorded first where no record of these weights, folder and settings exists. RECIPE itself
    where nothing is measured. A stage runs with, and config.json records, this recipe."""
    from pipeline.data.preprocess_choice import applies, apply_recorded, ensure_choice

    if not applies(recipe):
        return recipe
    scratch = thawed(recipe)
    choice = ensure_choice(scratch, paths, model) if measure else apply_recorded(scratch, paths)
    if choice is None:
        return recipe
    chosen = {f"preprocess.{name}": getattr(scratch.preprocess, name) for name in PREPROCESS_CHOICE_FIELDS}
    return with_fields(recipe, chosen, f"the choice in {paths.preprocess_choice.name}")


def recipe_with_flags(
    options: ModelOptions, stage_fields: dict[str, tuple[str, Any]] | None = None
) -> tuple[Recipe, list[str]]:
    """The recipe with every flag applied, completed from its inputs and validated, and notes on what was filled in."""
    if is_source_spec(options.model):
        recipe, origin = recipe_for_source(options.model, options), f"--model {options.model} (with flags)"
    else:
        recipe = get_recipe(options.model)
        origin = (
            f"recipe {options.model} (with flags)"
            if is_recipe_path(options.model)
            else f"model {recipe.name} (recipe and flags)"
        )
    explicit: dict[str, tuple[str, str]] = {}  # recipe key -> (flag, value) the user set it with
    ratio = (recipe.preprocess.resize, recipe.preprocess.crop) if recipe.preprocess.resize else None
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
    if options.resize is not None:
        mode, resize = parse_resize(options.resize)
        recipe.preprocess.resize_mode = mode
        recipe.preprocess.resize = recipe.preprocess.resize if resize < 0 else resize
    if options.skip_bad_images:
        recipe.data.skip_bad_images = True
    for flag, key, value in (
        ("--mean", "preprocess.mean", options.mean),
        ("--std", "preprocess.std", options.std),
        ("--num-classes", "num_classes", options.num_classes),
        ("--classifier", "classifier", options.classifier),
    ):
        if value is not None:
            set_field(recipe, key, value if isinstance(value, str) else int(value), f"{flag} {value}")
            explicit[key] = (flag, str(value))
    for assignment in options.overrides:
        apply_override(recipe, assignment)
        explicit[assignment.split("=", 1)[0].strip()] = ("--set", assignment.strip())
    for key, (flag, value) in (stage_fields or {}).items():  # a stage's own flag beats a general --set
        set_field(recipe, key, value, f"{flag} {value}")
    notes = complete_from_inputs(recipe, explicit, origin)
    if "preprocess.resize" in explicit:
        recipe.preprocess.resize_mode = "fixed"
    validate(recipe, origin=origin)
    why, warnings = fit_to_folder(recipe, recipe.weights not in NAMED_WEIGHTS, ratio)
    validate(recipe, origin=origin)
    notes.append(f"preprocessing: {describe_preprocessing(recipe)} ({why})")
    notes += [WARNING + text for text in warnings + validation_warning(recipe)]
    return recipe, notes


def recipe_for_source(spec: str, options: ModelOptions) -> Recipe:
    """A recipe for `--model SPEC`: the `_user` base recipe, with what the source knows and the flags it lacks.

    The source names the head and gives the input size, normalisation and (for published weights) the head size;
    a `python:` factory knows none of these, so --classifier, --input-size, --mean and --std fill them.
    """
    source = resolve_source(spec)
    defaults = source.defaults()
    classifier = options.classifier or source.classifier_name()
    if not classifier:
        suggestion = source.suggested_classifier() if isinstance(source, PythonSource) else None
        hint = f" (its last Linear layer is {suggestion!r})" if suggestion else ""
        raise PipelineError(f"{spec}: the classifier head is not known; name it with --classifier NAME{hint}")
    channels = CHANNELS.get(defaults.color or "RGB", 3)
    if defaults.input_size:
        input_shape = [channels, defaults.input_size, defaults.input_size]
        resize = defaults.resize or defaults.input_size
    elif options.input_size is not None:
        input_shape = parse_input_size(options.input_size, channels)
        resize = input_shape[1]  # resize the shorter side to the input size, then centre-crop
    else:
        raise PipelineError(f"{spec} does not say its input size; pass --input-size PIXELS")
    mean = defaults.mean if options.mean is None else options.mean
    std = defaults.std if options.std is None else options.std
    if mean is None or std is None:
        raise PipelineError(
            f"{spec} does not say how its input is normalised; pass --mean and --std "
            "(the values the model was trained with, one per channel)"
        )
    num_classes = defaults.num_classes or head_size(source.build(), classifier)
    if num_classes is None:
        raise PipelineError(
            f"{spec}: --classifier {classifier} names no Linear or Conv2d layer of the network; "
            "pass the module name of its classification head"
        )
    data = read_recipe_data(recipes_dir() / f"{USER_BASE}.toml")
    data.update(
        name=re.sub(r"[^A-Za-z0-9_.-]+", "_", spec),
        arch=spec,
        classifier=classifier,
        description=f"{spec} (--model {spec} on the {USER_BASE} base recipe)",
        num_classes=num_classes,
        input_shape=input_shape,
        labels=defaults.labels if defaults.labels and len(defaults.labels) == num_classes else [],
    )
    data["preprocess"] = {
        "resize": resize,
        "crop": input_shape[1],
        "mean": mean,
        "std": std,
        "color": {count: name for name, count in CHANNELS.items()}.get(input_shape[0], "RGB"),
    }
    return recipe_from_dict(data, origin=f"--model {spec}")


def complete_from_inputs(recipe: Recipe, explicit: dict[str, tuple[str, str]], origin: str) -> list[str]:
    """Fill num_classes and labels from the weights file and the image folder; notes on what was filled in.

    A weights file's head beats the recipe's num_classes (a registered ImageNet recipe takes a fine-tuned
    10-class file); an image folder names the labels, and sizes the head when the weights leave it free
    (random or pretrain). Explicit flags win; when they, the weights and the folder disagree, that is an error.
    """
    notes: list[str] = []
    head, head_from = None, ""
    if recipe.weights not in NAMED_WEIGHTS:
        weight_file = read_weight_file(recipe.weights)
        notes.append(f"weights: {weight_file.describe(Path(recipe.weights))}")
        head = infer_num_classes(weight_file.state_dict, recipe.classifier)
        head_from = f"{recipe.classifier}.weight in {recipe.weights}"
    elif recipe.weights in ("torchvision", "hub"):
        head = resolve_source(recipe.arch).defaults().num_classes
        head_from = f"the head of the {recipe.weights} weights of {recipe.arch}"
    flag = explicit.get("num_classes")
    if flag and head and recipe.num_classes != head:
        raise PipelineError(
            f"{flag[0]} {flag[1]}, but {head_from} has {head} outputs; drop {flag[0]} or pass the matching weights"
        )
    if head and not flag:
        if recipe.weights not in NAMED_WEIGHTS:
            notes.append(f"num_classes: {head}, from {recipe.classifier}.weight in the weights file")
        recipe.num_classes = head

    if recipe.data.kind == "imagefolder" and recipe.data.root:
        labels = imagefolder_labels(recipe.data.root, recipe.data.train_split, recipe.data.eval_split)
        if flag or head:
            where = (
                flag[0]
                if flag
                else ("the weights file" if recipe.weights not in NAMED_WEIGHTS else f"the {recipe.weights} weights")
            )
            if len(labels) != recipe.num_classes:
                raise PipelineError(
                    f"{recipe.data.root} has {len(labels)} classes but {where} says "
                    f"{recipe.num_classes}; the head and the class folders must match"
                )
        else:
            recipe.num_classes = len(labels)
        if "labels" not in explicit:
            recipe.labels = labels
            notes.append(f"labels: {len(labels)} class folders of {recipe.data.root}")

    if recipe.num_classes == 0:
        raise PipelineError(
            f"{origin}: num_classes = 0 (take it from the weights file) is not valid with weights "
            f"{recipe.weights!r} and no image folder; valid: at least 1 (--num-classes K), or "
            "--weights FILE or --data DIR to take it from"
        )
    if recipe.labels and len(recipe.labels) != recipe.num_classes and "labels" not in explicit:
        notes.append(
            f"labels: the recipe's {len(recipe.labels)} labels do not fit {recipe.num_classes} classes "
            "and are left out (--data DIR names them after its class folders)"
        )
        recipe.labels = []
    return notes


def parse_input_size(text: str, channels: int) -> list[int]:
    """`224` (square, `channels` channels) or `3,224,224` as [C, H, W]."""
    parts = [part.strip() for part in text.split(",")]
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 3) or any(n < 1 for n in numbers):
        raise PipelineError(f"--input-size {text}: not valid; valid: one positive size (224) or C,H,W (3,224,224)")
    if len(numbers) == 1:
        numbers = [channels, numbers[0], numbers[0]]
    if numbers[1] != numbers[2]:
        raise PipelineError(f"--input-size {text}: not valid; valid: square inputs only (H = W)")
    return numbers


def apply_input_size(recipe: Recipe, text: str) -> None:
    """`--input-size 224` (square, the recipe's channels) or `3,224,224`; crop, resize and colour follow."""
    numbers = parse_input_size(text, recipe.input_shape[0] if recipe.input_shape else 3)
    channels, height = numbers[0], numbers[1]
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
