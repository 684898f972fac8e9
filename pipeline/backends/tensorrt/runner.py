"""A TensorRT plan as a Runner: Polygraphy's TrtRunner for inference, the engine itself for what the plan is.

Everything verify needs to run a plan is read from the deserialized engine (ICudaEngine): the input and
output tensor names, the input's dtype and sample shape and the optimisation profile's batch range. So a plan
made by any tool (trtexec, Polygraphy, ModelOpt) runs without the pipeline's sidecar JSON; the sidecar, when
there is one, only adds what the pipeline knows (which modules and masks the plan came from).

Latency is GPU compute time (pipeline/backends/tensorrt/timing.py), not Polygraphy's host-side
`last_inference_time()`. NOT RUN ON A GPU by this project: tests/test_trt_timing.py fakes TensorRT and CUDA.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.tensorrt import timing
from pipeline.backends.tensorrt.log import captured_log, errors_in
from pipeline.errors import PipelineError

# Where Polygraphy's CUDA wrapper looks for libcudart.so* (polygraphy/cuda/cuda.py, _find_cuda_lib_dirs, 0.53.6)
POLYGRAPHY_CUDA_DIRS = ("/usr/local/cuda/lib64", "/usr/lib", "/lib")
# Where PyTorch's and NVIDIA's pip wheels put it: nvidia-cuda-runtime-cu12 -> nvidia/cuda_runtime/lib,
# the CUDA 13 wheels (nvidia-cuda-runtime 13.x, pulled in by torch's cu13 builds) -> nvidia/cu13/lib.
WHEEL_CUDA_DIRS = ("nvidia/cuda_runtime/lib", "nvidia/cu13/lib", "nvidia/cu12/lib")


def _has_cudart(folder: str) -> bool:
    return bool(folder) and bool(glob.glob(os.path.join(folder, "libcudart.so*")))


def ensure_cudart(environ=None, search: list[str] | None = None, loader_finds: bool | None = None) -> str | None:
    """Make the CUDA runtime findable by Polygraphy before its first CUDA call; returns the folder added to
    LD_LIBRARY_PATH (None when Polygraphy finds one already). One line naming LD_LIBRARY_PATH when none exists."""
    environ = os.environ if environ is None else environ
    search = sys.path if search is None else search
    listed = [d for d in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    if any(_has_cudart(d) for d in [*listed, *POLYGRAPHY_CUDA_DIRS]):
        return None
    wheels = [os.path.join(root, sub) for root in search if root and os.path.isdir(root) for sub in WHEEL_CUDA_DIRS]
    found = next((d for d in wheels if _has_cudart(d)), None)
    if found is not None:
        environ["LD_LIBRARY_PATH"] = os.pathsep.join([found, *listed])
        return found
    if loader_finds if loader_finds is not None else ctypes.util.find_library("cudart") is not None:
        return None  # the system loader (ldconfig) has it; Polygraphy falls back to it
    raise PipelineError(
        "no CUDA runtime (libcudart.so*) in LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/lib, /lib or the pip "
        f"wheels' {', '.join(WHEEL_CUDA_DIRS)}: install nvidia-cuda-runtime (pip) or add the folder holding "
        "libcudart.so to LD_LIBRARY_PATH"
    )


def startup_failure(engine_path: Path, said: str) -> str:
    """One line naming why TensorRT could not start a plan, by cause (not every failure is 'rebuild')."""
    low = said.lower()
    if "libcudart" in low or "cuda runtime library" in low or "libnvinfer" in low:
        return f"TensorRT cannot start {engine_path}: a CUDA/TensorRT library is missing ({said}); fix LD_LIBRARY_PATH"
    if "out of memory" in low or "out_of_memory" in low or "memoryallocation" in low:
        return f"TensorRT cannot start {engine_path}: the GPU is out of memory ({said}); free the GPU or use a smaller max batch"
    if any(key in low for key in ("version tag", "serialization", "magic tag", "incompatible")):
        return (
            f"TensorRT cannot load {engine_path} ({said}); it was built by another TensorRT "
            "version or GPU: rebuild it with the build stage"
        )
    return f"TensorRT cannot start {engine_path} ({said})"


@dataclass
class EngineIO:
    """What a plan takes and gives, read from the engine."""

    input_name: str
    output_name: str
    input_dtype: Any  # numpy dtype
    sample_shape: list[int]  # [C, H, W] from the profile's opt shape
    batch: dict[str, int]  # min, opt, max of profile 0


def engine_io(trt, engine, preferred_output: str | None = None, where: str = "the plan") -> EngineIO:
    names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1:
        raise PipelineError(f"{where} has {len(inputs)} inputs ({', '.join(inputs)}); verify runs single-input models")
    if len(outputs) != 1 and preferred_output not in outputs:
        raise PipelineError(
            f"{where} has outputs {', '.join(outputs) or 'none'}; verify checks classifiers with one [N, classes] output"
        )
    output = outputs[0] if len(outputs) == 1 else str(preferred_output)
    low, opt, high = (list(shape) for shape in engine.get_tensor_profile_shape(inputs[0], 0))
    dtype = {trt.float32: np.float32, trt.float16: np.float16}.get(engine.get_tensor_dtype(inputs[0]))
    if dtype is None:
        raise PipelineError(
            f"{where} takes {engine.get_tensor_dtype(inputs[0])} input {inputs[0]!r}; verify feeds float32 or "
            "float16 images (build the plan with a float input)"
        )
    return EngineIO(inputs[0], output, np.dtype(dtype), opt[1:], {"min": low[0], "opt": opt[0], "max": high[0]})


def to_device(array: np.ndarray) -> Any:
    """A CUDA copy of a host array (a torch tensor: Polygraphy takes its address as the input's)."""
    import torch

    return torch.from_numpy(array).cuda()


class TensorRTRunner:
    """Polygraphy's TrtRunner over one plan; I/O, batch range and input shape from the engine.

    `time_batch` returns GPU compute time per inference (timing.GpuTimer) and keeps the host enqueue time of
    the same calls in `last_host_ms`; `timing_method` says how. `layer_times` attaches an IProfiler to the
    runner's one execution context for its runs and detaches it after. `close` deactivates the runner.
    """

    def __init__(self, engine_path: Path, info=None):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.info, self.engine_path = info, Path(engine_path)
        self.cuda_note = ensure_cudart()
        lines: list[str] = []
        try:
            with captured_log() as lines:
                self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
                self._runner.activate()
        except Exception as exc:
            raise PipelineError(startup_failure(self.engine_path, errors_in(lines) or str(exc)[:200])) from None
        import tensorrt as trt

        io = engine_io(trt, self._runner.engine, getattr(info, "output_name", None), str(engine_path))
        self.input_name, self.output_name, self.input_dtype = io.input_name, io.output_name, io.input_dtype
        self.batch, self.sample_shape = io.batch, io.sample_shape
        self.min_batch, self.max_batch = io.batch["min"], io.batch["max"]
        self.timing_method, self.last_host_ms = "", list[float]()
        self._timer: timing.GpuTimer | None = None
        self._timed_shape: tuple[int, ...] | None = None
        self._device_feed: Any = None  # kept alive: the context (and a captured graph) points at it

    @property
    def engine(self):
        """The deserialized ICudaEngine (for its inspector)."""
        return self._runner.engine

    def inspector_json(self) -> str:
        import tensorrt as trt

        inspector = self._runner.engine.create_engine_inspector()
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)

    def _feed(self, batch) -> dict[str, Any]:
        shape = list(batch.shape)
        if len(shape) != 1 + len(self.sample_shape) or shape[1:] != list(self.sample_shape):
            raise PipelineError(
                f"batch shape {shape} does not match the engine input [N, {', '.join(map(str, self.sample_shape))}]"
            )
        if not self.min_batch <= shape[0] <= self.max_batch:
            raise PipelineError(
                f"batch of {shape[0]} is outside the engine's range {self.min_batch}..{self.max_batch}"
                "; rebuild with a larger --set build.max_batch"
            )
        return {self.input_name: batch}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._timed_shape = None  # shapes and addresses change: a later timing prepares again
        feed = self._feed(np.ascontiguousarray(batch, dtype=self.input_dtype))
        return np.asarray(self._runner.infer(feed)[self.output_name], dtype=np.float32)

    def _prepare(self, batch: np.ndarray) -> timing.GpuTimer:
        """One infer sets the input shape and every tensor address; then enqueues alone repeat the inference."""
        shape = tuple(batch.shape)
        if self._timer is not None and self._timed_shape == shape:
            return self._timer
        host = np.ascontiguousarray(batch, dtype=self.input_dtype)
        self._device_feed = to_device(host)
        self._runner.infer(self._feed(self._device_feed), copy_outputs_to_host=False)
        context, stream = self._runner.context, self._runner.stream

        def execute() -> None:
            if not context.execute_async_v3(stream.ptr):
                raise PipelineError(f"execute_async_v3 failed on {self.engine_path}")

        self._timer = timing.GpuTimer(timing.TorchCuda(stream.ptr), execute)
        self._timer.prepare()
        self._timed_shape = shape
        return self._timer

    def time_batch(self, batch: np.ndarray, iterations: int, warmup: int) -> list[float]:
        timer = self._prepare(batch)
        samples = timer.samples(iterations, warmup)
        self.timing_method, self.last_host_ms = timer.method, samples.host_ms
        return samples.gpu_ms

    def layer_times(self, runs: int = 10, batch: int | None = None) -> dict[str, float] | None:
        """Mean milliseconds per TensorRT layer over `runs` profiled executions at `batch` (default the profile's
        opt batch); the first run is dropped, and the profiler is detached after, so later timings are not profiled."""
        import tensorrt as trt

        totals: dict[str, float] = {}
        size = max(self.min_batch, min(batch or self.batch["opt"], self.max_batch))
        feed = self._feed(np.zeros((size, *self.sample_shape), dtype=self.input_dtype))
        self._timed_shape = None
        self._runner.context.profiler = make_profiler(trt, totals)
        try:
            self._runner.infer(feed, copy_outputs_to_host=False)
            totals.clear()
            for _ in range(runs):
                self._runner.infer(feed, copy_outputs_to_host=False)
        finally:
            self._runner.context.profiler = None
        return {name: total / runs for name, total in totals.items()} or None

    def close(self) -> None:
        """Deactivate the Polygraphy runner (frees its context, stream and buffers); safe to call twice."""
        self._timer, self._device_feed = None, None
        if getattr(self._runner, "is_active", False):
            self._runner.deactivate()


def make_profiler(trt, totals: dict[str, float]):
    class LayerProfiler(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name, ms):  # called by TensorRT after each profiled execution
            totals[layer_name] = totals.get(layer_name, 0.0) + float(ms)

    return LayerProfiler()
