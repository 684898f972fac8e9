"""Pure building blocks of the mask-training loop: step budget, schedules, early stop, losses, priors.

Nothing here touches a model or a data loader, so each piece is tested on its own; the loop in
`pipeline.masks.learning` (to become `pipeline.masks.learning`) composes them. Every schedule is a
function of (step, total steps), where the total comes from a step budget that does not depend on
the dataset's size: epochs are derived from the budget, never the other way round.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError


# --------------------------------------------------------------------------- budget
def steps_per_epoch(train_images: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over `train_images` (incomplete last batches dropped, as the sampler)."""
    if batch_size < 1 or world_size < 1:
        raise PipelineError(f"batch size {batch_size} and world size {world_size} must be at least 1")
    steps = (train_images // world_size) // batch_size
    if steps == 0:
        raise PipelineError(f"training set has {train_images} images, fewer than one batch of {batch_size} per "
                            f"process; lower masks.batch_size")
    return steps


def epochs_for_budget(steps: int, train_images: int, batch_size: int, world_size: int = 1) -> float:
    """Epochs a budget of `steps` optimizer steps amounts to on this dataset (reported, not chosen)."""
    if steps < 1:
        raise PipelineError(f"the step budget must be at least 1, got {steps}")
    return steps / steps_per_epoch(train_images, batch_size, world_size)


# --------------------------------------------------------------------------- schedules
def warmup_steps(total: int, share: float = 0.05) -> int:
    """Linear warm-up length: `share` of the budget, at least one step when there is room for it."""
    if not 0.0 <= share < 1.0:
        raise PipelineError(f"warm-up share must be in [0, 1), got {share}")
    return min(max(1, round(share * total)), total - 1) if share > 0 and total > 1 else 0


def warmup_cosine_factor(step: int, total: int, warmup: int, final: float = 0.0) -> float:
    """Learning-rate factor at `step` (0-based) of `total`: linear warm-up to 1 over `warmup` steps,
    then half a cosine from 1 down to `final` at the last step (Loshchilov & Hutter, SGDR, 2017;
    warm-up after Goyal et al., 2017). For torch.optim.lr_scheduler.LambdaLR."""
    if step < warmup:
        return (step + 1) / warmup
    decay = max(total - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / decay, 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def temperature(step: int, total: int, start: float, end: float, schedule: str) -> float:
    """Gumbel-Softmax temperature at `step` of the same budget: constant, linear, exponential
    (geometric, as in Jang et al., 2017) or cosine from `start` to `end`."""
    progress = min(step / max(total - 1, 1), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "exponential":
        return start * (end / start) ** progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise PipelineError(f"unknown masks.tau_schedule {schedule!r}; use constant, linear, exponential or cosine")


# --------------------------------------------------------------------------- early stop and best masks
@dataclass
class ArgmaxStopTracker:
    """Stop once the argmax masks stopped changing: `patience` evaluations in a row changed at most
    `threshold` of all blocks. State is plain data, so a resumed run continues the count."""

    patience: int
    threshold: float
    quiet: int = 0  # consecutive evaluations at or below the threshold

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise PipelineError(f"early-stop patience must be at least 1 evaluation, got {self.patience}")
        if not 0.0 <= self.threshold < 1.0:
            raise PipelineError(f"early-stop threshold is a share of blocks in [0, 1), got {self.threshold}")

    def update(self, changed_share: float) -> bool:
        """Record one evaluation's share of changed blocks; True when training should stop."""
        self.quiet = self.quiet + 1 if changed_share <= self.threshold else 0
        return self.quiet >= self.patience


@dataclass
class BestMasks:
    """The best argmax masks seen on the validation split, starting with the initial (heuristic) ones,
    so the result is never worse than where training started."""

    score: float = -math.inf
    step: int = -1
    indices: dict[str, torch.Tensor] = field(default_factory=dict)
    start_score: float | None = None

    def update(self, score: float, step: int, indices: dict[str, torch.Tensor]) -> bool:
        """Offer the masks evaluated at `step`; True when they are the new best (ties keep the older)."""
        if self.start_score is None:
            self.start_score = score
        if score <= self.score:
            return False
        self.score, self.step = score, step
        self.indices = {name: value.detach().clone() for name, value in indices.items()}
        return True

    @property
    def beat_start(self) -> bool:
        """Whether training found masks strictly better than the ones it started from."""
        return self.start_score is not None and self.step > 0 and self.score > self.start_score


def holdout_split(size: int, validation: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of `size` training images into (train, validation) index lists (never the test set)."""
    if not 0 < validation < size:
        raise PipelineError(f"a validation split of {validation} images needs between 1 and {size - 1} "
                            f"of the {size} training images")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[validation:].tolist()), sorted(order[:validation].tolist())


# --------------------------------------------------------------------------- losses
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
                      ) -> torch.Tensor:
    """KL(teacher || student) of the softened class distributions, times T^2 so the gradient scale
    does not depend on T (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    2015). The teacher is the frozen dense model; no labels are needed."""
    if temperature <= 0:
        raise PipelineError(f"distillation temperature must be positive, got {temperature}")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def feature_distillation_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
                              ) -> torch.Tensor:
    """Mean over layers of the relative squared error ||s - t||^2 / ||t||^2 between the student's and the
    frozen dense model's outputs of the same layers (the masked ones). Each layer weighs alike whatever
    its scale, and every image gives one target per activation rather than one per class, which is what
    a run without labels or with few images lacks (FitNets, Romero et al., 2015, at every masked layer)."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise PipelineError(f"feature distillation needs one teacher output per student layer, got "
                            f"{len(student_features)} and {len(teacher_features)}")
    errors = [(s.float() - t.detach().float()).pow(2).sum() / t.detach().float().pow(2).sum().clamp_min(1e-12)
              for s, t in zip(student_features, teacher_features)]
    return torch.stack(errors).mean()


# --------------------------------------------------------------------------- MaskLLM ideas
def prior_logits(indices: torch.Tensor, n: int, m: int, strength: float) -> torch.Tensor:
    """Pattern-major initial logits [P, *blocks] from a heuristic mask (MaskLLM's prior, Fang et al.,
    NeurIPS 2024): each candidate pattern is raised by `strength` x its overlap with the prior
    block's kept set (shared kept positions / n), centred over the patterns. The prior pattern gets
    the most, patterns sharing part of it get part, and strength 0 is a uniform start."""
    from pipeline.masks.patterns import pattern_table

    table = pattern_table(n, m)  # [P, M]
    overlap = (table @ table[indices.long()].unsqueeze(-1)).squeeze(-1) / n  # [*blocks, P]
    centred = overlap - overlap.mean(dim=-1, keepdim=True)
    return (strength * centred).movedim(-1, 0).contiguous()


def sampling_probabilities(logits: torch.Tensor, gumbel: torch.Tensor, tau: float, scale: float = 1.0
                           ) -> torch.Tensor:
    """Soft pattern choice softmax((scale * logits + g) / tau) over the pattern axis 0. `scale` is
    MaskLLM's logit scaling: the Gumbel noise g has a fixed spread, so scaling the logits sets how
    far they must move before sampling follows them (large: near-deterministic around the prior)."""
    return torch.softmax((scale * logits + gumbel) / tau, dim=0)
