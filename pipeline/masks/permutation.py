"""Channel permutations before N:M pruning (Pool & Yu, "Channel Permutations for N:M Sparsity", NeurIPS 2021).

Which M input channels share a block is an accident of channel order. Reordering the input
channels of a layer - and, so the network computes the same function, the output channels of
every layer that produces them, the per-channel parameters on the way (BatchNorm, depthwise
convs, LayerNorm) and every other layer that reads them - lets magnitude pruning keep more.

1. `channel_spaces` traces the model with torch.fx and groups tensors that must share one
   channel order: element-wise ops, BatchNorm, pooling and residual adds tie their inputs and
   outputs (the paper's treatment of residual connections: every producer and consumer of the
   tied tensors takes the same permutation). A space that reaches the network input or output,
   or an op this module does not understand, is fixed, and every masked layer reading it is
   reported as skipped with that reason.
2. `search_permutation` maximises the kept magnitude of all masked consumers of a space together
   with the paper's channel-swap search: evaluate every swap of two channels in different groups,
   apply the best one, update only the pairs it touched, repeat until no swap helps; then a few
   bounded regressions (a random pair's best, possibly worsening, swap followed by a new greedy
   descent) escape local optima, keeping the best order found. Spaces with many groups are searched
   in windows of groups, re-shuffled each pass. The identity is the starting point, so the result
   never keeps less than plain magnitude pruning.
3. `permute_state_dict` applies the permutations; the artifact stores them in `meta`, so the same
   permuted dense weights can be rebuilt from the original ones (`bake`, `export`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.gelu,
    F.silu,
    torch.sigmoid,
    torch.tanh,
    F.hardswish,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}
_ARITHMETIC_METHODS = {"add", "add_", "sub", "mul", "mul_", "relu", "relu_", "sigmoid", "contiguous"}


@dataclass
class ChannelSpace:
    """Tensors that must share one channel order, with the modules that would be permuted."""

    channels: int
    producers: list[str] = field(default_factory=list)  # weight dim 0 (and bias)
    holders: list[str] = field(default_factory=list)  # per-channel parameters and buffers
    consumers: list[str] = field(default_factory=list)  # weight dim 1
    fixed: str = ""  # why this space cannot be permuted; empty when it can


class _Spaces:
    """Union-find over fx nodes, each carrying the channel space of its output."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.data: dict[int, ChannelSpace] = {}
        self.of: dict[str, int] = {}  # node name -> space id
        self.axis: dict[str, int] = {}  # node name -> channel axis of its output

    def new(self, channels: int, fixed: str = "") -> int:
        key = len(self.parent)
        self.parent[key] = key
        self.data[key] = ChannelSpace(channels, fixed=fixed)
        return key

    def find(self, key: int) -> int:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        self.parent[b] = a
        left, right = self.data[a], self.data.pop(b)
        if left.channels != right.channels:
            left.fixed = left.fixed or f"joins tensors of {left.channels} and {right.channels} channels"
        left.producers += right.producers
        left.holders += right.holders
        left.consumers += right.consumers
        left.fixed = left.fixed or right.fixed
        return a

    def fix(self, key: int, reason: str) -> None:
        space = self.data[self.find(key)]
        space.fixed = space.fixed or reason

    def space(self, key: int) -> ChannelSpace:
        return self.data[self.find(key)]


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def channel_spaces(model: nn.Module, input_shape: list[int]) -> tuple[list[ChannelSpace], dict[str, int], _Spaces]:
    """Trace `model` and return its channel spaces, the space each Conv/Linear reads, and the union-find."""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = model.training
    model.eval()
    try:
        graph_module = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(graph_module).propagate(torch.zeros(2, *input_shape))
    finally:
        model.train(was_training)
    tracer = _ChannelTracer(dict(model.named_modules()))
    for node in graph_module.graph.nodes:
        tracer.visit(node)
    spaces = tracer.spaces
    found = {spaces.find(key) for key in spaces.parent}
    reads = {name: spaces.find(key) for name, key in tracer.reads.items()}
    return [spaces.data[key] for key in sorted(found)], reads, spaces


