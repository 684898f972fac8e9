"""init-recipe: a recipe TOML for a user's model from its source, weights file and ImageFolder."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import tomllib
import typing

import pytest
import torch
import torchvision
from image_folders import write_imagefolder

from pipeline.errors import PipelineError
from pipeline.recipe.config import Recipe
from pipeline.recipe.init_recipe import RecipeRequest, to_toml, write_recipe
from pipeline.recipe.labels import imagefolder_labels
from pipeline.recipe.registry import get_recipe
from pipeline.stages import init_recipe as stage

CLASSES = ["cat", "dog", "eel"]


@pytest.fixture
def folder(tmp_path):
    return write_imagefolder(tmp_path / "data", CLASSES, per_class=1, size=8, val_per_class=1)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "finetuned.pth"
    torch.save({"model": torchvision.models.resnet18(num_classes=len(CLASSES)).state_dict(), "epoch": 2}, path)
    return path


def test_recipe_from_torchvision_weights_and_data(tmp_path, folder, weights):
    out = tmp_path / "recipes" / "mine.toml"
    written = write_recipe(
        RecipeRequest("torchvision:resnet18", weights=str(weights), data=str(folder), input_size=64, out=str(out))
    )
    assert written.path == out
    assert written.next_command == f"python -m pipeline engine --model {out}"
    recipe = tomllib.loads(out.read_text())
    assert recipe["name"] == "mine" and recipe["arch"] == "torchvision:resnet18"
    assert recipe["num_classes"] == 3 and recipe["classifier"] == "fc" and recipe["labels"] == CLASSES
    assert recipe["input_shape"] == [3, 64, 64] and recipe["weights"] == str(weights.resolve())
    assert (recipe["data"]["kind"], recipe["data"]["root"]) == ("imagefolder", str(folder.resolve()))
    assert get_recipe(str(out)).to_dict() == recipe  # the whole resolved recipe, loadable as written
    # own weights on 8x8 images, at most the input size: whole images, neither resized nor cropped (issue 22;
    # before, torchvision's 256/224 ratio resized them to 73 and cropped 64); the file states it
    assert recipe["preprocess"] == {
        "resize": 0,
        "resize_mode": "fixed",
        "resize_shape": "shorter",
        "interpolation": "bilinear",
        "crop": 64,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "color": "RGB",
    }
    assert out.read_text().startswith("# preprocessing inferred by init-recipe: no resize")
    assert written.notes[:3] == [
        f"weights: file {weights} (entry 'model'); other entries ignored: epoch",
        "num_classes: 3, from fc.weight in the weights file",
        f"labels: 3 class folders of {folder}",
    ]
    # measured on the dense model (issue 34): these untrained weights score alike under every candidate, and ties
    # go to the simplest
    assert written.notes[3].startswith("preprocessing: no resize") and "chosen by measurement" in written.notes[3]


def test_recipe_keys_are_config_fields(tmp_path, folder, weights):
    """The recipe loader maps top-level keys onto Recipe and each table onto its section dataclass."""
    out = tmp_path / "r.toml"
    write_recipe(RecipeRequest("torchvision:resnet18", weights=str(weights), data=str(folder), out=str(out)))
    recipe = tomllib.loads(out.read_text())
    hints = typing.get_type_hints(Recipe)
    for key, value in recipe.items():
        assert key in hints, key
        if isinstance(value, dict):
            section_fields = {field.name for field in dataclasses.fields(hints[key])}
            assert set(value) <= section_fields, key


def test_defaults_from_timm_pretrained_config(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "t.toml"
    written = write_recipe(RecipeRequest("timm:resnet10t", out=str(out)))
    recipe = tomllib.loads(out.read_text())
    assert recipe["input_shape"] == [3, 176, 176] and recipe["num_classes"] == 1000
    assert recipe["preprocess"]["resize"] == 201 and recipe["weights"] == "random"
    assert recipe["labels"] == [] and recipe["classifier"] == "fc"
    assert written.notes[0] == "weights: random initialisation (no --weights FILE; accuracy means nothing)"
    assert len(written.notes) == 2 and written.notes[1].endswith(
        "(no image folder given (--data DIR): the recipe's transform)"
    )


def test_torchvision_imagenet_head_gets_imagenet_labels(tmp_path):
    out = tmp_path / "r.toml"
    write_recipe(RecipeRequest("torchvision:resnet18", out=str(out)))
    recipe = tomllib.loads(out.read_text())
    assert recipe["num_classes"] == 1000 and recipe["labels"][:2] == ["tench", "goldfish"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "ownnet.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def build(num_classes=10):
            return nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "python:ownnet:build"
    sys.modules.pop("ownnet", None)


def test_python_factory_needs_the_flags_the_source_cannot_know(tmp_path, user_module):
    out = tmp_path / "own.toml"
    with pytest.raises(PipelineError) as error:
        write_recipe(RecipeRequest(user_module, out=str(out)))
    assert str(error.value) == (
        "python:ownnet:build: the classifier head is not known; name it with "
        "--classifier NAME (its last Linear layer is '3')"
    )
    with pytest.raises(PipelineError) as error:
        write_recipe(RecipeRequest(user_module, classifier="3", num_classes=4, input_size=28, out=str(out)))
    assert str(error.value) == (
        "python:ownnet:build does not say how its input is normalised; pass --mean and --std "
        "(the values the model was trained with, one per channel)"
    )
    assert not out.exists()
    write_recipe(
        RecipeRequest(user_module, classifier="3", num_classes=4, input_size=28, mean=[0.5], std=[0.25], out=str(out))
    )
    recipe = tomllib.loads(out.read_text())
    assert recipe["input_shape"] == [1, 28, 28] and recipe["num_classes"] == 4 and recipe["name"] == "own"
    assert recipe["preprocess"] == {
        "resize": 28,
        "resize_mode": "auto",
        "resize_shape": "shorter",
        "interpolation": "bilinear",
        "crop": 28,
        "mean": [0.5],
        "std": [0.25],
        "color": "L",
    }


def bad(request: RecipeRequest) -> str:
    with pytest.raises(PipelineError) as error:
        write_recipe(request)
    return str(error.value)


def test_inconsistent_inputs_are_refused_and_nothing_written(tmp_path, folder, weights):
    out = tmp_path / "r.toml"
    spec = "torchvision:resnet18"
    assert bad(RecipeRequest(spec, weights=str(weights), num_classes=5, out=str(out))) == (
        f"--num-classes 5, but fc.weight in {weights} has 3 outputs; drop --num-classes or pass the matching weights"
    )
    four = write_imagefolder(tmp_path / "four", CLASSES + ["fox"], per_class=1, size=8)
    assert bad(RecipeRequest(spec, weights=str(weights), data=str(four), out=str(out))) == (
        f"{four} has 4 classes but the weights file says 3; the head and the class folders must match"
    )
    assert bad(RecipeRequest("torchvision:resnet34", weights=str(weights), out=str(out))).startswith(
        f"weights file {weights} does not fit this architecture (missing ['layer1.2.conv1.weight'"
    )
    assert bad(RecipeRequest(spec, weights=str(weights), mean=[0.5, 0.5], out=str(out))).endswith(
        "preprocess.mean = [0.5, 0.5] is not valid; valid: one value per input channel"
    )
    assert not out.exists()


def test_existing_recipe_is_kept_without_force(tmp_path, weights):
    out = tmp_path / "r.toml"
    out.write_text("# mine\n")
    assert bad(RecipeRequest("torchvision:resnet18", weights=str(weights), out=str(out))) == (
        f"{out} already exists; pass --force to replace it or --out another file"
    )
    assert out.read_text() == "# mine\n"
    write_recipe(RecipeRequest("torchvision:resnet18", weights=str(weights), out=str(out), force=True))
    assert tomllib.loads(out.read_text())["num_classes"] == 3


def test_stage_flags_and_output(tmp_path, folder, weights, capsys):
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    out = tmp_path / "r.toml"
    args = parser.parse_args(
        [
            "--model",
            "torchvision:resnet18",
            "--weights",
            str(weights),
            "--data",
            str(folder),
            "--input-size",
            "32",
            "--mean",
            "0.5,0.5,0.5",
            "--std",
            "0.2 0.2 0.2",
            "--out",
            str(out),
        ]
    )
    assert stage.NEEDS_RECIPE is False
    assert stage.run(stage.Options(**vars(args))) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [f"wrote {out}", f"next: python -m pipeline engine --model {out}"]
    assert tomllib.loads(out.read_text())["preprocess"]["std"] == [0.2, 0.2, 0.2]


def test_labels_follow_imagefolder_order(tmp_path):
    root = write_imagefolder(tmp_path / "d", ["b", "a", "C", "a b"], per_class=1, size=4, val_per_class=1)
    expected = torchvision.datasets.ImageFolder(str(root / "train")).classes
    assert imagefolder_labels(root) == expected == ["C", "a", "a b", "b"]
    (root / "val" / "b").rename(root / "val" / "z")
    with pytest.raises(PipelineError) as error:
        imagefolder_labels(root)
    message = str(error.value)
    assert f"{root / 'train'} and {root / 'val'} hold different class folders" in message
    assert "only in train/: [b]; only in val/: [z]" in message


def test_toml_strings_survive():
    data = {
        "name": 'a "quoted" \\ name',
        "labels": ["ü", "tab\there"],
        "x": 1e-05,
        "flag": True,
        "preprocess": {"mean": [0.5]},
    }
    assert tomllib.loads(to_toml(data)) == data


def test_default_name_and_file_from_the_weights_or_the_model(tmp_path, weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert write_recipe(RecipeRequest("torchvision:resnet18", weights=str(weights))).path.name == "finetuned.toml"
    assert tomllib.loads((tmp_path / "finetuned.toml").read_text())["name"] == "finetuned"
    assert write_recipe(RecipeRequest("torchvision:resnet18")).path.name == "resnet18.toml"
