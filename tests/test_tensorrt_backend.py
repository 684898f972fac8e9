"""TensorRT backend on CPU: Polygraphy's real loaders and logger, with TensorRT and the GPU work faked.

The backend composes Polygraphy's `NetworkFromOnnxPath`, `CreateConfig`, `Profile`, `EngineFromNetwork`,
`SaveEngine` and `TrtRunner`. Here `CreateConfig`, `Profile`, `NetworkFromOnnxPath` and Polygraphy's TensorRT
logger are the real ones (so the arguments the backend passes are checked against Polygraphy's own
signatures and stored attributes), a stub `tensorrt` module stands in sys.modules, and only the calls that
need libnvinfer and a GPU (`EngineFromNetwork`, `SaveEngine`, `TrtRunner`, `EngineFromBytes`) are replaced.
That the TensorRT names used exist in each supported TensorRT is checked against the real bindings wheels in
tests/test_tensorrt_conformance.py. Builder log and inspector text come from tests/fixtures/tensorrt (its
README says where each shape comes from). Tests named after a defect of issue 19 say which.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.backends.build_report import BuildReport
from pipeline.backends.tensorrt import engine as trt_backend
from pipeline.backends.tensorrt.info import EngineInfo
from pipeline.backends.tensorrt.parser_support import parser_problems
from pipeline.backends.tensorrt.sparsity import (
    QDQ_SPARSE_ISSUE,
    InspectedLayer,
    OnnxNameMap,
    module_from_scoped_name,
    module_layer_times,
    parse_inspector_json,
    parse_sparsity_log,
    sparse_layer_report,
    split_layer_list,
)
from pipeline.errors import PipelineError
from pipeline.io import sha256_file, write_json
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import InputSpec
from pipeline.recipe.registry import get_recipe
from tests import trt_fakes

CONV_A = "/layer1/layer1.0/conv1/Conv"
CONV_B = "node_Conv_7"  # dynamo-exporter style name; its weight initializer carries the module name
FIXTURES = Path(__file__).parent / "fixtures" / "tensorrt"


def fixture_lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def make_trt(version: str) -> types.ModuleType:
    """The few TensorRT names the backend and Polygraphy's logger touch before the faked GPU calls."""
    return trt_fakes.make_trt(version)


class FakeGpu:
    """Stands in for the Polygraphy calls that need libnvinfer and a GPU; TensorRT's log lines go through
    Polygraphy's real TensorRT logger (trt.ILogger subclass) into G_LOGGER, as a build's would."""

    def __init__(self, trt, monkeypatch):
        import polygraphy.backend.trt as ptrt
        from polygraphy.backend.trt import util as trt_util

        self.trt, self.calls, self.contexts, self.batch = trt, [], 0, [1, 4, 8]
        self.log: list[tuple[int, str]] = [(trt.Logger.INFO, line) for line in fixture_lines("builder_log_trt86.txt")]
        self.inspector = (FIXTURES / "inspector_fp16_sparse.json").read_text()
        self.parse_error: str | None = None
        monkeypatch.setattr(trt_util, "TRT_LOGGER", None)
        monkeypatch.setattr(ptrt, "EngineFromNetwork", self.engine_from_network)
        monkeypatch.setattr(ptrt, "SaveEngine", self.save_engine)
        monkeypatch.setattr(ptrt, "EngineFromBytes", lambda data: ("engine", data))
        monkeypatch.setattr(ptrt, "TrtRunner", lambda loader: FakeTrtRunner(self))
        monkeypatch.setattr(trt_backend, "gpu_info", lambda: {"gpu": "NVIDIA H100", "compute_capability": "9.0"})
        from pipeline.backends.tensorrt import runner as trt_runner
        from pipeline.backends.tensorrt import timing

        self.clock = trt_fakes.Clock()
        monkeypatch.setattr(timing, "TorchCuda", lambda ptr: trt_fakes.FakeCuda(self.clock))
        monkeypatch.setattr(trt_runner, "to_device", lambda array: array)
        monkeypatch.setattr(trt_runner, "ensure_cudart", lambda: None)

    def engine_from_network(self, network, config=None, save_timing_cache=None):
        def build():
            from polygraphy.backend.trt import util as trt_util
            from polygraphy.logger import G_LOGGER

            self.calls.append({"network": network, "config": config, "cache": save_timing_cache})
            logger = trt_util.get_trt_logger()
            for severity, line in self.log:
                logger.log(severity, line)
            if self.parse_error:
                logger.log(self.trt.Logger.ERROR, self.parse_error)
                G_LOGGER.critical("Could not parse ONNX correctly")
            Path(save_timing_cache).write_bytes(b"cache")
            inspector = types.SimpleNamespace(get_engine_information=lambda fmt: self.inspector)
            return types.SimpleNamespace(create_engine_inspector=lambda: inspector)

        return build

    def save_engine(self, engine, path):
        return lambda: Path(path).write_bytes(b"serialized engine")


def FakeTrtRunner(gpu: FakeGpu) -> trt_fakes.FakeTrtRunner:
    """TrtRunner as the backend uses it, over an engine whose I/O is the small graph's ("input" -> "logits")."""
    spec = {
        "gpu_ms": 0.5,
        "input": "input",
        "output": "logits",
        "sample_shape": [1, 28, 28],
        "batch": gpu.batch,
        "classes": 10,
        "dtype": "float32",
        "inspector": {"Layers": []},
        "layer_ms": {CONV_B: 0.5},
    }
    gpu.contexts += 1  # TrtRunner makes its one execution context when activated
    return trt_fakes.FakeTrtRunner(trt_fakes.FakeEngine(gpu.trt, spec), gpu.clock, 0.2, 0.005)


@pytest.fixture
def gpu(monkeypatch):
    trt = make_trt("10.9.0.34")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return FakeGpu(trt, monkeypatch)


def _onnx(path: Path, elem: int = TensorProto.FLOAT, qdq: bool = False, opset: int = 18, extra=()) -> Path:
    """A small graph named the way torch.onnx names things; with `qdq`, the second conv's weight goes through
    QuantizeLinear/DequantizeLinear; `extra` nodes are appended (to make a graph TensorRT cannot parse)."""
    dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32

    def init(name, shape):
        return onnx.numpy_helper.from_array(np.zeros(shape, dtype), name)

    if qdq:
        weight_path = [
            helper.make_node(
                "QuantizeLinear", ["layer2.0.conv1.weight", "w_scale", "w_zero"], ["w_q"], name="q_w", axis=0
            ),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_cast"], name="dq_w", axis=0),
        ]
        extra_inits = [
            onnx.numpy_helper.from_array(np.ones(8, np.float32), "w_scale"),
            onnx.numpy_helper.from_array(np.zeros(8, np.int8), "w_zero"),
        ]
    else:
        weight_path = [helper.make_node("Cast", ["layer2.0.conv1.weight"], ["w_cast"], name="cast_w", to=elem)]
        extra_inits = []
    nodes = [
        helper.make_node("Conv", ["input", "onnx::Conv_11"], ["a"], name=CONV_A, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="/layer1/layer1.0/relu/Relu"),
        *weight_path,
        helper.make_node("Conv", ["b", "w_cast"], ["c"], name=CONV_B, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["d"], name="/avgpool/GlobalAveragePool"),
        helper.make_node("Flatten", ["d"], ["e"], name="/Flatten"),
        helper.make_node("Gemm", ["e", "fc.weight"], ["logits"], name="/fc/Gemm", transB=1),
        *extra,
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", elem, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", elem, ["batch", 10])],
        [
            init("onnx::Conv_11", (8, 1, 3, 3)),
            init("layer2.0.conv1.weight", (8, 8, 3, 3)),
            init("fc.weight", (10, 8)),
            *extra_inits,
        ],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(n.domain, 1) for n in extra if n.domain]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


@pytest.fixture
def model_dir(tmp_path):
    paths = ArtifactPaths.for_model(tmp_path, "tiny_resnet")
    paths.root.mkdir(parents=True)
    for variant in ("dense", "sparse"):
        _onnx(getattr(paths, f"{variant}_onnx"))
        _onnx(getattr(paths, f"{variant}_onnx_fp16"), TensorProto.FLOAT16)
        _onnx(paths.int8_onnx(variant), qdq=True)
    return paths


def _recipe(precision="fp16", **build):
    recipe = get_recipe("tiny_resnet")
    recipe.build.precision = precision
    for key, value in build.items():
        setattr(recipe.build, key, value)
    return recipe


def _build(paths, variant="sparse", precision="fp16", **build):
    recipe = _recipe(precision, **build)
    backend = trt_backend.TensorRTBackend()
    return backend.build(
        backend.onnx_for(paths, variant, recipe.build),
        paths.root / "tensorrt",
        variant,
        recipe.build,
        InputSpec.of(recipe),
        sparse=variant == "sparse",
    )


# ----------------------------------------------------------------------------- build through Polygraphy
def test_sparse_weights_profile_and_workspace_reach_polygraphys_create_config(gpu, model_dir):
    _build(model_dir, "dense", max_batch=16, opt_batch=8, workspace_mib=64)
    _build(model_dir, "sparse", max_batch=16, opt_batch=8, workspace_mib=64)
    dense, sparse = (call["config"] for call in gpu.calls)
    assert (dense.sparse_weights, sparse.sparse_weights) == (False, True)
    [profile] = sparse.profiles
    assert (list(profile["input"].min), list(profile["input"].opt), list(profile["input"].max)) == (
        [1, 1, 28, 28],
        [8, 1, 28, 28],
        [16, 1, 28, 28],
    )
    assert sparse.memory_pool_limits == {gpu.trt.MemoryPoolType.WORKSPACE: 64 << 20}
    assert sparse.profiling_verbosity == gpu.trt.ProfilingVerbosity.DETAILED and sparse.tf32 is True
    assert gpu.calls[1]["network"].path == str(model_dir.sparse_onnx)


@pytest.mark.parametrize(
    "version, precision, graph, flags, strongly_typed",
    [
        ("10.9.0.34", "fp32", "sparse.onnx", (False, False), False),
        ("10.9.0.34", "fp16", "sparse.onnx", (True, False), False),
        ("10.9.0.34", "int8", "sparse.int8.onnx", (True, True), False),
        ("11.4.0.106", "fp16", "sparse.fp16.onnx", (False, False), True),
        ("11.4.0.106", "int8", "sparse.int8.onnx", (False, False), True),
    ],
)
def test_precision_flags_and_graph_per_version(gpu, model_dir, version, precision, graph, flags, strongly_typed):
    """10 sets FP16/INT8 builder flags (deprecated since 10.12); 11 is strongly typed and builds from the graph."""
    gpu.trt.__version__ = version
    _build(model_dir, "sparse", precision)
    [call] = gpu.calls
    assert (call["config"].fp16, call["config"].int8) == flags
    assert call["network"].strongly_typed is strongly_typed and call["network"].path.endswith(graph)


def test_hardware_compatibility_level_and_its_minimum_version(gpu, model_dir):
    _build(model_dir, hardware_compatibility="ampere_plus")
    assert gpu.calls[-1]["config"].hardware_compatibility_level == gpu.trt.HardwareCompatibilityLevel.AMPERE_PLUS
    _build(model_dir, hardware_compatibility="none")
    assert gpu.calls[-1]["config"].hardware_compatibility_level is None
    sys.modules["tensorrt"] = make_trt("10.0.1.6")  # no SAME_COMPUTE_CAPABILITY before 10.9
    with pytest.raises(PipelineError, match="SAME_COMPUTE_CAPABILITY exists from 10.9"):
        _build(model_dir, hardware_compatibility="same_compute_capability")


def test_timing_cache_is_loaded_and_saved_between_builds(gpu, model_dir):
    _build(model_dir)
    cache = model_dir.root / "tensorrt" / "timing.cache"
    assert gpu.calls[0]["config"].timing_cache_path is None and gpu.calls[0]["cache"] == str(cache)
    _build(model_dir)
    assert gpu.calls[1]["config"].timing_cache_path == str(cache)


def test_build_writes_engine_sidecar_log_and_inspector_json(gpu, model_dir, capsys):
    """The "(Sparsity)" lines reach the report through Polygraphy's logger, and nothing is printed."""
    gpu.log.append((gpu.trt.Logger.VERBOSE, "(Sparsity) a VERBOSE line is kept too"))
    gpu.log.append((gpu.trt.Logger.VERBOSE, "Tactic timing detail: dropped"))
    result = _build(model_dir)
    folder = model_dir.root / "tensorrt"
    assert result.engine_path == folder / "sparse.engine" and result.engine_path.read_bytes() == b"serialized engine"
    info = EngineInfo.load(result.engine_path)
    assert info.engine_sha256 == sha256_file(result.engine_path) and info.compute_capability == "9.0"
    assert (info.tensorrt_version, info.sparse_weights_flag, info.batch) == (
        "10.9.0.34",
        True,
        {"min": 1, "opt": 8, "max": 16},
    )
    log = (folder / "sparse.trt.log").read_text()
    assert "(Sparsity) TRT inference plan picked" in log and "a VERBOSE line is kept" in log
    assert "Tactic timing detail" not in log and "\x1b" not in log
    assert json.loads((folder / "sparse.layers.json").read_text())["Layers"]
    assert result.sparse_layers["picked_sparse"] == ["layer2.0.conv1"]
    assert "(Sparsity)" not in capsys.readouterr().out
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left


def test_failed_parse_is_one_line_and_leaves_no_engine(gpu, model_dir):
    gpu.parse_error = "In node 3 (parseGraph): INVALID_NODE: Invalid Node - /layer1/layer1.0/conv1/Conv"
    with pytest.raises(PipelineError) as error:
        _build(model_dir)
    assert "INVALID_NODE" in str(error.value) and "\n" not in str(error.value)
    assert not (model_dir.root / "tensorrt" / "sparse.engine").exists()
    assert "INVALID_NODE" in (model_dir.root / "tensorrt" / "sparse.trt.log").read_text()


def test_available_says_plainly_that_tensorrt_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, why = trt_backend.TensorRTBackend().available()
    assert not ok and why.startswith("TensorRT is not installed here") and "pip install tensorrt-cu12" in why


@pytest.mark.parametrize("version", ["8.5.3.1", "8.6.1.6"])
def test_tensorrt_8_is_refused_before_any_work(monkeypatch, model_dir, version):
    """Defects 1 and 2 of issue 19 (opset 18 vs the 8.x parser; no profile for a second 8.x context): 10.0 is the
    minimum, and an 8.x install is named as too old instead of building a wrong engine or dying in verify."""
    monkeypatch.setitem(sys.modules, "tensorrt", make_trt(version))
    ok, why = trt_backend.TensorRTBackend().available()
    assert not ok and f"tensorrt {version} is too old" in why and ">= 10.0" in why
    with pytest.raises(PipelineError, match="too old"):
        _build(model_dir)


# ----------------------------------------------------------------------------- parser support (defect 1)
def test_opset_18_graph_is_refused_by_the_tensorrt_86_parser_table(tmp_path):
    """Defect 1: onnx-tensorrt 8.5/8.6 reads opsets up to 17 and does not refuse newer graphs (it drops
    ReduceMean-18's axes input); the pipeline's own export (opset 18, AdaptiveAvgPool -> ReduceMean) is
    named before any build for 8.6, and passes for 10.0 and for a TensorRT newer than the table."""
    import torch

    from pipeline.export.onnx import ModelProtoFromTorch

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)
    )
    path = tmp_path / "m.onnx"
    onnx.save(ModelProtoFromTorch(model, [1, 8, 8], 18, "input", "logits"), path)
    problems = parser_problems(path, (8, 6))
    assert problems == ["opset 18 (the TensorRT 8.6 parser reads opsets 1..17)"]
    assert parser_problems(path, (10, 0)) == [] and parser_problems(path, (11, 4)) == []


def test_unsupported_operators_are_named_with_their_node(tmp_path):
    extra = [
        helper.make_node("Unique", ["logits"], ["u"], name="/head/Unique"),
        helper.make_node("MyOp", ["logits"], ["v"], name="/head/custom", domain="com.example"),
    ]
    path = _onnx(tmp_path / "m.onnx", extra=extra)
    assert parser_problems(path, (10, 1)) == ["Unique (node '/head/Unique')", "com.example::MyOp (node '/head/custom')"]


# ----------------------------------------------------------------------------- runner (defect 2)
def _sidecar(engine_file: Path, **batch) -> None:
    engine_file.parent.mkdir(parents=True, exist_ok=True)
    engine_file.write_bytes(b"serialized engine")
    recipe = _recipe(**batch)
    onnx_path = _onnx(engine_file.with_name("m.onnx"))
    EngineInfo.for_build(
        recipe.build,
        recipe.input_shape,
        "sparse",
        onnx_path,
        engine_file,
        "10.9.0.34",
        {"gpu": "x", "compute_capability": "9.0"},
        sparse=True,
        input_name="input",
        strongly_typed=False,
        build_seconds=1.0,
        sparse_layers={},
        output_name=recipe.export.output_name,
    ).save(engine_file)


def test_runner_uses_one_execution_context_for_timing_and_layer_times(gpu, tmp_path, monkeypatch):
    """Defect 2 of issue 19: layer times come from the runner's own context (its profiler attached), never from a
    second execution context. Issue 35: time_batch is the GPU time per inference (0.5 ms in the fake), not
    Polygraphy's host-side last_inference_time (0.7 ms here)."""
    engine_file = tmp_path / "sparse.engine"
    _sidecar(engine_file, min_batch=1, opt_batch=4, max_batch=8)
    runner = trt_backend.TensorRTBackend().load(engine_file, _recipe())
    batch = np.ones((3, 1, 28, 28), np.float32)
    assert runner.infer(batch).shape == (3, 10)
    assert runner.time_batch(batch, iterations=3, warmup=2) == pytest.approx([0.5, 0.5, 0.5])
    assert runner.layer_times(runs=4) == {CONV_B: 0.5}
    assert gpu.contexts == 1
    with pytest.raises(PipelineError, match="outside the engine's range 1..8"):
        runner.infer(np.ones((9, 1, 28, 28), np.float32))


def test_engine_tensorrt_cannot_load_is_one_line(gpu, tmp_path, monkeypatch):
    import polygraphy.backend.trt as ptrt
    from polygraphy.logger import G_LOGGER

    def refuse(loader):
        G_LOGGER.error("IRuntime::deserializeCudaEngine: Serialization assertion failed: version tag does not match")
        G_LOGGER.critical("Could not deserialize engine")

    monkeypatch.setattr(ptrt, "TrtRunner", refuse)
    engine_file = tmp_path / "sparse.engine"
    _sidecar(engine_file)
    with pytest.raises(PipelineError, match="version tag does not match.*rebuild it with the build stage") as error:
        trt_backend.TensorRTBackend().load(engine_file, _recipe())
    assert "\n" not in str(error.value)
    with pytest.raises(PipelineError, match="does not exist; run the build stage"):
        trt_backend.TensorRTBackend().load(tmp_path / "missing.engine", _recipe())


def test_sidecar_without_fields_is_one_line(tmp_path):
    engine_file = tmp_path / "sparse.engine"
    write_json(engine_file.with_suffix(".json"), {"variant": "sparse"})
    with pytest.raises(PipelineError, match="not a TensorRT engine sidecar"):
        EngineInfo.load(engine_file)


# ----------------------------------------------------------------------------- log and inspector parsing
def test_fused_names_with_commas_survive_the_split():
    """Fixture builder_log_trt86.txt: "PWN(PWN(a, b), c)" is one layer name, not three."""
    assert split_layer_list("a + b, PWN(PWN(c, d), e), {ForeignNode[f...g]}") == [
        "a + b",
        "PWN(PWN(c, d), e)",
        "{ForeignNode[f...g]}",
    ]
    log = parse_sparsity_log(fixture_lines("builder_log_trt86.txt"))
    fused = "PWN(PWN(node_Conv_7, /layer2/layer2.0/relu/Relu), /layer2/layer2.0/Add)"
    assert log["eligible"] == [f"{CONV_A} + /layer1/layer1.0/relu/Relu", fused, "/fc/Gemm"]
    assert log["picked"] == [fused]
    nothing = parse_sparsity_log(["[V] nothing about sparsity"])
    assert (nothing["eligible"], nothing["picked"], nothing["blocks"], nothing["format"]) == (None, None, [], None)
    assert parse_sparsity_log(fixture_lines("builder_log_int8_qdq.txt"))["picked"] == []  # seen, and empty


def test_metadata_separators_unit_and_record_and_local_function():
    """Defect 3: TensorRT joins a fused layer's ONNX nodes with \\x1f and sub-groups with \\x1e (NVIDIA
    Model-Optimizer fusion_grouping.py); onnx-tensorrt's processMetadata writes "| Local Function: fn"."""
    layer = InspectedLayer(
        "x", metadata="[ONNX Layer: /a/Conv]\x1f[ONNX Layer: /a/Relu]\x1e[ONNX Layer: /b/Gemm | Local Function: head]"
    )
    assert layer.onnx_nodes == ["/a/Conv", "/a/Relu", "/b/Gemm"]


def test_inspector_metadata_beats_layer_names(tmp_path):
    """Defect 3, fixture inspector_fp16_sparse.json: the Conv+ReLU fusion (\\x1f) maps to its conv; the ForeignNode
    range is named from CONV_A to /fc/Gemm but its Metadata (\\x1f, \\x1e, a Local Function record) holds the pool,
    flatten and fc nodes only. Reformat copy nodes belong to no module."""
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx"))
    layers = {
        layer.name: layer for layer in parse_inspector_json((FIXTURES / "inspector_fp16_sparse.json").read_text())
    }
    foreign = f"{{ForeignNode[{CONV_A}.../fc/Gemm]}}"
    assert names.modules_of(layers[foreign]) == ["fc"]
    assert names.modules_of(layers[f"{CONV_A} + /layer1/layer1.0/relu/Relu"]) == ["layer1.0.conv1"]
    reformat = f"Reformatting CopyNode for Input Tensor 0 to {CONV_A} + /layer1/layer1.0/relu/Relu"
    assert layers[reformat].is_reformat and names.modules_of(layers[reformat]) == []
    assert names.torch_names(foreign) == []  # without Metadata a range names no module
    assert [layer.has_sparse_weights for layer in layers.values()] == [None, False, True, None, None]


def test_inspector_only_report_maps_every_fused_layer(tmp_path):
    """Defect 3 end to end: with no "(Sparsity)" line (fixture builder_log_no_sparsity.txt) eligibility comes
    from HasSparseWeights, and per-layer rows exist for the fused conv and the ForeignNode, none unmapped.
    Issue 35: the inspector's sparse tactic name is evidence of its own, named as such."""
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx"))
    inspector = (FIXTURES / "inspector_fp16_sparse.json").read_text()
    report = sparse_layer_report(fixture_lines("builder_log_no_sparsity.txt"), inspector, names)
    assert report["picked_sparse"] == ["layer2.0.conv1"] and report["raw"]["sources"] == [
        "engine inspector tactic names"
    ]
    assert [row["evidence"] for row in report["layers"]] == [[], ["inspector tactic name"], []]
    unknown = sparse_layer_report(
        fixture_lines("builder_log_no_sparsity.txt"), inspector.replace("sparse_conv", "implicit_gemm"), names
    )
    assert unknown["picked_sparse"] is None and "not known" in unknown["notes"][0]
    assert report["eligible"] == ["layer2.0.conv1"] and report["raw"]["unmapped"] == []
    assert [row["modules"] for row in report["layers"]] == [["layer1.0.conv1"], ["layer2.0.conv1"], ["fc"]]


def test_trt86_fixture_log_maps_to_modules(tmp_path):
    """Fixture builder_log_trt86.txt without inspector JSON: layer names are parsed as a last resort."""
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx"))
    report = sparse_layer_report(fixture_lines("builder_log_trt86.txt"), None, names)
    assert report["eligible"] == ["layer1.0.conv1", "layer2.0.conv1", "fc"]
    assert report["picked_sparse"] == ["layer2.0.conv1"] and report["raw"]["unmapped"] == []


def test_reformat_time_is_not_charged_to_the_conv_it_feeds(tmp_path):
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx"))
    inspector = (FIXTURES / "inspector_fp16_sparse.json").read_text()
    times = {
        f"Reformatting CopyNode for Input Tensor 0 to {CONV_A} + /layer1/layer1.0/relu/Relu": 0.5,
        f"{CONV_A} + /layer1/layer1.0/relu/Relu": 1.0,
        CONV_B: 2.0,
        f"{{ForeignNode[{CONV_A}.../fc/Gemm]}}": 0.25,
        "(Unnamed Layer* 9) [Shuffle]": 0.125,
    }
    assert module_layer_times(times, inspector, names) == {
        "modules": {"layer1.0.conv1": 1.0, "layer2.0.conv1": 2.0, "fc": 0.25},
        "blocks": {},
        "reformat_ms": 0.5,
        "other_ms": 0.125,
    }


def test_qdq_layers_marked_sparse_but_built_dense_are_reported(tmp_path):
    """Fixtures inspector_int8_qdq.json + builder_log_int8_qdq.txt: the known TensorRT behaviour."""
    names = OnnxNameMap.from_onnx(_onnx(tmp_path / "m.onnx", qdq=True))
    assert names.nodes[CONV_B] == "layer2.0.conv1"  # the weight name is found through Q/DQ
    report = sparse_layer_report(
        fixture_lines("builder_log_int8_qdq.txt"),
        (FIXTURES / "inspector_int8_qdq.json").read_text(),
        names,
        quantized=True,
    )
    assert report["eligible"] == ["layer1.0.conv1", "layer2.0.conv1"] and report["picked_sparse"] == []
    assert [(e["modules"], e["has_sparse_weights"], e["picked_sparse"]) for e in report["layers"]] == [
        (["layer1.0.conv1"], True, False),
        (["layer2.0.conv1"], True, False),
    ]
    assert any(QDQ_SPARSE_ISSUE in note for note in report["notes"])


def test_parse_inspector_json_detailed_and_names_only():
    detailed = json.dumps(
        {
            "Layers": [
                {
                    "Name": "a",
                    "LayerType": "CaskConvolution",
                    "HasSparseWeights": 1,
                    "TacticName": "sm86_xmma_fprop_sparse_conv_f16",
                    "Metadata": "x",
                },
                {"Name": "b", "TacticName": "sm86_xmma_fprop_implicit_gemm"},
            ]
        }
    )
    assert [(layer.name, layer.has_sparse_weights) for layer in parse_inspector_json(detailed)] == [
        ("a", True),
        ("b", None),
    ]
    assert [layer.name for layer in parse_inspector_json(json.dumps({"Layers": ["a", "b"]}))] == ["a", "b"]
    assert parse_inspector_json("not json") == [] and parse_inspector_json(None) == []


@pytest.mark.parametrize(
    "node, module",
    [
        ("/conv1/Conv", "conv1"),
        ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
        ("/layer2/layer2.0/downsample/downsample.0/Conv", "layer2.0.downsample.0"),
        ("/fc/Gemm", "fc"),
        ("/a/Conv.../b/Gemm", None),
        ("node_Conv_7", None),
        ("/Conv", None),
    ],
)
def test_module_from_scoped_name(node, module):
    assert module_from_scoped_name(node) == module


def test_name_map_matches_the_pipelines_own_export(tmp_path):
    """pipeline.export.onnx's exporter (torch.export-based, BatchNorm folded) names weights after modules."""
    import torch

    from pipeline.export.onnx import ModelProtoFromTorch
    from pipeline.recipe.weights import build_network

    recipe = get_recipe("tiny_resnet")
    model = build_network(recipe).eval()
    path = tmp_path / "tiny.onnx"
    onnx.save(ModelProtoFromTorch(model, recipe.input_shape, 18, "input", "logits"), path)
    weighted = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(OnnxNameMap.from_onnx(path).nodes.values()) == sorted(weighted)


# ----------------------------------------------------------------------------- build.json and the CLI
def _built_folder(root: Path, version="10.9.0.34", backend="tensorrt", hardware="none") -> ArtifactPaths:
    """A model folder as the build stage leaves it: engines + sidecars + build.json (BuildReport)."""
    paths = ArtifactPaths.for_model(root, "tiny_resnet")
    engines = {}
    for variant in ("dense", "sparse"):
        engine_file = paths.root / "tensorrt" / f"{variant}.engine"
        _sidecar(engine_file)
        info = EngineInfo.load(engine_file)
        info.tensorrt_version, info.variant, info.hardware_compatibility = version, variant, hardware
        info.save(engine_file)
        engines[variant] = {
            "engine": f"tensorrt/{variant}.engine",
            "sha256": sha256_file(engine_file),
            "onnx": "tensorrt/m.onnx",
            "onnx_sha256": "",
            "metadata": info.to_dict(),
        }
    BuildReport("tiny_resnet", backend, "tensorrt", "test", True, "", [1, 32, 64], "", engines).save(paths.build_report)
    return paths


def test_plans_are_read_through_build_json_only(tmp_path):
    """Issue 18: plans.py reads BuildReport and the sidecars; a stray *.plan is not packaged."""
    from pipeline.package.plans import find_plans

    paths = _built_folder(tmp_path)
    (paths.root / "old.sm80.plan").write_bytes(b"stray")
    plans = find_plans(paths.root, paths.build_report, "fp16")
    assert {v: [p.path.name for p in found] for v, found in plans.items()} == {
        "dense": ["dense.engine"],
        "sparse": ["sparse.engine"],
    }
    assert plans["sparse"][0].compute_capability == "9.0"
    (paths.root / "tensorrt" / "sparse.engine").write_bytes(b"replaced")
    with pytest.raises(PipelineError, match="sha256 differs"):
        find_plans(paths.root, paths.build_report, "fp16")
    assert (
        find_plans(
            _built_folder(tmp_path / "ort", backend="onnxruntime").root,
            tmp_path / "ort" / "tiny_resnet" / "build.json",
            "fp16",
        )
        == {}
    )


def test_triton_release_check_compares_four_parts(tmp_path):
    """Defect 4: Triton 23.04 ships TensorRT 8.6.1.2; a plan from the PyPI 8.6.1 wheel (8.6.1.6) must be refused."""
    from pipeline.package.plans import find_plans

    paths = _built_folder(tmp_path, version="8.6.1.6")
    with pytest.raises(PipelineError, match=r"8\.6\.1\.6.*runs TensorRT 8\.6\.1\.2"):
        find_plans(paths.root, paths.build_report, "fp16", triton_release="23.04")
    assert find_plans(
        _built_folder(tmp_path / "ok", version="8.6.1.2").root,
        tmp_path / "ok" / "tiny_resnet" / "build.json",
        "fp16",
        triton_release="23.04",
    )


def test_release_table_has_four_part_versions_with_sources_or_claims_none(tmp_path):
    """Defect 6: every row names its version's source or is refused for plans; rows go past 25.07; no message
    suggests a pip version (8.6.3 is not on PyPI)."""
    from pipeline.package.plans import check_triton_release, find_plans
    from pipeline.triton_releases import FLAVOUR, RELEASES

    assert FLAVOUR == "py3" and max(RELEASES) > "25.07"
    for release, row in RELEASES.items():
        assert (row.source is not None) == row.four_part, release
    paths = _built_folder(tmp_path, version="8.6.3.1")
    plans = find_plans(paths.root, paths.build_report, "fp16")
    with pytest.raises(PipelineError, match="build number of nvcr.io/nvidia/tritonserver:24.02-py3 is not") as err:
        check_triton_release(plans, "24.02")
    assert "tensorrt==" not in str(err.value)


def test_release_table_shape_and_a_usable_tensorrt_10_row(tmp_path):
    """Issue 35: rows are YY.MM releases in order, each version None or dotted integers, each four-part row with its
    source; TensorRT 10 rows are usable. Source: triton-inference-server/server docs/introduction/release_notes.md,
    "Contents of the Triton Inference Server container" (the -py3 image), at commit
    7669321582e8bd5dcaf68b76e65389615e0a662f (24.08: TensorRT 10.3.0.26); 24.10, 24.12 and 25.01 at the commits
    named in pipeline/triton_releases.py. docs/introduction/compatibility.md gives the -trtllm-python-py3 image's
    versions and is not used."""
    import re

    from pipeline.package.plans import check_triton_release, find_plans
    from pipeline.triton_releases import RELEASES, TRITON_TENSORRT

    assert list(RELEASES) == sorted(RELEASES) and all(re.fullmatch(r"\d\d\.\d\d", r) for r in RELEASES)
    for release, row in RELEASES.items():
        assert row.tensorrt is None or re.fullmatch(r"\d+(\.\d+){2,3}", row.tensorrt), release
        assert TRITON_TENSORRT[release] == (row.tensorrt or "unknown")
        if row.four_part:
            assert row.source and ("release_notes.md @ " in row.source or "#" in row.source), release
    usable = {release: row for release, row in RELEASES.items() if row.four_part and row.tensorrt.startswith("10.")}
    assert usable.get("24.08") is not None and usable["24.08"].tensorrt == "10.3.0.26"
    assert usable["24.08"].source.startswith("triton-inference-server/server docs/introduction/release_notes.md @ ")
    for release, row in usable.items():
        assert release in row.source and row.tensorrt in row.source  # each source names its release and version
        paths = _built_folder(tmp_path / release, version=row.tensorrt)
        check_triton_release(find_plans(paths.root, paths.build_report, "fp16"), release)  # accepted: same build
        other = row.tensorrt.rsplit(".", 1)[0] + ".1"
        paths = _built_folder(tmp_path / f"{release}-other", version=other)
        with pytest.raises(PipelineError, match=re.escape(other)):
            check_triton_release(find_plans(paths.root, paths.build_report, "fp16"), release)
    assert RELEASES["24.07"].four_part is False  # no four-part -py3 version sourced: still refused for plans


def test_ampere_plus_plans_are_served_on_every_ampere_gpu(tmp_path):
    """Defect 5: an ampere_plus plan is registered under every Ampere+ compute capability and as the default."""
    from pipeline.package.model_config import ServedModel, render_config
    from pipeline.package.plans import AMPERE_PLUS_CCS, find_plans, served_filenames

    paths = _built_folder(tmp_path, hardware="ampere_plus")
    by_cc, default = served_filenames(find_plans(paths.root, paths.build_report, "fp16")["sparse"])
    assert set(by_cc) == set(AMPERE_PLUS_CCS) and set(by_cc.values()) == {default} == {"model.sm90.plan"}
    text = render_config(ServedModel("m", "plan", [], [], 8, [], 0, 1, "KIND_GPU", by_cc, default))
    assert 'default_model_filename: "model.sm90.plan"' in text and 'key: "8.6"' in text
    plain = _built_folder(tmp_path / "plain")
    assert served_filenames(find_plans(plain.root, plain.build_report, "fp16")["sparse"]) == (
        {"9.0": "model.sm90.plan"},
        "",
    )


def _exported(root: Path, extra=()) -> ArtifactPaths:
    from nm_fixtures import record_export

    paths = ArtifactPaths.for_model(root, "tiny_resnet")
    paths.root.mkdir(parents=True)
    for variant in ("dense", "sparse"):
        _onnx(getattr(paths, f"{variant}_onnx"), extra=extra)
    record_export(paths.root)
    return paths


def test_cli_build_names_what_tensorrt_cannot_parse(tmp_path):
    """Must-show 3: on this CPU machine, one `error:` line naming the operator, before any GPU work; exit 2."""
    from nm_fixtures import cli

    _exported(tmp_path, extra=[helper.make_node("Unique", ["logits"], ["u"], name="/head/Unique")])
    result = cli(
        "build",
        "--model",
        "tiny_resnet",
        "--out",
        str(tmp_path),
        "--backend",
        "tensorrt",
        "--set",
        "build.precision=fp16",
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: TensorRT cannot parse dense.onnx") and "Unique (node '/head/Unique')" in lines[0]


def test_cli_build_says_plainly_that_tensorrt_is_not_installed(tmp_path):
    from nm_fixtures import cli

    paths = _exported(tmp_path)
    result = cli("build", "--model", "tiny_resnet", "--out", str(tmp_path), "--backend", "tensorrt")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "TensorRT is not installed here" in lines[0]
    assert not paths.build_report.exists()


def test_an_onnxruntime_build_records_what_tensorrt_could_not_parse(tmp_path):
    """The check runs for every build; build.json keeps it (for verify's report), the run says it in a note."""
    from nm_fixtures import cli

    paths = _exported(tmp_path, extra=[helper.make_node("Unique", ["logits"], ["u"], name="/head/Unique")])
    result = cli("build", "--model", "tiny_resnet", "--out", str(tmp_path), "--backend", "onnxruntime")
    assert result.returncode == 0, result.stderr
    assert "note: TensorRT 10.0 (the oldest supported; none is installed here) could not parse" in result.stdout
    parser = BuildReport.load(paths.build_report, "tiny_resnet").tensorrt_parser
    assert parser["problems"] == {"dense": ["Unique (node '/head/Unique')"], "sparse": ["Unique (node '/head/Unique')"]}


def test_the_sidecar_names_the_graphs_output_not_the_recipes(gpu, model_dir):
    """Issue 35 (Why 8): the output tensor's name comes from the graph (as the engine names it), not from
    export.output_name, which another exporter need not have used."""
    recipe = _recipe()
    recipe.export.output_name = "probabilities"
    backend = trt_backend.TensorRTBackend()
    result = backend.build(
        backend.onnx_for(model_dir, "sparse", recipe.build),
        model_dir.root / "tensorrt",
        "sparse",
        recipe.build,
        InputSpec.of(recipe),
        True,
    )
    assert EngineInfo.load(result.engine_path).output_name == "logits"
