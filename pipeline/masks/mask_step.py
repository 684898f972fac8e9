"""One mask-training step, built once and called by the training loop (`pipeline.masks.learning`) and by
`bench-train`, so the benchmark times the step train-masks runs: the masks attached to the frozen model, the
teacher for distillation, the feature hooks, DDP, AdamW with warm-up + cosine, and the device's step settings
(bfloat16 autocast and channels_last on CUDA, `StepSettings`), through `pipeline.training.train_step`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.masks.eligibility import EligibilityReport
from pipeline.masks.gumbel import (
    attach_masks,
    mask_training_mode,
    masked_modules,
    prepare_step,
    set_kept_magnitude_weight,
    set_mask_kernel,
)
from pipeline.masks.schedules import MaskSchedule, distillation_loss, feature_distillation_loss, warmup_steps
from pipeline.recipe.config import MaskConfig
from pipeline.training import StepSettings, train_step


def mask_optimizer(logits: Sequence[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW on the logits only (as the paper); the fused kernel makes it one pass over them."""
    try:
        return torch.optim.AdamW(logits, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # devices without a fused implementation
        return torch.optim.AdamW(logits, lr=lr, weight_decay=weight_decay)


AUTO_LOSS_LABELED = "ce+distill"
AUTO_LOSS_UNLABELED = "distill"


def loss_terms(loss: str) -> set[str]:
    """The terms of a resolved loss such as `ce+distill+features`."""
    return set(loss.split("+"))


def resolve_loss(cfg: MaskConfig, unlabeled: bool) -> str:
    """The loss a run uses. `auto` is AUTO_LOSS_LABELED with labels and AUTO_LOSS_UNLABELED without
    (docs/notebook/results.md "Harder demo" has the measurements behind both)."""
    if unlabeled:
        if cfg.loss == "auto":
            return AUTO_LOSS_UNLABELED
        if "ce" in loss_terms(cfg.loss):
            raise PipelineError(
                f"masks.loss = {cfg.loss!r} reads labels, but --unlabeled has none; "
                f"use masks.loss=auto ({AUTO_LOSS_UNLABELED}) or terms of pseudo, distill and "
                "features (e.g. pseudo+distill)"
            )
        return cfg.loss
    return AUTO_LOSS_LABELED if cfg.loss == "auto" else cfg.loss


def needs_teacher(loss: str) -> bool:
    return bool(loss_terms(loss) & {"pseudo", "distill", "features"})


def mask_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    loss: str,
    distill_temperature: float,
    features: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    feature_weight: float = 1.0,
) -> torch.Tensor:
    """The training loss of one batch: the sum of its terms, cross-entropy on the labels (`ce`) or on the
    dense model's predicted classes (`pseudo`, no label read), distillation of the dense model's logits
    (`distill`) and, weighted by `feature_weight`, of the masked layers' outputs (`features`, given as
    (student outputs, dense outputs))."""
    terms = loss_terms(loss)
    total = logits.new_zeros((), dtype=torch.float32)
    if "ce" in terms:
        if labels is None:
            raise RuntimeError("the ce term needs labels (resolve_loss picks a label-free loss without them)")
        total = total + F.cross_entropy(logits.float(), labels)
    if terms & {"pseudo", "distill"}:
        if teacher_logits is None:
            raise RuntimeError("the pseudo and distill terms need the dense model's logits (needs_teacher)")
        if "pseudo" in terms:
            total = total + F.cross_entropy(logits.float(), teacher_logits.detach().argmax(1))
        if "distill" in terms:
            total = total + distillation_loss(logits, teacher_logits, distill_temperature)
    if "features" in terms:
        if features is None:
            raise ValueError("the features term needs the student's and the dense model's layer outputs")
        total = total + feature_weight * feature_distillation_loss(*features)
    return total


