"""Model registry: the CLI's MODEL name -> the recipe in `models/<name>.py`."""
from __future__ import annotations

import importlib
import pkgutil

from pipeline.recipe.config import Recipe
from pipeline.errors import PipelineError


def list_models() -> list[str]:
    import models

    return sorted(info.name for info in pkgutil.iter_modules(models.__path__) if not info.name.startswith("_"))


def get_recipe(name: str) -> Recipe:
    """A fresh Recipe for `name`; unknown names list the valid ones."""
    valid = list_models()
    if name not in valid:
        raise PipelineError(f"unknown model {name!r}; valid models: {', '.join(valid)}")
    module = importlib.import_module(f"models.{name}")
    recipe = module.recipe()
    if recipe.name != name:
        raise PipelineError(f"models/{name}.py returns a recipe named {recipe.name!r}; the names must match")
    return recipe
