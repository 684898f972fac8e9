"""TensorRT backend: ONNX -> serialized engine (2:4 sparse kernels allowed on the sparse build) -> Runner.

Written to NVIDIA's Python API of TensorRT 8.5/8.6, 10 and 11 (`tensorrt` is imported lazily,
inside functions). The versions differ where it matters here:
- 8.5/8.6: the network needs the EXPLICIT_BATCH creation flag; the name-based tensor API
  (num_io_tensors, set_input_shape, set_tensor_address, execute_async_v3) exists from 8.5.
- 10: explicit batch is implicit; weakly typed, precision comes from builder flags.
- 11: always strongly typed, no FP16/INT8 builder flags: precision comes from the graph.
`onnx_for_precision` is the one rule for which ONNX file a precision is built from.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends import BuildResult
from pipeline.backends.tensorrt.sparsity import OnnxNameMap, sparse_layer_report
from pipeline.errors import PipelineError
from pipeline.export.int8 import int8_onnx_path
from pipeline.io import atomic_path, ensure_dir, sha256_bytes, sha256_file, write_json, write_text

MIN_VERSION = (8, 5)
PRECISIONS = ("fp32", "fp16", "int8")
TIMING_CACHE = "timing.cache"
_DEVICE = "cuda"
# build.hardware_compatibility -> (HardwareCompatibilityLevel member, first TensorRT version that has it)
HARDWARE_COMPATIBILITY = {"none": ("NONE", (8, 6)), "ampere_plus": ("AMPERE_PLUS", (8, 6)),
                          "same_compute_capability": ("SAME_COMPUTE_CAPABILITY", (10, 9))}


def engine_path(engine_dir: Path, variant: str) -> Path:
    return Path(engine_dir) / f"{variant}.engine"


def metadata_path(engine_file: Path) -> Path:
    return Path(engine_file).with_suffix(".json")  # same rule as the other backends and the build stage


def log_path(engine_dir: Path, variant: str) -> Path:
    return Path(engine_dir) / f"{variant}.trt.log"


def inspector_path(engine_dir: Path, variant: str) -> Path:
    """The engine inspector's per-layer JSON (for sparsity.module_layer_times)."""
    return Path(engine_dir) / f"{variant}.layers.json"


def trt_version(trt: Any) -> tuple[int, int]:
    """(major, minor) of the installed TensorRT; (0, 0) if unreadable."""
    try:
        major, minor = str(trt.__version__).split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return 0, 0


def trt_major(trt: Any) -> int:
    return trt_version(trt)[0]


def _too_old(trt: Any) -> str | None:
    if trt_version(trt) >= MIN_VERSION:
        return None
    return (f"tensorrt {getattr(trt, '__version__', '?')} is too old; this pipeline needs TensorRT >= "
            f"{MIN_VERSION[0]}.{MIN_VERSION[1]} (pip install 'tensorrt>=8.5')")


def onnx_for_precision(paths, variant: str, precision: str, major: int) -> Path:
    """The ONNX file a TensorRT `major` build of `variant` ("dense" | "sparse") at `precision` starts from.

    int8: the Q/DQ graph (`<variant>.int8.onnx`) on every version. fp16: the FP16 graph
    (`<variant>.fp16.onnx`) on TensorRT 11, which has no FP16 flag; TensorRT 8 and 10 set the FP16
    flag on the FP32 graph. fp32: the FP32 graph.
    """
    if variant not in ("dense", "sparse"):
        raise PipelineError(f"unknown engine variant {variant!r}; valid: dense, sparse")
    if precision not in PRECISIONS:
        raise PipelineError(f"build.precision={precision!r} is not supported by tensorrt; valid: {', '.join(PRECISIONS)}")
    fp32 = Path(getattr(paths, f"{variant}_onnx"))
    if precision == "int8":
        path = paths.int8_onnx(variant)
        if not path.is_file():
            raise PipelineError(f"{path} does not exist; build.precision=int8 needs the Q/DQ graph: run export with "
                                "--set build.precision=int8")
        return path
    if precision == "fp16" and major >= 11:
        path = Path(getattr(paths, f"{variant}_onnx_fp16"))
        if not path.is_file():
            raise PipelineError(f"{path} does not exist; TensorRT {major} has no FP16 builder flag and needs the FP16 "
                                "ONNX: run export with --set export.fp16=true, or build with --set build.precision=fp32")
        return path
    return fp32


