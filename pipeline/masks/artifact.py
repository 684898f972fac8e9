"""The mask artifact (`masks.pt`): compact, versioned, independent of the weights.

Per layer it stores name, weight shape, N:M and one small integer per block (the
pattern index), so the same masks can be re-applied to updated weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io import torch_load, torch_save
from pipeline.masks.patterns import blocks_shape, mask_from_indices, num_patterns

FORMAT = "nm-mask-artifact"
VERSION = 1


@dataclass
class LayerMask:
    name: str
    shape: list[int]
    n: int
    m: int
    indices: torch.Tensor  # [K, *kernel, C // m] pattern indices

    def mask(self) -> torch.Tensor:
        return mask_from_indices(self.indices, self.n, self.m)


@dataclass
class MaskArtifact:
    model: str
    arch: str
    method: str
    layers: list[LayerMask]
    meta: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, LayerMask]:
        return {layer.name: layer for layer in self.layers}

    def save(self, path: Path) -> None:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "arch": self.arch,
            "method": self.method,
            "meta": self.meta,
            "layers": [
                {
                    "name": layer.name,
                    "shape": list(layer.shape),
                    "n": layer.n,
                    "m": layer.m,
                    "indices": layer.indices.to(torch.uint8 if num_patterns(layer.n, layer.m) <= 256 else torch.int32),
                }
                for layer in self.layers
            ],
        }
        torch_save(payload, path)

    @classmethod
    def load(cls, path: Path) -> MaskArtifact:
        payload = torch_load(path, "mask file", "re-run `python -m pipeline bake` (or pass the masks.pt it wrote)")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise PipelineError(
                f"{path} is not a mask artifact (expected format {FORMAT!r}); pass the masks.pt written by `bake`"
            )
        if payload.get("version") != VERSION:
            raise PipelineError(
                f"{path} has mask format version {payload.get('version')}, this tool reads "
                f"version {VERSION}; re-run `bake` to rewrite it"
            )
        entries = payload.get("layers")
        if not isinstance(entries, list) or not all(
            isinstance(payload.get(key), str) for key in ("model", "arch", "method")
        ):
            raise PipelineError(f"{path} is a damaged mask artifact (no layer list or model names); re-run `bake`")
        layers = [layer_from(entry, path) for entry in entries]
        meta = payload.get("meta", {})
        return cls(payload["model"], payload["arch"], payload["method"], layers, meta if isinstance(meta, dict) else {})


def layer_from(entry: Any, path: Path) -> LayerMask:
    """One layer of a mask artifact, refused unless its pattern indices are integers of the recorded shape."""
    fields = {"name": str, "shape": list, "n": int, "m": int, "indices": torch.Tensor}
    if not isinstance(entry, dict) or not all(isinstance(entry.get(key), kind) for key, kind in fields.items()):
        raise PipelineError(
            f"{path}: a layer entry is malformed (needs name, shape, n, m, indices); the file is damaged: re-run `bake`"
        )
    indices = entry["indices"]
    name = entry["name"]
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise PipelineError(
            f"{path}: layer {name} has pattern indices of dtype {indices.dtype} (integers "
            "expected); the file is damaged: re-run `bake`"
        )
    if not (2 <= entry["m"] and 0 < entry["n"] < entry["m"]) or not all(isinstance(x, int) for x in entry["shape"]):
        raise PipelineError(f"{path}: layer {name} has a malformed N:M or shape; the file is damaged: re-run `bake`")
    layer = LayerMask(name, list(entry["shape"]), int(entry["n"]), int(entry["m"]), indices.long())
    try:
        expected = blocks_shape(tuple(layer.shape), layer.m)
    except Exception:  # noqa: BLE001 - a shape no layer has
        expected = None
    smallest = int(layer.indices.min()) if layer.indices.numel() else 0
    largest = int(layer.indices.max()) if layer.indices.numel() else 0
    if tuple(layer.indices.shape) != expected or smallest < 0 or largest >= num_patterns(layer.n, layer.m):
        raise PipelineError(
            f"{path}: layer {layer.name} has malformed pattern indices; the file is damaged: re-run `bake`"
        )
    return layer


def apply_masks(
    state_dict: dict[str, torch.Tensor], artifact: MaskArtifact, source: str = "weights"
) -> dict[str, torch.Tensor]:
    """Return a copy of `state_dict` with every masked layer's weight multiplied by its mask."""
    baked = dict(state_dict)
    for layer in artifact.layers:
        key = f"{layer.name}.weight"
        if key not in state_dict:
            raise PipelineError(
                f"{source} has no tensor {key} for masked layer {layer.name}; "
                "masks and weights come from different architectures"
            )
        weight = state_dict[key]
        if list(weight.shape) != list(layer.shape):
            raise PipelineError(
                f"shape mismatch for {layer.name}: weights {list(weight.shape)} vs masks "
                f"{layer.shape}; masks only re-apply to weights of the same architecture"
            )
        # where() rather than a product: pruned entries become +0.0, never -0.0 or NaN
        baked[key] = torch.where(layer.mask().bool(), weight, torch.zeros((), dtype=weight.dtype))
    return baked
