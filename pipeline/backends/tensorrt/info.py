"""The one owner of a TensorRT engine's sidecar JSON (`<variant>.json` beside `<variant>.engine`).

Its shape is every backend's (`pipeline.backends.sidecar.EngineSidecar`); `EngineInfo` adds how TensorRT's build
fills it and reads it back. Written by the backend's build, read by its runner and by the Triton packaging
(pipeline/package/plans.py), which cannot open a plan without TensorRT and a GPU: the compute capability,
TensorRT version, batch range, tensors and hardware compatibility of a plan come from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.backends.sidecar import REBUILD, EngineSidecar, sidecar_path
from pipeline.io import read_json, sha256_file
from pipeline.recipe.config import BuildConfig

__all__ = ["EngineInfo", "engine_path", "inspector_path", "log_path", "sidecar_path"]


def engine_path(engine_dir: Path, variant: str) -> Path:
    return Path(engine_dir) / f"{variant}.engine"


def log_path(engine_dir: Path, variant: str) -> Path:
    return Path(engine_dir) / f"{variant}.trt.log"


def inspector_path(engine_dir: Path, variant: str) -> Path:
    """The engine inspector's per-layer JSON (for sparsity.module_layer_times)."""
    return Path(engine_dir) / f"{variant}.layers.json"


@dataclass
class EngineInfo(EngineSidecar):
    """A TensorRT engine's sidecar: the one sidecar shape (no field of its own), built from a TensorRT build."""

    WHAT: ClassVar[str] = "a TensorRT engine sidecar"

    @property
    def tensorrt_version(self) -> str:
        """Four parts, e.g. "10.13.3.9": a plan loads only in the TensorRT that built it."""
        return self.runtime_version

    @tensorrt_version.setter
    def tensorrt_version(self, version: str) -> None:
        self.runtime_version = version

    @classmethod
    def for_build(
        cls,
        cfg: BuildConfig,
        input_shape: Sequence[int],
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
        """The sidecar of an engine built with CFG (the recipe's build section) for samples of INPUT_SHAPE (C, H, W);
        OUTPUT_NAME is the graph's output (the engine's output tensor)."""
        return cls(
            backend="tensorrt",
            variant=variant,
            runtime_version=version,
            gpu=gpu["gpu"],
            compute_capability=gpu["compute_capability"],
            hardware_compatibility=cfg.hardware_compatibility,
            precision=cfg.precision,
            strongly_typed=strongly_typed,
            sparse_weights_flag=bool(sparse),
            batch={"min": cfg.min_batch, "opt": cfg.opt_batch, "max": cfg.max_batch},
            input_name=input_name,
            output_name=output_name,
            input_shape=[-1, *input_shape],
            engine=engine_file.name,
            engine_sha256=sha256_file(engine_file),
            onnx=str(onnx_path),
            onnx_sha256=sha256_file(onnx_path),
            build_seconds=round(build_seconds, 3),
            build_log=f"{variant}.trt.log",
            inspector_json=f"{variant}.layers.json",
            sparse_layers=sparse_layers,
        )

    @classmethod
    def load(cls, engine_file: Path) -> EngineInfo:
        path = sidecar_path(engine_file)
        return cls.from_dict(read_json(path, fix=REBUILD, what="TensorRT engine sidecar"), str(path))
