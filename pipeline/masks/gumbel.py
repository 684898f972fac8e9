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

import math

import torch
import torch.nn.functional as F
from torch import nn

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
        self.offsets = torch.Generator().manual_seed(seed * 1000 + stream)

    def set_step(self, step: int, device: torch.device) -> None:
        generation = step // self.refresh_steps
        if generation != self.generation or self.pool is None or self.pool.device != device:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + generation)
            pool = torch.empty(self.size).exponential_(generator=generator).log_().neg_()
            self.pool, self.generation = pool.to(device), generation

    def draw(self, numel: int, device: torch.device) -> torch.Tensor:
        if self.pool is None or self.pool.device != device:
            self.set_step(max(self.generation, 0) * self.refresh_steps, device)
        offset = int(torch.randint(0, self.size - numel + 1, (1,), generator=self.offsets))
        return self.pool[offset: offset + numel]


def pattern_codes(n: int, m: int) -> list[int]:
    """Each pattern as a bit mask over its M positions (bit j set = weight j kept)."""
    return [sum(int(bit) << j for j, bit in enumerate(row.tolist())) for row in pattern_table(n, m)]


def _code_dtype(m: int) -> torch.dtype:
    return torch.uint8 if m <= 8 else torch.int16 if m <= 15 else torch.int32


def first_argmax_codes(scores: torch.Tensor, codes: list[int], m: int) -> torch.Tensor:
    """Bit code of the first maximal pattern per block (torch.argmax's tie rule), from `[P, Nb]`."""
    return argmax_codes_and_max(scores, codes, m)[0]


