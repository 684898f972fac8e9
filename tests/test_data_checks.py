"""Dataset checks: matching class folders, an explicit --data folder is never swapped, content fingerprints."""

import os
import shutil

import numpy as np
import pytest
from nm_fixtures import MODEL, cli
from test_bad_input import ARTIFACTS, assert_one_error_line, files_in
from test_config_data import make_fake_fashion_mnist

import pipeline.data.datasets as data
from pipeline.data.datasets import build_datasets, dataset_fingerprint, fashion_mnist_candidates, locate_fashion_mnist
from pipeline.errors import PipelineError
from pipeline.recipe.registry import get_recipe


def make_image_folder(root, classes_by_split, images=2):
    from PIL import Image

    for split, classes in classes_by_split.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(images):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / split / name / f"{i}.png")


def image_folder_recipe(root):
    recipe = get_recipe(MODEL)
    recipe.data.kind, recipe.data.root = "imagefolder", str(root)
    return recipe


def test_train_and_val_with_different_classes_are_refused_with_both_lists(tmp_path):
    make_image_folder(tmp_path, {"train": ["cat", "dog", "emu"], "val": ["bird", "cat", "dog"]})
    with pytest.raises(PipelineError) as error:
        build_datasets(image_folder_recipe(tmp_path))
    message = str(error.value)
    assert "train/ has [cat, dog, emu]" in message and "val/ has [bird, cat, dog]" in message
    assert "only in train/: [emu]" in message and "only in val/: [bird]" in message


def test_matching_classes_are_accepted(tmp_path):
    make_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    bundle = build_datasets(image_folder_recipe(tmp_path))
    assert bundle.train.classes == bundle.eval.classes == ["cat", "dog"]


def test_augmented_training_images_keep_a_plain_view_for_validation_and_calibration(tmp_path):
    """Image folders and Fashion-MNIST alike: with augment_train the training images are random crops and
    flips, and `plain_train` serves the same images, in the same order, through the evaluation transform."""
    import torch

    def served_twice(dataset, index):
        torch.manual_seed(0)
        first = dataset[index][0]
        torch.manual_seed(1)
        return first, dataset[index][0]

    make_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, images=3)
    recipe = image_folder_recipe(tmp_path)
    plain = build_datasets(recipe)
    assert plain.plain_train is plain.train  # nothing augmented: one view
    augmented = build_datasets(recipe, augment_train=True)
    assert augmented.plain_train.samples == augmented.train.samples
    first, second = served_twice(augmented.plain_train, 4)
    assert torch.equal(first, second) and torch.equal(first, plain.train[4][0])
    assert augmented.plain_train[4][1] == augmented.train[4][1]

    fashion = build_datasets(get_recipe("fmnist_resnet"), augment_train=True)
    first, second = served_twice(fashion.train, 7)
    assert not torch.equal(first, second)  # crops and flips
    first, second = served_twice(fashion.plain_train, 7)
    assert torch.equal(first, second) and fashion.plain_train.images is fashion.train.images  # shared, not copied


@pytest.mark.slow  # a CLI run of 5-12 s: the whole suite keeps it, the fast subset leaves it out
def test_mismatched_classes_through_the_cli_are_one_error_line(tmp_path):
    make_image_folder(tmp_path / "data", {"train": ["cat", "dog"], "val": ["cat"]})
    out = tmp_path / "out"
    result = cli("train-masks", "--model", MODEL, "--data", str(tmp_path / "data"), "--out", str(out))
    assert_one_error_line(result, "hold different class folders", "train/ has [cat, dog]", "val/ has [cat]")
    assert not files_in(out) & ARTIFACTS


@pytest.fixture
def system_copy(tmp_path, monkeypatch):
    """A complete Fashion-MNIST in the system place, and no download: the fallback that must not be taken."""
    system = tmp_path / "system"
    system.mkdir()
    make_fake_fashion_mnist(system)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", system)
    monkeypatch.delenv("TORCHVISION_DATASETS", raising=False)
    monkeypatch.setattr("torchvision.datasets.FashionMNIST", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    return system


def test_explicit_folder_without_the_dataset_is_refused_not_replaced(tmp_path, system_copy):
    empty = tmp_path / "mine"
    empty.mkdir()
    assert system_copy not in fashion_mnist_candidates(str(empty))
    with pytest.raises(PipelineError, match=f"Fashion-MNIST not found in --data {empty} "):
        locate_fashion_mnist(str(empty))
    assert locate_fashion_mnist("") == system_copy  # without --data the system copy is the default


def test_explicit_folder_with_the_dataset_is_used(tmp_path, system_copy):
    mine = tmp_path / "mine" / "raw"
    mine.mkdir(parents=True)
    make_fake_fashion_mnist(mine)
    assert locate_fashion_mnist(str(tmp_path / "mine")) == mine


def test_fashion_mnist_fingerprint_follows_the_bytes_not_the_place(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    make_fake_fashion_mnist(first)
    shutil.copytree(first, second)
    recipe = get_recipe("fmnist_resnet")
    recipe.data.root = str(first)
    original = dataset_fingerprint(recipe)
    assert len(original) == 64 and dataset_fingerprint(recipe) == original
    recipe.data.root = str(second)
    assert dataset_fingerprint(recipe) == original
    make_fake_fashion_mnist(second, test=31)  # one test image fewer
    assert dataset_fingerprint(recipe) != original


def test_image_folder_fingerprint_sees_changed_added_and_renamed_images(tmp_path):
    make_image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    recipe = image_folder_recipe(tmp_path)
    seen = {dataset_fingerprint(recipe)}
    assert dataset_fingerprint(recipe) in seen

    image = tmp_path / "val" / "cat" / "0.png"
    stat = image.stat()
    image.write_bytes(image.read_bytes()[:-1] + b"\0")  # same size, new contents
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    seen.add(dataset_fingerprint(recipe))
    shutil.copy(image, tmp_path / "val" / "dog" / "9.png")
    seen.add(dataset_fingerprint(recipe))
    os.rename(tmp_path / "train" / "dog" / "1.png", tmp_path / "train" / "dog" / "2.png")
    seen.add(dataset_fingerprint(recipe))
    assert len(seen) == 4


def test_synthetic_fingerprint_is_constant_and_unknown_kinds_are_refused():
    recipe = get_recipe(MODEL)
    assert dataset_fingerprint(recipe) == dataset_fingerprint(get_recipe(MODEL))
    recipe.data.kind = "parquet"
    with pytest.raises(PipelineError, match="unknown data kind 'parquet'"):
        dataset_fingerprint(recipe)
