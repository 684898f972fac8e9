"""TensorRT backend on a real GPU (marked `tensorrt` and `gpu`; tests/conftest.py skips them without TensorRT + CUDA).

`check_sparse_report` is also run on CPU against fixture reports (the one test here without the marks).
None of these GPU tests has run in this repository's CI: its machines have no GPU and cannot install TensorRT.
They build tiny_resnet engines (random weights, magnitude 2:4 masks) from the ONNX the pipeline's
own exporter writes (pipeline.export.onnx, torch.export-based, BatchNorm folded; FP16 graphs with FP32
I/O; the INT8 Q/DQ graph from pipeline.export.int8), and check the engine against PyTorch, the files
written, the sparse-layer report and the runner's timing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import InputSpec
from tests.nm_fixtures import tiny_magnitude_pair


def check_sparse_report(report: dict, masked: list[str]) -> None:
    """What a sparse build's report must say. TensorRT does not always print the "picked" line: then
    picked_sparse is None and a note says which layers run sparse kernels is not known."""
    assert set(report["eligible"]) <= set(masked), report
    if report["picked_sparse"] is None:
        assert any("not known" in note for note in report["notes"]), report
    else:
        assert set(report["picked_sparse"]) <= set(report["eligible"]) | set(masked), report


def test_report_check_accepts_a_build_log_without_a_picked_line():
    """Defect 7 of issue 19 (CPU): the GPU test's check called set(None) when no "picked" line was printed
    (fixtures builder_log_no_sparsity.txt + inspector_fp16_sparse.json)."""
    from pathlib import Path

    from pipeline.backends.tensorrt.sparsity import OnnxNameMap, sparse_layer_report

    fixtures = Path(__file__).parent / "fixtures" / "tensorrt"
    names = OnnxNameMap(
        {"/layer1/layer1.0/conv1/Conv": "layer1.0.conv1", "node_Conv_7": "layer2.0.conv1", "/fc/Gemm": "fc"}
    )
    report = sparse_layer_report(
        (fixtures / "builder_log_no_sparsity.txt").read_text().splitlines(),
        # no tactic name saying sparse either (issue 35: a sparse tactic name is evidence of its own)
        (fixtures / "inspector_fp16_sparse.json").read_text().replace("sparse_conv", "implicit_gemm"),
        names,
    )
    assert report["picked_sparse"] is None
    check_sparse_report(report, ["layer1.0.conv1", "layer2.0.conv1"])


def _export(model, path, recipe, half=False):
    import onnx

    from pipeline.export.onnx import ModelProtoFromTorch, check_model

    proto = ModelProtoFromTorch(
        model, recipe.input_shape, recipe.export.opset, "input", "logits", fp16=half, max_batch=recipe.build.max_batch
    )
    check_model(proto)
    onnx.save(proto, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):

    from pipeline.export.int8 import quantize_qdq

    recipe, dense, sparse, masked = tiny_magnitude_pair()
    paths = ArtifactPaths.for_model(tmp_path_factory.mktemp("engines"), recipe.name)
    paths.root.mkdir(parents=True)
    calibration = [
        np.random.default_rng(seed).standard_normal((8, *recipe.input_shape)).astype(np.float32) for seed in range(4)
    ]
    for variant, model in (("dense", dense), ("sparse", sparse)):
        _export(model, getattr(paths, f"{variant}_onnx"), recipe)
        _export(model, getattr(paths, f"{variant}_onnx_fp16"), recipe, half=True)
        quantize_qdq(getattr(paths, f"{variant}_onnx"), calibration, paths.int8_onnx(variant))
    return recipe, paths, {"dense": dense, "sparse": sparse}, masked


def _backend():
    from pipeline.backends import get_backend

    return get_backend("tensorrt")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_fp32_engine_matches_pytorch(setup):
    import torch

    recipe, paths, models, _ = setup
    recipe.build.precision = "fp32"
    backend = _backend()
    result = backend.build(
        backend.onnx_for(paths, "dense", recipe.build),
        paths.root,
        "dense",
        recipe.build,
        InputSpec.of(recipe),
        sparse=False,
    )
    runner = backend.load(result.engine_path, recipe)
    batch = np.random.default_rng(0).standard_normal((5, *recipe.input_shape)).astype(np.float32)
    with torch.no_grad():
        expected = models["dense"](torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(runner.infer(batch), expected, rtol=2e-2, atol=2e-2)  # TF32 is on by default
    with pytest.raises(PipelineError):
        runner.infer(np.zeros((recipe.build.max_batch + 1, *recipe.input_shape), np.float32))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_sparse_fp16_engine_report_and_timing(setup):
    recipe, paths, _, masked = setup
    recipe.build.precision = "fp16"
    backend = _backend()
    result = backend.build(
        backend.onnx_for(paths, "sparse", recipe.build),
        paths.root,
        "sparse",
        recipe.build,
        InputSpec.of(recipe),
        sparse=True,
    )
    meta = json.loads((paths.root / "sparse.json").read_text())
    assert (
        meta["sparse_weights_flag"] is True
        and meta["compute_capability"]
        and len(meta["runtime_version"].split(".")) == 4
    )
    check_sparse_report(result.sparse_layers, masked)
    runner = backend.load(result.engine_path, recipe)
    batch = np.zeros((recipe.build.opt_batch, *recipe.input_shape), np.float32)
    assert runner.infer(batch).shape == (recipe.build.opt_batch, recipe.num_classes)
    times = runner.time_batch(batch, iterations=5, warmup=2)
    assert len(times) == 5 and all(t > 0 for t in times)
    layer_times = runner.layer_times()
    assert layer_times is None or all(ms >= 0 for ms in layer_times.values())


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_timing_cache_is_reused(setup):
    recipe, paths, _, _ = setup
    recipe.build.precision = "fp32"
    backend = _backend()
    backend.build(
        backend.onnx_for(paths, "dense", recipe.build),
        paths.root,
        "dense",
        recipe.build,
        InputSpec.of(recipe),
        sparse=False,
    )
    again = backend.build(
        backend.onnx_for(paths, "dense", recipe.build),
        paths.root,
        "dense",
        recipe.build,
        InputSpec.of(recipe),
        sparse=False,
    )
    assert (paths.root / "timing.cache").stat().st_size > 0 and again.engine_path.is_file()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_sparse_int8_engine_from_the_qdq_graph(setup):
    recipe, paths, _, masked = setup
    recipe.build.precision = "int8"
    backend = _backend()
    onnx_path = backend.onnx_for(paths, "sparse", recipe.build)
    assert onnx_path.name == "sparse.int8.onnx"
    result = backend.build(onnx_path, paths.root, "sparse", recipe.build, InputSpec.of(recipe), sparse=True)
    meta = json.loads((paths.root / "sparse.json").read_text())
    assert meta["precision"] == "int8" and meta["sparse_weights_flag"] is True
    report = result.sparse_layers
    assert {m for entry in report["layers"] for m in entry["modules"]} <= set(masked) | {"conv1", "fc"}, report
    runner = backend.load(result.engine_path, recipe)
    batch = np.zeros((runner.max_batch, *recipe.input_shape), np.float32)
    assert runner.infer(batch).shape == (runner.max_batch, recipe.num_classes)
