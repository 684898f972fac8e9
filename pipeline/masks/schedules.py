"""Pure building blocks of the mask-training loop: step budget, schedules, early stop, losses, priors.

Nothing here touches a model or a data loader, so each piece is tested on its own; the loop in
`pipeline.masks.learning` composes them. Every schedule is a
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
        raise PipelineError(
            f"training set has {train_images} images, fewer than one batch of {batch_size} per "
            f"process; lower masks.batch_size"
        )
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


class MaskSchedule:
    """The learning-rate factor and the Gumbel temperature at each step of a run: warm-up + cosine and the
    recipe's temperature schedule over the budget (`masks.steps`), until a `Cooldown` (set when the
    validation score plateaus) takes both to their final values early."""

    def __init__(
        self, steps: int, warmup: int, lr_final: float, tau_start: float, tau_end: float, tau_schedule: str
    ) -> None:
        self.steps, self.warmup, self.lr_final = steps, warmup, lr_final
        self.tau_start, self.tau_end, self.tau_schedule = tau_start, tau_end, tau_schedule
        self.cooldown: Cooldown | None = None

    def base_factor(self, step: int) -> float:
        return warmup_cosine_factor(step, self.steps, self.warmup, self.lr_final)

    def base_tau(self, step: int) -> float:
        return temperature(step, self.steps, self.tau_start, self.tau_end, self.tau_schedule)

    def lr_factor(self, step: int) -> float:
        if self.cooldown is None or step <= self.cooldown.start:
            return self.base_factor(step)
        return self.cooldown.blend(self.base_factor(self.cooldown.start), self.lr_final, step)

    def tau(self, step: int) -> float:
        if self.cooldown is None or step <= self.cooldown.start:
            return self.base_tau(step)
        return self.cooldown.blend(self.base_tau(self.cooldown.start), self.tau_end, step)


@dataclass(frozen=True)
class Cooldown:
    """The anneal that ends a run once its validation score has plateaued: from step `start` the learning-rate
    factor and the Gumbel temperature go from their values at `start` to their final ones along half a cosine
    over `length` steps (the decay phase of a warmup-stable-decay schedule, started when it is needed rather
    than at a fixed step: Hu et al., MiniCPM, 2024; Haegele et al., "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations", 2024). At its end the argmax has settled (the logits no longer move) and
    training stops."""

    start: int
    length: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 1:
            raise PipelineError(
                f"cooldown from step {self.start} over {self.length} steps: needs a start >= 0 and at least 1 step"
            )

    def blend(self, at_start: float, final: float, step: int) -> float:
        progress = min(max(step - self.start, 0) / self.length, 1.0)
        return final + (at_start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- early stop and best masks
@dataclass(frozen=True)
class PlateauRule:
    """Stop mask training at the plateau: the validation score has not improved by more than the validation
    split's resolution (one image, 100 / `validation_images` points) for `patience` evaluations in a row, and
    at the latest evaluation the argmax changed on at most `changed` of the blocks.

    The rule reads the evaluation history only (each point's `top1` and `changed`), never the clock or the
    optimiser, so a resumed run stops where it would have, and a run over the whole budget (rule off) shows
    where the rule would have stopped it: `first_stop(history)` (what `bench-masks` reads off one run)."""

    patience: int
    changed: float
    validation_images: int

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise PipelineError(f"masks.stop_patience {self.patience}: the plateau rule needs at least 1 evaluation")
        if not 0.0 <= self.changed < 1.0:
            raise PipelineError(f"masks.stop_changed {self.changed}: a share of blocks in [0, 1)")
        if self.validation_images < 1:
            raise PipelineError("the plateau rule needs a validation split (masks.validation_images > 0)")

    @property
    def resolution(self) -> float:
        """One validation image, in points of top-1."""
        return 100.0 / self.validation_images

    def stale(self, history: list[dict]) -> int:
        """Evaluations since the score last rose more than one image above the reference (the score at the
        previous such rise; the first evaluation at the start)."""
        reference, since = None, 0
        for point in history:
            if reference is None or point["top1"] > reference + self.resolution + 1e-9:
                reference, since = point["top1"], 0
            else:
                since += 1
        return since

    def plateau(self, history: list[dict]) -> str | None:
        """The validation half of the rule: why the score has plateaued after the last evaluation; None if not."""
        if len(history) < 2:
            return None
        stale = self.stale(history)
        if stale < self.patience:
            return None
        return (
            f"plateau: validation top-1 not above {history[-1 - stale]['top1']:.2f}% + one image "
            f"({self.resolution:.2f} pt) for {stale} evaluations"
        )

    def reason(self, history: list[dict]) -> str | None:
        """Why training stops after the last evaluation of `history` without a cooldown (the plateau, and the
        argmax settled by itself); None to go on."""
        plateau = self.plateau(history)
        changed = history[-1]["changed"] if history else 1.0
        if plateau is None or changed > self.changed:
            return None
        return f"{plateau} and the argmax changed on {100 * changed:.3f}% of blocks (at most {100 * self.changed:.3f}%)"

    def first_stop(self, history: list[dict]) -> int | None:
        """Index of the evaluation after which the rule stops a run with this history; None: never."""
        return next((i for i in range(1, len(history)) if self.reason(history[: i + 1])), None)


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
        return above_start(self.step, self.score, self.start_score)


def above_start(step: int, score: float | None, start_score: float | None) -> bool:
    """Whether masks from a step after 0 scored strictly above the start's (the prior's) on the validation split."""
    return start_score is not None and score is not None and step > 0 and score > start_score


@dataclass
class KeptMasks:
    """The argmax masks a run returns (masks.keep), the step they come from, their validation score (None
    without a validation split) and why these."""

    indices: dict[str, torch.Tensor]
    step: int
    score: float | None
    why: str

    def beat(self, start_score: float | None) -> bool:
        """Whether these masks scored strictly above the prior's at step 0 on the validation split."""
        return above_start(self.step, self.score, start_score)


