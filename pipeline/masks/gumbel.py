"""Learned N:M masks on frozen weights (Danhofer, arXiv 2411.00288), in TensorRT's layout.

Each block of M input channels at each (k, r, s) owns logits over the C(M, N) patterns.
Training samples a hard straight-through Gumbel-Softmax; evaluation and export take the
argmax, with no noise. The pattern table is a buffer and never changes; the layer's
weight, bias and BatchNorm statistics are never trained.

Layout, chosen for speed (a mask-training step must cost next to nothing beside the
convolutions, see `make bench-train`): logits are stored pattern-major, `[P, K, *kernel,
C // M]`, and each frozen weight is kept once more position-major, `[M, K, *kernel, C // M]`.
Every per-block reduction (argmax, softmax, the pattern sums of the backward pass) then
runs over a short outer axis of long contiguous slabs instead of a length-6 inner axis,
which PyTorch's CPU kernels handle an order of magnitude slower.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.masks import fused as fused_kernel
from pipeline.masks.eligibility import EligibilityReport
from pipeline.masks.patterns import from_blocks, num_patterns, pattern_scores, pattern_table, to_blocks


class GumbelNoisePool:
    """Gumbel(0, 1) noise drawn once and served as slices at random offsets.

    Drawing fresh exponential variates for every logit at every step costs more than the
    rest of the mask computation together on CPU; a pool twice the size of the largest
    layer, sliced at a uniformly random offset per layer and step, gives i.i.d. Gumbel
    values within a draw and independent offsets across draws (the noise-table trick of
    evolution strategies). The pool is redrawn every `refresh_steps` steps from a generator
    seeded by (seed, step // refresh_steps), so a resumed run sees the same noise. The offsets come from the
    pool's own generator (seeded by seed and `stream`, one stream per rank; its state is checkpointed), never
    from torch's global RNG.
    """

    def __init__(self, largest: int, seed: int, refresh_steps: int = 100, stream: int = 0) -> None:
        self.size = max(2 * largest, 1 << 16)
        self.seed = seed
        self.refresh_steps = refresh_steps
        self.generation = -1
        self.pool: torch.Tensor | None = None
        self._scaled: tuple[int, float, torch.Tensor] | None = None  # (generation, tau, pool / tau)
        self.offsets = torch.Generator().manual_seed(seed * 1000 + stream)

    def set_step(self, step: int, device: torch.device) -> None:
        generation = step // self.refresh_steps
        if generation != self.generation or self.pool is None or self.pool.device != device:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + generation)
            pool = torch.empty(self.size).exponential_(generator=generator).log_().neg_()
            self.pool, self.generation = pool.to(device), generation

    def draw(self, numel: int, device: torch.device, tau: float = 1.0) -> torch.Tensor:
        """`numel` Gumbel values divided by `tau`: the division runs once per pool and temperature (once a step,
        over twice the largest layer), not once per layer over all its logits."""
        if self.pool is None or self.pool.device != device:
            self.set_step(max(self.generation, 0) * self.refresh_steps, device)
        offset = int(torch.randint(0, self.size - numel + 1, (1,), generator=self.offsets))
        return self._over(tau)[offset : offset + numel]

    def _over(self, tau: float) -> torch.Tensor:
        pool = self.pool
        if pool is None:
            raise RuntimeError("GumbelNoisePool._over before set_step drew the pool")
        if tau == 1.0:
            return pool
        if self._scaled is None or self._scaled[2].device != pool.device:
            self._scaled = (-1, 0.0, torch.empty_like(pool))
        if self._scaled[:2] != (self.generation, tau):  # into the same buffer every step
            self._scaled = (self.generation, tau, torch.mul(pool, 1.0 / tau, out=self._scaled[2]))
        return self._scaled[2]


def pattern_codes(n: int, m: int) -> list[int]:
    """Each pattern as a bit mask over its M positions (bit j set = weight j kept)."""
    return [sum(int(bit) << j for j, bit in enumerate(row.tolist())) for row in pattern_table(n, m)]


def _code_dtype(m: int) -> torch.dtype:
    return torch.uint8 if m <= 8 else torch.int16 if m <= 15 else torch.int32


def first_argmax_codes(scores: torch.Tensor, codes: list[int], m: int) -> torch.Tensor:
    """Bit code of the first maximal pattern per block (torch.argmax's tie rule), from `[P, Nb]`: one vectorised
    max over the P slabs, then the patterns from last to first mark where they reach it."""
    best = scores.amax(0)
    code = torch.full(best.shape, codes[-1], dtype=_code_dtype(m), device=scores.device)
    for p in range(scores.shape[0] - 2, -1, -1):
        code.masked_fill_(scores[p] == best, codes[p])
    return code


_PACKED = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # m keep bytes read as one integer


@functools.cache
def _first_max_keep_table(codes: tuple[int, ...], m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For at most 9 patterns: the priority bit of each pattern but the last (`[P-1, 1]` uint8, the first one the
    highest), and the keep row (`[2**(P-1), m]` uint8) of the first pattern whose bit is set (none: the last)."""
    count = len(codes)
    priority = torch.tensor([1 << (count - 2 - p) for p in range(count - 1)], dtype=torch.uint8)[:, None]
    rows = torch.zeros(1 << (count - 1), m, dtype=torch.uint8)
    for bits in range(1 << (count - 1)):
        first = next((p for p in range(count - 1) if bits & (1 << (count - 2 - p))), count - 1)
        rows[bits] = torch.tensor([(codes[first] >> j) & 1 for j in range(m)], dtype=torch.uint8)
    return priority.to(device), rows.to(device)


def first_argmax_keep(scores: torch.Tensor, codes: list[int], m: int) -> torch.Tensor:
    """The 0/1 keep row `[Nb, m]` (uint8, block-last: the memory order of a channels_last weight) of the first
    maximal pattern per block, from `[P, Nb]`; ties go to the first pattern, as torch.argmax.

    For P <= 9 (2:4 has 6): one vectorised max over the P slabs, which of the first P-1 patterns reach it as the
    bits of one byte per block, and a table from that byte to the keep row (read as one integer when m is 2, 4
    or 8): four passes, no per-pattern masked fill. Otherwise from `first_argmax_codes`."""
    if len(codes) > 9:
        code = first_argmax_codes(scores, codes, m)
        return torch.stack([(code >> j) & 1 for j in range(m)], dim=-1).to(torch.uint8)
    priority, rows = _first_max_keep_table(tuple(codes), m, scores.device)
    best = scores.amax(0)
    reached = torch.eq(scores[:-1], best).view(torch.uint8).mul_(priority).sum(0, dtype=torch.uint8).int()
    if m in _PACKED:
        return rows.view(_PACKED[m]).view(-1).index_select(0, reached).view(torch.uint8).view(-1, m)
    return rows.index_select(0, reached)


def to_position_major(weight: torch.Tensor, m: int) -> torch.Tensor:
    """[K, C, *kernel] -> [M, K, *kernel, C // M] (a strided view)."""
    return to_blocks(weight, m).movedim(-1, 0)


def from_position_major(blocks_pm: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_position_major`, as a contiguous weight."""
    return from_blocks(blocks_pm.movedim(0, -1)).contiguous()


class _MaskedWeight(torch.autograd.Function):
    """weight * mask, with the mask sampled from the pattern logits.

    Forward: the pattern argmax(scale * logits + gumbel) per block, `gumbel` given already divided by tau
    (`GumbelNoisePool.draw`; None: plain argmax). The effective weight is written in `out_dtype` (autocast's
    dtype when the layer runs under autocast, so autocast has no copy to make).
    Backward (straight-through): the gradient of softmax((scale * logits + gumbel) / tau) @ table,
    i.e. d/dlogits = scale * soft * (g - <soft, g>) / tau with g_p = sum over kept j of dL/dmask_j
    and dL/dmask = dL/dW_eff * W. `scale` is MaskLLM's logit scaling (1 = none).

    `kept_term` (None: off) is -c * |W| / sum(|W|) in position-major layout, MaskLLM's kept-magnitude regulariser
    -c * sum(mask * |W|) / sum(|W|) through the same estimator: it is added to dL/dmask before the pattern sums
    (one fused multiply-add over the weights instead of a softmax over every logit). `GumbelMask` computes it
    once per layer (the weight is frozen).

    Cost (the per-weight work dominates on small inputs, `make bench-train`): the noise comes divided by tau
    and is added in one pass; the first argmax over the P pattern slabs is a vectorised max and one byte of
    "which patterns reach it" per block looked up in a table straight to the block's 0/1 keep row
    (`first_argmax_keep`, uint8, block-last = a channels_last weight's memory order); under autocast that mask
    multiplies a bfloat16 copy of the frozen weight kept by `GumbelMask`; the backward converts the incoming
    gradient to float32 position-major in one copy and uses PyTorch's fused softmax over the P slabs and its
    fused backward (`_softmax_backward_data`: soft * (g - <soft, g>)), two passes over the logits instead of eight,
    on CPU in place (bit-exact there, `tests/test_gumbel.py`): the backward consumes the forward's perturbed
    logits, so a graph through this Function is backpropagated once (mask training never retains it).

    `fused` (masks.kernel = auto, `pipeline.masks.fused.usable` checked by the caller): the forward and the backward
    each run as one pass of the fused C kernel over the blocks instead (same masks, gradients equal up to float
    rounding); it saves the logits and the noise view rather than the perturbed logits, and recomputes them.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        gumbel: torch.Tensor | None,
        tau: float,
        weight_pm: torch.Tensor,
        table: torch.Tensor,
        codes: list[int],
        scale: float = 1.0,
        kept_term: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        workspace: torch.Tensor | None = None,
        fused: bool = False,
        kept_scale: float = 0.0,
    ) -> torch.Tensor:
        m = weight_pm.shape[0]
        if fused:  # the caller checked `fused.usable`: `weight` is block-last, in out_dtype, and so is empty_like's
            if gumbel is None or weight is None:
                raise RuntimeError("the fused mask path was taken without noise or without the cast weight")
            effective, alpha = torch.empty_like(weight), scale / tau
            fused_kernel.forward(logits, gumbel, alpha, _keep_rows(table), weight, effective)
            ctx.save_for_backward(logits, gumbel, weight_pm, table)
            ctx.fused, ctx.alpha, ctx.kept_scale = True, alpha, kept_scale
            return effective
        ctx.fused = False
        flat = logits.reshape(logits.shape[0], -1)
        if gumbel is not None:  # (scale * logits + gumbel) / tau in one pass; the argmax ignores the division
            perturbed, divided = torch.add(gumbel.view_as(flat), flat, alpha=scale / tau), True
        else:  # no noise: the argmax of the logits themselves (exact ties, as torch.argmax)
            perturbed, divided = (flat * scale if scale != 1.0 else flat), False
        keep = from_blocks(first_argmax_keep(perturbed, codes, m).view(*weight_pm.shape[1:], m))  # weight-shaped
        if weight is None:  # the weight in its own layout (and memory format)
            weight = from_position_major(weight_pm)
        effective = torch.empty_like(weight, dtype=out_dtype or weight.dtype)
        torch.mul(weight, keep, out=effective)  # mask, layout and autocast's dtype in one pass
        ctx.save_for_backward(perturbed, weight_pm, table, kept_term)
        ctx.tau, ctx.scale, ctx.divided, ctx.workspace = tau, scale, divided, workspace
        ctx.logits_shape = logits.shape
        return effective

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor):
        if ctx.fused:
            logits, gumbel, weight_pm, table = ctx.saved_tensors
            m = weight_pm.shape[0]
            if not fused_kernel.block_last(grad_weight, m):
                grad_weight = (
                    grad_weight.contiguous(memory_format=torch.channels_last)
                    if grad_weight.dim() == 4
                    else grad_weight.contiguous()
                )
            grad = fused_kernel.backward(
                logits, gumbel, ctx.alpha, _scaled_table(table, ctx.alpha), grad_weight, weight_pm, ctx.kept_scale
            )
            return grad, None, None, None, None, None, None, None, None, None, None, None, None
        perturbed, weight_pm, table, kept_term = ctx.saved_tensors
        m = weight_pm.shape[0]
        grad_mask = ctx.workspace if ctx.workspace is not None else torch.empty_like(weight_pm)  # position-major
        grad_mask.copy_(to_position_major(grad_weight, m))  # layout and dtype (bfloat16 under autocast) in one pass
        if kept_term is not None:
            torch.addcmul(kept_term, grad_mask, weight_pm, out=grad_mask)
        else:
            grad_mask.mul_(weight_pm)
        grad = (table * (ctx.scale / ctx.tau)).to(grad_mask.dtype) @ grad_mask.view(m, -1)  # [P, Nb]
        if ctx.divided and perturbed.device.type == "cpu":  # its own buffer: softmax over the P slabs in place
            soft = torch.ops.aten._softmax.out(perturbed, 0, False, out=perturbed)
            grad = torch.ops.aten._softmax_backward_data.out(grad, soft, 0, soft.dtype, grad_input=grad)
        else:
            soft = torch.softmax(perturbed if ctx.divided else perturbed.mul(1.0 / ctx.tau), 0)
            grad = torch.ops.aten._softmax_backward_data(grad, soft, 0, soft.dtype)  # soft * (grad - <soft, grad>)
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None, None, None, None, None, None


def _keep_rows(table: torch.Tensor) -> torch.Tensor:
    """The 0/1 keep row of each pattern as uint8 `[P, m]` (the fused kernel's)."""
    return table.to(torch.uint8).contiguous()


def _scaled_table(table: torch.Tensor, alpha: float) -> torch.Tensor:
    return (table * alpha).float().contiguous()


def straight_through_reference(
    logits: torch.Tensor, gumbel: torch.Tensor, tau: float, table: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Textbook hard straight-through Gumbel-Softmax on block-last logits `[*blocks, P]`
    (used by the tests to check the fast Function)."""
    m = table.shape[1]
    soft = torch.softmax((logits + gumbel) / tau, dim=-1)
    hard = table[soft.argmax(-1)]
    relaxed = soft @ table
    mask = hard + relaxed - relaxed.detach()
    return weight * from_blocks(mask.view(*to_blocks(weight, m).shape))


def _frozen_key(weight: torch.Tensor) -> tuple:
    """What identifies a frozen weight's storage and contents, for the copies `GumbelMask` keeps of it."""
    return weight.data_ptr(), weight._version, weight.device, weight.dtype, tuple(weight.shape)


class GumbelMask(nn.Module):
    """Pattern logits `[P, K, *kernel, C // M]` of one layer."""

    def __init__(
        self, logits: torch.Tensor, n: int, m: int, noise: GumbelNoisePool | None = None, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.n, self.m = n, m
        self.scale = scale
        self.logits = nn.Parameter(logits)
        self.register_buffer("table", pattern_table(n, m), persistent=False)
        self.codes = pattern_codes(n, m)
        self.tau = 1.0
        self.noise = noise
        self.kept_coefficient = 0.0  # MaskLLM's kept-magnitude regulariser (set_kept_magnitude_weight)
        self.kernel = "torch"  # masks.kernel: auto = the fused C kernel where it builds (`set_mask_kernel`)
        self._weight_pm: tuple[tuple, torch.Tensor, float] | None = None
        self._weight_cast: tuple[tuple, torch.Tensor] | None = None  # (key + dtype, the frozen weight in it)
        self._grad_workspace: torch.Tensor | None = None  # dL/dmask of the backward, position-major
        self._kept_term: tuple[tuple, float, torch.Tensor] | None = None

    def indices(self) -> torch.Tensor:
        """Argmax pattern index per block, `[K, *kernel, C // M]` (what bake and export use)."""
        return self.logits.detach().argmax(0)

    def _position_major(self, weight: torch.Tensor) -> torch.Tensor:
        key = _frozen_key(weight)
        if self._weight_pm is None or self._weight_pm[0] != key:  # the weight is frozen: computed once
            self._weight_pm = (
                key,
                to_position_major(weight.detach(), self.m).contiguous(),
                float(weight.detach().abs().sum()),
            )
        return self._weight_pm[1]

    def _cast(self, weight: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """The frozen weight in `dtype` (autocast's), cast once and kept with its memory format: masking a
        bfloat16 copy is a tenth of the cost of masking the float32 weight into a bfloat16 output."""
        if dtype is None or dtype == weight.dtype:
            return weight
        key = (*_frozen_key(weight), dtype)
        if self._weight_cast is None or self._weight_cast[0] != key:
            self._weight_cast = (key, weight.to(dtype))
        return self._weight_cast[1]

    def _workspace(self, weight_pm: torch.Tensor) -> torch.Tensor | None:
        """A float32 buffer shaped like `weight_pm` that the backward fills with dL/dmask (kept across steps, so
        no step allocates it afresh); None outside training."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        if (
            self._grad_workspace is None
            or self._grad_workspace.shape != weight_pm.shape
            or self._grad_workspace.device != weight_pm.device
            or self._grad_workspace.dtype != weight_pm.dtype
        ):
            self._grad_workspace = torch.empty_like(weight_pm)
        return self._grad_workspace

    def _kept_scale(self) -> float:
        """-c / sum(|W|) for the current weight and coefficient (0 when c = 0 or outside training): the scale of
        the kept-magnitude term, which the fused kernel applies to |W| itself."""
        if not (self.training and self.kept_coefficient):
            return 0.0
        if self._weight_pm is None:
            raise RuntimeError("GumbelMask._kept_scale before _position_major kept the weight")
        return -self.kept_coefficient / max(self._weight_pm[2], 1e-12)

    def _kept(self) -> torch.Tensor | None:
        """-c |W| / sum(|W|), position-major, for the current weight and coefficient (None when c = 0): the
        PyTorch path's kept-magnitude term, computed once per weight and coefficient."""
        scale = self._kept_scale()
        if not scale:
            return None
        if self._weight_pm is None:
            raise RuntimeError("GumbelMask._kept before _position_major kept the weight")
        key, weight_pm, _ = self._weight_pm
        if self._kept_term is None or self._kept_term[:2] != (key, self.kept_coefficient):
            self._kept_term = (key, self.kept_coefficient, weight_pm.abs().mul_(scale))
        return self._kept_term[2]

    def masked_weight(
        self, weight: torch.Tensor, weight_pm: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        gumbel = None
        if self.training:
            if self.noise is None:
                self.noise = GumbelNoisePool(self.logits.numel(), seed=0)
            gumbel = self.noise.draw(self.logits.numel(), self.logits.device, self.tau)
        real = None
        if weight_pm is None:  # a real weight (not the all-ones mask of forward()): the regulariser applies
            weight_pm = self._position_major(weight)
            real = self._cast(weight.detach(), out_dtype)
        fused = (
            self.kernel == "auto"
            and real is not None
            and torch.is_grad_enabled()
            and fused_kernel.usable(self.logits, gumbel, real, self.m)
        )
        if fused:  # the kernel forms the kept-magnitude term from the weight it reads anyway: a scale, no tensor
            return _MaskedWeight.apply(
                self.logits,
                gumbel,
                self.tau,
                weight_pm,
                self.table,
                self.codes,
                self.scale,
                None,
                real,
                out_dtype,
                None,
                True,
                self._kept_scale(),
            )
        kept = self._kept() if real is not None else None
        return _MaskedWeight.apply(
            self.logits,
            gumbel,
            self.tau,
            weight_pm,
            self.table,
            self.codes,
            self.scale,
            kept,
            real,
            out_dtype,
            self._workspace(weight_pm),
        )

    def forward(self) -> torch.Tensor:
        """The 0/1 mask in weight layout (sampled while training, argmax otherwise)."""
        k, *kernel, groups = self.logits.shape[1:]
        ones = torch.ones(self.m, k, *kernel, groups, device=self.logits.device)
        return self.masked_weight(ones, weight_pm=ones)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives a convolution's or linear layer's weight here (None outside autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class MaskedConv2d(nn.Conv2d):
    """A Conv2d computing with `weight * mask` (its own weight is untouched)."""

    sparse_mask: GumbelMask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(
            x, self.sparse_mask.masked_weight(self.weight, out_dtype=autocast_dtype(x)), self.bias
        )


class MaskedLinear(nn.Linear):
    sparse_mask: GumbelMask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sparse_mask.masked_weight(self.weight, out_dtype=autocast_dtype(x)), self.bias)


def initial_logits(
    weight: torch.Tensor,
    n: int,
    m: int,
    prior: str,
    strength: float,
    generator: torch.Generator,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pattern-major logits from a heuristic prior (MaskLLM's prior masks, Fang et al., 2024):
    `strength` x the share of the block's score each pattern keeps, so sampling starts near the
    heuristic's mask. The score is |w| (`magnitude`) or the given per-weight `scores` (wanda,
    sparsegpt). `uniform` (the paper's start): small random logits."""
    blocks = to_blocks(weight, m).shape[:-1]
    if prior == "uniform":
        return (torch.rand((num_patterns(n, m), *blocks), generator=generator) - 0.5) * 0.02
    if prior == "magnitude" or scores is not None:
        source = weight if prior == "magnitude" or scores is None else scores
        return (pattern_scores(source, n, m) * strength).movedim(-1, 0).contiguous()
    raise ValueError(f"mask prior {prior!r} needs per-weight scores; magnitude and uniform need none")


def attach_masks(
    model: nn.Module,
    report: EligibilityReport,
    n: int,
    m: int,
    prior: str = "magnitude",
    strength: float = 20.0,
    seed: int = 0,
    initial_indices: dict[str, torch.Tensor] | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    logit_scale: float = 1.0,
    noise_stream: int = 0,
) -> list[str]:
    """Turn every eligible layer into a masked layer and freeze everything but the logits.

    `scores` (per layer, weight layout) are the heuristic's importances for a wanda/sparsegpt prior;
    `initial_indices` (per layer) pulls the logits towards another method's mask by `strength`.
    """
    from pipeline.masks.schedules import prior_logits

    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    largest = max((math.prod(layer.weight_shape) // m * num_patterns(n, m) for layer in report.masked), default=1)
    noise = GumbelNoisePool(largest, seed, stream=noise_stream)
    names = []
    for layer in report.masked:
        module = model.get_submodule(layer.name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise RuntimeError(f"eligible layer {layer.name} is a {type(module).__name__}, not a Conv2d or Linear")
        logits = initial_logits(
            module.weight.detach().float().cpu(),
            n,
            m,
            prior,
            strength,
            generator,
            None if scores is None else scores[layer.name].float(),
        )
        if initial_indices is not None and layer.name in initial_indices:
            logits = logits + prior_logits(initial_indices[layer.name], n, m, strength)
        module.__class__ = MaskedConv2d if isinstance(module, nn.Conv2d) else MaskedLinear
        module.sparse_mask = GumbelMask(logits.to(module.weight.device), n, m, noise, logit_scale)
        names.append(layer.name)
    return names


def masked_modules(model: nn.Module) -> dict[str, MaskedConv2d | MaskedLinear]:
    return {
        name.removeprefix("module."): module
        for name, module in model.named_modules()
        if isinstance(module, (MaskedConv2d, MaskedLinear))
    }


def noise_pool(model: nn.Module) -> GumbelNoisePool | None:
    """The Gumbel noise pool the masked layers of `model` share (None before `attach_masks`)."""
    return next((module.noise for module in model.modules() if isinstance(module, GumbelMask)), None)


def prepare_step(model: nn.Module, step: int, tau: float) -> None:
    """Set the temperature and the noise pool's generation for training step `step`."""
    for module in model.modules():
        if isinstance(module, GumbelMask):
            module.tau = tau
            if module.noise is not None:
                module.noise.set_step(step, module.logits.device)


def mask_training_mode(model: nn.Module) -> None:
    """Everything frozen in eval mode (BatchNorm keeps its statistics); masks sample noise."""
    model.eval()
    for module in model.modules():
        if isinstance(module, GumbelMask):
            module.train()


def set_mask_kernel(model: nn.Module, kernel: str) -> None:
    """masks.kernel for every mask layer: auto (the fused C kernel of `pipeline.masks.fused` where it builds and
    the layer suits it) or torch (PyTorch ops only)."""
    for module in model.modules():
        if isinstance(module, GumbelMask):
            module.kernel = kernel


def set_kept_magnitude_weight(model: nn.Module, weight: float) -> None:
    """MaskLLM's kept-magnitude regulariser, loss -= weight x (mean over masked layers of the share of the
    layer's |w| the sampled mask keeps), applied inside each layer's straight-through backward."""
    layers = list(masked_modules(model).values())
    for module in layers:
        module.sparse_mask.kept_coefficient = weight / len(layers)


def current_indices(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.sparse_mask.indices().cpu() for name, module in masked_modules(model).items()}


def mask_logits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.sparse_mask.logits.detach().cpu().clone() for name, module in masked_modules(model).items()}


def use_argmax_masks(model: nn.Module, indices: dict[str, torch.Tensor]) -> None:
    """Set each masked layer's logits so that its argmax is `indices` (e.g. the best masks, to evaluate them)."""
    for name, module in masked_modules(model).items():
        logits = module.sparse_mask.logits
        with torch.no_grad():
            logits.copy_(F.one_hot(indices[name].long().to(logits.device), logits.shape[0]).movedim(-1, 0))


def load_mask_logits(model: nn.Module, logits: dict[str, torch.Tensor]) -> None:
    for name, module in masked_modules(model).items():
        with torch.no_grad():
            module.sparse_mask.logits.copy_(logits[name])
