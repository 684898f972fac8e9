"""The evaluation transform of your own weights, chosen by measuring the dense model (issue 34, must-shows 1, 2, 5).

Three tiny models, each trained here under a different transform the common training scripts use (the whole image
scaled up to the input size; resize and centre crop at crop_pct 0.875; native size, zero-padded), on images whose
class is the period of their stripes, so a transform that rescales them changes what the model sees. With only
`--input-size` the pipeline must find each model's transform: its dense top-1 equals the model's own evaluation
within one validation image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from image_folders import stripe_net, write_stripe_folder
from nm_fixtures import cli

from pipeline.data.preprocess_choice import Candidate, ensure_choice, stratified_sample
from pipeline.errors import PipelineError
from pipeline.paths import ArtifactPaths
from pipeline.recipe.resolve import ModelOptions, recipe_with_flags

INPUT = 32
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
SPEC = "python:tests.image_folders:stripe_net"
# training transform -> (image size, torchvision geometry steps)
CASES = {
    "whole image scaled up": (16, lambda t: [t.Resize((INPUT, INPUT))]),
    "resize and crop at 0.875": (48, lambda t: [t.Resize(round(INPUT / 0.875)), t.CenterCrop(INPUT)]),
    "native size": (24, lambda t: [t.CenterCrop(INPUT)]),
}


def transform(case: str):
    from torchvision import transforms

    return transforms.Compose([*CASES[case][1](transforms), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def folder_tensors(root: Path, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform(case))
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.tensor(dataset.targets)


def train_under(case: str, data: Path, steps: int = 150) -> tuple[torch.nn.Module, float]:
    """A model trained under CASE's transform, as a user's script would, and its own evaluation on val/ (%)."""
    images, labels = folder_tensors(data / "train", case)
    torch.manual_seed(0)
    model = stripe_net(4)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        pick = torch.randint(0, len(labels), (32,))
        loss = torch.nn.functional.cross_entropy(model(images[pick]), labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    val_images, val_labels = folder_tensors(data / "val", case)
    with torch.no_grad():
        own = 100.0 * float((model(val_images).argmax(1) == val_labels).float().mean())
    return model, own


_TRAINED: dict[str, tuple] = {}


def trained_case(case: str, tmp_path_factory) -> tuple:
    """(case, folder, weights file, model, its own evaluation), trained once per test module run."""
    if case not in _TRAINED:
        root = tmp_path_factory.mktemp("choice")
        data = write_stripe_folder(root / "data", CASES[case][0], per_class=40, val_per_class=20)
        model, own = train_under(case, data)
        weights = root / "own.pth"
        torch.save(model.state_dict(), weights)
        _TRAINED[case] = (case, data, weights, model, own)
    return _TRAINED[case]


@pytest.fixture(params=list(CASES))
def trained(request, tmp_path_factory):
    return trained_case(request.param, tmp_path_factory)


def flags(data: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "--model",
        SPEC,
        "--classifier",
        "head",
        "--mean",
        ",".join(map(str, MEAN)),
        "--std",
        ",".join(map(str, STD)),
        "--weights",
        str(weights),
        "--data",
        str(data),
        "--input-size",
        str(INPUT),
        *extra,
    ]


def resolved(data: Path, weights: Path, resize: str | None = None):
    options = ModelOptions(
        model=SPEC,
        weights=str(weights),
        data=str(data),
        input_size=str(INPUT),
        classifier="head",
        mean=",".join(map(str, MEAN)),
        std=",".join(map(str, STD)),
        resize=resize,
    )
    return recipe_with_flags(options)[0]


def own_eval_of_choice(recipe, data: Path, model) -> float:
    from pipeline.data.datasets import build_datasets
    from pipeline.training import evaluate

    return evaluate(model, build_datasets(recipe).eval, 64, torch.device("cpu"))["top1"]


def test_the_measured_transform_gives_the_models_own_accuracy(trained, tmp_path, capsys):
    case, data, weights, model, own = trained
    recipe = resolved(data, weights)
    paths = ArtifactPaths(tmp_path / "out")
    choice = ensure_choice(recipe, paths, model)
    printed = capsys.readouterr().out
    assert "preprocessing candidates: dense top-1 on 80 validation images" in printed, printed
    assert "s:\n" in printed  # the seconds the measurement took
    resolution = 100.0 / 80
    dense = own_eval_of_choice(recipe, data, model)
    assert abs(dense - own) <= resolution, (case, dense, own, printed)
    worst = min(row["top1"] for row in choice.table)
    assert worst < own - 20, printed  # the wrong transforms show: the test can fail
    # recorded, and read back (not measured again) by a later stage of the same weights and folder
    again = resolved(data, weights)
    assert ensure_choice(again, paths, None).chosen == choice.chosen
    assert "recorded in preprocess_choice.json" in capsys.readouterr().out
    assert Candidate.of(again.preprocess) == choice.candidate


def test_a_stated_transform_is_used_and_the_table_shows_how_it_compares(tmp_path, capsys, tmp_path_factory):
    case, data, weights, model, own = trained_case("whole image scaled up", tmp_path_factory)
    recipe = resolved(data, weights, resize=str(INPUT))  # --resize 32: the shorter side to 32, stated
    choice = ensure_choice(recipe, ArtifactPaths(tmp_path / "out"), model)
    assert choice.stated and choice.candidate == Candidate(INPUT)
    assert "<- stated" in capsys.readouterr().out


def test_a_baseline_near_chance_under_every_transform_stops_before_training(tmp_path, capsys, tmp_path_factory):
    case, data, weights, model, own = trained_case("native size", tmp_path_factory)
    torch.manual_seed(1)
    wrong = tmp_path / "untrained.pth"  # wrong weights: the same network, never trained
    torch.save(stripe_net(4).state_dict(), wrong)
    paths = ArtifactPaths(tmp_path / "out")
    with pytest.raises(PipelineError) as error:
        ensure_choice(resolved(data, wrong), paths)
    message = str(error.value)
    assert "near chance (25.0% for 4 classes" in message and "wrong weights" in message, message
    assert "--resize" in message and "--input-size" in message
    assert not paths.preprocess_choice.exists()
    # stated as not refused: one warning line and the run goes on; a floor of the user's own still refuses
    from pipeline.recipe.config import thawed, with_fields

    lenient = thawed(with_fields(resolved(data, wrong), {"verify.refuse_chance_baseline": False}, "test"))
    capsys.readouterr()
    ensure_choice(lenient, paths)
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "near chance" in warned[0] and "refuse_chance_baseline" in warned[0], warned
    with pytest.raises(PipelineError, match="below verify.min_dense_top1 = 90%"):
        strict = with_fields(resolved(data, wrong), {"verify.refuse_chance_baseline": False}, "test")
        strict = thawed(with_fields(strict, {"verify.min_dense_top1": 90.0}, "test"))
        ensure_choice(strict, ArtifactPaths(tmp_path / "o2"))


def test_stratified_sample_takes_every_class_alike():
    targets = [0] * 50 + [1] * 5 + [2] * 50
    picked = stratified_sample(targets, 20)
    counts = [sum(targets[i] == c for i in picked) for c in range(3)]
    assert len(picked) == 20 and counts[1] == 5 and abs(counts[0] - counts[2]) <= 1


@pytest.mark.slow
def test_engine_with_only_input_size_finds_each_training_transform(trained, tmp_path):
    case, data, weights, model, own = trained
    out = tmp_path / "engines"
    run = cli("engine", *flags(data, weights, "--out", str(out), "--set", "masks.steps=2"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout.index("preprocessing candidates:")
    assert table < run.stdout.index("mask training precision"), "the table comes before any training"
    folder = out / SPEC.replace(":", "_")
    details = json.loads((folder / "train_masks.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    resolution = 100.0 / 80
    assert abs(details["dense"]["top1"] - own) <= resolution, (case, details["dense"], own)
    assert abs(report["accuracy"]["dense"]["top1"] - own) <= resolution, (case, report["accuracy"], own)
    assert details["preprocessing"]["how"] == "chosen by measurement" and report["preprocessing"]["seconds"] >= 0
    chosen = json.loads((folder / "preprocess_choice.json").read_text())["chosen"]
    assert Candidate(**chosen).describe(INPUT) in details["preprocessing"]["candidates"]


def test_config_json_of_an_engine_run_shows_the_chosen_transform(tmp_path, tmp_path_factory):
    case, data, weights, model, own = trained_case("whole image scaled up", tmp_path_factory)
    out = tmp_path / "engines"
    cli("engine", *flags(data, weights, "--out", str(out), "--set", "masks.steps=2"), check=True)
    folder = out / SPEC.replace(":", "_")
    config = json.loads((folder / "config.json").read_text())
    chosen = json.loads((folder / "preprocess_choice.json").read_text())["chosen"]
    assert {key: config["preprocess"][key] for key in chosen} == chosen


def test_engine_refuses_a_broken_baseline_in_one_line(tmp_path, tmp_path_factory):
    case, data, weights, model, own = trained_case("native size", tmp_path_factory)
    out = tmp_path / "engines"
    run = cli("engine", *flags(data, weights, "--out", str(out), "--resize", "32"))  # stated, and wrong
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "near chance" in errors[0] and "no resize, centre crop/pad to 32" in errors[0], errors[0]
    assert "mask training precision" not in run.stdout


def test_unlabeled_mask_training_measures_nothing_against_the_labels(tmp_path, tmp_path_factory):
    """--unlabeled never reads labels: the transform is not scored against them (weights that score near chance on
    the folder's labels are no reason to stop), and the note says what to state instead."""
    case, data, weights, model, own = trained_case("native size", tmp_path_factory)
    torch.manual_seed(1)
    wrong = tmp_path / "untrained.pth"
    torch.save(stripe_net(4).state_dict(), wrong)
    out = tmp_path / "engines"
    run = cli("train-masks", *flags(data, wrong, "--out", str(out), "--set", "masks.steps=2", "--unlabeled"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "not measured under --unlabeled" in run.stdout and "preprocessing candidates" not in run.stdout
    assert not (out / SPEC.replace(":", "_") / "preprocess_choice.json").exists()


@pytest.mark.parametrize("shape,interpolation", [("square", "bicubic"), ("shorter", "bicubic"), ("square", "bilinear")])
def test_the_triton_preprocess_model_serves_every_candidate_as_the_pipeline_evaluates(tmp_path, shape, interpolation):
    import numpy as np
    from PIL import Image

    from pipeline.data.datasets import folder_transforms
    from pipeline.package.python_models.preprocess import preprocess_image
    from pipeline.package.serving import preprocessing
    from pipeline.package.tensors import TensorSpec

    data = write_stripe_folder(tmp_path / "data", 16, per_class=2, val_per_class=1)
    recipe = resolved(data, _weights_file(tmp_path))
    pre = recipe.preprocess
    pre.resize, pre.resize_shape, pre.interpolation = 40, shape, interpolation
    path = tmp_path / "wide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(path)  # not square: shapes differ
    spec = preprocessing(recipe, TensorSpec("input", "TYPE_FP32", (3, 32, 32)), TensorSpec("logits", "TYPE_FP32", (4,)))
    served = preprocess_image(path.read_bytes(), spec)
    expected = folder_transforms(recipe, train=False)(Image.open(path).convert("RGB")).numpy()
    assert np.allclose(served, expected, atol=1e-5)


def _weights_file(tmp_path: Path) -> Path:
    path = tmp_path / "w.pth"
    torch.save(stripe_net(4).state_dict(), path)
    return path