class LayerOutputs:
    """Forward hooks keeping the outputs of the named layers of the student and of the dense model
    while `recording` (training steps only, so evaluations hold no activations)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: list[str]) -> None:
        self.names = list(names)
        self.active = False
        self.outputs: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
        self.handles = [
            model.get_submodule(name).register_forward_hook(self._keeper(side, name))
            for side, model in enumerate((student, teacher))
            for name in self.names
        ]

    def _keeper(self, side: int, name: str):
        def keep(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if self.active:
                self.outputs[side][name] = output

        return keep

    @contextlib.contextmanager
    def recording(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(student outputs, dense outputs) of the last recorded forward passes, in the order of `names`."""
        student, dense = ([outputs[name] for name in self.names] for outputs in self.outputs)
        self.outputs = ({}, {})
        return student, dense

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class MaskLoss:
    """loss_fn of `train_step` for mask training: the teacher's forward pass (no gradient), the student's, and
    `mask_loss` over them; the layer outputs are recorded during the step only."""

    def __init__(
        self,
        kind: str,
        teacher: nn.Module | None,
        layer_outputs: LayerOutputs | None,
        distill_temperature: float,
        feature_weight: float,
    ) -> None:
        self.kind, self.teacher, self.layer_outputs = kind, teacher, layer_outputs
        self.distill_temperature, self.feature_weight = distill_temperature, feature_weight

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None):
        recording = self.layer_outputs.recording() if self.layer_outputs else contextlib.nullcontext()
        with recording:
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
            logits = model(images)
            features = self.layer_outputs.take() if self.layer_outputs else None
        return mask_loss(
            logits, labels, teacher_logits, self.kind, self.distill_temperature, features, self.feature_weight
        ), logits


@dataclass
class MaskStep:
    """The mask-training step of one run; `step(images, labels, index)` trains the logits once."""

    model: nn.Module  # the masked model (its logits are the only trainable tensors)
    wrapped: nn.Module  # the model, or its DistributedDataParallel wrapper
    loss: MaskLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    settings: StepSettings
    device: torch.device
    cfg: MaskConfig
    schedule: MaskSchedule  # the learning-rate factor (the scheduler's) and the temperature, cooldown included

    def tau(self, index: int) -> float:
        return self.schedule.tau(index)

    def step(self, images: torch.Tensor, labels: torch.Tensor | None, index: int) -> torch.Tensor:
        mask_training_mode(self.model)
        prepare_step(self.model, index, self.tau(index))
        images = self.settings.prepare_images(images, self.device)
        labels = None if labels is None else labels.to(self.device, non_blocking=True)
        loss, _ = train_step(self.wrapped, images, labels, self.loss, self.optimizer, self.scheduler, self.settings)
        return loss

    def close(self) -> None:
        if self.loss.layer_outputs:
            self.loss.layer_outputs.remove()


def build_mask_step(
    model: nn.Module,
    report: EligibilityReport,
    cfg: MaskConfig,
    device: torch.device,
    loss: str,
    settings: StepSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    initial_indices: dict[str, torch.Tensor] | None = None,
    scores: dict[str, torch.Tensor] | None = None,
) -> MaskStep:
    """Attach masks to `model` (frozen, in place) for `report.masked` and build the step that trains them, as the
    recipe's masks section CFG says."""
    model.eval()
    teacher = settings.prepare_model(copy.deepcopy(model).to(device).eval()) if needs_teacher(loss) else None
    attach_masks(
        model,
        report,
        cfg.n,
        cfg.m,
        cfg.prior,
        cfg.prior_strength,
        cfg.seed,
        initial_indices,
        scores,
        cfg.logit_scale,
        noise_stream=rank,
    )
    set_kept_magnitude_weight(model, cfg.kept_magnitude_weight)
    set_mask_kernel(model, cfg.kernel)
    settings.prepare_model(model.to(device))
    trainable = [module.sparse_mask.logits for module in masked_modules(model).values()]
    if not trainable:
        raise PipelineError("the model has no eligible layers to mask; check masks.include/exclude")
    wrapped: nn.Module = model
    if world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    layer_outputs = None
    if "features" in loss_terms(loss):
        if teacher is None:
            raise RuntimeError("the features term needs the dense model (needs_teacher)")
        layer_outputs = LayerOutputs(model, teacher, [layer.name for layer in report.masked])
    optimizer = mask_optimizer(trainable, cfg.lr, cfg.weight_decay)
    schedule = MaskSchedule(
        cfg.steps, warmup_steps(cfg.steps, cfg.warmup_share), cfg.lr_final, cfg.tau_start, cfg.tau_end, cfg.tau_schedule
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: schedule.lr_factor(index))
    return MaskStep(
        model,
        wrapped,
        MaskLoss(loss, teacher, layer_outputs, cfg.distill_temperature, cfg.feature_weight),
        optimizer,
        scheduler,
        settings,
        device,
        cfg,
        schedule,
    )