def argmax_codes_and_max(scores: torch.Tensor, codes: list[int], m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bit code of the first maximal pattern, the maximum) per block: one vectorised max over the P slabs,
    then the patterns from last to first mark where they reach it, so the first one wins ties."""
    best = scores.amax(0)
    code = torch.full(best.shape, codes[-1], dtype=_code_dtype(m), device=scores.device)
    for p in range(scores.shape[0] - 2, -1, -1):
        code.masked_fill_(scores[p] == best, codes[p])
    return code, best


def keep_from_codes(code: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """`[M, Nb]` 0/1 mask from the bit codes."""
    return torch.stack([(code >> j) & 1 for j in range(m)]).to(dtype)


def to_position_major(weight: torch.Tensor, m: int) -> torch.Tensor:
    """[K, C, *kernel] -> [M, K, *kernel, C // M] (a strided view)."""
    return to_blocks(weight, m).movedim(-1, 0)


def from_position_major(blocks_pm: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_position_major`, as a contiguous weight."""
    return from_blocks(blocks_pm.movedim(0, -1)).contiguous()


def from_position_major_view(blocks_pm: torch.Tensor) -> torch.Tensor:
    """`[M, K, *kernel, C // M]` seen in weight layout `[K, C, *kernel]` (a strided view, no copy)."""
    return from_blocks(blocks_pm.movedim(0, -1))


class _MaskedWeight(torch.autograd.Function):
    """weight * mask, with the mask sampled from the pattern logits.

    Forward: the pattern argmax(scale * logits + gumbel) per block (gumbel = None: plain argmax).
    Backward (straight-through): the gradient of softmax((scale * logits + gumbel) / tau) @ table,
    i.e. d/dlogits = scale * soft * (g - <soft, g>) / tau with g_p = sum over kept j of dL/dmask_j
    and dL/dmask = dL/dW_eff * W. `scale` is MaskLLM's logit scaling (1 = none).

    `kept_term` (None: off) is -c * |W| / sum(|W|) in position-major layout, MaskLLM's kept-magnitude regulariser
    -c * sum(mask * |W|) / sum(|W|) through the same estimator: it is added to dL/dmask before the pattern sums
    (one fused multiply-add over the weights instead of a softmax over every logit). `GumbelMask` computes it
    once per layer (the weight is frozen).

    Cost (the per-weight work dominates on small inputs, `make bench-train`): the maximum over the P pattern
    slabs is one vectorised reduction, kept for the backward's softmax; the 0/1 mask stays uint8 and is applied
    to the frozen weight in its own layout and memory format in one pass (no position-major product copied
    back); the backward makes one pass fewer over the logits by forming soft * g first
    (soft * (g - <soft, g>) = soft * g - soft * sum(soft * g)).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, gumbel: torch.Tensor | None, tau: float, weight_pm: torch.Tensor,
                table: torch.Tensor, codes: list[int], scale: float = 1.0, kept_term: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        m = weight_pm.shape[0]
        flat = logits.reshape(logits.shape[0], -1)
        if scale != 1.0:
            flat = flat * scale
        perturbed = flat + gumbel.view_as(flat) if gumbel is not None else flat
        code, best = argmax_codes_and_max(perturbed, codes, m)
        keep = from_position_major_view(keep_from_codes(code, m, torch.uint8).view_as(weight_pm))
        if weight is None:  # the weight in its own layout (and memory format)
            weight = from_position_major(weight_pm)
        effective = torch.empty_like(weight)
        torch.mul(weight, keep, out=effective)  # mask and layout in one pass
        ctx.save_for_backward(perturbed, best, weight_pm, table, kept_term)
        ctx.tau = tau
        ctx.scale = scale
        ctx.logits_shape = logits.shape
        return effective

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor):
        perturbed, best, weight_pm, table, kept_term = ctx.saved_tensors
        m = weight_pm.shape[0]
        grad_pm = to_position_major(grad_weight, m)
        grad_mask = torch.empty_like(weight_pm)  # contiguous, position-major
        if kept_term is not None:
            torch.addcmul(kept_term, grad_pm, weight_pm, out=grad_mask)
        else:
            torch.mul(grad_pm, weight_pm, out=grad_mask)
        grad = (table * (ctx.scale / ctx.tau)).to(grad_mask.dtype) @ grad_mask.view(m, -1)  # [P, Nb]
        soft = torch.sub(perturbed, best).div_(ctx.tau).exp_()  # softmax((x + g) / tau) over P, max from forward
        soft.div_(soft.sum(0))
        grad.mul_(soft)
        grad.sub_(soft.mul_(grad.sum(0)))
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None, None


def straight_through_reference(logits: torch.Tensor, gumbel: torch.Tensor, tau: float, table: torch.Tensor,
                               weight: torch.Tensor) -> torch.Tensor:
    """Textbook hard straight-through Gumbel-Softmax on block-last logits `[*blocks, P]`
    (used by the tests to check the fast Function)."""
    m = table.shape[1]
    soft = torch.softmax((logits + gumbel) / tau, dim=-1)
    hard = table[soft.argmax(-1)]
    relaxed = soft @ table
    mask = hard + relaxed - relaxed.detach()
    return weight * from_blocks(mask.view(*to_blocks(weight, m).shape))


class GumbelMask(nn.Module):
    """Pattern logits `[P, K, *kernel, C // M]` of one layer."""

    def __init__(self, logits: torch.Tensor, n: int, m: int, noise: GumbelNoisePool | None = None,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.n, self.m = n, m
        self.scale = scale
        self.logits = nn.Parameter(logits)
        self.register_buffer("table", pattern_table(n, m), persistent=False)
        self.codes = pattern_codes(n, m)
        self.tau = 1.0
        self.noise = noise
        self.kept_coefficient = 0.0  # MaskLLM's kept-magnitude regulariser (set_kept_magnitude_weight)
        self._weight_pm: tuple[tuple, torch.Tensor, float] | None = None
        self._kept_term: tuple[tuple, float, torch.Tensor] | None = None

    def indices(self) -> torch.Tensor:
        """Argmax pattern index per block, `[K, *kernel, C // M]` (what bake and export use)."""
        return self.logits.detach().argmax(0)

    def _position_major(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype, tuple(weight.shape))
        if self._weight_pm is None or self._weight_pm[0] != key:  # the weight is frozen: computed once
            self._weight_pm = (key, to_position_major(weight.detach(), self.m).contiguous(),
                               float(weight.detach().abs().sum()))
        return self._weight_pm[1]

    def _kept(self) -> torch.Tensor | None:
        """-c |W| / sum(|W|), position-major, for the current weight and coefficient (None when c = 0)."""
        if not (self.training and self.kept_coefficient):
            return None
        key, weight_pm, total_abs = self._weight_pm
        if self._kept_term is None or self._kept_term[:2] != (key, self.kept_coefficient):
            term = weight_pm.abs().mul_(-self.kept_coefficient / max(total_abs, 1e-12))
            self._kept_term = (key, self.kept_coefficient, term)
        return self._kept_term[2]

    def masked_weight(self, weight: torch.Tensor, weight_pm: torch.Tensor | None = None) -> torch.Tensor:
        gumbel = None
        if self.training:
            if self.noise is None:
                self.noise = GumbelNoisePool(self.logits.numel(), seed=0)
            gumbel = self.noise.draw(self.logits.numel(), self.logits.device)
        kept, real = None, None
        if weight_pm is None:  # a real weight (not the all-ones mask of forward()): the regulariser applies
            weight_pm = self._position_major(weight)
            kept, real = self._kept(), weight.detach()
        return _MaskedWeight.apply(self.logits, gumbel, self.tau, weight_pm, self.table, self.codes, self.scale,
                                   kept, real)

    def forward(self) -> torch.Tensor:
        """The 0/1 mask in weight layout (sampled while training, argmax otherwise)."""
        k, *kernel, groups = self.logits.shape[1:]
        ones = torch.ones(self.m, k, *kernel, groups, device=self.logits.device)
        return self.masked_weight(ones, weight_pm=ones)


class MaskedConv2d(nn.Conv2d):
    """A Conv2d computing with `weight * mask` (its own weight is untouched)."""

    sparse_mask: GumbelMask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.sparse_mask.masked_weight(self.weight), self.bias)


class MaskedLinear(nn.Linear):
    sparse_mask: GumbelMask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sparse_mask.masked_weight(self.weight), self.bias)


def initial_logits(weight: torch.Tensor, n: int, m: int, prior: str, strength: float,
                   generator: torch.Generator, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Pattern-major logits from a heuristic prior (MaskLLM's prior masks, Fang et al., 2024):
    `strength` x the share of the block's score each pattern keeps, so sampling starts near the
    heuristic's mask. The score is |w| (`magnitude`) or the given per-weight `scores` (wanda,
    sparsegpt). `uniform` (the paper's start): small random logits."""
    blocks = to_blocks(weight, m).shape[:-1]
    if prior == "uniform":
        return (torch.rand((num_patterns(n, m), *blocks), generator=generator) - 0.5) * 0.02
    if prior == "magnitude" or scores is not None:
        source = weight if prior == "magnitude" else scores
        return (pattern_scores(source, n, m) * strength).movedim(-1, 0).contiguous()
    raise ValueError(f"mask prior {prior!r} needs per-weight scores; magnitude and uniform need none")


def attach_masks(model: nn.Module, report: EligibilityReport, n: int, m: int, prior: str = "magnitude",
                 strength: float = 20.0, seed: int = 0, initial_indices: dict[str, torch.Tensor] | None = None,
                 scores: dict[str, torch.Tensor] | None = None, logit_scale: float = 1.0,
                 noise_stream: int = 0) -> list[str]:
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
        logits = initial_logits(module.weight.detach().float().cpu(), n, m, prior, strength, generator,
                                None if scores is None else scores[layer.name].float())
        if initial_indices is not None and layer.name in initial_indices:
            logits = logits + prior_logits(initial_indices[layer.name], n, m, strength)
        module.__class__ = MaskedConv2d if isinstance(module, nn.Conv2d) else MaskedLinear
        module.sparse_mask = GumbelMask(logits.to(module.weight.device), n, m, noise, logit_scale)
        names.append(layer.name)
    return names


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name.removeprefix("module."): module for name, module in model.named_modules()
            if isinstance(module, (MaskedConv2d, MaskedLinear))}


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