def builder_flag_names(precision: str, version: tuple[int, int], sparse: bool) -> list[str]:
    """BuilderFlag members a build sets. Weakly typed networks (8.x, 10) need INT8 for a Q/DQ graph, and
    FP16 so that the layers outside Q/DQ pairs are not left in FP32; 11 takes precision from the graph."""
    flags = ["SPARSE_WEIGHTS"] if sparse else []
    if version < (11, 0):
        flags += {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]
    return flags


def network_flag_names(version: tuple[int, int]) -> list[str]:
    """NetworkDefinitionCreationFlag members: EXPLICIT_BATCH on 8.x (deprecated and ignored from 10),
    STRONGLY_TYPED on 11 (always strongly typed; the flag is accepted and ignored)."""
    if version < (10, 0):
        return ["EXPLICIT_BATCH"]
    return ["STRONGLY_TYPED"] if version >= (11, 0) else []


def _gpu_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": "unknown (torch sees no CUDA GPU)", "compute_capability": None}
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


# ------------------------------------------------------------------------ logger
_PROCESS_LOGGER: tuple[Any, Any] | None = None  # (tensorrt module, its logger)


def process_logger(trt):
    """The one ILogger this process gives TensorRT.

    TensorRT keeps the first logger it is handed as its global fallback, so a logger per build
    would leave later messages going to the first one. Builds and loads capture its lines with
    `capture_log`. It keeps INFO and more severe messages, and "(Sparsity)" lines at any severity
    (their severity differs between versions). `min_severity` exists only on trt.Logger, not on
    ILogger subclasses, so the filter is here.
    """
    global _PROCESS_LOGGER
    if _PROCESS_LOGGER is None or _PROCESS_LOGGER[0] is not trt:
        severity = trt.ILogger.Severity

        class CaptureLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.sinks: list[list[str]] = []

            def log(self, level, msg):  # called by TensorRT; must not raise
                if level == severity.VERBOSE and "(Sparsity)" not in msg:
                    return
                line = f"[{getattr(level, 'name', level)}] {msg}"
                for sink in self.sinks:
                    sink.append(line)
                if not self.sinks and level in (severity.ERROR, severity.INTERNAL_ERROR):
                    print(f"TensorRT: {line}", file=sys.stderr)

        _PROCESS_LOGGER = (trt, CaptureLogger())
    return _PROCESS_LOGGER[1]


@contextlib.contextmanager
def capture_log(logger):
    lines: list[str] = []
    logger.sinks.append(lines)
    try:
        yield lines
    finally:
        logger.sinks.remove(lines)


def _errors(lines: list[str], limit: int = 3) -> str:
    bad = [line for line in lines if line.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
    return " | ".join(bad[-limit:]) or "no error message from TensorRT"


def _start(trt, factory, logger, lines: list[str], what: str):
    """trt.Builder / trt.Runtime; they raise TypeError ("factory function returned nullptr") when CUDA cannot start."""
    try:
        return factory(logger)
    except TypeError as exc:
        said = " | ".join(line for line in lines if "CUDA" in line) or str(exc)
        raise PipelineError(f"TensorRT {trt.__version__} could not start CUDA for its {what} ({said}): the NVIDIA "
                            "driver is older than the CUDA this TensorRT was built for, or no GPU is visible; compare "
                            "the CUDA version nvidia-smi reports with the TensorRT wheel's (tensorrt-cu11/-cu12/-cu13)"
                            ) from None


def _has_op(onnx_path: Path, op_types: set[str]) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type in op_types for node in model.graph.node)


