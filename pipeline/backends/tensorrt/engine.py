"""TensorRT backend: ONNX -> engine (2:4 sparse kernels allowed on the sparse build) -> Runner, through Polygraphy.

Polygraphy's loaders do the version plumbing (NetworkFromOnnxPath: explicit batch / strongly typed;
CreateConfig: sparse weights, precision flags, profile, hardware compatibility, timing cache;
EngineFromNetwork, SaveEngine; TrtRunner). This module adds what Polygraphy does not: the recipe's
rules for which graph and flags a precision uses, the captured "(Sparsity)" builder lines, the
inspector's per-layer JSON, per-layer times and the engine sidecar (EngineInfo).
TensorRT >= 10.0 (docs/tensorrt.md says why not 8.x). No machine of this project has run this module
on a GPU yet: its CPU tests use Polygraphy's real config, network and logger objects and fake only the
calls that need libnvinfer and a GPU (EngineFromNetwork, SaveEngine, TrtRunner) and TensorRT's enums.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends import BuildResult
from pipeline.backends.build_report import VARIANTS
from pipeline.backends.tensorrt.info import EngineInfo, engine_path, inspector_path, log_path
from pipeline.backends.tensorrt.parser_support import MIN_VERSION, check_parsable
from pipeline.backends.tensorrt.sparsity import OnnxNameMap, sparse_layer_report
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, ensure_dir, write_text

TIMING_CACHE = "timing.cache"
# build.hardware_compatibility -> HardwareCompatibilityLevel member (AMPERE_PLUS from 8.6, SAME_COMPUTE_CAPABILITY 10.9)
HARDWARE_LEVELS = {"none": None, "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


def trt_version(trt: Any) -> tuple[int, int]:
    """(major, minor) of the installed TensorRT; (0, 0) if unreadable."""
    try:
        major, minor = str(trt.__version__).split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return 0, 0


def import_tensorrt():
    """tensorrt, or one line saying plainly that it is not installed / too old."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken CUDA install raising OSError
        raise PipelineError(
            f"TensorRT is not installed here (import tensorrt: {type(exc).__name__}: "
            f"{str(exc)[:100]}); on a machine with an NVIDIA GPU: pip install tensorrt-cu12"
        ) from None
    if trt_version(trt) < MIN_VERSION:
        raise PipelineError(
            f"tensorrt {getattr(trt, '__version__', '?')} is too old; this pipeline needs TensorRT >= "
            f"{MIN_VERSION[0]}.{MIN_VERSION[1]} (pip install 'tensorrt-cu12>=10'; docs/tensorrt.md)"
        )
    return trt


def onnx_for_precision(paths, variant: str, precision: str, major: int) -> Path:
    """The ONNX a TensorRT `major` build of `variant` at `precision` starts from: int8 -> the Q/DQ graph on every
    version; fp16 -> the FP16 graph on 11 (no FP16 flag), the FP32 graph with the FP16 flag on 10; fp32 -> FP32."""
    if precision == "int8":
        return paths.int8_onnx(variant)
    if precision == "fp16" and major >= 11:
        return Path(getattr(paths, f"{variant}_onnx_fp16"))
    return Path(getattr(paths, f"{variant}_onnx"))


def target_version() -> tuple[tuple[int, int], str]:
    """The TensorRT a build targets: the installed one, else the oldest supported (for the check before a build)."""
    try:
        trt = import_tensorrt()
    except PipelineError:
        return MIN_VERSION, f"TensorRT {MIN_VERSION[0]}.{MIN_VERSION[1]} (the oldest supported; none is installed here)"
    return trt_version(trt), f"TensorRT {trt.__version__}"


def preflight(recipe, paths) -> tuple[dict[str, Path], tuple[tuple[int, int], str]]:
    """The graphs a TensorRT build reads ({variant: onnx}) and the target TensorRT, without TensorRT or a GPU."""
    version, target = target_version()
    return {v: onnx_for_precision(paths, v, recipe.build.precision, version[0]) for v in VARIANTS}, (version, target)


def precision_flags(precision: str, version: tuple[int, int]) -> dict[str, bool]:
    """CreateConfig precision arguments. Weakly typed 10.x needs INT8 for a Q/DQ graph and FP16 so layers outside
    Q/DQ pairs are not left in FP32 (flags deprecated since 10.12); 11 is strongly typed and takes none."""
    if version >= (11, 0):
        return {}
    return {"fp32": {}, "fp16": {"fp16": True}, "int8": {"int8": True, "fp16": True}}[precision]


