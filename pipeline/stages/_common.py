"""What every model-level stage does first: resolve the recipe and its artifact folder."""
from __future__ import annotations

import argparse

from pipeline.cli import resolve_recipe
from pipeline.recipe.config import Recipe
from pipeline.io import ensure_dir, write_json
from pipeline.paths import ArtifactPaths


def prepare(args: argparse.Namespace) -> tuple[Recipe, ArtifactPaths]:
    recipe = resolve_recipe(args)
    paths = ArtifactPaths.for_model(args.out, recipe.name)
    ensure_dir(paths.root)
    write_json(paths.config, recipe.to_dict())
    return recipe, paths
