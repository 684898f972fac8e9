"""Independent checks of a baked state_dict: N:M layout and bit-exact kept weights."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

import torch

from pipeline.masks.artifact import MaskArtifact
from pipeline.masks.patterns import nm_violations


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(
        {
            torch.float32: torch.int32,
            torch.float16: torch.int16,
            torch.bfloat16: torch.int16,
            torch.float64: torch.int64,
        }[tensor.dtype]
    )


def check_baked(
    dense: dict[str, torch.Tensor],
    sparse: dict[str, torch.Tensor],
    artifact: MaskArtifact,
    reestimated: AbstractSet[str] = frozenset(),
) -> dict:
    """Per masked layer: N:M violations along the input-channel axis, kept weights bit-exact,
    density; every other tensor must be identical to the dense one, except the BatchNorm running
    statistics named in `reestimated` (masks.bn_reestimate_images)."""
    layers = []
    masked_keys = set()
    for layer in artifact.layers:
        key = f"{layer.name}.weight"
        masked_keys.add(key)
        mask = layer.mask().bool()
        kept_exact = bool(torch.equal(_bits(sparse[key])[mask], _bits(dense[key])[mask]))
        pruned_zero = bool((sparse[key][~mask] == 0).all())
        layers.append(
            {
                "name": layer.name,
                "shape": layer.shape,
                "n": layer.n,
                "m": layer.m,
                "nm_violations": nm_violations(sparse[key], layer.n, layer.m),
                "kept_bit_exact": kept_exact,
                "pruned_are_zero": pruned_zero,
                "density": float((sparse[key] != 0).float().mean()),
            }
        )
    untouched = [
        key
        for key in dense
        if key not in masked_keys and key not in reestimated and not torch.equal(dense[key], sparse[key])
    ]
    ok = all(x["nm_violations"] == 0 and x["kept_bit_exact"] and x["pruned_are_zero"] for x in layers) and not untouched
    return {"ok": ok, "layers": layers, "other_tensors_changed": untouched}
