"""Inference backends, registered by name; a backend is offered only when its library imports.

Every backend builds an engine file from an ONNX file and loads it as a `Runner`. A build takes the recipe's build
section (`BuildConfig`) and the network's `InputSpec`, not the recipe (the stage passes those sections).
Backend modules import their optional libraries lazily (inside functions), so
`pipeline.backends` itself imports with nothing but the core dependencies.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.backends.sidecar import EngineSidecar
from pipeline.errors import PipelineError
from pipeline.recipe.config import BuildConfig, InputSpec


@dataclass
class BuildResult:
    engine_path: Path
    sidecar: EngineSidecar  # saved next to the engine (the one copy; build.json records its name and sha256)
    sparse_layers: dict[str, Any] = field(default_factory=dict)  # eligible / picked sparse kernels, if known

    def sidecar_record(self) -> dict[str, Any]:
        """build.json's entry for the sidecar: its file name and sha256, not a copy of its content."""
        return self.sidecar.record(self.engine_path)


class Runner(Protocol):
    input_name: str
    output_name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def time_batch(self, batch: np.ndarray, iterations: int, warmup: int) -> list[float]:
        """Latency of each of `iterations` runs in milliseconds, after `warmup` untimed runs."""
        ...

    def layer_times(self) -> dict[str, float] | None: ...


class Backend(Protocol):
    name: str
    has_sparse_kernels: bool

    def available(self) -> tuple[bool, str]: ...

    def onnx_for(self, paths, variant: str, config: BuildConfig) -> Path:
        """The exported ONNX file this backend builds `variant` from at build.precision (`config.precision`)."""
        ...

    def build(
        self, onnx_path: Path, engine_dir: Path, variant: str, config: BuildConfig, spec: InputSpec, sparse: bool
    ) -> BuildResult:
        """An engine of `variant` from ONNX_PATH under the build section CONFIG (precision, batch range,
        workspace, hardware compatibility) for the network SPEC describes (shape, tensor names)."""
        ...

    def load(self, engine_path: Path, recipe) -> Runner:
        """A runner over ENGINE_PATH; RECIPE (or None) only names the model in messages."""
        ...


# name -> module implementing `backend() -> Backend`
BACKENDS = {
    "onnxruntime": "pipeline.backends.onnxruntime",
    "tensorrt": "pipeline.backends.tensorrt",
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise PipelineError(f"unknown backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    module = importlib.import_module(BACKENDS[name])
    backend = module.backend()
    ok, reason = backend.available()
    if not ok:
        raise PipelineError(f"backend {name} is not usable here: {reason}")
    return backend


def pick_backend(requested: str) -> tuple[Backend, str]:
    """Resolve `auto`: tensorrt when it imports and a CUDA GPU is present, else onnxruntime (with why)."""
    if requested != "auto":
        return get_backend(requested), f"{requested} requested"
    trt = importlib.import_module(BACKENDS["tensorrt"]).backend()
    ok, reason = trt.available()
    if ok:
        return trt, "auto: TensorRT imports and a CUDA GPU is present"
    return get_backend("onnxruntime"), f"auto: onnxruntime, because tensorrt is not usable ({reason})"
