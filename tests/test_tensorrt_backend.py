"""TensorRT backend against a stub `tensorrt` module (CPU only).

These tests run the backend against a stub `tensorrt` module injected into sys.modules, as NVIDIA
ModelOpt does in its tests, so they check the call sequence the backend makes (flags, profile,
timing cache, files written, name mapping, runner bindings), not TensorRT itself. The stub models
the documented Python API of TensorRT 8.4 (refused), 8.5/8.6 (EXPLICIT_BATCH creation flag, the
name-based tensor API, no STRONGLY_TYPED), 10 (BuilderFlag.FP16/INT8 exist) and 11 (no FP16/INT8
flags, always strongly typed). Log and inspector text comes from tests/fixtures/tensorrt (see its
README); each test's docstring says whether it uses a stub, a fixture or both.
Real-GPU tests are in tests/test_tensorrt_gpu.py.
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
from pipeline.backends.tensorrt.sparsity import (QDQ_SPARSE_ISSUE, OnnxNameMap, module_from_scoped_name,
                                                 module_layer_times, parse_inspector_json, parse_sparsity_log,
                                                 sparse_layer_report, split_layer_list)
from pipeline.errors import PipelineError
from pipeline.export.int8 import int8_onnx_path
from pipeline.io import sha256_bytes, sha256_file, write_json
from pipeline.paths import ArtifactPaths
from pipeline.recipe.registry import get_recipe

ELIGIBLE = "(Sparsity) Layers eligible for sparse math: "
PICKED = "(Sparsity) TRT inference plan picked sparse implementation for layers: "
CONV_A = "/layer1/layer1.0/conv1/Conv"
CONV_B = "node_Conv_7"  # dynamo-exporter style name; its weight initializer carries the module name


# ----------------------------------------------------------------------------- stub tensorrt
FIXTURES = Path(__file__).parent / "fixtures" / "tensorrt"
CUDA_FAILURE = ("CUDA initialization failure with error: 35. Please check your CUDA installation: "
                "http://docs.nvidia.com/cuda/cuda-installation-guide-linux/index.html")


def fixture_lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def make_trt(version: str) -> types.ModuleType:
    """A stub `tensorrt` of the given version ("8.6.1", "10.9.0", "11.1.0", ...)."""
    major, minor = (int(part) for part in version.split(".")[:2])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    trt.loggers = []  # every logger handed to Builder / Runtime / OnnxParser
    trt.fail_build = False
    trt.fail_parse = False
    trt.cache_mismatch = False
    trt.cuda_broken = False
    trt.profile = ((1, 1, 28, 28), (8, 1, 28, 28), (16, 1, 28, 28))  # min / opt / max of the engine's input
    trt.sparsity_severity = "INFO"  # severity of the "(Sparsity)" lines the stub builder logs
    trt.build_log = None  # fixture lines replayed by the builder instead of the default "(Sparsity)" lines
    trt.inspector_json = None  # fixture JSON returned by the inspector instead of the default
    record = trt.calls.append

    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:  # like the real ILogger, it has no min_severity (only trt.Logger has)
        def __init__(self):
            pass

    ILogger.Severity = Severity
    trt.ILogger = ILogger

    class IProfiler:
        def __init__(self):
            pass

    trt.IProfiler = IProfiler
    flags = {"SPARSE_WEIGHTS": 7, "TF32": 6}
    if major < 11:
        flags.update(FP16=0, INT8=1)
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    creation = ({"STRONGLY_TYPED": 0} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10
                else {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1})
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", creation)
    if (major, minor) >= (8, 6):
        levels = {"NONE": 0, "AMPERE_PLUS": 1}
        if (major, minor) >= (10, 9):
            levels["SAME_COMPUTE_CAPABILITY"] = 2
        trt.HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel", levels)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    trt.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4})

    def start(what, logger):
        trt.loggers.append(logger)
        if trt.cuda_broken:
            logger.log(Severity.WARNING, CUDA_FAILURE)
            raise TypeError("pybind11::init(): factory function returned nullptr")
        record((what, id(logger)))

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

        def __setattr__(self, name, value):
            if name == "hardware_compatibility_level":
                if not hasattr(trt, "HardwareCompatibilityLevel"):
                    raise AttributeError(name)  # not in the 8.5 API
                record(("hardware_compatibility_level", value.name))
            object.__setattr__(self, name, value)

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
            start("Builder", logger)
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
            sparse = trt.BuilderFlag.SPARSE_WEIGHTS in config.flags
            if trt.build_log is not None:
                for line in trt.build_log:  # "[I] message" as in the fixtures
                    self.logger.log({"I": Severity.INFO, "W": Severity.WARNING, "V": Severity.VERBOSE}[line[1]],
                                    line[4:])
            elif sparse:
                level = Severity[trt.sparsity_severity]
                self.logger.log(level, ELIGIBLE + f"{CONV_A} + /layer1/layer1.0/relu/Relu, {CONV_B}")
                self.logger.log(level, PICKED + f"{CONV_B}")
            return b"ENGINE:" + ",".join(sorted(f.name for f in config.flags)).encode()

    class Parser:
        def __init__(self, network, logger):
            trt.loggers.append(logger)
            self.num_errors = 0

        def parse_from_file(self, path):
            record(("parse_from_file", path))
            if trt.fail_parse:
                self.num_errors = 1
                return False
            return True

        def get_error(self, index):
            return "In node 3 (Conv): unsupported attribute"

    class Runtime:
        def __init__(self, logger):
            start("Runtime", logger)

        def deserialize_cuda_engine(self, data):
            record(("deserialize", bytes(data)))
            return Engine(sparse=b"SPARSE_WEIGHTS" in bytes(data))

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime

    class Inspector:
        def __init__(self, sparse):
            self.sparse = sparse

        def get_engine_information(self, fmt):
            record(("inspect", fmt.name))
            if trt.inspector_json is not None:
                return trt.inspector_json
            tactic = "sm80_xmma_fprop_sparse_conv_f16f16_f16f16_f16" if self.sparse else "sm80_xmma_fprop_implicit_gemm"
            return json.dumps({"Layers": [
                {"Name": f"{CONV_A} + /layer1/layer1.0/relu/Relu", "LayerType": "CaskConvolution",
                 "TacticName": "sm80_xmma_fprop_implicit_gemm", "HasSparseWeights": int(self.sparse),
                 "Metadata": f"[ONNX Layer: {CONV_A}]\x1e[ONNX Layer: /layer1/layer1.0/relu/Relu]"},
                {"Name": CONV_B, "LayerType": "CaskConvolution", "TacticName": tactic,
                 "HasSparseWeights": int(self.sparse), "Metadata": f"[ONNX Layer: {CONV_B}]"},
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

        def get_tensor_profile_shape(self, name, profile_index):
            record(("get_tensor_profile_shape", name, profile_index))
            return [list(shape) for shape in trt.profile]

        def create_execution_context(self):
            return Context()

    class Context:
        """Runs a fake network on the bound host addresses: logits[i, j] = sum(input[i]) + j."""

        def __init__(self):
            self.shapes, self.addresses, self.profiler = {}, {}, None

        def set_input_shape(self, name, shape):
            record(("set_input_shape", name, tuple(shape)))
            if not trt.profile[0][0] <= shape[0] <= trt.profile[2][0]:
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


VERSIONS = {"trt86": "8.6.1", "trt10": "10.9.0", "trt11": "11.1.0"}


@pytest.fixture(params=list(VERSIONS.values()), ids=list(VERSIONS))
def trt(request, monkeypatch):
    fake = make_trt(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def _onnx(path: Path, elem: int, qdq: bool = False) -> Path:
    """A small graph named the way torch.onnx names things (legacy and dynamo exporters); with `qdq`, the
    second conv's weight goes through QuantizeLinear/DequantizeLinear, as in a Q/DQ graph."""
    dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32

    def init(name, shape):
        return onnx.numpy_helper.from_array(np.zeros(shape, dtype), name)

    if qdq:
        weight_path = [helper.make_node("QuantizeLinear", ["layer2.0.conv1.weight", "w_scale", "w_zero"], ["w_q"],
                                        name="q_w", axis=0),
                       helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_cast"], name="dq_w",
                                        axis=0)]
        extra = [onnx.numpy_helper.from_array(np.ones(8, np.float32), "w_scale"),
                 onnx.numpy_helper.from_array(np.zeros(8, np.int8), "w_zero")]
    else:
        weight_path = [helper.make_node("Cast", ["layer2.0.conv1.weight"], ["w_cast"], name="cast_w", to=elem)]
        extra = []
    nodes = [
        helper.make_node("Conv", ["input", "onnx::Conv_11"], ["a"], name=CONV_A, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="/layer1/layer1.0/relu/Relu"),
        *weight_path,
        helper.make_node("Conv", ["b", "w_cast"], ["c"], name=CONV_B, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["d"], name="/avgpool/GlobalAveragePool"),
        helper.make_node("Flatten", ["d"], ["e"], name="/Flatten"),
        helper.make_node("Gemm", ["e", "fc.weight"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", elem, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", elem, ["batch", 10])],
        [init("onnx::Conv_11", (8, 1, 3, 3)), init("layer2.0.conv1.weight", (8, 8, 3, 3)), init("fc.weight", (10, 8)),
         *extra])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def model_dir(tmp_path):
    paths = ArtifactPaths.for_model(tmp_path, "tiny_resnet")
    paths.root.mkdir(parents=True)
    for variant in ("dense", "sparse"):
        _onnx(getattr(paths, f"{variant}_onnx"), TensorProto.FLOAT)
        _onnx(getattr(paths, f"{variant}_onnx_fp16"), TensorProto.FLOAT16)
        _onnx(int8_onnx_path(getattr(paths, f"{variant}_onnx")), TensorProto.FLOAT, qdq=True)
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
    """Stub (8.6, 10, 11)."""
    _build(trt, model_dir, "dense")
    dense_flags = {f.name for f in trt.config.flags}
    _build(trt, model_dir, "sparse")
    sparse_flags = {f.name for f in trt.config.flags}
    assert "SPARSE_WEIGHTS" not in dense_flags
    assert "SPARSE_WEIGHTS" in sparse_flags


