"""The dense/sparse pair verify --dense/--sparse gates, once both files are checked (ONNX graphs or TensorRT plans)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.verify import layout as layouts


@dataclass
class Pair:
    """The dense and sparse model, checked: their input shape, classes, and the sparse model's layout."""

    kind: str  # "onnx" | "tensorrt plan"
    dense: Path
    sparse: Path
    input_shape: list[int]
    num_classes: int
    layout: layouts.LayoutReport | None
    runners: dict[str, Any] | None = None  # plans are loaded while checking them
    plan_layers: dict[str, Any] | None = None
