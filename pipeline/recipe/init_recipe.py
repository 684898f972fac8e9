"""Write a recipe TOML for a user's own model from a source spec, a weights file and an ImageFolder.

Every value the flags leave open comes from the source (torchvision weight metadata, timm's pretrained
config), the weights file (the classifier's output size) or the data folder (the class names). The file
holds only what differs from the typed config's defaults, and is checked by reading it back before the
atomic rename.
"""
from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import write_text
from pipeline.recipe.labels import imagefolder_labels
from pipeline.recipe.sources import ModelSource, PythonSource, input_channels, resolve_source
from pipeline.recipe.weight_files import infer_num_classes, read_weight_file
from pipeline.weights import load_state_dict_strict

NAMED_WEIGHTS = ("random", "torchvision", "pretrain")


@dataclass
class RecipeRequest:
    """The init-recipe flags; None means: take it from the source, the weights or the data."""

    source: str
    weights: str | None = None
    data: str | None = None
    num_classes: int | None = None
    classifier: str | None = None
    input_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    name: str | None = None
    out: str | None = None
    force: bool = False


@dataclass
class WrittenRecipe:
    path: Path
    next_command: str
    notes: list[str] = field(default_factory=list)  # where each filled-in value came from


def write_recipe(request: RecipeRequest) -> WrittenRecipe:
    source = resolve_source(request.source)
    defaults = source.defaults()
    notes: list[str] = []
    classifier = request.classifier or source.classifier_name()
    if classifier is None:
        suggestion = source.suggested_classifier() if isinstance(source, PythonSource) else None
        hint = f" (its last Linear layer is {suggestion!r})" if suggestion else ""
        raise PipelineError(f"{request.source}: the classifier head is not known; name it with --classifier NAME{hint}")

    state = None
    weights = request.weights or "random"
    if weights not in NAMED_WEIGHTS:
        weight_file = read_weight_file(weights)
        state = weight_file.state_dict
        weights = str(Path(weights).resolve())
        notes.append(f"weights: {weight_file.describe(Path(request.weights))}")
    elif request.weights is None:
        notes.append("weights: random initialisation (no --weights FILE; accuracy means nothing)")

    labels = imagefolder_labels(request.data) if request.data and request.data != "synthetic" else None
    num_classes = _num_classes(request, state, classifier, labels, defaults.num_classes, notes)
    if labels is None and defaults.labels and len(defaults.labels) == num_classes:
        labels = defaults.labels

    model = source.build(num_classes)
    if state is not None:
        load_state_dict_strict(model, state, f"weights file {request.weights}")
    channels = input_channels(model) or 3
    size = request.input_size or defaults.input_size
    if not size:
        raise PipelineError(f"{request.source} does not say its input size; pass --input-size PIXELS")
    if size < 1:
        raise PipelineError(f"--input-size {size}: expected a positive number of pixels")
    preprocess = _preprocess(request, defaults, channels, size)

    name = request.name or _default_name(request, source)
    recipe: dict[str, Any] = {
        "name": name,
        "arch": request.source,
        "description": f"{request.source}, {num_classes} classes (written by init-recipe)",
        "num_classes": num_classes,
        "input_shape": [channels, size, size],
        "weights": weights,
        "classifier": classifier,
    }
    if labels:
        recipe["labels"] = list(labels)
    if request.data == "synthetic":
        recipe["data"] = {"kind": "synthetic"}
    elif request.data:
        recipe["data"] = {"kind": "imagefolder", "root": str(Path(request.data).resolve())}
    recipe["preprocess"] = preprocess

    path = Path(request.out or f"{name}.toml")
    if path.exists() and not request.force:
        raise PipelineError(f"{path} already exists; pass --force to replace it or --out another file")
    text = to_toml(recipe)
    if tomllib.loads(text) != recipe:
        raise PipelineError(f"cannot write {path}: a value does not survive TOML (labels with control characters?)")
    write_text(path, text)
    return WrittenRecipe(path, f"python -m pipeline engine --model {path}", notes)


def _num_classes(request: RecipeRequest, state, classifier: str, labels: list[str] | None,
                 source_default: int | None, notes: list[str]) -> int:
    from_weights = infer_num_classes(state, classifier) if state is not None else None
    if request.num_classes is not None and request.num_classes < 1:
        raise PipelineError(f"--num-classes {request.num_classes}: expected a positive number")
    if request.num_classes and from_weights and request.num_classes != from_weights:
        raise PipelineError(f"--num-classes {request.num_classes}, but {classifier}.weight in {request.weights} has "
                            f"{from_weights} outputs; drop --num-classes or pass the matching weights")
    chosen = request.num_classes or from_weights or (len(labels) if labels else None) or source_default
    if chosen is None:
        raise PipelineError(f"{request.source}: the number of classes is not known; pass --num-classes, "
                            "--weights FILE or --data DIR")
    if labels is not None and len(labels) != chosen:
        where = "--num-classes" if request.num_classes else ("the weights file" if from_weights else "the source")
        raise PipelineError(f"{request.data} has {len(labels)} classes but {where} says {chosen}; the head and the "
                            "class folders must match")
    if from_weights and not request.num_classes:
        notes.append(f"num_classes: {chosen}, from {classifier}.weight in the weights file")
    if labels:
        notes.append(f"labels: {len(labels)} class folders of {request.data}")
    return chosen


def _preprocess(request: RecipeRequest, defaults, channels: int, size: int) -> dict[str, Any]:
    mean = request.mean or defaults.mean
    std = request.std or defaults.std
    if mean is None or std is None:
        raise PipelineError(f"{request.source} does not say how its input is normalised; pass --mean and --std "
                            "(the values the model was trained with, one per channel)")
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, channels):
            raise PipelineError(f"{flag} has {len(values)} values; the model takes {channels} channels")
    if any(value <= 0 for value in std):
        raise PipelineError(f"--std {','.join(map(str, std))}: every value must be > 0")
    if defaults.input_size and defaults.resize:  # keep the source's resize-to-crop ratio at any input size
        resize = int(math.floor(size * defaults.resize / defaults.input_size))
    else:
        resize = size
    color = defaults.color if defaults.color and {"L": 1, "RGB": 3}[defaults.color] == channels else \
        ("L" if channels == 1 else "RGB")
    return {"resize": resize, "crop": size, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "color": color}


def _default_name(request: RecipeRequest, source: ModelSource) -> str:
    base = Path(request.weights).stem if request.weights and request.weights not in NAMED_WEIGHTS else source.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-") or "model"


# --------------------------------------------------------------------------- TOML (scalars, lists, tables)
def to_toml(data: dict[str, Any]) -> str:
    """TOML for top-level scalars and lists followed by one table per nested dict."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not isinstance(value, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"] + [f"{name} = {_toml_value(value)}" for name, value in table.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are all valid in TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")
