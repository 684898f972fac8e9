"""Every stage for a model given as a source spec: torchvision:, timm: and python: (issue 9, item 2, small models).

Random or file weights, synthetic data, 32x32 input and two mask-training steps keep each run to seconds of work;
the README's table holds the same runs at each model's own input size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "--data",
    "synthetic",
    "--input-size",
    "32",
    "--set",
    "data.synthetic_size=32",
    "--set",
    "data.workers=0",
    "--set",
    "data.batch_size=8",
    "--set",
    "masks.batch_size=8",
    "--set",
    "masks.steps=2",
    "--set",
    "export.fp16=false",
    "--set",
    "verify.latency_iters=2",
    "--set",
    "verify.warmup_iters=0",
]
OWN_NET = ["--classifier", "head", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


def run_every_stage(spec: str, out: Path, capsys, *flags: str) -> tuple[dict, str]:
    argv = ["--model", spec, "--out", str(out), *FAST, *flags]
    assert main(["layers", *argv]) == 0
    layers_output = capsys.readouterr().out
    assert main(["engine", *argv]) == 0, capsys.readouterr()
    folder = next(out.iterdir())
    stages = json.loads((folder / "stages.json").read_text())["stages"]
    assert set(stages) == {"train-masks", "bake", "export", "build", "verify"}
    report = json.loads((folder / "report.json").read_text())
    coverage = report["coverage"]
    layers = json.loads((folder / "layers.json").read_text())
    assert report["gates"]["passed"] and coverage["masked_layers"] == len(layers["masked"]) > 0
    assert coverage["exported_nm_layers"] == f"{len(layers['masked'])}/{len(layers['masked'])}"
    assert coverage["masked_mac_fraction"] == pytest.approx(layers["masked_mac_fraction"])
    config = json.loads((folder / "config.json").read_text())
    assert config["arch"] == spec and config["input_shape"] == [3, 32, 32]
    return config, layers_output


@pytest.mark.slow
def test_torchvision_source_every_stage(tmp_path, capsys):
    config, layers_output = run_every_stage("torchvision:mobilenet_v3_small", tmp_path, capsys, "--weights", "random")
    assert config["num_classes"] == 1000 and config["classifier"] == "classifier.3"  # torchvision's metadata
    assert config["preprocess"]["resize"] == round(32 * 256 / 224)
    assert "depthwise/grouped convolutions hold" in layers_output  # the layer report says what cannot gain


@pytest.mark.slow
def test_timm_source_every_stage(tmp_path, capsys):
    pytest.importorskip("timm", reason="timm: sources need the optional extra [timm]")
    config, _ = run_every_stage("timm:resnet10t", tmp_path, capsys, "--weights", "random")
    assert config["classifier"] == "fc" and config["preprocess"]["resize"] == round(32 * 201 / 176)


@pytest.mark.slow
def test_python_factory_every_stage_with_its_weights_file(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from examples.custom_cnn import build

    weights = tmp_path / "own.pth"
    torch.save({"model_state_dict": build(num_classes=7).state_dict()}, weights)
    config, _ = run_every_stage(
        "python:examples.custom_cnn:build", tmp_path / "engines", capsys, "--weights", str(weights), *OWN_NET
    )
    assert config["num_classes"] == 7 and config["weights"] == str(weights)  # the head size from the file
