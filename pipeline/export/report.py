"""The one owner of export.json: the ONNX files `export` wrote (sha256, bytes, checks) and its other results.

Written by export; build, verify and package read it through `ExportReport.load` and check the ONNX files they
use with `ExportReport.checked`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.records import StageReport


@dataclass
class ExportReport(StageReport):
    """export.json: the ONNX files (sha256, bytes, checks) and how they were exported and checked, typed."""

    STAGE = "export"
    dense_weights: str = ""  # where the dense weights came from
    sparse_weights: str = ""  # sparse.pt
    masks: str = ""  # masks.pt
    exporter: str = ""
    opset: int = 0  # the opset written
    opset_requested: int | None = None  # export.opset (None: the exporter's choice)
    n: int = 0
    m: int = 0
    io: dict[str, str] = field(default_factory=dict)  # input_name, output_name, dtype, note
    batchnorm: str = ""
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)  # precision -> atol, rtol
    nm_check: dict[str, dict[str, int]] = field(default_factory=dict)  # precision -> layers, ok
    layers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # precision -> per-layer N:M checks
    seconds: float = 0.0
