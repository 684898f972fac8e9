"""verify fails a sparse engine that is not its dense model (issue 34, must-show 3).

Engines made to disagree: the sparse ONNX is the dense tiny classifier with its head's outputs rotated, so it
predicts another class than the dense one on every image. Judged on a folder labelled by the sparse
model's own predictions, the sparse top-1 is 100% and the dense far below: a symptom of a wrong evaluation, named
in report.json and in the `gate failed:` line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.recipe.config import VerifyConfig
from pipeline.verify.gates import agreement_gates, symptoms


def export(net, path: Path) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            torch.zeros(1, 1, 8, 8),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            dynamo=False,
        )
    return path


def predictions(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0].argmax(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import torch
    from PIL import Image

    root = tmp_path_factory.mktemp("gates")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 64, 4))
    dense = export(net.eval(), root / "dense.onnx")
    with torch.no_grad():  # the sparse engine with its head's outputs rotated: another class on every image
        net[2].weight.copy_(net[2].weight.roll(1, 0))
        net[2].bias.copy_(net[2].bias.roll(1, 0))
    sparse = export(net.eval(), root / "sparse.onnx")
    pixels = np.random.default_rng(0).integers(0, 256, (80, 8, 8), dtype=np.uint8)
    images = ((pixels.astype(np.float32) / 255 - 0.5) / 0.25)[:, None]
    labels = predictions(sparse, images)  # a folder whose labels are the sparse model's predictions
    for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        folder = root / "data" / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index}.png")
    assert len(set(labels.tolist())) == 4, "every class needs images"
    agree = float((predictions(dense, images) == labels).mean())
    assert agree < 0.5, f"the engines agree on {agree:.0%}: the test would prove nothing"
    return root, dense, sparse


def test_disagreeing_engines_fail_verify_with_the_symptom(pair, capsys):
    root, dense, sparse = pair
    out = root / "out"
    args = ["verify", "--dense", str(dense), "--sparse", str(sparse), "--data", str(root / "data")]
    code = main(
        [
            *args,
            "--mean",
            "0.5",
            "--std",
            "0.25",
            "--iters",
            "2",
            "--no-plots",
            "--min-masked-coverage",
            "0",
            "--min-accelerable-coverage",
            "0",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    failed = [line for line in err.splitlines() if line.startswith("gate failed:")]
    assert len(failed) == 1 and "agreement = " in failed[0] and "sparse_top1_above_dense = " in failed[0], err
    report = json.loads((out / "report.json").read_text())
    gates = {gate["name"]: gate for gate in report["gates"]["checks"]}
    assert gates["agreement"]["passed"] is False and gates["sparse_top1_above_dense"]["passed"] is False
    assert report["accuracy"]["sparse"]["top1"] == 100.0 and report["accuracy"]["dense"]["top1"] < 50
    assert any("cannot be that much better than the model it masks" in text for text in report["symptoms"])


def test_the_gates_pass_a_sparse_model_that_is_its_dense_model():
    cfg = VerifyConfig()
    close = {"dense": {"top1": 80.0}, "sparse": {"top1": 79.0}, "agreement": 0.97, "top1_drop": 1.0, "samples": 100}
    assert [gate.passed for gate in agreement_gates(close, cfg)] == [True, True]
    assert symptoms(close, cfg) == []
    skipped = agreement_gates(close | {"agreement": 0.1}, cfg, "synthetic data: accuracy means nothing")
    assert [gate.passed for gate in skipped] == [None, None]
