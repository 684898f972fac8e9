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

import time
from pathlib import Path
from typing import Any

from pipeline.backends import BuildResult
from pipeline.backends.build_report import VARIANTS
from pipeline.backends.tensorrt.info import EngineInfo, engine_path, inspector_path, log_path, sidecar_path
from pipeline.backends.tensorrt.log import captured_log, errors_in
from pipeline.backends.tensorrt.parser_support import MIN_VERSION, check_parsable
from pipeline.backends.tensorrt.runner import TensorRTRunner, make_profiler
from pipeline.backends.tensorrt.sparsity import OnnxNameMap, sparse_layer_report
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, ensure_dir, write_text
from pipeline.recipe.config import BuildConfig, InputSpec

TIMING_CACHE = "timing.cache"
# The oldest Polygraphy with every attribute this backend reads (G_LOGGER.use_python_logging_system is missing
# from 0.49.0-0.49.12, the versions in the TensorRT 10.0/10.2 containers; checked in the 0.49.9 and 0.49.14
# wheels on PyPI). pyproject.toml's extras carry the same floor (tests/test_trt_timing.py compares them).
POLYGRAPHY_MIN = (0, 49, 14)
POLYGRAPHY_ATTRIBUTES = ("use_python_logging_system", "module_severity", "colors", "EXTRA_VERBOSE")
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


def check_polygraphy(package=None) -> str:
    """Polygraphy's version, or one line saying it is missing or too old (before any build or runner starts)."""
    try:
        import polygraphy
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise PipelineError(f"polygraphy is not installed ({exc}); pip install 'polygraphy>={_floor()}'") from None
    version = str(getattr(package or polygraphy, "__version__", "0"))
    try:
        parts = tuple(int(part) for part in version.split(".")[:3])
    except ValueError:
        parts = (0,)
    missing = [name for name in POLYGRAPHY_ATTRIBUTES if not hasattr(G_LOGGER, name)]
    if parts < POLYGRAPHY_MIN or missing:
        lacking = f" (its logger has no {', '.join(missing)})" if missing else ""
        raise PipelineError(f"polygraphy {version} is too old{lacking}; pip install 'polygraphy>={_floor()}'")
    return version


def _floor() -> str:
    return ".".join(map(str, POLYGRAPHY_MIN))


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


def preflight(config: BuildConfig, paths) -> tuple[dict[str, Path], tuple[tuple[int, int], str]]:
    """The graphs a TensorRT build reads ({variant: onnx}) and the target TensorRT, without TensorRT or a GPU."""
    version, target = target_version()
    return {v: onnx_for_precision(paths, v, config.precision, version[0]) for v in VARIANTS}, (version, target)


def precision_flags(precision: str, version: tuple[int, int]) -> dict[str, bool]:
    """CreateConfig precision arguments. Weakly typed 10.x needs INT8 for a Q/DQ graph and FP16 so layers outside
    Q/DQ pairs are not left in FP32 (flags deprecated since 10.12); 11 is strongly typed and takes none."""
    if version >= (11, 0):
        return {}
    return {"fp32": {}, "fp16": {"fp16": True}, "int8": {"int8": True, "fp16": True}}[precision]


def onnx_output(onnx_path: Path) -> str:
    """The name of the graph's first output (the logits), as the engine will name its output tensor."""
    import onnx

    outputs = onnx.load(str(onnx_path), load_external_data=False).graph.output
    if not outputs:
        raise PipelineError(f"{onnx_path} has no outputs; re-export the model")
    return outputs[0].name


def onnx_input(onnx_path: Path, config: BuildConfig, spec: InputSpec) -> tuple[str, list[int]]:
    """(name, [batch, *sample shape]) of the graph's one input; refuses a fixed batch the build's range cannot use."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = [i for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    if len(inputs) != 1:
        raise PipelineError(f"{onnx_path} has {len(inputs)} inputs; this pipeline builds single-input models")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 1 + len(spec.shape):
        raise PipelineError(
            f"ONNX input {inputs[0].name!r} has shape {dims}; expected [batch, "
            f"{', '.join(map(str, spec.shape))}] for recipe {spec.model}"
        )
    cfg = config
    if dims[0] > 0 and not cfg.min_batch == cfg.opt_batch == cfg.max_batch == dims[0]:
        raise PipelineError(
            f"ONNX input {inputs[0].name!r} has a fixed batch of {dims[0]}; re-export with a dynamic "
            f"batch axis to build for batches {cfg.min_batch}..{cfg.max_batch}"
        )
    return inputs[0].name, [-1] + [d if d > 0 else r for d, r in zip(dims[1:], spec.shape)]


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


def build_engine(trt, onnx_path: Path, engine_file: Path, cfg: BuildConfig, spec: InputSpec, sparse: bool, cache: Path):
    """Parse, configure, build and save through Polygraphy's loaders; returns the ICudaEngine."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    version = trt_version(trt)
    name, shape = onnx_input(onnx_path, cfg, spec)
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


def gpu_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


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
            check_polygraphy()
        except (PipelineError, ImportError) as exc:
            return False, str(exc)
        if not gpu_visible():
            return False, "no CUDA GPU is visible to torch"
        return True, f"tensorrt {trt.__version__}"

    def onnx_for(self, paths, variant: str, config: BuildConfig) -> Path:
        return onnx_for_precision(paths, variant, config.precision, trt_version(import_tensorrt())[0])

    def build(
        self, onnx_path: Path, engine_dir: Path, variant: str, config: BuildConfig, spec: InputSpec, sparse: bool
    ) -> BuildResult:
        trt = import_tensorrt()
        check_polygraphy()
        onnx_path, engine_dir, version = Path(onnx_path), ensure_dir(Path(engine_dir)), trt_version(trt)
        check_parsable([onnx_path], version, f"TensorRT {trt.__version__}")
        hardware_level(trt, config.hardware_compatibility)
        engine_file, log_file = engine_path(engine_dir, variant), log_path(engine_dir, variant)
        start = time.perf_counter()
        with captured_log() as lines:
            try:
                engine = build_engine(trt, onnx_path, engine_file, config, spec, sparse, engine_dir / TIMING_CACHE)
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
            lines, layers_json, OnnxNameMap.from_onnx(onnx_path), quantized=config.precision == "int8"
        )
        info = EngineInfo.for_build(
            config,
            list(spec.shape),
            variant,
            onnx_path,
            engine_file,
            str(trt.__version__),
            gpu_info(),
            sparse=sparse,
            input_name=onnx_input(onnx_path, config, spec)[0],
            output_name=onnx_output(onnx_path),
            strongly_typed=version >= (11, 0),
            build_seconds=seconds,
            sparse_layers=report,
        )
        info.save(engine_file)
        return BuildResult(engine_path=engine_file, sidecar=info, sparse_layers=report)

    def load(self, engine_path: Path, recipe) -> TensorRTRunner:
        """A runner over any plan: I/O and batch range from the engine; the sidecar, where one exists, adds the
        pipeline's own record (a plan from another tool has none and needs none)."""
        import_tensorrt()
        check_polygraphy()
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise PipelineError(f"engine {engine_path} does not exist; run the build stage first")
        info = EngineInfo.load(engine_path) if sidecar_path(engine_path).exists() else None
        return TensorRTRunner(engine_path, info)


__all__ = ["TensorRTBackend", "TensorRTRunner", "captured_log", "errors_in", "make_profiler"]
