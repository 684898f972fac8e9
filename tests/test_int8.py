"""INT8 Q/DQ graphs (pipeline.export.int8) on tiny_resnet, exported with the pipeline's own exporter.

No stub and no fixture: real ONNX Runtime static quantization and the real polygraphy CLI on a
random-weight tiny_resnet whose maskable layers carry magnitude 2:4 masks. Calibration uses the
recipe's own (synthetic) training data.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from pipeline.data.datasets import build_datasets
from pipeline.errors import PipelineError
from pipeline.export.int8 import (
    calibration_batches,
    polygraphy_sparsity,
    qdq_problems,
    quantize_qdq,
    sparse_weights_survive,
    weight_quantizations,
)
from pipeline.export.onnx import ModelProtoFromTorch
from pipeline.paths import ArtifactPaths
from tests.nm_fixtures import tiny_magnitude_pair


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    recipe, dense, sparse, masked = tiny_magnitude_pair()
    folder = tmp_path_factory.mktemp("int8")
    data = build_datasets(recipe)
    calibration = calibration_batches(data.train, 96, batch_size=32)
    paths = {}
    for variant, model in (("dense", dense), ("sparse", sparse)):
        fp32 = folder / f"{variant}.onnx"
        onnx.save(ModelProtoFromTorch(model, recipe.input_shape, 18, "input", "logits"), fp32)
        paths[variant] = (fp32, quantize_qdq(fp32, calibration, ArtifactPaths(folder).int8_onnx(variant)))
    held_out = np.stack([np.asarray(data.eval[i][0], np.float32) for i in range(32)])
    return recipe, paths, masked, held_out


def _run(path, batch):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def test_qdq_graph_is_written_beside_the_fp32_graph(graphs):
    _, paths, _, _ = graphs
    fp32, int8 = paths["sparse"]
    assert int8 == ArtifactPaths(fp32.parent).int8_onnx("sparse") == fp32.with_name("sparse.int8.onnx")
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_qdq_graph_runs_in_onnxruntime_close_to_fp32(graphs):
    """On 32 held-out images: logits within 5 % of the FP32 logit range, top-1 agreement >= 90 %."""
    _, paths, _, held_out = graphs
    for variant in ("dense", "sparse"):
        fp32, int8 = paths[variant]
        reference, quantized = _run(fp32, held_out), _run(int8, held_out)
        scale = float(np.ptp(reference))
        assert float(np.max(np.abs(quantized - reference))) <= 0.05 * scale, variant
        assert float(np.mean(quantized.argmax(1) == reference.argmax(1))) >= 0.9, variant


def test_weights_are_per_channel_symmetric_activations_per_tensor(graphs):
    _, paths, _, _ = graphs
    proto = onnx.load(str(paths["sparse"][1]))
    assert qdq_problems(proto) == []
    weights = weight_quantizations(proto)
    assert len(weights) == 10  # 9 convolutions and the classifier
    for entry in weights:
        channels = entry.weight.shape[entry.output_channel_axis]
        assert entry.axis == entry.output_channel_axis and entry.scale.shape == (channels,), entry.node
        assert not np.any(entry.zero_point) and entry.zero_point.dtype == np.int8
        assert entry.weight.dtype == np.float32  # TensorRT quantizes the FP32 weight with the Q scale
    weight_inputs = {entry.initializer for entry in weights}
    inits = {init.name: init for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in weight_inputs:
            assert onnx.numpy_helper.to_array(inits[node.input[1]]).size == 1  # per-tensor activation scale
            assert onnx.numpy_helper.to_array(inits[node.input[2]]).item() == 0
    assert not any(init.data_type == onnx.TensorProto.INT32 for init in proto.graph.initializer)  # bias left FP32


def test_2_4_zeros_survive_quantization(graphs):
    """In code: the INT8 weights TensorRT will store, dequantized, keep 2:4 along input channels."""
    _, paths, masked, _ = graphs
    survived = sparse_weights_survive(onnx.load(str(paths["sparse"][1])))
    for layer in masked:
        entry = survived[f"{layer}.weight"]
        assert entry["zeros_kept"] and entry["nm_violations_fp32"] == 0 and entry["nm_violations_int8"] == 0, layer
    dense = sparse_weights_survive(onnx.load(str(paths["dense"][1])))
    assert all(dense[f"{layer}.weight"]["nm_violations_int8"] > 0 for layer in masked)


def test_polygraphy_sees_2_4_through_qdq_on_every_masked_layer(graphs):
    _, paths, masked, _ = graphs
    found = polygraphy_sparsity(paths["sparse"][1])
    assert {f"{layer}.weight" for layer in masked} <= set(found["sparse"])
    dense = polygraphy_sparsity(paths["dense"][1])
    assert {f"{layer}.weight" for layer in masked} <= set(dense["not_sparse"])


def test_bad_input_is_one_line(tmp_path, graphs):
    _, paths, _, held_out = graphs
    with pytest.raises(PipelineError, match="does not exist; run the export stage"):
        quantize_qdq(tmp_path / "missing.onnx", [held_out], tmp_path / "missing.int8.onnx")
    with pytest.raises(PipelineError, match="at least one batch"):
        quantize_qdq(paths["dense"][0], [], out=tmp_path / "x.int8.onnx")
    assert not (tmp_path / "x.int8.onnx").exists()


def test_onnxruntime_top1_counts_correct_labels(graphs):
    """Labels are set to the FP32 graph's own predictions, so its top-1 must be exactly 1."""
    from pipeline.export.int8 import onnxruntime_top1

    _, paths, _, held_out = graphs
    predictions = _run(paths["dense"][0], held_out).argmax(1)
    dataset = [(image, int(label)) for image, label in zip(held_out, predictions)]
    assert onnxruntime_top1(paths["dense"][0], dataset, batch_size=7) == 1.0
    wrong = [(image, (label + 1) % 10) for image, label in dataset]
    assert onnxruntime_top1(paths["dense"][0], wrong) == 0.0


@pytest.mark.slow  # a whole engine run (about 10 s); the Q/DQ writers have fast tests above
def test_engine_with_int8_precision_writes_qdq_graphs_and_reports_their_accuracy(tmp_path):
    """build.precision=int8 through the stages: export writes both Q/DQ graphs, polygraphy finds every
    masked layer sparse in sparse.int8.onnx, and verify reports INT8 accuracy next to the FP32 engines."""
    from pipeline.cli import main

    code = main(
        [
            "engine",
            "--model",
            "tiny_resnet",
            "--out",
            str(tmp_path),
            "--set",
            "build.precision=int8",
            "--set",
            "masks.steps=2",
        ]
    )
    assert code == 0
    root = tmp_path / "tiny_resnet"
    export = json.loads((root / "export.json").read_text())
    masked = [layer["name"] for layer in json.loads((root / "layers.json").read_text())["masked"]]
    sparse_int8 = export["files"]["sparse.int8.onnx"]
    assert {f"{name}.weight" for name in masked} <= set(sparse_int8["polygraphy_sparse"])
    assert export["files"]["dense.int8.onnx"]["precision"] == "int8"
    int8 = json.loads((root / "report.json").read_text())["accuracy"]["int8"]
    assert 0.0 <= int8["sparse_top1"] <= 100.0 and int8["sparse_graph"] == "sparse.int8.onnx"
    assert "INT8 Q/DQ graphs" in (root / "report.md").read_text()