def keep_masks(keep: str, best: BestMasks, final: dict[str, torch.Tensor], step: int, score: float | None) -> KeptMasks:
    """Which masks a run that ends now returns. `final`: the argmax at `step`, scoring `score` on the validation
    split. keep = "best": the best masks seen. keep = "final": the final masks, unless they score below the prior's
    masks at step 0 (then the best ones, never worse than the start). Without a validation split (no best masks),
    the final masks."""
    if not best.indices:
        return KeptMasks(final, step, None, "final (no validation split to choose with)")
    if keep == "best":
        return KeptMasks(best.indices, max(best.step, 0), best.score, "best (masks.keep = best)")
    if score is not None and best.start_score is not None and score < best.start_score:
        return KeptMasks(
            best.indices,
            max(best.step, 0),
            best.score,
            f"best: the final masks scored {score:.2f} on the validation split, below the prior's "
            f"{best.start_score:.2f}",
        )
    return KeptMasks(final, step, score, "final")


# --------------------------------------------------------------------------- losses
def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of the softened class distributions, times T^2 so the gradient scale
    does not depend on T (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    2015). The teacher is the frozen dense model; no labels are needed."""
    if temperature <= 0:
        raise PipelineError(f"distillation temperature must be positive, got {temperature}")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def feature_distillation_loss(
    student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
) -> torch.Tensor:
    """Mean over layers of the relative squared error ||s - t||^2 / ||t||^2 between the student's and the
    frozen dense model's outputs of the same layers (the masked ones). Each layer weighs alike whatever
    its scale, and every image gives one target per activation rather than one per class, which is what
    a run without labels or with few images lacks (FitNets, Romero et al., 2015, at every masked layer)."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise PipelineError(
            f"feature distillation needs one teacher output per student layer, got "
            f"{len(student_features)} and {len(teacher_features)}"
        )
    errors = [
        (s.float() - t.detach().float()).pow(2).sum() / t.detach().float().pow(2).sum().clamp_min(1e-12)
        for s, t in zip(student_features, teacher_features)
    ]
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


def sampling_probabilities(logits: torch.Tensor, gumbel: torch.Tensor, tau: float, scale: float = 1.0) -> torch.Tensor:
    """Soft pattern choice softmax((scale * logits + g) / tau) over the pattern axis 0. `scale` is
    MaskLLM's logit scaling: the Gumbel noise g has a fixed spread, so scaling the logits sets how
    far they must move before sampling follows them (large: near-deterministic around the prior)."""
    return torch.softmax((scale * logits + gumbel) / tau, dim=0)
