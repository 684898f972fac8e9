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
            "format": FORMAT, "version": VERSION, "model": self.model, "arch": self.arch, "method": self.method,
            "meta": self.meta,
            "layers": [{"name": layer.name, "shape": list(layer.shape), "n": layer.n, "m": layer.m,
                        "indices": layer.indices.to(torch.uint8 if num_patterns(layer.n, layer.m) <= 256
                                                    else torch.int32)}
                       for layer in self.layers],
        }
        torch_save(payload, path)

    @classmethod
    def load(cls, path: Path) -> "MaskArtifact":
        payload = torch_load(path, "mask file")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise PipelineError(f"{path} is not a mask artifact (expected format {FORMAT!r}); "
                                "pass the masks.pt written by `bake`")
        if payload.get("version") != VERSION:
            raise PipelineError(f"{path} has mask format version {payload.get('version')}, this tool reads "
                                f"version {VERSION}; re-run `bake` to rewrite it")
        layers = []
        for entry in payload["layers"]:
            layer = LayerMask(entry["name"], list(entry["shape"]), int(entry["n"]), int(entry["m"]),
                              entry["indices"].long())
            expected = blocks_shape(tuple(layer.shape), layer.m)
            largest = int(layer.indices.max()) if layer.indices.numel() else 0
            if tuple(layer.indices.shape) != expected or largest >= num_patterns(layer.n, layer.m):
                raise PipelineError(f"{path}: layer {layer.name} has malformed pattern indices; the file is damaged")
            layers.append(layer)
        return cls(payload["model"], payload["arch"], payload["method"], layers, payload.get("meta", {}))


def apply_masks(state_dict: dict[str, torch.Tensor], artifact: MaskArtifact,
                source: str = "weights") -> dict[str, torch.Tensor]:
    """Return a copy of `state_dict` with every masked layer's weight multiplied by its mask."""
    baked = dict(state_dict)
    for layer in artifact.layers:
        key = f"{layer.name}.weight"
        if key not in state_dict:
            raise PipelineError(f"{source} has no tensor {key} for masked layer {layer.name}; "
                                "masks and weights come from different architectures")
        weight = state_dict[key]
        if list(weight.shape) != list(layer.shape):
            raise PipelineError(f"shape mismatch for {layer.name}: weights {list(weight.shape)} vs masks "
                                f"{layer.shape}; masks only re-apply to weights of the same architecture")
        # where() rather than a product: pruned entries become +0.0, never -0.0 or NaN
        baked[key] = torch.where(layer.mask().bool(), weight, torch.zeros((), dtype=weight.dtype))
    return baked
