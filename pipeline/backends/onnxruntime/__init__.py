"""ONNX Runtime backend: CPU (and the CUDA execution provider when present).

ONNX Runtime has no sparse kernels: a 2:4 sparse graph runs exactly as fast as the dense
one. This backend verifies correctness and accuracy of the engines, never a speed-up.
The "engine" is the graph after ONNX Runtime's offline optimisations (extended level,
portable across machines), plus its sidecar JSON next to it (the one shape of every backend's:
pipeline/backends/sidecar.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.backends import BuildResult
from pipeline.backends.sidecar import EngineSidecar
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, sha256_file
from pipeline.recipe.config import BuildConfig, InputSpec

NO_SPARSE_KERNELS = "ONNX Runtime has no sparse kernels: it checks correctness and accuracy, not speed-up"


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _session_options(level: str = "all", profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    # Dense and sparse sessions alternate during timing: a spinning thread pool of one would steal
    # cores from the other, so pools sleep when idle.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def _session(path: Path, options, providers: list[str]):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for damaged or foreign files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(
            f"ONNX Runtime cannot load {path} ({first[:200]}); the file is damaged or not ONNX — "
            "re-run export and build"
        ) from None


class OrtRunner:
    def __init__(self, path: Path, providers: list[str]) -> None:
        self.path = Path(path)
        self.providers = providers
        self.session = _session(self.path, _session_options("all"), providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._last_shape: tuple[int, ...] | None = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]

    def time_batch(self, batch: np.ndarray, iterations: int, warmup: int) -> list[float]:
        feed = {self.input_name: np.ascontiguousarray(batch, np.float32)}
        self._last_shape = tuple(batch.shape)
        for _ in range(warmup):
            self.session.run([self.output_name], feed)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            self.session.run([self.output_name], feed)
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def layer_times(self) -> dict[str, float] | None:
        """Mean milliseconds per graph node ("name (op)") from ONNX Runtime's profiler, in a separate short session.

        Names are those of the optimised graph: ONNX Runtime fuses and renames nodes (e.g. Conv+Relu).
        """
        if self._last_shape is None:
            return None
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            session = _session(self.path, _session_options("all", str(Path(folder) / "ort")), self.providers)
            feed = {self.input_name: np.zeros(self._last_shape, np.float32)}
            runs = 3
            session.run([self.output_name], feed)  # warm-up, also profiled; subtracted below by averaging
            for _ in range(runs):
                session.run([self.output_name], feed)
            profile = Path(session.end_profiling())
            events = json.loads(profile.read_text())
        totals: dict[str, float] = {}
        for event in events:
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                node = event["name"].removesuffix("_kernel_time")
                op = event.get("args", {}).get("op_name")
                node = f"{node} ({op})" if op else node
                totals[node] = totals.get(node, 0.0) + event.get("dur", 0) / 1e3
        return {node: total / (runs + 1) for node, total in totals.items()} or None


class OnnxRuntimeBackend:
    name = "onnxruntime"
    has_sparse_kernels = False

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime)"
        return True, f"onnxruntime {ort.__version__} with {', '.join(_providers())}"

    def onnx_for(self, paths, variant: str, config: BuildConfig) -> Path:
        """The FP32 graph at every build.precision: on CPU the reduced precisions would only measure ONNX
        Runtime's emulation (verify reports INT8 accuracy from the Q/DQ graphs separately)."""
        return Path(getattr(paths, f"{variant}_onnx"))

    def build(
        self, onnx_path: Path, engine_dir: Path, variant: str, config: BuildConfig, spec: InputSpec, sparse: bool
    ) -> BuildResult:
        import onnxruntime as ort

        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise PipelineError(f"{onnx_path} does not exist; run `python -m pipeline export --model {spec.model}`")
        engine_path = Path(engine_dir) / f"{variant}.ort.onnx"
        providers = _providers()
        started = time.time()
        with atomic_path(engine_path) as tmp:
            options = _session_options("extended")
            options.optimized_model_filepath = str(tmp)
            # Optimise with the CPU provider only: the saved graph then runs on any provider.
            session = _session(onnx_path, options, ["CPUExecutionProvider"])
            if not tmp.stat().st_size:
                raise PipelineError(f"ONNX Runtime wrote no optimised graph for {onnx_path}")
        sidecar = EngineSidecar(
            backend=self.name,
            variant=variant,
            runtime_version=ort.__version__,
            precision=_graph_precision(onnx_path),
            sparse_weights_flag=False,  # ONNX Runtime has no sparse-weights setting (nor sparse kernels)
            batch={"min": config.min_batch, "opt": config.opt_batch, "max": config.max_batch},
            input_name=session.get_inputs()[0].name,
            output_name=session.get_outputs()[0].name,
            input_shape=[-1, *(dim if isinstance(dim, int) else -1 for dim in session.get_inputs()[0].shape[1:])],
            engine=engine_path.name,
            engine_sha256=sha256_file(engine_path),
            onnx=str(onnx_path),
            onnx_sha256=sha256_file(onnx_path),
            build_seconds=round(time.time() - started, 3),
            note=NO_SPARSE_KERNELS,
            providers=providers,
            graph_optimization="ORT_ENABLE_EXTENDED (saved), ORT_ENABLE_ALL at load",
        )
        sidecar.save(engine_path)
        return BuildResult(engine_path, sidecar, {"eligible": [], "picked_sparse": [], "note": NO_SPARSE_KERNELS})

    def load(self, engine_path: Path, recipe) -> OrtRunner:
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise PipelineError(
                f"engine {engine_path} does not exist; run `python -m pipeline build --model "
                f"{getattr(recipe, 'name', 'MODEL')}`"
            )
        return OrtRunner(engine_path, _providers())


def _graph_precision(path: Path) -> str:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return "unknown"
    props = {prop.key: prop.value for prop in model.metadata_props}
    return props.get("precision", "fp32")


def backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend()