class TensorRTBackend:
    name = "tensorrt"
    has_sparse_kernels = True

    def available(self) -> tuple[bool, str]:
        try:
            import tensorrt as trt
        except Exception as exc:  # ImportError, or a broken CUDA install raising OSError
            return False, f"tensorrt does not import ({type(exc).__name__}: {str(exc)[:120]}); pip install tensorrt"
        if (old := _too_old(trt)) is not None:
            return False, old
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except Exception as exc:
            return False, f"torch cannot query CUDA ({type(exc).__name__})"
        if not has_gpu:
            return False, "no CUDA GPU is visible to torch"
        return True, f"tensorrt {trt.__version__}"

    def onnx_for(self, paths, variant: str, recipe) -> Path:
        """`onnx_for_precision` with the installed TensorRT's major version: what the build stage passes to build()."""
        import tensorrt as trt

        return onnx_for_precision(paths, variant, recipe.build.precision, trt_major(trt))

    # ------------------------------------------------------------------ build
    def build(self, onnx_path: Path, engine_dir: Path, variant: str, recipe, sparse: bool) -> BuildResult:
        import tensorrt as trt

        onnx_path, engine_dir = Path(onnx_path), ensure_dir(Path(engine_dir))
        if not onnx_path.is_file():
            raise PipelineError(f"{onnx_path} does not exist; run the export stage first")
        cfg = recipe.build
        if (old := _too_old(trt)) is not None:
            raise PipelineError(old)
        version = trt_version(trt)
        if cfg.precision not in PRECISIONS:
            raise PipelineError(f"build.precision={cfg.precision!r} is not supported by tensorrt; valid: "
                                f"{', '.join(PRECISIONS)}")
        if not 1 <= cfg.min_batch <= cfg.opt_batch <= cfg.max_batch:
            raise PipelineError(f"build batch range min={cfg.min_batch} opt={cfg.opt_batch} max={cfg.max_batch} must "
                                "satisfy 1 <= min_batch <= opt_batch <= max_batch; fix --set build.*_batch")
        strongly_typed = version >= (11, 0)
        if strongly_typed and cfg.precision == "fp16" and not _has_fp16_tensors(onnx_path):
            raise PipelineError(f"{onnx_path} is an FP32 graph, but TensorRT {version[0]} has no FP16 flag: pass the "
                                f"FP16 ONNX ({variant}.fp16.onnx, see onnx_for_precision) or set build.precision=fp32")
        if cfg.precision == "int8" and not _has_op(onnx_path, {"QuantizeLinear", "DequantizeLinear"}):
            raise PipelineError(f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes; build.precision=int8 builds "
                                f"from the Q/DQ graph ({int8_onnx_path(Path(variant + '.onnx')).name}, see "
                                "onnx_for_precision)")
        hardware = cfg.hardware_compatibility
        hardware_level = _hardware_level(trt, hardware, version)

        logger = process_logger(trt)
        with capture_log(logger) as lines:
            builder = _start(trt, trt.Builder, logger, lines, "builder")
            network_flags = network_flag_names(version)
            flags = 0
            for flag in network_flags:
                flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                write_text(log_path(engine_dir, variant), "\n".join(lines) + "\n")
                errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
                raise PipelineError(f"TensorRT cannot parse {onnx_path}: {errors[0] if errors else _errors(lines)}; "
                                    "re-export it (python -m pipeline export)")

            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_mib) << 20)
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
            builder_flags = builder_flag_names(cfg.precision, version, sparse)
            for flag in builder_flags:
                config.set_flag(getattr(trt.BuilderFlag, flag))
            if hardware_level is not None:
                config.hardware_compatibility_level = hardware_level
            input_name, input_shape = _add_profile(builder, network, config, cfg, recipe)

            cache_file = engine_dir / TIMING_CACHE
            cache_loaded = _attach_timing_cache(config, cache_file)

            start = time.perf_counter()
            serialized = builder.build_serialized_network(network, config)
            build_seconds = time.perf_counter() - start
            log_file = log_path(engine_dir, variant)
            if serialized is None:
                write_text(log_file, "\n".join(lines) + "\n")
                raise PipelineError(f"TensorRT could not build the {variant} engine from {onnx_path}: "
                                    f"{_errors(lines)} (full log: {log_file}); try a larger --set build.workspace_mib")
            data = bytes(serialized)
            if not data:
                write_text(log_file, "\n".join(lines) + "\n")
                raise PipelineError(f"TensorRT returned an empty {variant} engine; see {log_file}")
            _save_timing_cache(config, cache_file)
            inspector_json = _inspect(trt, logger, lines, data)
        write_text(log_file, "\n".join(lines) + "\n")
        report = sparse_layer_report(lines, inspector_json, OnnxNameMap.from_onnx(onnx_path),
                                     quantized=cfg.precision == "int8")

        engine_file = engine_path(engine_dir, variant)
        if inspector_json:
            write_text(inspector_path(engine_dir, variant), inspector_json)
        with atomic_path(engine_file) as tmp:
            tmp.write_bytes(data)
        metadata = {
            "backend": self.name,
            "variant": variant,
            "tensorrt_version": str(trt.__version__),
            **_gpu_info(),
            "hardware_compatibility": hardware,
            "precision": cfg.precision,
            "strongly_typed": strongly_typed,
            "network_flags": network_flags,
            "builder_flags": builder_flags,
            "fp16_builder_flag": "FP16" in builder_flags,
            "sparse_weights_flag": bool(sparse),
            "batch": {"min": cfg.min_batch, "opt": cfg.opt_batch, "max": cfg.max_batch},
            "input_name": input_name,
            "input_shape": input_shape,
            "workspace_mib": cfg.workspace_mib,
            "engine": engine_file.name,
            "engine_sha256": sha256_bytes(data),
            "onnx": str(onnx_path),
            "onnx_sha256": sha256_file(onnx_path),
            "timing_cache": {"path": cache_file.name, "loaded": cache_loaded},
            "build_seconds": round(build_seconds, 3),
            "build_log": log_file.name,
            "inspector_json": inspector_path(engine_dir, variant).name if inspector_json else None,
            "sparse_layers": report,
        }
        write_json(metadata_path(engine_file), metadata)
        return BuildResult(engine_path=engine_file, metadata=metadata, sparse_layers=report)

    # ------------------------------------------------------------------- load
    def load(self, engine_path: Path, recipe) -> "TensorRTRunner":
        """The engine's runner; its batch range and input shape come from the engine's optimisation profile."""
        import tensorrt as trt

        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise PipelineError(f"engine {engine_path} does not exist; run the build stage first")
        if (old := _too_old(trt)) is not None:
            raise PipelineError(old)
        logger = process_logger(trt)
        with capture_log(logger) as lines:
            runtime = _start(trt, trt.Runtime, logger, lines, "runtime")
            engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise PipelineError(f"TensorRT cannot load {engine_path} ({_errors(lines)}); it was built by another "
                                "TensorRT version or GPU: rebuild it with the build stage")
        return TensorRTRunner(trt, engine, _cuda_stream(), _DEVICE, runtime=runtime)