def onnx_input(onnx_path: Path, recipe) -> tuple[str, list[int]]:
    """(name, [batch, *sample shape]) of the graph's one input; refuses a fixed batch the recipe's range cannot use."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = [i for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    if len(inputs) != 1:
        raise PipelineError(f"{onnx_path} has {len(inputs)} inputs; this pipeline builds single-input models")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 1 + len(recipe.input_shape):
        raise PipelineError(
            f"ONNX input {inputs[0].name!r} has shape {dims}; expected [batch, "
            f"{', '.join(map(str, recipe.input_shape))}] for recipe {recipe.name}"
        )
    cfg = recipe.build
    if dims[0] > 0 and not cfg.min_batch == cfg.opt_batch == cfg.max_batch == dims[0]:
        raise PipelineError(
            f"ONNX input {inputs[0].name!r} has a fixed batch of {dims[0]}; re-export with a dynamic "
            f"batch axis to build for batches {cfg.min_batch}..{cfg.max_batch}"
        )
    return inputs[0].name, [-1] + [d if d > 0 else r for d, r in zip(dims[1:], recipe.input_shape)]


@contextlib.contextmanager
def captured_log():
    """Polygraphy's log (TensorRT's lines among it) into a list instead of stdout: INFO and above, and "(Sparsity)"
    lines at any severity (their severity differs between versions)."""
    from polygraphy.logger import G_LOGGER

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if record.levelno >= logging.DEBUG or "(Sparsity)" in text:
                lines.append(text)

    saved = G_LOGGER.use_python_logging_system, G_LOGGER.module_severity, G_LOGGER.colors
    G_LOGGER.use_python_logging_system, G_LOGGER.module_severity = True, G_LOGGER.EXTRA_VERBOSE
    G_LOGGER.colors = False  # no escape codes in the log file
    logger, handler = logging.getLogger("Polygraphy"), Keep(level=1)
    saved_logger = logger.level, logger.propagate
    logger.setLevel(1)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved_logger
        G_LOGGER.use_python_logging_system, G_LOGGER.module_severity, G_LOGGER.colors = saved


def errors_in(lines: list[str], limit: int = 3) -> str:
    """The last error lines of a captured log ("" when there is none)."""
    bad = [line for line in lines if line.lstrip().startswith(("[E]", "[!]"))]
    return " | ".join(bad[-limit:])


def hardware_level(trt, name: str):
    """HardwareCompatibilityLevel member for build.hardware_compatibility (None: TensorRT's default)."""
    member = HARDWARE_LEVELS[name]
    if member is None:
        return None
    if not hasattr(trt.HardwareCompatibilityLevel, member):
        raise PipelineError(
            f"build.hardware_compatibility={name} needs a newer TensorRT than {trt.__version__} "
            "(SAME_COMPUTE_CAPABILITY exists from 10.9): upgrade it or set build.hardware_compatibility"
            "=ampere_plus or none"
        )
    return getattr(trt.HardwareCompatibilityLevel, member)


def build_engine(trt, onnx_path: Path, engine_file: Path, recipe, sparse: bool, cache: Path):
    """Parse, configure, build and save through Polygraphy's loaders; returns the ICudaEngine."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    cfg, version = recipe.build, trt_version(trt)
    name, shape = onnx_input(onnx_path, recipe)
    rest = shape[1:]
    profile = Profile().add(name, min=[cfg.min_batch, *rest], opt=[cfg.opt_batch, *rest], max=[cfg.max_batch, *rest])
    config = CreateConfig(
        sparse_weights=sparse,
        profiles=[profile],
        **precision_flags(cfg.precision, version),
        hardware_compatibility_level=hardware_level(trt, cfg.hardware_compatibility),
        tf32=True,  # TensorRT allows TF32 by default; Polygraphy clears it unless asked
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(cfg.workspace_mib) << 20},
        load_timing_cache=str(cache) if cache.is_file() else None,
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=version >= (11, 0))
    engine = EngineFromNetwork(network, config=config, save_timing_cache=str(cache))()
    with atomic_path(engine_file) as tmp:
        SaveEngine(engine, str(tmp))()
    return engine


def inspect(trt, engine) -> str:
    """Per-layer JSON of the built engine (layer names, tactics, HasSparseWeights, ONNX origin in Metadata)."""
    return engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)


def gpu_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": "unknown (torch sees no CUDA GPU)", "compute_capability": None}
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


class TensorRTBackend:
    name = "tensorrt"
    has_sparse_kernels = True

    def available(self) -> tuple[bool, str]:
        try:
            trt = import_tensorrt()
            import polygraphy  # noqa: F401
            import torch
        except (PipelineError, ImportError) as exc:
            return False, str(exc)
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch"
        return True, f"tensorrt {trt.__version__}"

    def onnx_for(self, paths, variant: str, recipe) -> Path:
        return onnx_for_precision(paths, variant, recipe.build.precision, trt_version(import_tensorrt())[0])

    def build(self, onnx_path: Path, engine_dir: Path, variant: str, recipe, sparse: bool) -> BuildResult:
        trt = import_tensorrt()
        onnx_path, engine_dir, version = Path(onnx_path), ensure_dir(Path(engine_dir)), trt_version(trt)
        check_parsable([onnx_path], version, f"TensorRT {trt.__version__}")
        hardware_level(trt, recipe.build.hardware_compatibility)
        engine_file, log_file = engine_path(engine_dir, variant), log_path(engine_dir, variant)
        start = time.perf_counter()
        with captured_log() as lines:
            try:
                engine = build_engine(trt, onnx_path, engine_file, recipe, sparse, engine_dir / TIMING_CACHE)
                layers_json = inspect(trt, engine)
            except Exception as exc:  # PolygraphyException carries the parser/builder error; the lines say more
                write_text(log_file, "\n".join(lines) + "\n")
                engine_file.unlink(missing_ok=True)
                if isinstance(exc, PipelineError):
                    raise
                raise PipelineError(
                    f"TensorRT could not build the {variant} engine from {onnx_path.name}: "
                    f"{errors_in(lines) or exc} (log: {log_file})"
                ) from None
        seconds = time.perf_counter() - start
        write_text(log_file, "\n".join(lines) + "\n")
        write_text(inspector_path(engine_dir, variant), layers_json)
        report = sparse_layer_report(
            lines, layers_json, OnnxNameMap.from_onnx(onnx_path), quantized=recipe.build.precision == "int8"
        )
        info = EngineInfo.for_build(
            recipe,
            variant,
            onnx_path,
            engine_file,
            str(trt.__version__),
            gpu_info(),
            sparse=sparse,
            input_name=onnx_input(onnx_path, recipe)[0],
            strongly_typed=version >= (11, 0),
            build_seconds=seconds,
            sparse_layers=report,
        )
        info.save(engine_file)
        return BuildResult(engine_path=engine_file, metadata=info.to_dict(), sparse_layers=report)

    def load(self, engine_path: Path, recipe) -> TensorRTRunner:
        import_tensorrt()
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise PipelineError(f"engine {engine_path} does not exist; run the build stage first")
        return TensorRTRunner(engine_path, EngineInfo.load(engine_path))


class TensorRTRunner:
    """Polygraphy's TrtRunner over one engine, with the batch range and input shape its sidecar records.

    `time_batch` is TrtRunner's own inference time of each call, inputs already on the GPU and outputs left
    there. `layer_times` attaches an IProfiler to the runner's one execution context (no second context, so
    no question which optimisation profile it gets); call it after the timed runs.
    """

    def __init__(self, engine_path: Path, info: EngineInfo):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.info, self.input_name, self.output_name = info, info.input_name, info.output_name
        self.min_batch, self.max_batch, self.sample_shape = info.batch["min"], info.batch["max"], info.input_shape[1:]
        lines: list[str] = []
        try:
            with captured_log() as lines:
                self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
                self._runner.activate()
        except Exception:
            said = errors_in(lines) or "no error line"
            raise PipelineError(
                f"TensorRT cannot load {engine_path} ({said}); it was built by another TensorRT "
                "version or GPU: rebuild it with the build stage"
            ) from None

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
        feed = self._feed(np.ascontiguousarray(batch, dtype=np.float32))
        return np.asarray(self._runner.infer(feed)[self.output_name], dtype=np.float32)

    def time_batch(self, batch: np.ndarray, iterations: int, warmup: int) -> list[float]:
        import torch

        feed = self._feed(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda())
        times = []
        for index in range(max(0, warmup) + iterations):
            self._runner.infer(feed, copy_outputs_to_host=False)
            if index >= warmup:
                times.append(self._runner.last_inference_time() * 1e3)
        return times

    def layer_times(self, runs: int = 10) -> dict[str, float] | None:
        """Mean milliseconds per TensorRT layer over `runs` profiled executions (the first run is dropped)."""
        import tensorrt as trt

        totals: dict[str, float] = {}
        self._runner.context.profiler = make_profiler(trt, totals)
        feed = self._feed(np.zeros((self.info.batch["opt"], *self.sample_shape), dtype=np.float32))
        self._runner.infer(feed, copy_outputs_to_host=False)
        totals.clear()
        for _ in range(runs):
            self._runner.infer(feed, copy_outputs_to_host=False)
        return {name: total / runs for name, total in totals.items()} or None


def make_profiler(trt, totals: dict[str, float]):
    class LayerProfiler(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name, ms):  # called by TensorRT after each profiled execution
            totals[layer_name] = totals.get(layer_name, 0.0) + float(ms)

    return LayerProfiler()
