"""verify --dense/--sparse on INT8 Q/DQ files (issue 35): the project's INT8 export (pipeline/export/int8.py) feeds every
conv its weight as FP32 initializer -> QuantizeLinear -> DequantizeLinear -> Conv, as a strongly typed TensorRT 11
network does; the layout check follows the weight through the Q/DQ pair to its initializer."""

import json

import numpy as np
import onnx_fixtures as fx
import pytest

from pipeline.cli import main
from pipeline.export.int8 import quantize_qdq


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_int8")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 1, 8, 8)).astype(np.float32) for _ in range(2)]
    found = {"dense": fx.save(fx.classifier(), root / "dense.onnx")}
    for name, model in (("tensorrt", fx.pruned("tensorrt")), ("flattened", fx.pruned("flattened"))):
        found[name] = fx.save(model, root / f"sparse_{name}.onnx")
    for name in list(found):
        found[f"{name}_int8"] = quantize_qdq(found[name], batches, root / f"{found[name].stem}.int8.onnx")
    return found


def _verify(dense, sparse, out, *extra):
    args = ["verify", "--dense", str(dense), "--sparse", str(sparse), "--data", "synthetic", "--no-plots"]
    return main(args + ["--iters", "2", "--out", str(out), *extra])


def _layers(out):
    report = json.loads((out / "report.json").read_text())
    return {layer["name"]: layer for layer in report["layout"]["layers"]}, report


@pytest.mark.parametrize("dense", ["dense_int8", "dense"])
def test_int8_qdq_sparse_model_gets_its_layout(files, dense, tmp_path, capsys):
    assert _verify(files[dense], files["tensorrt_int8"], tmp_path / "out") == 0, capsys.readouterr().err
    layers, report = _layers(tmp_path / "out")
    assert report["layout"]["skipped"] == [] and len(layers) == 5
    conv2, conv1 = layers["/conv2/Conv"], layers["/conv1/Conv"]
    assert (conv2["layout"], conv2["weight"], conv2["shape"]) == ("tensorrt 2:4", "conv2.weight", [8, 8, 3, 3])
    assert layers["/conv3/Conv"]["layout"] == "tensorrt 2:4" and conv1["layout"] == "dense"
    # INT8 against INT8 is the same rounding; FP32 against INT8 is within one INT8 step
    assert conv2["kept"] == ("masks only" if dense == "dense_int8" else "masks only (within INT8 rounding)")
    assert "layer /conv2/Conv (Conv conv2.weight [8, 8, 3, 3]): tensorrt 2:4" in capsys.readouterr().out


def test_int8_qdq_flattened_layout_fails_the_coverage_gate(files, tmp_path, capsys):
    assert _verify(files["dense_int8"], files["flattened_int8"], tmp_path / "out") == 1
    assert "gate failed: accelerable_mac_fraction" in capsys.readouterr().err
    layers, _ = _layers(tmp_path / "out")
    assert layers["/conv2/Conv"]["layout"] == "2:4 in another layout"
    assert layers["/conv2/Conv"]["axis"] == "flattened C*R*S"
