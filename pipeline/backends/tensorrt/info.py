"""The one owner of a TensorRT engine's sidecar JSON (`<variant>.json` beside `<variant>.engine`).

Written by the backend's build, read by its runner and by the Triton packaging (pipeline/package/plans.py),
which cannot open a plan without TensorRT and a GPU: the compute capability, TensorRT version, batch
range, tensors and hardware compatibility of a plan come from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import sha256_file, write_json


def engine_path(engine_dir: Path, variant: str) -> Path:
    return Path(engine_dir) / f"{variant}.engine"


def sidecar_path(engine_file: Path) -> Path:
    return Path(engine_file).with_suffix(".json")


def log_path(engine_dir: Path, variant: str) -> Path:
    return Path(engine_dir) / f"{variant}.trt.log"


def inspector_path(engine_dir: Path, variant: str) -> Path:
    """The engine inspector's per-layer JSON (for sparsity.module_layer_times)."""
    return Path(engine_dir) / f"{variant}.layers.json"


@dataclass
class EngineInfo:
    backend: str
    variant: str
    tensorrt_version: str  # four parts, e.g. "10.13.3.9": a plan loads only in the TensorRT that built it
    gpu: str
    compute_capability: str | None  # "8.6"
    hardware_compatibility: str  # none | ampere_plus | same_compute_capability
    precision: str
    strongly_typed: bool
    sparse_weights_flag: bool
    batch: dict[str, int]  # min, opt, max
    input_name: str
    output_name: str
    input_shape: list[int]  # [-1, C, H, W]
    engine: str  # file name
    engine_sha256: str
    onnx: str
    onnx_sha256: str
    build_seconds: float
    build_log: str
    inspector_json: str
    sparse_layers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_build(
        cls,
        recipe,
        variant: str,
        onnx_path: Path,
        engine_file: Path,
        version: str,
        gpu: dict[str, Any],
        sparse: bool,
        input_name: str,
        strongly_typed: bool,
        build_seconds: float,
        sparse_layers: dict[str, Any],
        output_name: str | None = None,
    ) -> EngineInfo:
        """OUTPUT_NAME: the graph's output (the engine's output tensor); the recipe's export.output_name if not given."""
        return cls._for_build(
            recipe,
            variant,
            onnx_path,
            engine_file,
            version,
            gpu,
            sparse,
            input_name,
            strongly_typed,
            build_seconds,
            sparse_layers,
            output_name or recipe.export.output_name,
        )

    @classmethod
    def _for_build(
        cls,
        recipe,
        variant: str,
        onnx_path: Path,
        engine_file: Path,
        version: str,
        gpu: dict[str, Any],
        sparse: bool,
        input_name: str,
        strongly_typed: bool,
        build_seconds: float,
        sparse_layers: dict[str, Any],
        output_name: str,
    ) -> EngineInfo:
        cfg = recipe.build
        return cls(
            backend="tensorrt",
            variant=variant,
            tensorrt_version=version,
            gpu=gpu["gpu"],
            compute_capability=gpu["compute_capability"],
            hardware_compatibility=cfg.hardware_compatibility,
            precision=cfg.precision,
            strongly_typed=strongly_typed,
            sparse_weights_flag=bool(sparse),
            batch={"min": cfg.min_batch, "opt": cfg.opt_batch, "max": cfg.max_batch},
            input_name=input_name,
            output_name=output_name,
            input_shape=[-1, *recipe.input_shape],
            engine=engine_file.name,
            engine_sha256=sha256_file(engine_file),
            onnx=str(onnx_path),
            onnx_sha256=sha256_file(onnx_path),
            build_seconds=round(build_seconds, 3),
            build_log=f"{variant}.trt.log",
            inspector_json=f"{variant}.layers.json",
            sparse_layers=sparse_layers,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, engine_file: Path) -> None:
        write_json(sidecar_path(engine_file), self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, where: str) -> EngineInfo:
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n != "sparse_layers" and not (isinstance(data, dict) and n in data))
        if missing:
            raise PipelineError(
                f"{where} is not a TensorRT engine sidecar (missing {', '.join(missing)}); rebuild the "
                "engine with the build stage"
            )
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, engine_file: Path) -> EngineInfo:
        path = sidecar_path(engine_file)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PipelineError(
                f"{path} cannot be read ({type(exc).__name__}); rebuild the engine with the build stage"
            ) from None
        return cls.from_dict(data, str(path))
