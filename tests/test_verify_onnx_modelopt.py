"""A model NVIDIA ModelOpt sparsified (mts.sparsify "sparse_magnitude", mts.export, torch.onnx.export), gated by
verify --dense/--sparse. Skipped where ModelOpt is not installed (the project does not depend on it; docs/ci-gate.md
says how it was run: a throwaway venv layered on the project's)."""

import copy
import json

import pytest
import torch
from torch import nn

from pipeline.cli import main

mts = pytest.importorskip(
    "modelopt.torch.sparsity",
    reason="NVIDIA ModelOpt is not installed (pip install nvidia-modelopt in a separate venv)",
)
pytestmark = pytest.mark.slow


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    ).eval()


def _export(model: nn.Module, path) -> None:
    torch.onnx.export(
        model,
        (torch.randn(1, 1, 8, 8),),
        str(path),
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )


def test_modelopt_sparse_magnitude_is_tensorrt_layout(tmp_path):
    dense = _network()
    sparse = mts.export(mts.sparsify(copy.deepcopy(dense), "sparse_magnitude")).eval()
    sparsified = [name for name, p in sparse.named_parameters() if p.dim() == 4 and (p == 0).float().mean() == 0.5]
    assert sparsified == ["2.weight", "4.weight", "6.weight"]  # ModelOpt skips C % 16 != 0 (the first conv)
    _export(dense, tmp_path / "dense.onnx")
    _export(sparse, tmp_path / "modelopt.onnx")
    out = tmp_path / "out"
    assert (
        main(
            [
                "verify",
                "--dense",
                str(tmp_path / "dense.onnx"),
                "--sparse",
                str(tmp_path / "modelopt.onnx"),
                "--data",
                "synthetic",
                "--iters",
                "2",
                "--no-plots",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    layout = json.loads((out / "report.json").read_text())["layout"]
    classes = [(layer["shape"], layer["layout"], layer["kept"]) for layer in layout["layers"]]
    assert classes[1:4] == [
        ([16, 16, 3, 3], "tensorrt 2:4", "masks only"),
        ([32, 16, 3, 3], "tensorrt 2:4", "masks only"),
        ([32, 32, 1, 1], "tensorrt 2:4", "masks only"),
    ]
    assert classes[0][1] == "dense" and layout["accelerable_mac_fraction"] > 0.5


def test_modelopt_sparsegpt_groups_the_flattened_axis(tmp_path, capsys):
    """ModelOpt's sparsegpt mode groups the flattened C*R*S axis: its 3x3 convs are 2:4 in another layout, the
    1x1 conv is accepted, and the coverage gate fails (exit 1)."""
    dense = _network()
    images = [(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    config = {"data_loader": images, "collect_func": lambda batch: batch[0]}
    sparse = mts.export(mts.sparsify(copy.deepcopy(dense), "sparsegpt", config=config)).eval()
    _export(dense, tmp_path / "dense.onnx")
    _export(sparse, tmp_path / "sparsegpt.onnx")
    out = tmp_path / "out"
    assert (
        main(
            [
                "verify",
                "--dense",
                str(tmp_path / "dense.onnx"),
                "--sparse",
                str(tmp_path / "sparsegpt.onnx"),
                "--data",
                "synthetic",
                "--iters",
                "2",
                "--no-plots",
                "--out",
                str(out),
            ]
        )
        == 1
    )
    assert "gate failed: accelerable_mac_fraction" in capsys.readouterr().err
    layout = json.loads((out / "report.json").read_text())["layout"]
    classes = [(layer["shape"], layer["layout"], layer["axis"]) for layer in layout["layers"]]
    assert classes[1:4] == [
        ([16, 16, 3, 3], "2:4 in another layout", "flattened C*R*S"),
        ([32, 16, 3, 3], "2:4 in another layout", "flattened C*R*S"),
        ([32, 32, 1, 1], "tensorrt 2:4", "input channels"),
    ]
