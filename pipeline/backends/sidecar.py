"""The one shape of an engine's sidecar JSON, for every backend: `EngineSidecar` (`<engine stem>.json` beside the
engine: TensorRT `dense.engine` -> `dense.json`, ONNX Runtime `dense.ort.onnx` -> `dense.ort.json`).

The sidecar is the one copy of what a build knows about its engine: build.json's entry for the engine keeps only
the sidecar's file name and sha256 (`sidecar`), never a second copy of its content. The fields every backend fills
come first; the TensorRT ones (GPU, compute capability, hardware compatibility, the four-part version a plan loads
in, the build log and inspector files) and the ONNX Runtime ones (execution providers, graph optimisation) are
empty where the backend has no such thing, and required on reading where it has
(`pipeline.backends.tensorrt.info.EngineInfo` builds and reads TensorRT's: the runner and the Triton packaging
read it; ONNX Runtime's is written for the record, nothing reads it back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from pipeline.errors import PipelineError
from pipeline.io import sha256_file, write_json
from pipeline.records import to_json, typed_from_json

REBUILD = "rebuild the engine with the build stage"


def sidecar_path(engine_file: Path) -> Path:
    """`dense.engine` -> `dense.json`; `dense.ort.onnx` -> `dense.ort.json`."""
    return Path(engine_file).with_suffix(".json")


@dataclass
class EngineSidecar:
    backend: str  # tensorrt | onnxruntime
    variant: str  # dense | sparse
    # the version of the runtime that built it; TensorRT: four parts, e.g. "10.13.3.9" (a plan loads only in the
    # TensorRT that built it; EngineInfo.tensorrt_version)
    runtime_version: str
    precision: str
    sparse_weights_flag: bool  # built with the runtime's sparse-weights setting (TensorRT SPARSE_WEIGHTS; ORT: none)
    batch: dict[str, int]  # min, opt, max
    input_name: str
    output_name: str
    input_shape: list[int]  # [-1, C, H, W]
    engine: str  # file name, beside the sidecar
    engine_sha256: str
    onnx: str  # the graph it was built from
    onnx_sha256: str
    build_seconds: float
    note: str = ""
    # TensorRT ("" / None / False elsewhere)
    gpu: str = ""
    compute_capability: str | None = None  # "8.6"
    hardware_compatibility: str = ""  # none | ampere_plus | same_compute_capability
    strongly_typed: bool = False
    build_log: str = ""
    inspector_json: str = ""
    sparse_layers: dict[str, Any] = field(default_factory=dict)
    # ONNX Runtime ([] / "" elsewhere)
    providers: list[str] = field(default_factory=list)
    graph_optimization: str = ""

    WHAT: ClassVar[str] = "an engine sidecar"
    # the fields a backend must fill (read back: a sidecar without one is refused)
    REQUIRED_BY_BACKEND: ClassVar[dict[str, tuple[str, ...]]] = {
        "tensorrt": (
            "gpu",
            "compute_capability",
            "hardware_compatibility",
            "strongly_typed",
            "build_log",
            "inspector_json",
        ),
        "onnxruntime": ("providers", "graph_optimization"),
    }

    def to_dict(self) -> dict[str, Any]:
        return to_json(self)

    def save(self, engine_file: Path) -> None:
        write_json(sidecar_path(engine_file), self.to_dict())

    def record(self, engine_file: Path) -> dict[str, Any]:
        """build.json's reference to the saved sidecar (its name and sha256), instead of a copy of it."""
        path = sidecar_path(engine_file)
        return {"file": path.name, "sha256": sha256_file(path)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Self:
        """The sidecar in DATA (read from WHERE): every field of its type, and the fields its backend fills there."""
        what = f"{where} is not {cls.WHAT}"
        sidecar = typed_from_json(cls, data, what, REBUILD)
        missing = [name for name in cls.REQUIRED_BY_BACKEND.get(sidecar.backend, ()) if name not in data]
        if missing:
            raise PipelineError(f"{what} (backend {sidecar.backend} but no {', '.join(missing)}); {REBUILD}")
        return sidecar