def _hardware_level(trt, name: str, version: tuple[int, int]):
    """HardwareCompatibilityLevel member for build.hardware_compatibility; None leaves TensorRT's default."""
    if name not in HARDWARE_COMPATIBILITY:
        raise PipelineError(f"build.hardware_compatibility={name!r}; valid: {', '.join(HARDWARE_COMPATIBILITY)}")
    if name == "none":
        return None
    member, first = HARDWARE_COMPATIBILITY[name]
    level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), member, None)
    if level is None:
        raise PipelineError(f"build.hardware_compatibility={name} needs TensorRT >= {first[0]}.{first[1]}; this is "
                            f"TensorRT {trt.__version__}: upgrade it or set build.hardware_compatibility=none")
    return level


def _has_fp16_tensors(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    fp16 = onnx.TensorProto.FLOAT16
    if any(init.data_type == fp16 for init in model.graph.initializer):
        return True
    values = list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)
    return any(v.type.tensor_type.elem_type == fp16 for v in values)


def _add_profile(builder, network, config, cfg, recipe) -> tuple[str, list[int]]:
    """One optimisation profile over the batch axis of the (single) network input."""
    if network.num_inputs != 1:
        raise PipelineError(f"the ONNX graph has {network.num_inputs} inputs; this pipeline builds single-input models")
    tensor = network.get_input(0)
    dims = list(tensor.shape)
    if len(dims) != 1 + len(recipe.input_shape):
        raise PipelineError(f"ONNX input {tensor.name!r} has shape {dims}; expected [batch, "
                            f"{', '.join(map(str, recipe.input_shape))}] for recipe {recipe.name}")
    rest = [int(d) if int(d) > 0 else int(r) for d, r in zip(dims[1:], recipe.input_shape)]
    if int(dims[0]) > 0 and not cfg.min_batch == cfg.opt_batch == cfg.max_batch == int(dims[0]):
        raise PipelineError(f"ONNX input {tensor.name!r} has a fixed batch of {dims[0]}; re-export with a dynamic batch "
                            f"axis to build for batches {cfg.min_batch}..{cfg.max_batch}")
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, (cfg.min_batch, *rest), (cfg.opt_batch, *rest), (cfg.max_batch, *rest))
    config.add_optimization_profile(profile)
    return tensor.name, [-1, *rest]


