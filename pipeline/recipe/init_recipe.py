"""Write a recipe TOML for a user's own model from a source spec, a weights file and an ImageFolder.

The recipe is resolved exactly as `--model SPEC --weights FILE --data DIR` resolves it for a stage
(pipeline.recipe.resolve): the source fills the head, input size and normalisation, the weights file the
head size, the data folder the labels, on the `_user` base recipe. The file holds the whole resolved recipe,
so every setting is there to edit; it is checked by reading it back before the atomic rename.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.preprocess_choice import applies, choose
from pipeline.errors import PipelineError
from pipeline.io import write_text
from pipeline.recipe.preprocessing import describe as describe_preprocessing
from pipeline.recipe.resolve import ModelOptions, recipe_with_flags
from pipeline.recipe.sources import resolve_source
from pipeline.recipe.weight_files import read_state_dict
from pipeline.recipe.weights import NAMED_WEIGHTS, build_network, load_state_dict_strict


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
    resize: str | None = None  # auto | none | N (default auto: fit the image folder)
    name: str | None = None
    out: str | None = None
    force: bool = False


@dataclass
class WrittenRecipe:
    path: Path
    next_command: str
    notes: list[str] = field(default_factory=list)  # where each filled-in value came from


def _joined(values: list[float] | None) -> str | None:
    """--mean/--std as the comma-separated text the recipe flags take."""
    return None if values is None else ",".join(map(str, values))


def write_recipe(request: RecipeRequest) -> WrittenRecipe:
    weights = request.weights
    if weights and weights not in NAMED_WEIGHTS:
        weights = str(Path(weights).resolve())
    data = request.data
    if data and data not in ("synthetic", "fashion_mnist"):
        data = str(Path(data).resolve())
    options = ModelOptions(
        model=request.source,
        weights=weights,
        data=data,
        num_classes=request.num_classes,
        classifier=request.classifier,
        input_size=None if request.input_size is None else str(request.input_size),
        resize=request.resize,
        mean=_joined(request.mean),
        std=_joined(request.std),
        overrides=[f"name={request.name or _default_name(request)}"],
    )
    recipe, notes = recipe_with_flags(options)
    if weights is None:  # weights is None exactly when request.weights is
        notes.insert(0, "weights: random initialisation (no --weights FILE; accuracy means nothing)")
    elif weights not in NAMED_WEIGHTS:  # the whole file must fit the network, not only its head
        model = build_network(recipe)
        load_state_dict_strict(model, read_state_dict(weights), f"weights file {request.weights}")
        if applies(recipe):  # the transform measured on the dense model (pipeline/data/preprocess_choice.py)
            chosen = choose(recipe, model.eval())
            how = "stated" if chosen.stated else "chosen by measurement, the highest dense top-1 of the candidates"
            at = next((i for i, note in enumerate(notes) if note.startswith("preprocessing: ")), len(notes))
            notes = [note for note in notes if not note.startswith("preprocessing: ")]
            notes.insert(at, f"preprocessing: {describe_preprocessing(recipe)} ({how})")
    recipe.description = f"{request.source}, {recipe.num_classes} classes (written by init-recipe)"

    path = Path(request.out or f"{recipe.name}.toml")
    if path.exists() and not request.force:
        raise PipelineError(f"{path} already exists; pass --force to replace it or --out another file")
    inferred = [note.removeprefix("preprocessing: ") for note in notes if note.startswith("preprocessing: ")]
    folder = recipe.data.kind == "imagefolder" and bool(recipe.data.root)
    if folder:
        recipe.preprocess.resize_mode = "fixed"  # the file states what was inferred from the folder
    content = recipe.to_dict()
    header = [f"# preprocessing inferred by init-recipe: {line}" for line in inferred]
    if header and folder:
        header.append('# (preprocess.resize_mode = "fixed" keeps it; "auto" infers it from the image folder again)')
    text = "\n".join(header + [""] if header else []) + to_toml(content)
    if tomllib.loads(text) != content:
        raise PipelineError(f"cannot write {path}: a value does not survive TOML (labels with control characters?)")
    write_text(path, text)
    return WrittenRecipe(path, f"python -m pipeline engine --model {path}", notes)


def _default_name(request: RecipeRequest) -> str:
    """The --out file's stem (a recipe in models/ must be named after its file), else the weights' or the model's."""
    if request.out:
        base = Path(request.out).stem
    elif request.weights and request.weights not in NAMED_WEIGHTS:
        base = Path(request.weights).stem
    else:
        base = resolve_source(request.source).name
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