def test_trt86_call_sequence_uses_explicit_batch_and_the_name_based_api(monkeypatch, model_dir, tmp_path):
    """Stub (8.6): item 10. EXPLICIT_BATCH on the network, FP16 flag on the FP32 graph, name-based runner API."""
    trt = make_trt("8.6.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    result = _build(trt, model_dir, "sparse", "fp16")
    assert ("create_network", 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)) in trt.calls
    assert ("parse_from_file", str(model_dir.sparse_onnx)) in trt.calls
    assert {f.name for f in trt.config.flags} == {"FP16", "SPARSE_WEIGHTS"}
    assert result.metadata["network_flags"] == ["EXPLICIT_BATCH"] and result.metadata["strongly_typed"] is False
    order = [call[0] for call in trt.calls if call[0] in ("Builder", "create_network", "parse_from_file", "build",
                                                          "Runtime", "inspect")]
    assert order == ["Builder", "create_network", "parse_from_file", "build", "Runtime", "inspect"]


def test_trt84_is_refused_with_the_minimum_named(monkeypatch, model_dir):
    """Stub (8.4): item 10. available() and build() refuse it in one line naming 8.5."""
    trt = make_trt("8.4.3")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    ok, reason = trt_backend.TensorRTBackend().available()
    assert not ok and "TensorRT >= 8.5" in reason and "\n" not in reason
    with pytest.raises(PipelineError, match=r"tensorrt 8\.4\.3 is too old.*TensorRT >= 8\.5"):
        trt_backend.TensorRTBackend().build(model_dir.dense_onnx, model_dir.root, "dense", get_recipe("tiny_resnet"),
                                            sparse=False)
    assert trt.calls == []


