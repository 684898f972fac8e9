"""TensorRT backend against a stub `tensorrt` module (CPU only).

These tests run the backend against a stub `tensorrt` module injected into sys.modules, as NVIDIA
ModelOpt does in its tests, so they check the call sequence the backend makes (flags, profile,
timing cache, files written, name mapping, runner bindings), not TensorRT itself. Two stubs model
the documented Python API of TensorRT 10 (BuilderFlag.FP16 exists) and TensorRT 11 (no FP16 flag,
always strongly typed). Real-GPU tests are in tests/test_tensorrt_gpu.py.
"""
from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.backends.tensorrt import engine as trt_backend
from pipeline.backends.tensorrt import onnx_for_precision
from pipeline.backends.tensorrt.sparsity import (OnnxNameMap, module_from_scoped_name, parse_inspector_json,
                                                 parse_sparsity_log, sparse_layer_report)
from pipeline.errors import PipelineError
from pipeline.io import sha256_bytes, sha256_file
from pipeline.paths import ArtifactPaths
from pipeline.recipe.registry import get_recipe

ELIGIBLE = "(Sparsity) Layers eligible for sparse math: "
PICKED = "(Sparsity) TRT inference plan picked sparse implementation for layers: "
CONV_A = "/layer1/layer1.0/conv1/Conv"
CONV_B = "node_Conv_7"  # dynamo-exporter style name; its weight initializer carries the module name


# ----------------------------------------------------------------------------- stub tensorrt
def make_trt(major: int) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = f"{major}.4.0"
    trt.calls = []
    trt.fail_build = False
    trt.fail_parse = False
    trt.cache_mismatch = False
    record = trt.calls.append

    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self):
            self.min_severity = Severity.WARNING

    ILogger.Severity = Severity
    trt.ILogger = ILogger

    class IProfiler:
        def __init__(self):
            pass

    trt.IProfiler = IProfiler
    flags = {"SPARSE_WEIGHTS": 7, "TF32": 6}
    if major < 11:
        flags["FP16"] = 0
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    creation = {"STRONGLY_TYPED": 0} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    trt.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4})

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        num_inputs = 1

        def get_input(self, index):
            return Tensor("input", [-1, 1, 28, 28])

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+new-timings"

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles, self.cache = set(), {}, [], None
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY

        def set_flag(self, flag):
            record(("set_flag", flag.name))
            self.flags.add(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            record(("create_timing_cache", bytes(data)))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            record(("set_timing_cache", cache.data, ignore_mismatch))
            if trt.cache_mismatch and cache.data:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            record(("create_network", flags))
            return Network()

        def create_builder_config(self):
            trt.config = Config()
            return trt.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record(("build", sorted(f.name for f in config.flags)))
            self.logger.log(Severity.VERBOSE, "tactic chatter that must not be kept")
            if trt.fail_build:
                self.logger.log(Severity.ERROR, "Out of memory while building")
                return None
            if trt.BuilderFlag.SPARSE_WEIGHTS in config.flags:
                self.logger.log(Severity.INFO, ELIGIBLE + f"{CONV_A} + /layer1/layer1.0/relu/Relu, {CONV_B}")
                self.logger.log(Severity.INFO, PICKED + f"{CONV_B}")
            return b"ENGINE:" + ",".join(sorted(f.name for f in config.flags)).encode()

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            record(("parse_from_file", path))
            if trt.fail_parse:
                self.num_errors = 1
                return False
            return True

        def get_error(self, index):
            return "In node 3 (Conv): unsupported attribute"

    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.Runtime = lambda logger: Runtime()

    class Runtime:
        def deserialize_cuda_engine(self, data):
            record(("deserialize", bytes(data)))
            return Engine(sparse=b"SPARSE_WEIGHTS" in bytes(data))

    class Inspector:
        def __init__(self, sparse):
            self.sparse = sparse

        def get_engine_information(self, fmt):
            record(("inspect", fmt.name))
            tactic = "sm80_xmma_fprop_sparse_conv_f16f16_f16f16_f16" if self.sparse else "sm80_xmma_fprop_implicit_gemm"
            return json.dumps({"Layers": [
                {"Name": f"{CONV_A} + /layer1/layer1.0/relu/Relu", "LayerType": "CaskConvolution",
                 "TacticName": "sm80_xmma_fprop_implicit_gemm", "Metadata": f"[ONNX Layer: {CONV_A}]"},
                {"Name": CONV_B, "LayerType": "CaskConvolution", "TacticName": tactic,
                 "Metadata": f"[ONNX Layer: {CONV_B}]"},
            ], "Bindings": ["input", "logits"]})

    class Engine:
        num_io_tensors = 2

        def __init__(self, sparse=False):
            self.sparse = sparse

        def create_engine_inspector(self):
            return Inspector(self.sparse)

        def get_tensor_name(self, index):
            return ["input", "logits"][index]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "input" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def get_tensor_shape(self, name):
            return [-1, 1, 28, 28] if name == "input" else [-1, 10]

        def create_execution_context(self):
            return Context()

    class Context:
        """Runs a fake network on the bound host addresses: logits[i, j] = sum(input[i]) + j."""

        def __init__(self):
            self.shapes, self.addresses, self.profiler = {}, {}, None

        def set_input_shape(self, name, shape):
            record(("set_input_shape", name, tuple(shape)))
            if not 1 <= shape[0] <= 16:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shapes["input"] if name == "input" else (self.shapes["input"][0], 10)

        def set_tensor_address(self, name, address):
            record(("set_tensor_address", name, address))
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle):
            record(("execute_async_v3", stream_handle))
            n = self.shapes["input"][0]
            inp = np.ctypeslib.as_array((ctypes.c_float * (n * 784)).from_address(self.addresses["input"]))
            out = np.ctypeslib.as_array((ctypes.c_float * (n * 10)).from_address(self.addresses["logits"]))
            out[:] = (inp.reshape(n, -1).sum(1, keepdims=True) + np.arange(10)).reshape(-1)
            if self.profiler is not None:
                self.profiler.report_layer_time(CONV_A, 0.25)
                self.profiler.report_layer_time(CONV_B, 0.5)
            return True

    return trt


@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def trt(request, monkeypatch):
    fake = make_trt(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def _onnx(path: Path, elem: int) -> Path:
    """A small graph named the way torch.onnx names things (legacy and dynamo exporters)."""
    dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32

    def init(name, shape):
        return onnx.numpy_helper.from_array(np.zeros(shape, dtype), name)

    nodes = [
        helper.make_node("Conv", ["input", "onnx::Conv_11"], ["a"], name=CONV_A, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="/layer1/layer1.0/relu/Relu"),
        helper.make_node("Cast", ["layer2.0.conv1.weight"], ["w_cast"], name="cast_w", to=elem),
        helper.make_node("Conv", ["b", "w_cast"], ["c"], name=CONV_B, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["d"], name="/avgpool/GlobalAveragePool"),
        helper.make_node("Flatten", ["d"], ["e"], name="/Flatten"),
        helper.make_node("Gemm", ["e", "fc.weight"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", elem, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", elem, ["batch", 10])],
        [init("onnx::Conv_11", (8, 1, 3, 3)), init("layer2.0.conv1.weight", (8, 8, 3, 3)), init("fc.weight", (10, 8))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def model_dir(tmp_path):
    paths = ArtifactPaths.for_model(tmp_path, "tiny_resnet")
    paths.root.mkdir(parents=True)
    for variant in ("dense", "sparse"):
        _onnx(getattr(paths, f"{variant}_onnx"), TensorProto.FLOAT)
        _onnx(getattr(paths, f"{variant}_onnx_fp16"), TensorProto.FLOAT16)
    return paths


def _build(trt, paths, variant="sparse", precision="fp16", **build):
    recipe = get_recipe("tiny_resnet")
    recipe.build.precision = precision
    for key, value in build.items():
        setattr(recipe.build, key, value)
    onnx_path = onnx_for_precision(paths, variant, precision, trt_backend.trt_major(trt))
    return trt_backend.TensorRTBackend().build(onnx_path, paths.root, variant, recipe, sparse=variant == "sparse")


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- build
def test_sparse_weights_flag_only_on_the_sparse_build(trt, model_dir):
    _build(trt, model_dir, "dense")
    dense_flags = {f.name for f in trt.config.flags}
    _build(trt, model_dir, "sparse")
    sparse_flags = {f.name for f in trt.config.flags}
    assert "SPARSE_WEIGHTS" not in dense_flags
    assert "SPARSE_WEIGHTS" in sparse_flags


def test_trt10_sets_fp16_flag_on_the_fp32_graph(monkeypatch, model_dir):
    trt = make_trt(10)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    result = _build(trt, model_dir, "sparse", "fp16")
    assert {f.name for f in trt.config.flags} == {"FP16", "SPARSE_WEIGHTS"}
    assert ("create_network", 0) in trt.calls  # weakly typed; explicit batch is implicit in 10
    assert ("parse_from_file", str(model_dir.sparse_onnx)) in trt.calls
    assert result.metadata["fp16_builder_flag"] is True and result.metadata["strongly_typed"] is False
    _build(trt, model_dir, "dense", "fp32")
    assert "FP16" not in {f.name for f in trt.config.flags}


def test_trt11_is_strongly_typed_and_builds_fp16_from_the_fp16_graph(monkeypatch, model_dir):
    trt = make_trt(11)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    assert not hasattr(trt.BuilderFlag, "FP16")  # touching it would raise, as in TensorRT 11
    result = _build(trt, model_dir, "sparse", "fp16")
    assert ("create_network", 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) in trt.calls
    assert ("parse_from_file", str(model_dir.sparse_onnx_fp16)) in trt.calls
    assert {f.name for f in trt.config.flags} == {"SPARSE_WEIGHTS"}
    assert result.metadata["strongly_typed"] is True and result.metadata["fp16_builder_flag"] is False
    assert onnx_for_precision(model_dir, "dense", "fp32", 11) == model_dir.dense_onnx

    recipe = get_recipe("tiny_resnet")  # precision fp16 with the FP32 graph: refused, with the fix named
    with pytest.raises(PipelineError, match="FP32 graph.*fp16.onnx"):
        trt_backend.TensorRTBackend().build(model_dir.sparse_onnx, model_dir.root, "sparse", recipe, sparse=True)
    model_dir.sparse_onnx_fp16.unlink()
    with pytest.raises(PipelineError, match="export.fp16=true"):
        onnx_for_precision(model_dir, "sparse", "fp16", 11)


def test_profile_workspace_and_verbosity_come_from_the_recipe(trt, model_dir):
    _build(trt, model_dir, "dense", min_batch=2, opt_batch=4, max_batch=12, workspace_mib=64)
    [profile] = trt.config.profiles
    assert profile.shapes == {"input": ((2, 1, 28, 28), (4, 1, 28, 28), (12, 1, 28, 28))}
    assert trt.config.pools == {trt.MemoryPoolType.WORKSPACE: 64 << 20}
    assert trt.config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED
    with pytest.raises(PipelineError, match="min_batch <= opt_batch <= max_batch"):
        _build(trt, model_dir, "dense", min_batch=8, opt_batch=4, max_batch=12)


def test_timing_cache_is_loaded_and_saved_between_builds(trt, model_dir):
    cache = model_dir.root / trt_backend.TIMING_CACHE
    first = _build(trt, model_dir, "dense")
    assert ("create_timing_cache", b"") in trt.calls and first.metadata["timing_cache"]["loaded"] is False
    assert cache.read_bytes() == b"+new-timings"
    trt.calls.clear()
    second = _build(trt, model_dir, "sparse")
    assert ("create_timing_cache", b"+new-timings") in trt.calls
    assert ("set_timing_cache", b"+new-timings", False) in trt.calls
    assert second.metadata["timing_cache"]["loaded"] is True
    assert cache.read_bytes() == b"+new-timings+new-timings"

    trt.cache_mismatch = True  # cache from another GPU: TensorRT refuses it, the build starts from empty
    third = _build(trt, model_dir, "sparse")
    assert third.metadata["timing_cache"]["loaded"] is False
    assert trt.calls[-1][0] != "set_timing_cache" and ("set_timing_cache", b"", False) in trt.calls
    assert _leftovers(model_dir.root) == []


def test_engine_and_metadata_are_written_next_to_each_other(trt, model_dir):
    result = _build(trt, model_dir, "sparse")
    engine = model_dir.root / "sparse.engine"
    assert result.engine_path == engine
    data = engine.read_bytes()
    meta = json.loads((model_dir.root / "sparse.json").read_text())
    assert meta == json.loads(json.dumps(result.metadata))
    assert meta["engine_sha256"] == sha256_bytes(data)
    onnx_file = model_dir.sparse_onnx_fp16 if trt.__version__.startswith("11") else model_dir.sparse_onnx
    assert meta["onnx_sha256"] == sha256_file(onnx_file)
    assert meta["tensorrt_version"] == trt.__version__
    assert meta["precision"] == "fp16" and meta["sparse_weights_flag"] is True
    assert meta["batch"] == {"min": 1, "opt": 8, "max": 16}
    assert meta["input_shape"] == [-1, 1, 28, 28]
    assert {"gpu", "compute_capability"} <= set(meta)
    log = (model_dir.root / "sparse.trt.log").read_text()
    assert "(Sparsity) Layers eligible" in log and "tactic chatter" not in log
    assert _leftovers(model_dir.root) == []


def test_failed_build_leaves_no_engine_and_says_why(trt, model_dir):
    trt.fail_build = True
    with pytest.raises(PipelineError, match="could not build the sparse engine.*Out of memory.*workspace_mib"):
        _build(trt, model_dir, "sparse")
    assert not (model_dir.root / "sparse.engine").exists()
    assert not (model_dir.root / "sparse.json").exists()
    assert (model_dir.root / "sparse.trt.log").is_file()
    assert _leftovers(model_dir.root) == []


def test_unparsable_onnx_is_a_one_line_error(trt, model_dir):
    trt.fail_parse = True
    with pytest.raises(PipelineError, match="cannot parse .*unsupported attribute"):
        _build(trt, model_dir, "dense")
    assert not (model_dir.root / "dense.engine").exists()


def test_sparse_report_maps_layers_to_pytorch_modules(trt, model_dir):
    result = _build(trt, model_dir, "sparse")
    assert result.sparse_layers["eligible"] == ["layer1.0.conv1", "layer2.0.conv1"]
    assert result.sparse_layers["picked_sparse"] == ["layer2.0.conv1"]
    raw = result.sparse_layers["raw"]
    assert raw["source"] == "builder log" and raw["unmapped"] == []
    assert list(raw["inspector_sparse_tactics"]) == [CONV_B]
    dense = _build(trt, model_dir, "dense")
    assert dense.sparse_layers["eligible"] == [] and dense.sparse_layers["picked_sparse"] == []


# ----------------------------------------------------------------------------- availability
def test_available_says_why_not(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    ok, reason = trt_backend.TensorRTBackend().available()
    assert not ok and "tensorrt does not import" in reason

    monkeypatch.setitem(sys.modules, "tensorrt", make_trt(8))
    ok, reason = trt_backend.TensorRTBackend().available()
    assert not ok and "TensorRT >= 10" in reason

    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", make_trt(10))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = trt_backend.TensorRTBackend().available()
    assert not ok and "no CUDA GPU" in reason


# ----------------------------------------------------------------------------- log parsing
def test_parse_sparsity_log_lines():
    lines = [
        "[03/23/2021-00:14:05] [I] [TRT] " + ELIGIBLE + "conv1, conv2, conv3",
        "[W] something else",
        "[I] " + PICKED + "conv2, conv3",
        "[I] " + ELIGIBLE + "conv3, conv4",  # a second profile repeats names
    ]
    assert parse_sparsity_log(lines) == {"eligible": ["conv1", "conv2", "conv3", "conv4"], "picked": ["conv2", "conv3"]}
    assert parse_sparsity_log(["[I] nothing about sparsity"]) == {"eligible": [], "picked": []}


def test_parse_inspector_json_detailed_and_names_only():
    detailed = json.dumps({"Layers": [{"Name": "a", "LayerType": "CaskConvolution",
                                       "TacticName": "sm86_xmma_fprop_sparse_conv_f16", "Metadata": "x"},
                                      {"Name": "b", "TacticName": "sm86_xmma_fprop_implicit_gemm"}]})
    layers = parse_inspector_json(detailed)
    assert [(l.name, l.sparse_tactic) for l in layers] == [("a", True), ("b", False)]
    assert [l.name for l in parse_inspector_json(json.dumps({"Layers": ["a", "b"]}))] == ["a", "b"]
    assert parse_inspector_json("not json") == [] and parse_inspector_json(None) == []


@pytest.mark.parametrize("node, module", [
    ("/conv1/Conv", "conv1"),
    ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
    ("/layer2/layer2.0/downsample/downsample.0/Conv", "layer2.0.downsample.0"),
    ("/features/features.1/features.1.0/block/block.0/Conv", "features.1.0.block.0"),
    ("/fc/Gemm", "fc"),
    ("node_Conv_7", None),
    ("/Conv", None),
])
def test_module_from_scoped_name(node, module):
    assert module_from_scoped_name(node) == module


def test_report_maps_fused_names_and_falls_back_to_inspector(tmp_path):
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx", TensorProto.FLOAT))
    assert names.nodes == {CONV_A: "layer1.0.conv1", CONV_B: "layer2.0.conv1", "/fc/Gemm": "fc"}
    assert names.torch_names(f"PWN({CONV_A} + /layer1/layer1.0/relu/Relu)") == ["layer1.0.conv1"]
    assert names.torch_names("[ONNX Layer: /layer9/layer9.0/conv2/Conv]\x1e[ONNX Layer: /x/Relu]") == ["layer9.0.conv2"]
    inspector = json.dumps({"Layers": [{"Name": "fused_7", "TacticName": "sm80_xmma_fprop_sparse_conv",
                                        "Metadata": f"[ONNX Layer: {CONV_B}]"},
                                       {"Name": "Reformat 3", "TacticName": "sparse_reformat_oddity"}]})
    report = sparse_layer_report(["[I] unrelated"], inspector, names)
    assert report["picked_sparse"] == ["layer2.0.conv1"] and report["eligible"] == []
    assert report["raw"]["source"] == "engine inspector tactic names"
    assert report["raw"]["unmapped"] == ["Reformat 3"]
    empty = sparse_layer_report([], None, names)
    assert empty["picked_sparse"] == [] and empty["raw"]["source"].startswith("none")


def test_name_map_matches_a_real_torchscript_export(tmp_path):
    """torch.onnx's TorchScript exporter folds BatchNorm into Conv ("onnx::Conv_N" weights): names come from scopes."""
    import torch

    from pipeline.recipe.weights import build_network

    recipe = get_recipe("tiny_resnet")
    model = build_network(recipe).eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, torch.zeros(1, *recipe.input_shape), path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)
    weighted = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(OnnxNameMap.from_onnx(path).nodes.values()) == sorted(weighted)


# ----------------------------------------------------------------------------- runner
class FakeStream:
    handle = 0x5EED  # the default stream would be 0

    def __init__(self):
        self.syncs = 0

    def scope(self):
        import contextlib

        return contextlib.nullcontext()

    def synchronize(self):
        self.syncs += 1

    def time_ms(self, fn):
        fn()
        return 0.125


@pytest.fixture
def runner(trt, monkeypatch, tmp_path):
    monkeypatch.setattr(trt_backend, "_cuda_stream", FakeStream)
    monkeypatch.setattr(trt_backend, "_DEVICE", "cpu")
    engine = tmp_path / "dense.engine"
    engine.write_bytes(b"ENGINE:")
    return trt_backend.TensorRTBackend().load(engine, get_recipe("tiny_resnet"))


def test_runner_binds_by_name_and_runs_on_its_own_stream(trt, runner):
    batch = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    out = runner.infer(batch)
    expected = batch.reshape(3, -1).sum(1, keepdims=True) + np.arange(10)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    assert (runner.input_name, runner.output_name) == ("input", "logits")
    assert ("set_input_shape", "input", (3, 1, 28, 28)) in trt.calls
    addresses = {c[1]: c[2] for c in trt.calls if c[0] == "set_tensor_address"}
    assert addresses == {"input": runner._input.data_ptr(), "logits": runner._output.data_ptr()}
    executes = [c for c in trt.calls if c[0] == "execute_async_v3"]
    assert executes == [("execute_async_v3", FakeStream.handle)]
    assert runner.stream.syncs >= 1


def test_runner_timing_warms_up_then_times_each_run(trt, runner):
    times = runner.time_batch(np.zeros((8, 1, 28, 28), np.float32), iterations=4, warmup=2)
    assert times == [0.125] * 4
    assert sum(1 for c in trt.calls if c[0] == "execute_async_v3") == 6


def test_runner_layer_times_through_iprofiler(trt, runner):
    assert runner.layer_times(runs=4) == {CONV_A: 0.25, CONV_B: 0.5}
    assert runner.layer_times(runs=2) == {CONV_A: 0.25, CONV_B: 0.5}  # totals reset between calls


def test_runner_rejects_batches_it_was_not_built_for(runner):
    with pytest.raises(PipelineError, match="outside the engine's range 1..16"):
        runner.infer(np.zeros((17, 1, 28, 28), np.float32))
    with pytest.raises(PipelineError, match=r"does not match the engine input \[N, 1, 28, 28\]"):
        runner.infer(np.zeros((2, 3, 28, 28), np.float32))


def test_load_missing_or_foreign_engine(trt, tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match="run the build stage first"):
        trt_backend.TensorRTBackend().load(tmp_path / "nope.engine", get_recipe("tiny_resnet"))
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"junk")

    class NoEngine:
        def deserialize_cuda_engine(self, data):
            return None

    monkeypatch.setattr(trt, "Runtime", lambda logger: NoEngine())
    with pytest.raises(PipelineError, match="rebuild it"):
        trt_backend.TensorRTBackend().load(bad, get_recipe("tiny_resnet"))
