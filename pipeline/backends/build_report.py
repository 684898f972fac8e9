"""The one owner of build.json (what `build` made: backend, why, engine files with their sha256).

Written by the build stage; verify, engine and the Triton packaging read it through `BuildReport.load`.
Engine paths are stored relative to the model folder, so the folder can be moved or copied whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import write_json
from pipeline.records import load_report, typed_from_json, verify_recorded

VARIANTS = ("dense", "sparse")
REQUIRED = {"model": str, "backend": str, "has_sparse_kernels": bool, "batch_range": list, "engines": dict}


@dataclass
class BuildReport:
    model: str
    backend: str
    requested: str
    reason: str
    has_sparse_kernels: bool
    inputs: str  # which ONNX files the engines were built from, and why those
    batch_range: list[int]  # min, opt, max
    note: str
    # variant -> {engine, sha256, onnx, onnx_sha256, sidecar: {file, sha256}, sparse_layers}
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    # what TensorRT's ONNX parser could not read in the graphs built, for any backend:
    # {"target": "TensorRT 10.0 (...)", "problems": {variant: ["Unique (node '/x')", ...]}}
    tensorrt_parser: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path, model: str) -> BuildReport:
        rebuild = f"re-run `python -m pipeline build --model {model}`"
        data = load_report(path, "build", model, REQUIRED)
        report = typed_from_json(cls, data, f"{path} is not a build report", rebuild)  # every field of its type
        for variant in VARIANTS:
            entry = report.engines.get(variant)
            if not isinstance(entry, dict) or not isinstance(entry.get("engine"), str):
                raise PipelineError(f"{path} has no {variant} engine; {rebuild}")
        return report

    def engine_path(self, variant: str, root: Path) -> Path:
        """An engine path (relative to the model folder, or absolute)."""
        path = Path(self.engines[variant]["engine"])
        return path if path.is_absolute() else Path(root) / path

    def checked_engine(self, variant: str, root: Path) -> Path:
        """The engine file, refused when it is missing or differs from what build wrote."""
        return verify_recorded(self.engine_path(variant, root), self.engines[variant], "build", self.model)
