"""Registered recipes: the CLI's MODEL name -> `models/<name>.toml`; `--model` may also be a path to a recipe file
(or a model source spec, see pipeline.recipe.resolve).

A recipe file holds the fields of `pipeline.recipe.config.Recipe` (top-level keys and one table per
section). `extends = "<file stem>"` starts from another file in the same folder (files whose name
starts with `_` hold shared settings and are not models). Every value is checked on loading.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pipeline
from pipeline.errors import PipelineError
from pipeline.recipe.config import Recipe, recipe_from_dict, validate
from pipeline.recipe.sources import SPEC_FORMS


def recipes_dir() -> Path:
    """The registered recipe files: shipped as package data (pipeline/models), or a source checkout's models/."""
    installed = Path(pipeline.__file__).parent / "models"
    return installed if installed.is_dir() else Path(pipeline.__file__).resolve().parent.parent / "models"


def list_models() -> list[str]:
    return sorted(path.stem for path in recipes_dir().glob("*.toml") if not path.stem.startswith("_"))


def is_recipe_path(model: str) -> bool:
    return model.endswith(".toml")


def get_recipe(model: str) -> Recipe:
    """A fresh, validated Recipe for a registered name or a recipe file path; unknown names list the valid ones."""
    if is_recipe_path(model):
        path = Path(model)
        if not path.is_file():
            raise PipelineError(f"--model {model}: no such recipe file")
        return load_recipe_file(path)
    valid = list_models()
    if model not in valid:
        raise PipelineError(
            f"unknown model {model!r}; valid models: {', '.join(valid)}, a path to a recipe .toml, or "
            f"a model source ({SPEC_FORMS})"
        )
    return load_recipe_file(recipes_dir() / f"{model}.toml")


def load_recipe_file(path: Path) -> Recipe:
    data = read_recipe_data(path)
    name = data.pop("name", path.stem)
    if path.parent.resolve() == recipes_dir().resolve() and name != path.stem:
        raise PipelineError(f"{path}: name = {name!r}, but a registered recipe is named after its file ({path.stem!r})")
    data["name"] = name
    return validate(recipe_from_dict(data, origin=f"recipe {path}"), origin=f"recipe {path}", resolved=False)


def read_recipe_data(path: Path) -> dict[str, Any]:
    """A recipe file's plain data with its `extends` bases merged in, not yet checked."""
    return _read_with_bases(path, seen=())


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path in seen:
        raise PipelineError(f"recipe {path}: `extends` loops ({' -> '.join(str(p) for p in seen + (path,))})")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read recipe {path} ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"recipe {path} is not valid TOML ({exc})") from None
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = path.parent / f"{base}.toml"
    if not isinstance(base, str) or not base_path.is_file():
        raise PipelineError(f"recipe {path}: extends = {base!r} names no recipe file in {path.parent}")
    merged = _read_with_bases(base_path, seen + (path,))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged
