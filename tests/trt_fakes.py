"""Fakes of what a TensorRT plan needs a GPU for: Polygraphy's TrtRunner, the ICudaEngine and IExecutionContext
it holds, and the CUDA events the timing records, on one fake time line of GPU and host milliseconds.

The fake engine answers the ICudaEngine calls the runner makes (num_io_tensors, get_tensor_name,
get_tensor_mode, get_tensor_dtype, get_tensor_profile_shape, create_engine_inspector: the names of TensorRT's
`pyCore.cpp`, checked in tests/test_tensorrt_conformance.py). A fake "plan" file is JSON describing its engine
(`write_plan`), so a test can hand verify two bare plan files with no sidecar.

The time model: `infer` (Polygraphy's whole Python call) costs `host_overhead_ms` of host time plus one
execution; one execute_async_v3 costs `enqueue_ms` of host time and `gpu_ms` of GPU time. Polygraphy's
`last_inference_time()` is the host-side total, as the real one is (a time.time() around infer).
"""

from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np


class Clock:
    def __init__(self):
        self.gpu_ms = 0.0
        self.host_ms = 0.0


def make_trt(version: str = "10.16.1.11") -> types.ModuleType:
    """The TensorRT names the backend, Polygraphy's logger and these fakes touch."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    levels = ["NONE", "AMPERE_PLUS"] + (["SAME_COMPUTE_CAPABILITY"] if version >= "10.9" else [])
    trt.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", levels)
    trt.ProfilingVerbosity = enum.Enum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "DETAILED"])
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.LayerInformationFormat = enum.Enum("LayerInformationFormat", ["ONELINE", "JSON"])
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.DataType = enum.Enum("DataType", ["FLOAT", "HALF", "INT8", "INT32"])
    trt.float32, trt.float16 = trt.DataType.FLOAT, trt.DataType.HALF

    class ILogger:
        def __init__(self):
            pass

    class IProfiler:
        def __init__(self):
            pass

    trt.ILogger, trt.IProfiler = ILogger, IProfiler
    trt.Logger = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)
    return trt


def write_plan(path: Path, gpu_ms: float, **spec: Any) -> Path:
    """A fake plan: JSON the fake runtime deserializes (input/output names, shapes, batch range, inspector)."""
    spec = {
        "gpu_ms": gpu_ms,
        "input": "images",
        "output": "scores",
        "sample_shape": [1, 8, 8],
        "batch": [1, 4, 8],
        "classes": 3,
        "dtype": "float32",
        "inspector": {"Layers": []},
        "layer_ms": {},
        **spec,
    }
    path.write_text(json.dumps(spec))
    return path


class FakeEngine:
    def __init__(self, trt, spec: dict[str, Any]):
        self.trt, self.spec = trt, spec
        self.names = [spec["input"], spec["output"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str):
        return self.trt.TensorIOMode.INPUT if name == self.spec["input"] else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return self.trt.float16 if self.spec["dtype"] == "float16" else self.trt.float32

    def get_tensor_profile_shape(self, name: str, profile: int):
        assert name == self.spec["input"] and profile == 0
        return [[batch, *self.spec["sample_shape"]] for batch in self.spec["batch"]]

    def create_engine_inspector(self):
        text = json.dumps(self.spec["inspector"])
        return types.SimpleNamespace(get_engine_information=lambda fmt: text)


class FakeContext:
    def __init__(self, engine: FakeEngine, clock: Clock, enqueue_ms: float):
        self.engine, self.clock, self.enqueue_ms = engine, clock, enqueue_ms
        self.profiler = None
        self.executions = 0

    def execute_async_v3(self, stream_ptr: int) -> bool:
        self.clock.host_ms += self.enqueue_ms
        self.clock.gpu_ms += self.engine.spec["gpu_ms"]
        self.executions += 1
        if self.profiler is not None:
            for name, ms in self.engine.spec["layer_ms"].items():
                self.profiler.report_layer_time(name, ms)
        return True


class FakeTrtRunner:
    """Polygraphy's TrtRunner as the backend uses it: activate, engine, context, stream, infer, deactivate."""

    def __init__(self, engine: FakeEngine, clock: Clock, host_overhead_ms: float, enqueue_ms: float):
        self._engine, self.clock = engine, clock
        self.host_overhead_ms, self.enqueue_ms = host_overhead_ms, enqueue_ms
        self.is_active, self.last_ms = False, 0.0
        self.activations = 0

    def activate(self):
        self.is_active, self.activations = True, self.activations + 1
        self.engine = self._engine
        self.context = FakeContext(self._engine, self.clock, self.enqueue_ms)
        self.stream = types.SimpleNamespace(ptr=1234)

    def deactivate(self):
        self.is_active = False

    def infer(self, feed, copy_outputs_to_host=True):
        batch = np.asarray(next(iter(feed.values())), dtype=np.float32)
        self.clock.host_ms += self.host_overhead_ms  # Polygraphy's Python around the enqueue (its own included)
        self.context.execute_async_v3(self.stream.ptr)
        self.last_ms = self.host_overhead_ms + self._engine.spec["gpu_ms"]  # its stream sync waits for the GPU
        flat = batch.reshape(len(batch), -1)
        return {self._engine.spec["output"]: flat[:, : self._engine.spec["classes"]] * 3.0 + 1.0}

    def last_inference_time(self):
        return self.last_ms / 1e3


class FakeCuda:
    """timing.TorchCuda on the fake clock: an event records the GPU time line; capture can be refused."""

    def __init__(self, clock: Clock, capture_ok: bool = True):
        self.clock, self.capture_ok, self.captures = clock, capture_ok, 0

    def event(self):
        return {}

    def record(self, event):
        event["t"] = self.clock.gpu_ms

    def elapsed_ms(self, start, end):
        return end["t"] - start["t"]

    def synchronize(self):
        pass

    def capture(self, enqueue):
        if not self.capture_ok:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        enqueue()  # the capture itself enqueues nothing on the GPU time line in real CUDA; close enough here
        return enqueue

    def host_seconds(self):
        return self.clock.host_ms / 1e3


class FakeTensorRT:
    """Installs the fakes: `tensorrt` in sys.modules, Polygraphy's loaders and TrtRunner, the CUDA clock."""

    def __init__(self, monkeypatch, host_overhead_ms: float = 0.2, enqueue_ms: float = 0.005, capture_ok=True):
        import importlib

        import polygraphy.backend.common as pcommon
        import polygraphy.backend.trt as ptrt

        from pipeline.backends.tensorrt import engine as trt_engine

        self.trt, self.clock, self.runners = make_trt(), Clock(), []
        self.host_overhead_ms, self.enqueue_ms = host_overhead_ms, enqueue_ms
        self.cuda = FakeCuda(self.clock, capture_ok)
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setattr(pcommon, "BytesFromPath", lambda path: Path(path))
        monkeypatch.setattr(ptrt, "EngineFromBytes", lambda loader: loader)
        monkeypatch.setattr(ptrt, "TrtRunner", self.runner)
        # torch here has no CUDA GPU; what available() checks besides it (tensorrt imports, polygraphy) still runs.
        # raising=False and the guarded imports let these fakes run against the base commit (issue 35, must-show 1)
        monkeypatch.setattr(trt_engine, "gpu_visible", lambda: True, raising=False)
        for module, name, value in (
            ("timing", "TorchCuda", lambda ptr: self.cuda),
            ("runner", "to_device", lambda array: array),
            ("runner", "ensure_cudart", lambda: None),
        ):
            try:
                found = importlib.import_module(f"pipeline.backends.tensorrt.{module}")
            except ImportError:
                continue
            monkeypatch.setattr(found, name, value)

    def runner(self, path: Path) -> FakeTrtRunner:
        spec = json.loads(Path(path).read_text())
        made = FakeTrtRunner(FakeEngine(self.trt, spec), self.clock, self.host_overhead_ms, self.enqueue_ms)
        self.runners.append(made)
        return made
