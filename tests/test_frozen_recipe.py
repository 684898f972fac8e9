"""The resolved recipe is frozen; what changes a run's recipe does so before config.json is written, through the
override path (issue 33: a frozen recipe and narrow configs at library seams)."""

from __future__ import annotations

import json

import pytest
from nm_fixtures import cli
from test_preprocess_choice import flags, resolved, trained_case

from pipeline.recipe.config import FrozenRecipeError, freeze, is_frozen, thawed, with_fields
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.resolve import ModelOptions, resolve_recipe


def test_a_resolved_recipe_cannot_be_assigned_and_with_fields_goes_through_the_override_path():
    recipe = resolve_recipe(ModelOptions(model="tiny_resnet", data="synthetic"))
    assert is_frozen(recipe)
    for section, name, value in (("export", "fp16", False), ("build", "max_batch", 128), ("preprocess", "resize", 0)):
        with pytest.raises(FrozenRecipeError, match=f"{name} cannot be assigned"):
            setattr(getattr(recipe, section), name, value)
    with pytest.raises(FrozenRecipeError):
        recipe.name = "other"
    changed = with_fields(recipe, {"export.fp16": False}, "test")
    assert is_frozen(changed) and changed.export.fp16 is False and recipe.export.fp16 is True
    with pytest.raises(Exception, match="build.opt_batch"):  # validated like every override
        with_fields(recipe, {"build.opt_batch": 1000}, "test")


def test_thawed_is_a_mutable_copy_and_freeze_works_on_any_recipe():
    recipe = freeze(get_recipe("tiny_resnet"))
    twin = thawed(recipe)
    twin.masks.steps = recipe.masks.steps + 1
    assert not is_frozen(twin) and twin.masks.steps != recipe.masks.steps


def test_config_json_of_every_stage_after_a_measured_choice_records_the_chosen_preprocessing(
    tmp_path, tmp_path_factory
):
    """train-masks measures the transform (preprocess_choice.json); bake reads it: both config.json records hold
    the chosen resize, shape and interpolation, not the recipe's transform before the measurement."""
    case, data, weights, model, own = trained_case("whole image scaled up", tmp_path_factory)
    out = tmp_path / "engines"
    common = flags(data, weights, "--out", str(out), "--set", "masks.steps=2")
    folder = out / "python_tests.image_folders_stripe_net"
    recipe_own = resolved(data, weights).preprocess  # the transform before any measurement
    cli("train-masks", *common, check=True)
    chosen = json.loads((folder / "preprocess_choice.json").read_text())["chosen"]
    assert chosen != {key: getattr(recipe_own, key) for key in chosen}  # else the test could not fail
    assert recorded(folder, chosen) == chosen
    (folder / "config.json").unlink()
    cli("bake", *common, check=True)
    assert recorded(folder, chosen) == chosen


def recorded(folder, chosen: dict) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {key: config["preprocess"][key] for key in chosen}
