"""Mask diversity (Hubara et al., NeurIPS 2021): how many masks a sparsity constraint admits.

Reported in bits (log2 of the count), summed over layers, so constraints can be compared
at the same density (50% for 2:4):
- N:M along input channels: C(M, N) choices per block -> blocks * log2 C(M, N).
- transposable N:M: T admissible M x M masks per block (90 for 2:4) -> blocks * log2 T.
- unstructured at the same density: log2 C(total, kept), via lgamma (no huge integers).
"""

from __future__ import annotations

import math

from pipeline.masks.transposable import count_transposable


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


def log2_binomial(total: int, kept: int) -> float:
    if not 0 <= kept <= total:
        raise ValueError(f"cannot choose {kept} of {total}")
    return (math.lgamma(total + 1) - math.lgamma(kept + 1) - math.lgamma(total - kept + 1)) / math.log(2)


def nm_bits(shape: list[int], n: int, m: int) -> float:
    blocks = _numel(shape) // m
    return blocks * math.log2(math.comb(m, n))


def transposable_bits(shape: list[int], n: int, m: int) -> float:
    blocks = _numel(shape) // (m * m)
    return blocks * math.log2(count_transposable(n, m))


def unstructured_bits(shape: list[int], n: int, m: int) -> float:
    total = _numel(shape)
    return log2_binomial(total, total * n // m)


CONSTRAINTS = {"nm": nm_bits, "transposable": transposable_bits, "unstructured": unstructured_bits}


def layer_bits(shape: list[int], n: int, m: int, constraint: str) -> float:
    return CONSTRAINTS[constraint](list(shape), n, m)


def diversity_bits(
    shapes: dict[str, list[int]], n: int, m: int, constraint: str, per_layer: dict[str, str] | None = None
) -> float:
    """Total bits over layers; `per_layer` overrides the constraint of some layers (e.g. a layer that
    could not take a transposable mask and fell back to plain N:M)."""
    per_layer = per_layer or {}
    return sum(layer_bits(shape, n, m, per_layer.get(name, constraint)) for name, shape in shapes.items())