class _ChannelTracer:
    """Walks an FX graph node by node, giving every tensor a channel space (`spaces.of`) and the axis its
    channels lie on (`spaces.axis`), and recording which space each Conv/Linear reads (`reads`)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.spaces = _Spaces()
        self.reads: dict[str, int] = {}

    def tensor_inputs(self, node) -> list:
        import torch.fx

        found = []
        for arg in list(node.args) + list(node.kwargs.values()):
            for item in arg if isinstance(arg, (list, tuple)) else [arg]:
                if isinstance(item, torch.fx.Node) and item.name in self.spaces.of:
                    found.append(item)
        return found

    def fix_inputs(self, node, reason: str) -> None:
        for item in self.tensor_inputs(node):
            self.spaces.fix(self.spaces.of[item.name], reason)

    def opaque(self, node, reason: str) -> None:
        """NODE mixes channels in a way no permutation survives: its inputs are fixed, its output is new."""
        self.fix_inputs(node, reason)
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            self.spaces.of[node.name] = self.spaces.new(shape[1], fixed=reason)
            self.spaces.axis[node.name] = 1

    def passthrough(self, node, source) -> None:
        self.spaces.of[node.name] = self.spaces.of[source.name]
        self.spaces.axis[node.name] = self.spaces.axis[source.name]

    def visit(self, node) -> None:
        shape = _shape(node)
        if node.op == "placeholder":
            self.spaces.of[node.name] = self.spaces.new(
                shape[1] if shape and len(shape) > 1 else 0, fixed="network input"
            )
            self.spaces.axis[node.name] = 1
        elif node.op == "get_attr":
            channels = shape[0] if shape else 0
            self.spaces.of[node.name] = self.spaces.new(channels, fixed=f"parameter {node.target} is used as a tensor")
            self.spaces.axis[node.name] = 0
        elif node.op == "output":
            self.fix_inputs(node, "network output (class order must not change)")
        elif node.op == "call_module":
            self.visit_module(node, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            self.visit_function(node)

    def consume(self, node, in_space: int, out_channels: int, out_axis: int) -> None:
        """NODE (a Conv/Linear) reads IN_SPACE and starts a new space of OUT_CHANNELS that it produces."""
        spaces = self.spaces
        spaces.space(in_space).consumers.append(node.target)
        self.reads[node.target] = spaces.find(in_space)
        spaces.of[node.name] = spaces.new(out_channels)
        spaces.space(spaces.of[node.name]).producers.append(node.target)
        spaces.axis[node.name] = out_axis

    def visit_module(self, node, module: nn.Module) -> None:
        inputs = self.tensor_inputs(node)
        if not inputs:
            self.opaque(node, f"module {node.target} has no tensor input")
            return
        source = inputs[0]
        spaces = self.spaces
        in_space, in_axis, in_shape = spaces.of[source.name], spaces.axis[source.name], _shape(source)
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            if in_axis != 1:
                spaces.fix(in_space, f"{node.target} reads a tensor whose channels are not on axis 1")
            self.consume(node, in_space, module.out_channels, 1)
        elif isinstance(module, nn.Linear):
            if in_shape is None or in_axis != len(in_shape) - 1:
                spaces.fix(in_space, f"{node.target} reads a tensor whose channels are not its last axis")
            out_shape = _shape(node)
            if out_shape is None:
                raise RuntimeError(f"ShapeProp left no output shape on linear {node.target}")
            self.consume(node, in_space, module.out_features, len(out_shape) - 1)
        elif isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels:
            spaces.space(in_space).holders.append(node.target)  # depthwise: channel c -> channel c
            self.passthrough(node, source)
        elif isinstance(module, nn.Conv2d):
            self.opaque(node, f"grouped conv {node.target} (groups={module.groups}) mixes channels within groups")
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if in_axis != 1:
                spaces.fix(in_space, f"BatchNorm {node.target} on a tensor whose channels are not axis 1")
            spaces.space(in_space).holders.append(node.target)
            self.passthrough(node, source)
        elif (
            isinstance(module, nn.LayerNorm)
            and len(module.normalized_shape) == 1
            and in_shape
            and in_axis == len(in_shape) - 1
        ):
            spaces.space(in_space).holders.append(node.target)
            self.passthrough(node, source)
        elif isinstance(module, _ELEMENTWISE_MODULES) or (
            isinstance(module, nn.Flatten) and _flatten_keeps_channels(in_shape, _shape(node), in_axis)
        ):
            self.passthrough(node, source)
        else:
            self.opaque(node, f"{type(module).__name__} {node.target} is not known to keep channels apart")

    def visit_function(self, node) -> None:
        target, shape = node.target, _shape(node)
        inputs = self.tensor_inputs(node)
        if target in (getattr, "size", "dim") or (
            node.op == "call_function" and target is operator.getitem and shape is None
        ):
            return  # shape queries: no channel mixing
        if not inputs:
            return
        first = inputs[0]
        if (
            target in _ELEMENTWISE_FUNCTIONS
            or (node.op == "call_method" and target in _ARITHMETIC_METHODS)
            or target in _ARITHMETIC
        ):
            if not all(_same_channel_axis(first, item, self.spaces) for item in inputs[1:]):
                self.opaque(node, f"{node.name}: operands with different channel layouts")
                return
            for item in inputs[1:]:
                self.spaces.join(self.spaces.of[first.name], self.spaces.of[item.name])
            self.passthrough(node, first)
        elif (target is torch.flatten or target in ("flatten", "view", "reshape")) and _flatten_keeps_channels(
            _shape(first), shape, self.spaces.axis[first.name]
        ):
            self.passthrough(node, first)
        else:
            name = getattr(target, "__name__", str(target))
            self.opaque(node, f"operation {name} ({node.name}) is not known to keep channels apart")


def _flatten_keeps_channels(before, after, axis: int) -> bool:
    """[N, C, 1, 1] -> [N, C]: the channel axis survives the reshape unchanged."""
    if before is None or after is None or axis != 1 or len(after) != 2:
        return False
    return after[1] == before[1] and all(size == 1 for size in before[2:])


def _same_channel_axis(a, b, spaces: _Spaces) -> bool:
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    axis = spaces.axis[a.name]
    return axis == spaces.axis[b.name] and sa[axis] == sb[axis]


# --------------------------------------------------------------------------- search
def kept_magnitude(matrix: torch.Tensor, order: torch.Tensor, n: int, m: int) -> float:
    """Sum over columns and groups of the N largest |w| when rows are grouped in `order`."""
    groups = matrix[order].view(-1, m, matrix.shape[1])
    return float(groups.topk(n, dim=1).values.sum())


class _SwapSearch:
    """Steepest-ascent channel swaps between the groups `members` of `order` (edited in place).

    For a group with rows R (M x D), replacing row i by a row x keeps, per column d,
    max(A_i[d], B_i[d] + x[d]) where A_i is the best pattern without i and B_i the best pattern
    with i minus R[i]. Caching A and B per group makes every swap's gain a broadcast max, and after
    a swap only the pairs involving the two touched groups are re-evaluated.
    """

    def __init__(
        self, matrix: torch.Tensor, order: torch.Tensor, members: list[int], n: int, m: int, chunk: int = 64
    ) -> None:
        from pipeline.masks.patterns import pattern_table

        self.matrix, self.order, self.n, self.m, self.chunk = matrix, order, n, m, chunk
        self.members = torch.tensor(members)
        table = pattern_table(n, m, matrix.dtype)  # [P, M]
        self.table = table
        self.with_row = table.T.bool()  # [M, P]: pattern p contains row i
        count = len(members)
        self.gain = torch.full((count, count), float("-inf"))
        self.swap = torch.zeros((count, count), dtype=torch.long)
        self.a_idx, self.b_idx = torch.triu_indices(count, count, 1)
        width = matrix.shape[1]
        self.value = torch.zeros(count, dtype=matrix.dtype)
        self.without = torch.zeros(count, m, width, dtype=matrix.dtype)
        self.with_i = torch.zeros(count, m, width, dtype=matrix.dtype)
        for start in range(0, count, chunk):
            self._parts(torch.arange(start, min(start + chunk, count)))
        self.refresh_all()

    def _rows(self, local: torch.Tensor) -> torch.Tensor:
        return self.matrix[self.order.view(-1, self.m)[self.members[local]]]  # [P, M, D]

    def _parts(self, local: torch.Tensor) -> None:
        """Cache value [P], A [P, M, D], B [P, M, D] of the groups `local` (see the class docstring)."""
        rows = self._rows(local)
        scores = rows.transpose(1, 2) @ self.table.T  # [P, D, patterns]
        self.value[local] = scores.amax(-1).sum(-1)
        inf = torch.tensor(float("-inf"), dtype=rows.dtype)
        without = torch.where(self.with_row[None, None], inf, scores[:, :, None, :]).amax(-1)  # [P, D, M]
        others = scores[:, :, None, :] - rows.transpose(1, 2)[:, :, :, None]  # remove row i's own term
        with_i = torch.where(self.with_row[None, None], others, inf).amax(-1)
        self.without[local] = without.transpose(1, 2)
        self.with_i[local] = with_i.transpose(1, 2)

    def _evaluate(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gains, where = [], []
        for start in range(0, len(a), self.chunk):
            pa, pb = a[start : start + self.chunk], b[start : start + self.chunk]
            ra, rb = self._rows(pa), self._rows(pb)
            aa, ba, ab, bb = self.without[pa], self.with_i[pa], self.without[pb], self.with_i[pb]
            # new_a[i, j] = sum_d max(A_a[i], B_a[i] + R_b[j]);  new_b[i, j] = sum_d max(A_b[j], B_b[j] + R_a[i])
            new_a = torch.maximum(aa[:, :, None], ba[:, :, None] + rb[:, None]).sum(-1)
            new_b = torch.maximum(ab[:, None], bb[:, None] + ra[:, :, None]).sum(-1)
            gain = (new_a + new_b).flatten(1) - (self.value[pa] + self.value[pb])[:, None]
            best = gain.max(-1)
            gains.append(best.values)
            where.append(best.indices)
        return torch.cat(gains), torch.cat(where)

    def refresh_all(self) -> None:
        if len(self.a_idx):
            g, w = self._evaluate(self.a_idx, self.b_idx)
            self.gain[self.a_idx, self.b_idx], self.swap[self.a_idx, self.b_idx] = g, w

    def refresh(self, touched: int) -> None:
        others = torch.tensor([x for x in range(len(self.members)) if x != touched], dtype=torch.long)
        if not len(others):
            return
        lo = torch.minimum(others, torch.tensor(touched))
        hi = torch.maximum(others, torch.tensor(touched))
        g, w = self._evaluate(lo, hi)
        self.gain[lo, hi], self.swap[lo, hi] = g, w

    def apply(self, a: int, b: int) -> None:
        i, j = divmod(int(self.swap[a, b]), self.m)
        groups = self.order.view(-1, self.m)
        ga, gb = int(self.members[a]), int(self.members[b])
        groups[ga, i], groups[gb, j] = groups[gb, j].clone(), groups[ga, i].clone()
        self._parts(torch.tensor([a, b]))
        self.refresh(a)
        self.refresh(b)

    def descend(self, tolerance: float, max_swaps: int) -> int:
        swaps = 0
        while swaps < max_swaps and len(self.members) > 1:
            a, b = divmod(int(self.gain.argmax()), len(self.members))
            if not float(self.gain[a, b]) > tolerance:
                break
            self.apply(a, b)
            swaps += 1
        return swaps


def search_permutation(
    matrix: torch.Tensor, n: int, m: int, escapes: int = 8, window: int = 64, passes: int = 2, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """Order of the rows (input channels) of `matrix` [C, D] (|w| of every consumer, side by side)
    that keeps the most magnitude under N:M grouping. Returns (order, statistics)."""
    if matrix.numel() < 1 << 22:  # small tensors: thread start-up costs more than it saves
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _search(matrix, n, m, escapes, window, passes, seed)
        finally:
            torch.set_num_threads(threads)
    return _search(matrix, n, m, escapes, window, passes, seed)


def _search(
    matrix: torch.Tensor, n: int, m: int, escapes: int, window: int, passes: int, seed: int
) -> tuple[torch.Tensor, dict]:
    channels = matrix.shape[0]
    matrix = matrix.float().contiguous()
    order = torch.arange(channels)
    before = kept_magnitude(matrix, order, n, m)
    tolerance = 1e-7 * max(before, 1e-12)
    generator = torch.Generator().manual_seed(seed)
    group_count = channels // m
    max_swaps = 4 * channels
    best_order, best = order.clone(), before
    swaps = regressions = 0
    rounds = 1 if group_count <= window else passes
    for _ in range(rounds):
        members = list(range(group_count))
        if group_count > window:  # large spaces: search windows of groups, re-shuffled every pass
            members = torch.randperm(group_count, generator=generator).tolist()
        for start in range(0, group_count, window):
            search = _SwapSearch(matrix, order, members[start : start + window], n, m)
            swaps += search.descend(tolerance, max_swaps)
            value = kept_magnitude(matrix, order, n, m)
            if value > best + tolerance:
                best_order, best = order.clone(), value
            for _ in range(escapes if len(search.members) > 1 else 0):
                # bounded regression: a random pair's best swap even if it loses, then descend again
                a, b = sorted(torch.randperm(len(search.members), generator=generator)[:2].tolist())
                search.apply(a, b)
                regressions += 1
                swaps += 1 + search.descend(tolerance, max_swaps)
                value = kept_magnitude(matrix, order, n, m)
                if value > best + tolerance:
                    best_order, best = order.clone(), value
            order.copy_(best_order)
    return best_order, {"kept_before": before, "kept_after": best, "swaps": swaps, "regressions": regressions}


# --------------------------------------------------------------------------- applying permutations
def permute_state_dict(state_dict: dict[str, torch.Tensor], permutations: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Apply the permutations recorded in a mask artifact's meta (`meta["permutations"]`).

    Each entry holds `order` (new channel q takes old channel order[q]) and the module names whose
    weight dim 0 (`producers`), dim 1 (`consumers`) or per-channel tensors (`holders`) move."""
    permuted = dict(state_dict)
    for key, entry in permutations.items():
        order = torch.as_tensor(entry["order"], dtype=torch.long)
        channels = len(order)
        for name in entry["producers"]:
            for suffix in (".weight", ".bias"):
                if name + suffix in permuted:
                    permuted[name + suffix] = permuted[name + suffix][order].contiguous()
        for name in entry["holders"]:
            for tensor_key, tensor in list(permuted.items()):
                if (
                    tensor_key.startswith(name + ".")
                    and "." not in tensor_key[len(name) + 1 :]
                    and tensor.dim() >= 1
                    and tensor.shape[0] == channels
                ):
                    permuted[tensor_key] = tensor[order].contiguous()
        for name in entry["consumers"]:
            permuted[name + ".weight"] = permuted[name + ".weight"][:, order].contiguous()
        if not order.sort().values.equal(torch.arange(channels)):
            raise ValueError(f"permutation {key} is not a permutation of {channels} channels")
    return permuted


def consumer_matrix(state_dict: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """|w| of the given consumers as [C, D]: one row per input channel, every output/kernel entry a column."""
    parts = [state_dict[f"{name}.weight"].detach().abs().float().transpose(0, 1).flatten(1) for name in names]
    return torch.cat(parts, 1)


def output_difference(
    model: nn.Module, state_a: dict, state_b: dict, input_shape: list[int], batch: int = 8, seed: int = 0
) -> float:
    """Largest |difference| of the logits of two weight sets on a random batch (eval mode)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, *input_shape, generator=generator)
    outputs = []
    original = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for state in (state_a, state_b):
                model.load_state_dict(state)
                outputs.append(model(images))
    finally:
        model.load_state_dict(original)
        model.train(was_training)
    return float((outputs[0] - outputs[1]).abs().max())
