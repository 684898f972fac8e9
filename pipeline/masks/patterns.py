"""N:M patterns and the block layout TensorRT accelerates.

TensorRT's rule: for a Conv weight [K, C, R, S] every group of M consecutive input
channels at each (k, r, s) keeps at most N non-zeros (C % M == 0); for Linear/Gemm the
groups run along in_features. `to_blocks` puts the input-channel axis last and splits
it into groups, so every mask operation below works on exactly those groups, never on
the flattened C*R*S order (which leaves 3x3 convs unaccelerable).
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import torch


@cache
def _pattern_rows(n: int, m: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(1 if i in kept else 0 for i in range(m)) for kept in itertools.combinations(range(m), n))


def pattern_table(n: int, m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[P, M] 0/1 table of every way to keep n of m weights; P = C(m, n) (6 for 2:4)."""
    if not 0 < n <= m:
        raise ValueError(f"invalid N:M = {n}:{m}")
    return torch.tensor(_pattern_rows(n, m), dtype=dtype)


def num_patterns(n: int, m: int) -> int:
    return math.comb(m, n)


def to_blocks(weight: torch.Tensor, m: int) -> torch.Tensor:
    """[K, C, *kernel] or [out, in] -> [K, *kernel, C // m, m] (a view-compatible permutation)."""
    moved = weight.movedim(1, -1)
    return moved.unflatten(-1, (moved.shape[-1] // m, m))


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_blocks`."""
    return blocks.flatten(-2).movedim(-1, 1)


def blocks_shape(weight_shape: tuple[int, ...], m: int) -> tuple[int, ...]:
    k, c, *kernel = weight_shape
    return (k, *kernel, c // m)


def mask_from_indices(indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pattern indices [K, *kernel, C//m] -> 0/1 mask in weight layout [K, C, *kernel]."""
    table = pattern_table(n, m)
    return from_blocks(table[indices.long()])


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every block of m along the input axis has at most n non-zeros."""
    if weight.shape[1] % m:
        return False
    return bool(((to_blocks(weight, m) != 0).sum(-1) <= n).all())


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of blocks holding more than n non-zeros (C % m != 0 counts every block)."""
    if weight.shape[1] % m:
        return -1
    return int(((to_blocks(weight, m) != 0).sum(-1) > n).sum())


def magnitude_indices(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per block, the index of the pattern that keeps the largest total |w| (ASP's m4n2_1d choice)."""
    scores = to_blocks(weight.detach().abs().float(), m) @ pattern_table(n, m).T
    return scores.argmax(-1)


def pattern_scores(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Share of each block's |w| kept by each pattern: [K, *kernel, C//m, P] in [0, 1]."""
    blocks = to_blocks(weight.detach().abs().float(), m)
    kept = blocks @ pattern_table(n, m).T
    return kept / blocks.sum(-1, keepdim=True).clamp_min(1e-12)
