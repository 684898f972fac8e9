"""Transposable N:M masks (Hubara et al., NeurIPS 2021): the mask and its transpose are both N:M.

Blocks follow TensorRT's layout: M consecutive output channels x M consecutive input
channels at each kernel position (r, s). Inside a block the mask keeps exactly N entries in
every row (output channel) and every column (input channel), so the forward weight is N:M
along the input channels (what TensorRT accelerates) and the transposed weight used by the
backward pass is N:M too.

Three solvers for one M x M block, all maximising the kept |w| (= minimising the pruned |w|):
- `flow`: the paper's exact formulation as a minimum-cost flow (source -> row, capacity N;
  row -> column, capacity 1, cost -|w|; column -> sink, capacity N), solved by successive
  shortest paths (Bellman-Ford, since costs are negative). Pure Python, one block at a time.
- `enumerate`: exact too, vectorised over all blocks: score every admissible M x M mask
  (90 for 2:4) and take the best. Used by default when the table is small; the tests check
  it agrees with `flow`.
- `greedy`: the paper's linear-time 2-approximation: visit the block's entries by descending
  |w| and keep one while its row and column hold fewer than N. A maximal but not always
  complete selection can leave a row and a column one short whose shared entry is already
  kept; `_complete` then fills the deficit with the best exchange (documented in
  docs/notebook/baselines.md), so the result is a full transposable N:M mask.
"""

from __future__ import annotations

import itertools
from functools import cache

import torch

from pipeline.errors import PipelineError
from pipeline.masks.patterns import pattern_table, to_blocks

ENUMERATE_LIMIT = 5000  # largest table of M x M masks the vectorised exact solver enumerates


