"""The one owner of bake.json: masks.pt and sparse.pt as `bake` wrote them (sha256, bytes) and its checks.

Written by bake; export and package read it through `BakeReport.load` and check masks.pt / sparse.pt with
`BakeReport.checked`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.records import StageReport


@dataclass
class BakeReport(StageReport):
    """bake.json: the files (masks.pt, sparse.pt) and the checks bake ran on them, typed."""

    STAGE = "bake"
    method: str = ""  # how the masks were made (the mask artifact's method)
    weights: str = ""  # the dense weights baked
    masks_source: str = ""  # the masks or checkpoint file baked
    layers_masked: int = 0
    density_in_masked_layers: float = 0.0
    all_nm_in_tensorrt_layout: bool = False
    kept_weights_bit_exact: bool = False
    other_tensors_unchanged: bool = False
    layers: list[dict[str, Any]] = field(default_factory=list)  # per layer: name, shape, density, nm_violations, ...
    batchnorm_reestimated: dict[str, Any] | None = None  # images, layers; None when the statistics were kept
