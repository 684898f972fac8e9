"""Resolving --model/--weights/--data: the head size from the weights file, the labels from the class folders,
source specs on the `_user` base recipe, and one error line when the inputs disagree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from image_folders import write_imagefolder

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.recipe.config import with_fields
from pipeline.recipe.resolve import ModelOptions, resolve_recipe

CLASSES = ["ant", "bee", "cow"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # python:examples.custom_cnn:build


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    weights = root / "three.pth"
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=3).state_dict()}, weights)
    return (
        weights,
        write_imagefolder(root / "three", CLASSES, 1, size=4, val_per_class=1),
        write_imagefolder(root / "four", CLASSES + ["dog"], 1, size=4, val_per_class=1),
    )


def resolve(**flags):
    return resolve_recipe(ModelOptions(**flags))


def test_registered_imagenet_recipe_takes_head_and_labels_from_the_inputs(inputs, capsys):
    weights, three, _ = inputs
    recipe = resolve(model="resnet18", weights=str(weights), data=str(three), input_size="32")
    assert (recipe.num_classes, recipe.labels, recipe.input_shape) == (3, CLASSES, [3, 32, 32])
    printed = capsys.readouterr()
    assert printed.out.splitlines()[:3] == [
        f"note: weights: file {weights} (entry 'state_dict')",
        "note: num_classes: 3, from fc.weight in the weights file",
        f"note: labels: 3 class folders of {three}",
    ]
    assert printed.out.splitlines()[3].startswith("note: preprocessing: ")  # every stage says its preprocessing
    assert all(line.startswith("warning: ") for line in printed.err.splitlines())
    random_head = resolve(model="resnet18", weights="random", data=str(three))  # nothing fixes the head
    assert random_head.num_classes == 3 and random_head.labels == CLASSES


def test_explicit_flags_win_and_conflicts_are_one_error(inputs):
    weights, three, four = inputs
    assert resolve(model="resnet18", weights="random", data=str(three), overrides=["labels=a,b,c"]).labels == [
        "a",
        "b",
        "c",
    ]
    with pytest.raises(PipelineError) as error:
        resolve(model="resnet18", weights=str(weights), data=str(four))
    assert (
        str(error.value) == f"{four} has 4 classes but the weights file says 3; the head and the class folders "
        "must match"
    )
    with pytest.raises(PipelineError) as error:
        resolve(model="resnet18", weights=str(weights), num_classes=5)
    assert (
        str(error.value) == f"--num-classes 5, but fc.weight in {weights} has 3 outputs; drop --num-classes or "
        "pass the matching weights"
    )
    with pytest.raises(PipelineError, match="the torchvision weights says 1000"):
        resolve(model="resnet18", data=str(three))  # ImageNet weights, a 3-class folder


def test_recipe_file_with_num_classes_zero_takes_the_head_from_the_weights(inputs, tmp_path):
    weights, _, _ = inputs
    path = tmp_path / "mine.toml"
    path.write_text(
        'arch = "torchvision:resnet18"\nnum_classes = 0\ninput_shape = [3, 64, 64]\nweights = "random"\n'
        '[data]\nkind = "synthetic"\n[preprocess]\ncrop = 64\nmean = [0.5, 0.5, 0.5]\n'
        'std = [0.2, 0.2, 0.2]\ncolor = "RGB"\n'
    )
    assert resolve(model=str(path), weights=str(weights)).num_classes == 3
    with pytest.raises(PipelineError) as error:
        resolve(model=str(path))
    assert str(error.value).startswith(f"recipe {path} (with flags): num_classes = 0")


def test_source_spec_recipe_from_the_source_defaults():
    recipe = resolve(model="torchvision:resnet18")
    assert (recipe.name, recipe.arch, recipe.classifier) == ("torchvision_resnet18", "torchvision:resnet18", "fc")
    assert recipe.input_shape == [3, 224, 224] and recipe.preprocess.resize == 256
    assert recipe.num_classes == 1000 and recipe.labels[0] == "tench" and recipe.data.kind == "synthetic"
    assert recipe.masks.batch_size == 64 and recipe.verify.max_top1_drop == 2.0  # the _user / ImageNet settings
    with pytest.raises(
        PipelineError,
        match=r"the classifier head is not known; name it with --classifier NAME "
        r"\(its last Linear layer is 'head'\)",
    ):
        resolve(model="python:examples.custom_cnn:build")


def test_published_weights_name_their_source(monkeypatch):
    from pipeline.paths import ArtifactPaths
    from pipeline.recipe.weights import dense_state_dict

    recipe = resolve(
        model="python:examples.custom_cnn:build",
        classifier="head",
        input_size="32",
        mean="0.5,0.5,0.5",
        std="0.5,0.5,0.5",
    )
    torchvision = with_fields(recipe, {"weights": "torchvision"}, "test")  # the resolved recipe is frozen
    with pytest.raises(PipelineError, match="is not a torchvision model; use --weights hub"):
        dense_state_dict(torchvision, ArtifactPaths.for_model("unused", recipe.name))
    hub = with_fields(recipe, {"weights": "hub"}, "test")
    with pytest.raises(PipelineError, match="has no published weights; pass --weights FILE"):
        dense_state_dict(hub, ArtifactPaths.for_model("unused", recipe.name))


def test_init_recipe_is_a_stage_and_its_file_runs(inputs, tmp_path, capsys):
    weights, three, _ = inputs
    path = tmp_path / "mine.toml"
    assert (
        main(
            [
                "init-recipe",
                "--model",
                "torchvision:resnet18",
                "--weights",
                str(weights),
                "--data",
                str(three),
                "--input-size",
                "32",
                "--out",
                str(path),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1] == f"next: python -m pipeline engine --model {path}"
    assert main(["layers", "--model", str(path), "--out", str(tmp_path / "engines")]) == 0
    printed = capsys.readouterr().out
    assert "2:4 masks cover" in printed and (tmp_path / "engines" / "mine" / "layers.json").is_file()