# --------------------------------------------------------------------------- admissible masks
@cache
def _transposable_rows(n: int, m: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    rows = [tuple(row) for row in pattern_table(n, m).int().tolist()]
    masks = []

    def extend(prefix: list[tuple[int, ...]], columns: list[int]) -> None:
        if len(prefix) == m:
            if all(count == n for count in columns):
                masks.append(tuple(prefix))
            return
        left = m - len(prefix) - 1
        for row in rows:
            counts = [c + r for c, r in zip(columns, row)]
            if all(count <= n and count + left >= n for count in counts):
                extend(prefix + [row], counts)

    extend([], [0] * m)
    return tuple(masks)


def count_transposable(n: int, m: int) -> int:
    """Number of M x M 0/1 matrices with exactly N ones in every row and column (90 for 2:4)."""
    if m > 6:
        raise PipelineError(f"counting {n}:{m} transposable masks by enumeration is too slow for M={m}")
    return len(_transposable_rows(n, m))


def transposable_table(n: int, m: int) -> torch.Tensor:
    """[T, M, M] every admissible block mask (rows = output channels, columns = input channels)."""
    return torch.tensor(_transposable_rows(n, m), dtype=torch.float32)


# --------------------------------------------------------------------------- minimum-cost flow
class MinCostFlow:
    """Successive-shortest-path minimum-cost flow on a small graph (Bellman-Ford: costs may be negative)."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes
        self.edges: list[list] = []  # [to, capacity, cost, reverse index]
        self.graph: list[list[int]] = [[] for _ in range(nodes)]

    def add_edge(self, u: int, v: int, capacity: int, cost: float) -> int:
        self.graph[u].append(len(self.edges))
        self.edges.append([v, capacity, cost, len(self.edges) + 1])
        self.graph[v].append(len(self.edges))
        self.edges.append([u, 0, -cost, len(self.edges) - 1])
        return len(self.edges) - 2

    def solve(self, source: int, sink: int, flow: int) -> tuple[int, float]:
        """Push up to `flow` units at minimum cost; returns (flow pushed, total cost)."""
        pushed, total = 0, 0.0
        while pushed < flow:
            dist = [float("inf")] * self.nodes
            via = [-1] * self.nodes
            dist[source] = 0.0
            for _ in range(self.nodes - 1):
                changed = False
                for u in range(self.nodes):
                    if dist[u] == float("inf"):
                        continue
                    for e in self.graph[u]:
                        v, cap, cost, _ = self.edges[e]
                        if cap > 0 and dist[u] + cost < dist[v] - 1e-12:
                            dist[v] = dist[u] + cost
                            via[v] = e
                            changed = True
                if not changed:
                    break
            if dist[sink] == float("inf"):
                break
            amount, v = flow - pushed, sink
            while v != source:
                e = via[v]
                amount = min(amount, self.edges[e][1])
                v = self.edges[self.edges[e][3]][0]
            v = sink
            while v != source:
                e = via[v]
                self.edges[e][1] -= amount
                self.edges[self.edges[e][3]][1] += amount
                v = self.edges[self.edges[e][3]][0]
            pushed += amount
            total += amount * dist[sink]
        return pushed, total


def block_mask_flow(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Exact transposable mask of one M x M block of non-negative scores, as a min-cost flow."""
    m = scores.shape[0]
    source, sink = 2 * m, 2 * m + 1
    graph = MinCostFlow(2 * m + 2)
    edge_of = {}
    for i in range(m):
        graph.add_edge(source, i, n, 0.0)
        graph.add_edge(m + i, sink, n, 0.0)
    values = scores.tolist()
    for i, j in itertools.product(range(m), range(m)):
        edge_of[i, j] = graph.add_edge(i, m + j, 1, -float(values[i][j]))
    pushed, _ = graph.solve(source, sink, n * m)
    if pushed != n * m:  # cannot happen on a complete bipartite graph
        raise RuntimeError(f"min-cost flow pushed {pushed} of {n * m} units")
    mask = torch.zeros(m, m)
    for (i, j), e in edge_of.items():
        if graph.edges[e][1] == 0:
            mask[i, j] = 1.0
    return mask


# --------------------------------------------------------------------------- block solvers (batched)
def masks_enumerate(scores: torch.Tensor, n: int) -> torch.Tensor:
    """[B, M, M] scores -> [B, M, M] exact masks by scoring every admissible mask."""
    m = scores.shape[-1]
    table = transposable_table(n, m).to(scores.dtype)
    best = (scores.flatten(1) @ table.flatten(1).T).argmax(-1)
    return table[best]


def masks_flow(scores: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([block_mask_flow(block, n) for block in scores]) if len(scores) else scores.clone()


def masks_greedy(scores: torch.Tensor, n: int, complete: bool = True) -> torch.Tensor:
    """The 2-approximation, vectorised over blocks: M*M steps over entries sorted by descending score."""
    b, m, _ = scores.shape
    order = scores.flatten(1).sort(dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(b, m * m)
    rows = torch.zeros(b, m, dtype=torch.long)
    cols = torch.zeros(b, m, dtype=torch.long)
    batch = torch.arange(b)
    for step in range(m * m):
        entry = order[:, step]
        r, c = entry // m, entry % m
        take = (rows[batch, r] < n) & (cols[batch, c] < n)
        mask[batch, entry] = take.float()
        rows[batch, r] += take.long()
        cols[batch, c] += take.long()
    mask = mask.view(b, m, m)
    return _complete(mask, scores, n) if complete else mask


def _complete(mask: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Fill rows/columns holding fewer than N (vectorised over blocks): add the best free entry of a
    short row and a short column when one exists, else the best exchange - drop kept (r2, c2), keep
    (r, c2) and (r2, c) - which raises short row r and short column c by one each."""
    mask = mask.clone()
    b, m, _ = mask.shape
    inf = torch.tensor(float("-inf"), dtype=scores.dtype)
    for _ in range(2 * n * m):
        short_rows = mask.sum(2) < n  # [B, M]
        short_cols = mask.sum(1) < n
        todo = short_rows.any(1)
        if not bool(todo.any()):
            return mask
        free = short_rows[:, :, None] & short_cols[:, None, :] & (mask == 0)
        has_free = free.flatten(1).any(1)
        pick = torch.where(free, scores, inf).flatten(1).argmax(1)
        add = todo & has_free
        mask.view(b, -1)[add, pick[add]] = 1
        swap = todo & ~has_free
        if bool(swap.any()):
            idx = swap.nonzero().flatten()
            r = short_rows[idx].float().argmax(1)
            c = short_cols[idx].float().argmax(1)
            sub, sc = mask[idx], scores[idx]
            rows_r = sub[torch.arange(len(idx)), r]  # [S, M] over c2
            cols_c = sub[torch.arange(len(idx)), :, c]  # [S, M] over r2
            valid = (sub == 1) & (rows_r[:, None, :] == 0) & (cols_c[:, :, None] == 0)  # [S, r2, c2]
            gain = sc[torch.arange(len(idx)), r][:, None, :] + sc[torch.arange(len(idx)), :, c][:, :, None] - sc
            best = torch.where(valid, gain, inf).flatten(1).argmax(1)
            r2, c2 = best // m, best % m
            mask[idx, r2, c2] = 0
            mask[idx, r, c2] = 1
            mask[idx, r2, c] = 1
    if bool((mask.sum(2) < n).any()):
        raise RuntimeError("could not complete a transposable mask")
    return mask


SOLVERS = {"enumerate": masks_enumerate, "flow": masks_flow, "greedy": masks_greedy}


# --------------------------------------------------------------------------- whole weights
def _weight_blocks(weight: torch.Tensor, m: int) -> torch.Tensor:
    """[K, C, *kernel] -> [B, M(out), M(in)] blocks (view order: kernel position, K//m, C//m)."""
    w = weight if weight.dim() > 2 else weight[..., None, None]
    k, c, r, s = w.shape
    blocks = w.reshape(k // m, m, c // m, m, r, s).permute(4, 5, 0, 2, 1, 3)
    return blocks.reshape(-1, m, m)


def _from_weight_blocks(blocks: torch.Tensor, shape: torch.Size, m: int) -> torch.Tensor:
    full = tuple(shape) if len(shape) > 2 else (*shape, 1, 1)
    k, c, r, s = full
    w = blocks.reshape(r, s, k // m, c // m, m, m).permute(2, 4, 3, 5, 0, 1).reshape(full)
    return w.reshape(shape)


def can_transpose(shape: list[int] | torch.Size, m: int) -> str:
    """Empty when a weight of this shape tiles into M x M blocks, else the reason it does not."""
    if shape[0] % m:
        return f"out_channels={shape[0]} is not a multiple of {m} (transposable blocks need M x M tiles)"
    if shape[1] % m:
        return f"in_channels={shape[1]} is not a multiple of {m}"
    return ""


def transposable_mask(weight: torch.Tensor, n: int, m: int, solver: str = "auto") -> torch.Tensor:
    """0/1 mask in weight layout, N:M along input channels and along output channels."""
    reason = can_transpose(weight.shape, m)
    if reason:
        raise PipelineError(f"weight of shape {list(weight.shape)}: {reason}")
    if solver == "auto":
        solver = "enumerate" if m <= 6 and count_transposable(n, m) <= ENUMERATE_LIMIT else "flow"
    if solver not in SOLVERS:
        raise PipelineError(f"unknown transposable solver {solver!r}; use auto, {', '.join(SOLVERS)}")
    scores = _weight_blocks(weight.detach().abs().float(), m)
    return _from_weight_blocks(SOLVERS[solver](scores, n), weight.shape, m)


def indices_from_mask(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pattern index per input-channel block (the mask artifact's encoding) of an exact N:M mask."""
    blocks = to_blocks(mask, m)
    table = pattern_table(n, m)
    match = (blocks.unsqueeze(-2) == table).all(-1)  # [..., P]
    if not bool(match.any(-1).all()):
        raise ValueError("mask has blocks that do not keep exactly N of M")
    return match.float().argmax(-1)
