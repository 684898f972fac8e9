"""Preprocessing that fits the user's images, said out loud (issue 22).

A model trained on whole 32x32 images: `--input-size 32` alone must neither resize nor crop them (before, the
torchvision source's 256/224 ratio resized them to 37 and cropped 32, cutting off the border the model reads).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.recipe.resolve import ModelOptions, recipe_with_flags

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_border_folder(
    root: Path, size: int = 32, per_class: int = 12, val_per_class: int = 8, seed: int = 0, border: int = 2
) -> Path:
    """Two classes told apart only by a BORDER-pixel frame (red or blue) around the same kind of noise: a centre
    crop of an enlarged image cuts the frame off, so the wrong preprocessing shows in the accuracy."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(60, 196, (size, size, 3), dtype=np.uint8)
                pixels[:border], pixels[-border:], pixels[:, :border], pixels[:, -border:] = (
                    colour,
                    colour,
                    colour,
                    colour,
                )
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def whole_images(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ROOT/SPLIT as the model was trained on it: whole, normalised, in ImageFolder's order."""
    images, labels = [], []
    for label, name in enumerate(sorted(p.name for p in (root / split).iterdir())):
        for path in sorted((root / split / name).iterdir()):
            x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            images.append((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def top1(model, images, labels) -> float:
    with torch.no_grad():
        return 100.0 * float((model(images).argmax(1) == labels).float().mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """resnet18 (2 classes) trained on whole 32x32 images until it reads the frame; its own evaluation."""
    import torchvision

    root = tmp_path_factory.mktemp("whole")
    data = write_border_folder(root / "data")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    images, labels = whole_images(data, "train")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(40):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    weights = root / "whole32.pth"
    torch.save(model.state_dict(), weights)
    return data, weights, model


def options(data: Path, weights: Path, **extra) -> ModelOptions:
    return ModelOptions(model="torchvision:resnet18", weights=str(weights), data=str(data), **extra)


def test_own_weights_on_whole_images_of_the_input_size_get_no_resize_by_measurement(trained, tmp_path, capsys):
    from pipeline.data.preprocess_choice import ensure_choice
    from pipeline.paths import ArtifactPaths

    data, weights, model = trained
    recipe, notes = recipe_with_flags(options(data, weights, input_size="32"))
    said = [note for note in notes if note.startswith("preprocessing:")]
    assert len(said) == 1 and "measures the dense top-1 under each candidate" in said[0], said
    assert not [note for note in notes if note.startswith("warning: ") and "zero-padded" in note]
    choice = ensure_choice(recipe, ArtifactPaths(tmp_path / "out"), model)
    # the source's 256/224 ratio (resize 37, crop 32) cuts the frames off; whole images keep them
    assert (recipe.preprocess.resize, recipe.preprocess.crop) == (0, 32), capsys.readouterr().out
    recipe_row = next(row for row in choice.table if row["candidate"]["resize"] == 37)
    assert choice.row(choice.candidate)["top1"] > recipe_row["top1"]


def test_resize_flag_states_it_and_larger_images_keep_the_source_ratio(trained, tmp_path):
    data, weights, _ = trained
    recipe, _ = recipe_with_flags(options(data, weights, input_size="32", resize="40"))
    assert (recipe.preprocess.resize, recipe.preprocess.resize_mode) == (40, "fixed")
    big = write_border_folder(tmp_path / "big", size=48, per_class=2, val_per_class=1)
    recipe, notes = recipe_with_flags(options(big, weights, input_size="32"))
    assert recipe.preprocess.resize == round(32 * 256 / 224)  # the recipe's own, until the model is measured
    assert any("measures the dense top-1" in note for note in notes)


def test_a_small_folder_with_the_recipe_s_resize_gets_one_warning_naming_the_flags(trained):
    data, _, _ = trained
    recipe, notes = recipe_with_flags(
        ModelOptions(model="torchvision:resnet18", weights="random", data=str(data), num_classes=2)
    )
    assert (recipe.preprocess.resize, recipe.preprocess.crop) == (256, 224)  # published/random: the recipe's own
    warnings = [note for note in notes if note.startswith("warning: ")]
    assert any("32x32" in w and "--input-size 32 --resize none" in w for w in warnings), warnings
    assert any("masks.validation_images" in w for w in warnings), warnings  # 24 images cannot hold out 1000


def test_init_recipe_writes_what_it_inferred_from_the_folder(trained, tmp_path, capsys):
    data, weights, _ = trained
    out = tmp_path / "mine.toml"
    assert (
        main(
            [
                "init-recipe",
                "--model",
                "torchvision:resnet18",
                "--weights",
                str(weights),
                "--data",
                str(data),
                "--input-size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert text.startswith("# preprocessing inferred by init-recipe: no resize") and "32x32" in text.splitlines()[0]
    assert 'resize_mode = "fixed"' in text and "resize = 0" in text
    assert "preprocessing: no resize" in capsys.readouterr().out


def test_the_triton_preprocess_model_serves_the_same_transform(trained, tmp_path):
    from pipeline.data.preprocess_choice import ensure_choice
    from pipeline.package.python_models.preprocess import preprocess_image
    from pipeline.package.serving import preprocessing
    from pipeline.package.tensors import TensorSpec
    from pipeline.paths import ArtifactPaths

    data, weights, model = trained
    recipe, _ = recipe_with_flags(options(data, weights, input_size="32"))
    ensure_choice(recipe, ArtifactPaths(tmp_path / "out"), model)  # what package does first
    spec = preprocessing(recipe, TensorSpec("input", "TYPE_FP32", (3, 32, 32)), TensorSpec("logits", "TYPE_FP32", (2,)))
    path = sorted((data / "val" / "red").iterdir())[0]
    served = preprocess_image(path.read_bytes(), spec)
    expected, _ = whole_images(data, "val")
    index = len(list((data / "val" / "blue").iterdir()))  # first red image in ImageFolder order
    assert np.allclose(served, expected[index].numpy(), atol=1e-6)


@pytest.mark.slow
def test_dense_top1_through_engine_equals_the_model_s_own_evaluation(trained, tmp_path, capsys):
    from torchvision import transforms

    data, weights, model = trained
    val_images, val_labels = whole_images(data, "val")
    own = top1(model, val_images, val_labels)
    assert own >= 90.0, f"the model did not learn the frames ({own}%): the test would prove nothing"
    # the transform engine used before issue 22 (resize 37, crop 32) loses the frames: the check can fail
    old = transforms.Compose(
        [transforms.Resize(37), transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    files = [p for name in ("blue", "red") for p in sorted((data / "val" / name).iterdir())]
    old_top1 = top1(model, torch.stack([old(Image.open(p).convert("RGB")) for p in files]), val_labels)
    assert old_top1 < own

    out = tmp_path / "engines"
    fast = [
        "masks.steps=1",
        "masks.validation_images=0",
        "masks.batch_size=8",
        "export.fp16=false",
        "verify.latency_iters=2",
        "verify.warmup_iters=0",
        "verify.max_top1_drop=100",
        "verify.min_agreement=0",  # one mask step: the sparse model is not yet its dense model, and need not be here
        "data.workers=0",
        "build.max_batch=16",
        "build.opt_batch=8",
        "serve.max_batch_size=16",
        "serve.preferred_batch_sizes=8",
    ]
    code = main(
        [
            "engine",
            "--model",
            "torchvision:resnet18",
            "--weights",
            str(weights),
            "--data",
            str(data),
            "--input-size",
            "32",
            "--out",
            str(out),
            *[arg for item in fast for arg in ("--set", item)],
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "preprocessing candidates:" in printed.out and "no resize, centre crop/pad to 32  <- chosen" in printed.out
    report = json.loads((out / "torchvision_resnet18" / "report.json").read_text())
    print(
        f"own evaluation {own:.2f}%, resize 37/crop 32 {old_top1:.2f}%, engine dense "
        f"{report['accuracy']['dense']['top1']:.2f}%"
    )
    assert report["accuracy"]["dense"]["top1"] == pytest.approx(own)


def test_own_weights_on_images_smaller_than_the_input_size_are_measured_not_guessed(trained):
    data, weights, _ = trained
    recipe, notes = recipe_with_flags(options(data, weights))  # no --input-size: the weights' metadata says 224
    assert recipe.preprocess.crop == 224
    assert not [note for note in notes if note.startswith("warning: ") and "zero-padded" in note], notes
    assert any("measures the dense top-1" in note for note in notes), notes