def _attach_timing_cache(config, cache_file: Path) -> bool:
    """Start from the saved timing cache when it fits this GPU/TensorRT; else from an empty one."""
    if cache_file.is_file():
        cache = None
        with contextlib.suppress(Exception):  # a corrupt or foreign cache is only a slower build
            cache = config.create_timing_cache(cache_file.read_bytes())
        if cache is not None and config.set_timing_cache(cache, False):
            return True
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def _save_timing_cache(config, cache_file: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    with atomic_path(cache_file) as tmp:
        tmp.write_bytes(bytes(cache.serialize()))


def _inspect(trt, logger, lines: list[str], data: bytes) -> str | None:
    """Per-layer JSON of the built engine (layer names, tactics, HasSparseWeights, ONNX origin in Metadata)."""
    engine = _start(trt, trt.Runtime, logger, lines, "runtime").deserialize_cuda_engine(data)
    if engine is None:
        return None
    inspector = engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


# ------------------------------------------------------------------------ runner
class TorchCudaStream:
    """A non-default CUDA stream owned by torch, with event timing on it."""

    def __init__(self):
        import torch

        self._torch = torch
        self.stream = torch.cuda.Stream()
        self.handle = int(self.stream.cuda_stream)

    def scope(self):
        return self._torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def time_ms(self, fn) -> float:
        start = self._torch.cuda.Event(enable_timing=True)
        end = self._torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        fn()
        end.record(self.stream)
        end.synchronize()
        return float(start.elapsed_time(end))


def _cuda_stream():
    return TorchCudaStream()


def _torch_dtype(trt, dtype):
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    for name, torch_dtype in table.items():
        if getattr(trt.DataType, name, object()) == dtype:
            return torch_dtype
    raise PipelineError(f"engine tensor type {dtype} is not supported by this runner; export the model with float I/O")


class TensorRTRunner:
    """Runs a deserialized engine on one non-default stream, with buffers sized for the engine's largest batch.

    The batch range and input shape come from the engine's optimisation profile 0, not from the
    recipe, so an engine built with other settings still runs within what it was built for.
    Latency (`time_batch`) is the engine execution alone, measured with CUDA events on the runner's
    stream after warm-up; the input is already on the GPU (host copies are not in the figure).
    `layer_times` uses a second execution context with an IProfiler, keyed by TensorRT layer name.
    """

    def __init__(self, trt, engine, stream, device: str, runtime=None):
        import torch

        self._trt, self._torch, self.engine, self.stream, self.device = trt, torch, engine, stream, device
        self._runtime = runtime  # the engine must not outlive its runtime
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise PipelineError(f"engine has inputs {inputs} and outputs {outputs}; this runner needs one of each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        low, opt, high = _profile_shapes(engine, self.input_name)
        self.min_batch, self._opt_batch, self.max_batch = low[0], opt[0], high[0]
        self.sample_shape = high[1:]
        if low[1:] != high[1:]:
            raise PipelineError(f"engine input {self.input_name!r} allows shapes {low}..{high}; this runner needs "
                                "only the batch axis to vary: rebuild the engine with the build stage")
        self.context = engine.create_execution_context()
        self._input = torch.empty((self.max_batch, *self.sample_shape),
                                  dtype=_torch_dtype(trt, engine.get_tensor_dtype(self.input_name)), device=device)
        out_shape = self._set_shape(self.context, self.max_batch)
        self._output = torch.empty(out_shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(self.output_name)),
                                   device=device)
        self._batch = 0
        self._profile_context = None

    def _set_shape(self, context, n: int) -> list[int]:
        if not context.set_input_shape(self.input_name, (n, *self.sample_shape)):
            raise PipelineError(f"engine rejects batch {n} for input {self.input_name!r}; it was built for "
                                f"{self.min_batch}..{self.max_batch}")
        out_shape = [int(d) for d in context.get_tensor_shape(self.output_name)]
        if any(d < 0 for d in out_shape):
            raise PipelineError(f"engine output {self.output_name!r} has unresolved shape {out_shape}")
        return out_shape

    def _bind(self, context, n: int) -> list[int]:
        out_shape = self._set_shape(context, n)
        for name, buffer in ((self.input_name, self._input), (self.output_name, self._output)):
            if not context.set_tensor_address(name, int(buffer.data_ptr())):
                raise PipelineError(f"TensorRT rejected the device buffer for tensor {name!r}")
        return out_shape

    def _upload(self, batch: np.ndarray) -> list[int]:
        batch = np.asarray(batch)
        if batch.ndim != 1 + len(self.sample_shape) or list(batch.shape[1:]) != self.sample_shape:
            raise PipelineError(f"batch shape {list(batch.shape)} does not match the engine input "
                                f"[N, {', '.join(map(str, self.sample_shape))}]")
        n = int(batch.shape[0])
        if not self.min_batch <= n <= self.max_batch:
            raise PipelineError(f"batch of {n} is outside the engine's range {self.min_batch}..{self.max_batch}; "
                                "rebuild with a larger --set build.max_batch")
        host = self._torch.from_numpy(np.ascontiguousarray(batch)).to(self._input.dtype)
        with self.stream.scope():
            self._input[:n].copy_(host, non_blocking=True)
        self._batch = n
        return self._bind(self.context, n)

    def _execute(self, context=None) -> None:
        if not (self.context if context is None else context).execute_async_v3(self.stream.handle):
            raise PipelineError("TensorRT execute_async_v3 failed; see the TensorRT log above")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out_shape = self._upload(batch)
        count = int(np.prod(out_shape))
        with self.stream.scope():
            self._execute()
            result = self._output.reshape(-1)[:count].reshape(out_shape).to("cpu")
        self.stream.synchronize()
        return result.float().numpy()

    def time_batch(self, batch: np.ndarray, iterations: int, warmup: int) -> list[float]:
        self._upload(batch)
        with self.stream.scope():
            for _ in range(max(0, warmup)):
                self._execute()
            self.stream.synchronize()
            return [self.stream.time_ms(self._execute) for _ in range(iterations)]

    def layer_times(self, runs: int = 10) -> dict[str, float] | None:
        """Mean milliseconds per TensorRT layer over `runs` profiled executions (None if unsupported)."""
        if not hasattr(self._trt, "IProfiler"):
            return None
        if self._batch == 0:
            self._upload(np.zeros((self._opt_batch, *self.sample_shape), dtype=np.float32))
        if self._profile_context is None:
            self._layer_totals: dict[str, float] = {}
            self._profiler = _make_profiler(self._trt, self._layer_totals)
            self._profile_context = self.engine.create_execution_context()
            self._profile_context.profiler = self._profiler
        self._bind(self._profile_context, self._batch)
        with self.stream.scope():
            self._execute(self._profile_context)  # warm-up: its times are dropped below
            self.stream.synchronize()
            self._layer_totals.clear()
            for _ in range(runs):
                self._execute(self._profile_context)
            self.stream.synchronize()
        return {name: total / runs for name, total in self._layer_totals.items()} or None


def _profile_shapes(engine, name: str) -> tuple[list[int], list[int], list[int]]:
    """(min, opt, max) shape of an input in optimisation profile 0; a static input is its own range."""
    fixed = [int(d) for d in engine.get_tensor_shape(name)]
    if all(d > 0 for d in fixed):
        return fixed, fixed, fixed
    low, opt, high = ([int(d) for d in shape] for shape in engine.get_tensor_profile_shape(name, 0))
    return low, opt, high


def _make_profiler(trt, totals: dict[str, float]):
    class LayerProfiler(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name, ms):  # called by TensorRT after each profiled execution
            totals[layer_name] = totals.get(layer_name, 0.0) + float(ms)

    return LayerProfiler()
