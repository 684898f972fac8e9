"""ONNX Runtime backend: optimised engine + metadata, runner outputs and timings, auto selection."""

import importlib
import json

import numpy as np
import onnx
import pytest
import torch

from pipeline.backends import get_backend, pick_backend
from pipeline.backends.sidecar import EngineSidecar
from pipeline.errors import PipelineError
from pipeline.export.onnx import ModelProtoFromTorch
from pipeline.io import sha256_file
from pipeline.recipe.config import InputSpec
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network


@pytest.fixture(scope="module")
def model_and_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ort")
    recipe = get_recipe("tiny_resnet")
    torch.manual_seed(0)
    model = build_network(recipe).eval()
    path = folder / "dense.onnx"
    onnx.save(ModelProtoFromTorch(model, recipe.input_shape, 18, "input", "logits"), str(path))
    return recipe, model, path, folder


def test_build_writes_engine_and_metadata(model_and_onnx):
    recipe, _, path, folder = model_and_onnx
    backend = get_backend("onnxruntime")
    assert backend.name == "onnxruntime" and backend.has_sparse_kernels is False
    result = backend.build(path, folder / "engines", "dense", recipe.build, InputSpec.of(recipe), sparse=False)
    assert result.engine_path.is_file() and result.engine_path.name == "dense.ort.onnx"
    meta = json.loads(result.engine_path.with_suffix(".json").read_text())
    import onnxruntime

    assert meta["backend"] == "onnxruntime" and meta["runtime_version"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in meta["providers"]
    batch = {"min": recipe.build.min_batch, "opt": recipe.build.opt_batch, "max": recipe.build.max_batch}
    assert meta["precision"] == "fp32" and meta["batch"] == batch
    assert (meta["input_name"], meta["output_name"], meta["input_shape"]) == ("input", "logits", [-1, 1, 28, 28])
    assert meta["engine"] == "dense.ort.onnx" and meta["engine_sha256"] == sha256_file(result.engine_path)
    assert meta["onnx_sha256"] == sha256_file(path)
    assert "no sparse kernels" in meta["note"] and result.sparse_layers["picked_sparse"] == []
    # the one sidecar shape (TensorRT's too), read back typed; build.json keeps its name and sha256, not a copy
    assert EngineSidecar.from_dict(meta, "dense.ort.json") == result.sidecar
    sidecar = result.engine_path.with_suffix(".json")
    assert result.sidecar_record() == {"file": "dense.ort.json", "sha256": sha256_file(sidecar)}
    assert not list((folder / "engines").glob(".*.tmp"))


def test_runner_matches_pytorch_and_times(model_and_onnx):
    recipe, model, path, folder = model_and_onnx
    backend = get_backend("onnxruntime")
    result = backend.build(path, folder / "engines", "dense", recipe.build, InputSpec.of(recipe), sparse=False)
    runner = backend.load(result.engine_path, recipe)
    assert (runner.input_name, runner.output_name) == ("input", "logits")
    for batch in (1, 5):
        x = torch.randn(batch, *recipe.input_shape)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(runner.infer(x.numpy()), expected, atol=1e-4, rtol=1e-4)
    times = runner.time_batch(np.zeros((2, *recipe.input_shape), np.float32), iterations=4, warmup=1)
    assert len(times) == 4 and all(t > 0 for t in times)
    layer_times = runner.layer_times()
    assert layer_times and any("Conv" in name for name in layer_times) and all(v >= 0 for v in layer_times.values())


def test_damaged_onnx_gives_one_line_error_and_no_engine(model_and_onnx, tmp_path):
    recipe, _, path, _ = model_and_onnx
    truncated = tmp_path / "dense.onnx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PipelineError, match="cannot load .*re-run export"):
        get_backend("onnxruntime").build(
            truncated, tmp_path / "engines", "dense", recipe.build, InputSpec.of(recipe), sparse=False
        )
    assert not list((tmp_path / "engines").glob("*"))
    with pytest.raises(PipelineError, match="does not exist"):
        get_backend("onnxruntime").load(tmp_path / "missing.ort.onnx", recipe)


def test_auto_picks_onnxruntime_without_tensorrt_and_says_why(monkeypatch):
    trt_module = importlib.import_module("pipeline.backends.tensorrt")

    class NoTensorRT:
        name = "tensorrt"
        has_sparse_kernels = True

        def available(self):
            return False, "no CUDA GPU"

    monkeypatch.setattr(trt_module, "backend", lambda: NoTensorRT())
    backend, reason = pick_backend("auto")
    assert backend.name == "onnxruntime" and "no CUDA GPU" in reason
    backend, reason = pick_backend("onnxruntime")
    assert backend.name == "onnxruntime" and reason == "onnxruntime requested"
    with pytest.raises(PipelineError, match="unknown backend"):
        pick_backend("tvm")