def test_trt10_sets_fp16_flag_on_the_fp32_graph(monkeypatch, model_dir):
    """Stub (10)."""
    trt = make_trt("10.9.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    result = _build(trt, model_dir, "sparse", "fp16")
    assert {f.name for f in trt.config.flags} == {"FP16", "SPARSE_WEIGHTS"}
    assert ("create_network", 0) in trt.calls  # weakly typed; explicit batch is implicit in 10
    assert ("parse_from_file", str(model_dir.sparse_onnx)) in trt.calls
    assert result.metadata["fp16_builder_flag"] is True and result.metadata["strongly_typed"] is False
    _build(trt, model_dir, "dense", "fp32")
    assert "FP16" not in {f.name for f in trt.config.flags}


def test_trt11_is_strongly_typed_and_builds_fp16_from_the_fp16_graph(monkeypatch, model_dir):
    """Stub (11)."""
    trt = make_trt("11.1.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    assert not hasattr(trt.BuilderFlag, "FP16")  # touching it would raise, as in TensorRT 11
    result = _build(trt, model_dir, "sparse", "fp16")
    assert ("create_network", 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) in trt.calls
    assert ("parse_from_file", str(model_dir.sparse_onnx_fp16)) in trt.calls
    assert {f.name for f in trt.config.flags} == {"SPARSE_WEIGHTS"}
    assert result.metadata["strongly_typed"] is True and result.metadata["fp16_builder_flag"] is False

    recipe = get_recipe("tiny_resnet")  # precision fp16 with the FP32 graph: refused, with the fix named
    with pytest.raises(PipelineError, match="FP32 graph.*fp16.onnx"):
        trt_backend.TensorRTBackend().build(model_dir.sparse_onnx, model_dir.root, "sparse", recipe, sparse=True)


@pytest.mark.parametrize("version, flags", [("8.6.1", {"INT8", "FP16", "SPARSE_WEIGHTS"}),
                                            ("10.9.0", {"INT8", "FP16", "SPARSE_WEIGHTS"}),
                                            ("11.1.0", {"SPARSE_WEIGHTS"})])
def test_int8_builds_from_the_qdq_graph_with_sparse_weights(monkeypatch, model_dir, version, flags):
    """Stub (8.6, 10, 11): part C. Weakly typed 8.6/10 need INT8 (and FP16 for the unquantized layers) on a
    Q/DQ network; 11 is strongly typed and takes precision from the graph."""
    trt = make_trt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    result = _build(trt, model_dir, "sparse", "int8")
    assert ("parse_from_file", str(int8_onnx_path(model_dir.sparse_onnx))) in trt.calls
    assert {f.name for f in trt.config.flags} == flags
    assert result.metadata["precision"] == "int8" and result.metadata["builder_flags"] == sorted(
        flags, key=["SPARSE_WEIGHTS", "INT8", "FP16"].index)
    recipe = get_recipe("tiny_resnet")
    recipe.build.precision = "int8"  # the FP32 graph has no Q/DQ nodes: refused, naming the file to use
    with pytest.raises(PipelineError, match=r"no QuantizeLinear/DequantizeLinear.*sparse\.int8\.onnx"):
        trt_backend.TensorRTBackend().build(model_dir.sparse_onnx, model_dir.root, "sparse", recipe, sparse=True)


def test_one_rule_picks_the_graph_for_each_precision(model_dir):
    """No stub: item 8. onnx_for_precision is the only rule; the build stage asks the backend."""
    for major in (8, 10, 11):
        assert onnx_for_precision(model_dir, "dense", "fp32", major) == model_dir.dense_onnx
        assert onnx_for_precision(model_dir, "sparse", "int8", major) == model_dir.root / "sparse.int8.onnx"
    assert onnx_for_precision(model_dir, "sparse", "fp16", 8) == model_dir.sparse_onnx
    assert onnx_for_precision(model_dir, "sparse", "fp16", 10) == model_dir.sparse_onnx
    assert onnx_for_precision(model_dir, "sparse", "fp16", 11) == model_dir.sparse_onnx_fp16
    with pytest.raises(PipelineError, match="valid: fp32, fp16, int8"):
        onnx_for_precision(model_dir, "sparse", "bf16", 10)
    model_dir.sparse_onnx_fp16.unlink()
    with pytest.raises(PipelineError, match="export.fp16=true"):
        onnx_for_precision(model_dir, "sparse", "fp16", 11)
    (model_dir.root / "dense.int8.onnx").unlink()
    with pytest.raises(PipelineError, match="dense.int8.onnx does not exist.*build.precision=int8"):
        onnx_for_precision(model_dir, "dense", "int8", 10)


def test_hardware_compatibility_level_and_its_minimum_version(monkeypatch, model_dir):
    """Stub (8.5, 8.6, 10.8, 10.9): item 7. SAME_COMPUTE_CAPABILITY exists from 10.9, AMPERE_PLUS from 8.6."""
    for version, level, ok in [("10.9.0", "same_compute_capability", True), ("8.6.1", "ampere_plus", True),
                               ("10.8.0", "same_compute_capability", False), ("8.5.3", "ampere_plus", False)]:
        trt = make_trt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        if ok:
            result = _build(trt, model_dir, "dense", "fp32", hardware_compatibility=level)
            assert ("hardware_compatibility_level", level.upper()) in trt.calls
            assert result.metadata["hardware_compatibility"] == level
            assert result.metadata["tensorrt_version"] == version
        else:
            with pytest.raises(PipelineError, match=f"hardware_compatibility={level} needs TensorRT >= "):
                _build(trt, model_dir, "dense", "fp32", hardware_compatibility=level)
    trt = make_trt("8.5.3")  # the default leaves the 8.5 API (which has no such attribute) alone
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    assert _build(trt, model_dir, "dense", "fp32").metadata["hardware_compatibility"] == "none"


def test_profile_workspace_and_verbosity_come_from_the_recipe(trt, model_dir):
    """Stub (8.6, 10, 11)."""
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
    layers = json.loads((model_dir.root / meta["inspector_json"]).read_text())["Layers"]
    assert [layer["Name"] for layer in layers] == [f"{CONV_A} + /layer1/layer1.0/relu/Relu", CONV_B]
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
    """Stub (8.6, 10, 11): default stub log lines and inspector JSON."""
    result = _build(trt, model_dir, "sparse")
    assert result.sparse_layers["eligible"] == ["layer1.0.conv1", "layer2.0.conv1"]
    assert result.sparse_layers["picked_sparse"] == ["layer2.0.conv1"]
    raw = result.sparse_layers["raw"]
    assert raw["source"] == "builder log" and raw["unmapped"] == []
    picked = {entry["trt_layer"]: entry["picked_sparse"] for entry in result.sparse_layers["layers"]}
    assert picked == {f"{CONV_A} + /layer1/layer1.0/relu/Relu": False, CONV_B: True}
    dense = _build(trt, model_dir, "dense")
    assert dense.sparse_layers["picked_sparse"] is None  # a dense build prints no "(Sparsity)" line


# ----------------------------------------------------------------------------- availability
def test_available_says_why_not(monkeypatch):
    """Stub (10)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    ok, reason = trt_backend.TensorRTBackend().available()
    assert not ok and "tensorrt does not import" in reason

    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", make_trt("10.9.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = trt_backend.TensorRTBackend().available()
    assert not ok and "no CUDA GPU" in reason


def test_cuda_start_failure_is_one_line_naming_the_driver(trt, model_dir, tmp_path):
    """Stub (8.6, 10, 11): item 5. trt.Builder / trt.Runtime raise TypeError when CUDA cannot start."""
    trt.cuda_broken = True
    with pytest.raises(PipelineError, match=r"could not start CUDA for its builder \(.*error: 35.*\): the NVIDIA "
                                            r"driver is older than the CUDA") as caught:
        _build(trt, model_dir, "sparse")
    assert "\n" not in str(caught.value)
    engine = tmp_path / "dense.engine"
    engine.write_bytes(b"ENGINE:")
    with pytest.raises(PipelineError, match="could not start CUDA for its runtime"):
        trt_backend.TensorRTBackend().load(engine, get_recipe("tiny_resnet"))
    assert not (model_dir.root / "sparse.engine").exists()


def test_one_logger_for_the_whole_process(trt, model_dir, tmp_path, monkeypatch):
    """Stub (8.6, 10, 11): item 4. Builds and loads hand TensorRT the same logger, which has no min_severity."""
    monkeypatch.setattr(trt_backend, "_cuda_stream", FakeStream)
    monkeypatch.setattr(trt_backend, "_DEVICE", "cpu")
    _build(trt, model_dir, "dense")
    _build(trt, model_dir, "sparse")
    engine = tmp_path / "dense.engine"
    engine.write_bytes(b"ENGINE:")
    trt_backend.TensorRTBackend().load(engine, get_recipe("tiny_resnet"))
    assert len(trt.loggers) >= 6 and len({id(logger) for logger in trt.loggers}) == 1
    assert isinstance(trt.loggers[0], trt.ILogger) and not hasattr(trt.loggers[0], "min_severity")
    assert trt.loggers[0].sinks == []  # no capture left open
    first = (model_dir.root / "dense.trt.log").read_text()
    assert "(Sparsity)" not in first  # the sparse build's lines went to the sparse log only
    assert "(Sparsity) TRT inference plan picked" in (model_dir.root / "sparse.trt.log").read_text()


@pytest.mark.parametrize("severity", ["INFO", "WARNING", "VERBOSE"])
def test_sparsity_lines_are_kept_at_any_severity(monkeypatch, model_dir, severity):
    """Stub (10): item 2. The "(Sparsity)" lines are kept whatever severity TensorRT gives them."""
    trt = make_trt("10.9.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    trt.sparsity_severity = severity
    result = _build(trt, model_dir, "sparse")
    assert result.sparse_layers["picked_sparse"] == ["layer2.0.conv1"]
    log = (model_dir.root / "sparse.trt.log").read_text()
    assert f"[{severity}] (Sparsity) Layers eligible" in log and "tactic chatter" not in log


def test_no_sparsity_lines_is_said_plainly_not_guessed(monkeypatch, model_dir):
    """Stub (10) replaying fixture builder_log_no_sparsity.txt and inspector_fp16_sparse.json: item 2.

    The inspector has a tactic named "...sparse_conv..." for node_Conv_7; it must not be taken as "picked".
    """
    trt = make_trt("10.9.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    trt.build_log = fixture_lines("builder_log_no_sparsity.txt")
    trt.inspector_json = (FIXTURES / "inspector_fp16_sparse.json").read_text()
    report = _build(trt, model_dir, "sparse").sparse_layers
    assert report["picked_sparse"] is None
    assert report["notes"] and "not known" in report["notes"][0]
    assert report["raw"]["source"].startswith("none")
    assert report["eligible"] == ["layer2.0.conv1"] and report["raw"]["eligible_source"] == \
        "engine inspector HasSparseWeights"
    tactic = {entry["trt_layer"]: entry["tactic"] for entry in report["layers"]}[CONV_B]
    assert "sparse" in tactic  # listed as it is, not turned into a verdict


# ----------------------------------------------------------------------------- log and inspector parsing
def test_fused_names_with_commas_survive_the_split():
    """Fixture builder_log_trt86.txt: item 3. "PWN(PWN(a, b), c)" is one layer name, not three."""
    assert split_layer_list("a + b, PWN(PWN(c, d), e), {ForeignNode[f...g]}") == \
        ["a + b", "PWN(PWN(c, d), e)", "{ForeignNode[f...g]}"]
    log = parse_sparsity_log(fixture_lines("builder_log_trt86.txt"))
    fused = "PWN(PWN(node_Conv_7, /layer2/layer2.0/relu/Relu), /layer2/layer2.0/Add)"
    assert log["eligible"] == [f"{CONV_A} + /layer1/layer1.0/relu/Relu", fused, "/fc/Gemm"]
    assert log["picked"] == [fused]
    assert parse_sparsity_log(["[I] nothing about sparsity"]) == {"eligible": None, "picked": None}
    assert parse_sparsity_log(fixture_lines("builder_log_int8_qdq.txt"))["picked"] == []  # seen, and empty


def test_trt86_fixture_log_maps_to_modules(tmp_path):
    """Fixture builder_log_trt86.txt (no inspector JSON, as with LAYER_NAMES_ONLY): names are parsed as a last resort."""
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx", TensorProto.FLOAT))
    report = sparse_layer_report(fixture_lines("builder_log_trt86.txt"), None, names)
    assert report["eligible"] == ["layer1.0.conv1", "layer2.0.conv1", "fc"]
    assert report["picked_sparse"] == ["layer2.0.conv1"] and report["raw"]["unmapped"] == []


def test_inspector_metadata_beats_layer_names(tmp_path):
    """Fixture inspector_fp16_sparse.json: item 1.

    The ForeignNode range is named from CONV_A to /fc/Gemm, but its Metadata says it holds the pool,
    flatten and fc nodes only; reading the name would have charged it to layer1.0.conv1 (or to a
    made-up "layer1.layer1.0.conv1.Conv....fc" scope). Reformat copy nodes belong to no module.
    """
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx", TensorProto.FLOAT))
    layers = {layer.name: layer for layer in parse_inspector_json((FIXTURES / "inspector_fp16_sparse.json").read_text())}
    foreign = f"{{ForeignNode[{CONV_A}.../fc/Gemm]}}"
    assert names.modules_of(layers[foreign]) == ["fc"]
    assert names.modules_of(layers[f"{CONV_A} + /layer1/layer1.0/relu/Relu"]) == ["layer1.0.conv1"]
    reformat = f"Reformatting CopyNode for Input Tensor 0 to {CONV_A} + /layer1/layer1.0/relu/Relu"
    assert layers[reformat].is_reformat and names.modules_of(layers[reformat]) == []
    assert names.torch_names(foreign) == []  # without Metadata a range names no module
    assert [layer.has_sparse_weights for layer in layers.values()] == [None, False, True, None, None]


def test_reformat_time_is_not_charged_to_the_conv_it_feeds(tmp_path):
    """Fixture inspector_fp16_sparse.json: item 1. Per-module layer times keep reformats apart."""
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx", TensorProto.FLOAT))
    inspector = (FIXTURES / "inspector_fp16_sparse.json").read_text()
    times = {f"Reformatting CopyNode for Input Tensor 0 to {CONV_A} + /layer1/layer1.0/relu/Relu": 0.5,
             f"{CONV_A} + /layer1/layer1.0/relu/Relu": 1.0, CONV_B: 2.0,
             f"{{ForeignNode[{CONV_A}.../fc/Gemm]}}": 0.25, "(Unnamed Layer* 9) [Shuffle]": 0.125}
    split = module_layer_times(times, inspector, names)
    assert split == {"modules": {"layer1.0.conv1": 1.0, "layer2.0.conv1": 2.0, "fc": 0.25},
                     "reformat_ms": 0.5, "other_ms": 0.125}


def test_qdq_layers_marked_sparse_but_built_dense_are_reported(tmp_path):
    """Fixtures inspector_int8_qdq.json + builder_log_int8_qdq.txt: part C, the known TensorRT behaviour."""
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx", TensorProto.FLOAT, qdq=True))
    assert names.nodes[CONV_B] == "layer2.0.conv1"  # the weight name is found through Q/DQ
    report = sparse_layer_report(fixture_lines("builder_log_int8_qdq.txt"),
                                 (FIXTURES / "inspector_int8_qdq.json").read_text(), names, quantized=True)
    assert report["eligible"] == ["layer1.0.conv1", "layer2.0.conv1"] and report["picked_sparse"] == []
    assert [(e["modules"], e["has_sparse_weights"], e["picked_sparse"]) for e in report["layers"]] == \
        [(["layer1.0.conv1"], True, False), (["layer2.0.conv1"], True, False)]
    assert any(QDQ_SPARSE_ISSUE in note for note in report["notes"])
    assert all("i8i8" in e["tactic"] for e in report["layers"])


def test_parse_inspector_json_detailed_and_names_only():
    """No stub, inline JSON."""
    detailed = json.dumps({"Layers": [{"Name": "a", "LayerType": "CaskConvolution", "HasSparseWeights": 1,
                                       "TacticName": "sm86_xmma_fprop_sparse_conv_f16", "Metadata": "x"},
                                      {"Name": "b", "TacticName": "sm86_xmma_fprop_implicit_gemm"}]})
    layers = parse_inspector_json(detailed)
    assert [(l.name, l.has_sparse_weights) for l in layers] == [("a", True), ("b", None)]
    assert [l.name for l in parse_inspector_json(json.dumps({"Layers": ["a", "b"]}))] == ["a", "b"]
    assert parse_inspector_json("not json") == [] and parse_inspector_json(None) == []


@pytest.mark.parametrize("node, module", [
    ("/conv1/Conv", "conv1"),
    ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
    ("/layer2/layer2.0/downsample/downsample.0/Conv", "layer2.0.downsample.0"),
    ("/features/features.1/features.1.0/block/block.0/Conv", "features.1.0.block.0"),
    ("/fc/Gemm", "fc"),
    ("/a/Conv.../b/Gemm", None),
    ("node_Conv_7", None),
    ("/Conv", None),
])
def test_module_from_scoped_name(node, module):
    assert module_from_scoped_name(node) == module


def test_name_map_reads_fused_and_wrapped_names(tmp_path):
    """No stub: a small ONNX written by the test."""
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx", TensorProto.FLOAT))
    assert names.nodes == {CONV_A: "layer1.0.conv1", CONV_B: "layer2.0.conv1", "/fc/Gemm": "fc"}
    assert names.torch_names(f"PWN({CONV_A} + /layer1/layer1.0/relu/Relu)") == ["layer1.0.conv1"]
    assert names.torch_names("/layer9/layer9.0/conv2/Conv + /x/Relu") == ["layer9.0.conv2"]


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


def test_name_map_matches_the_pipelines_own_export(tmp_path):
    """No stub: pipeline.export.onnx's exporter (torch.export-based, BatchNorm folded) names weights after modules."""
    import torch

    from pipeline.export.onnx import ModelProtoFromTorch
    from pipeline.recipe.weights import build_network

    recipe = get_recipe("tiny_resnet")
    model = build_network(recipe).eval()
    path = tmp_path / "tiny.onnx"
    onnx.save(ModelProtoFromTorch(model, recipe.input_shape, 18, "input", "logits"), path)
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


def test_runner_sizes_come_from_the_engine_profile(trt, monkeypatch, tmp_path):
    """Stub (8.6, 10, 11): item 6. The engine was built for batches 2..12; the recipe says 1..16."""
    monkeypatch.setattr(trt_backend, "_cuda_stream", FakeStream)
    monkeypatch.setattr(trt_backend, "_DEVICE", "cpu")
    trt.profile = ((2, 1, 28, 28), (4, 1, 28, 28), (12, 1, 28, 28))
    engine = tmp_path / "dense.engine"
    engine.write_bytes(b"ENGINE:")
    recipe = get_recipe("tiny_resnet")
    assert (recipe.build.min_batch, recipe.build.max_batch) == (1, 16)
    runner = trt_backend.TensorRTBackend().load(engine, recipe)
    assert ("get_tensor_profile_shape", "input", 0) in trt.calls
    assert (runner.min_batch, runner.max_batch, runner.sample_shape) == (2, 12, [1, 28, 28])
    assert tuple(runner._input.shape) == (12, 1, 28, 28)
    with pytest.raises(PipelineError, match="outside the engine's range 2..12"):
        runner.infer(np.zeros((13, 1, 28, 28), np.float32))
    assert runner.layer_times(runs=1) is not None
    assert ("set_input_shape", "input", (4, 1, 28, 28)) in trt.calls  # profiling runs at the engine's opt batch


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


# ----------------------------------------------------------------------------- plans for Triton
def _plan(root: Path, variant: str, **meta) -> Path:
    engine = root / "tensorrt" / f"{variant}.engine"
    engine.parent.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(b"plan-" + variant.encode())
    write_json(engine.with_suffix(".json"), {"variant": variant, "compute_capability": "8.6", "precision": "fp16",
                                             "engine_sha256": sha256_file(engine), **meta})
    return engine


def test_plans_record_their_tensorrt_version_and_are_refused_for_another_triton(tmp_path):
    """No stub: item 7. A plan built by TensorRT 10.3 packages for Triton 24.08 (TensorRT 10.3.0), not for 24.05."""
    from pipeline.package.plans import TRITON_TENSORRT, find_plans

    for variant in ("dense", "sparse"):
        _plan(tmp_path, variant, tensorrt_version="10.3.0.26", hardware_compatibility="same_compute_capability")
    plans = find_plans(tmp_path, tmp_path / "build.json", "fp16", triton_release="24.08")
    [dense] = plans["dense"]
    assert (dense.tensorrt_version, dense.hardware_compatibility) == ("10.3.0.26", "same_compute_capability")
    assert TRITON_TENSORRT["24.05"] == "10.0.1"
    with pytest.raises(PipelineError, match=r"built by TensorRT 10\.3\.0\.26, but Triton 24\.05 runs TensorRT 10\.0\.1"):
        find_plans(tmp_path, tmp_path / "build.json", "fp16", triton_release="24.05")
    with pytest.raises(PipelineError, match="not in the TensorRT version table"):
        find_plans(tmp_path, tmp_path / "build.json", "fp16", triton_release="19.01")
    _plan(tmp_path, "sparse")  # metadata without tensorrt_version
    with pytest.raises(PipelineError, match="does not record the TensorRT version"):
        find_plans(tmp_path, tmp_path / "build.json", "fp16", triton_release="24.08")
    assert find_plans(tmp_path, tmp_path / "build.json", "fp16")["sparse"]  # no release asked: no check
