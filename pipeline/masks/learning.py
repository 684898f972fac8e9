"""The mask-training loop: AdamW on the pattern logits only, warm-up + cosine learning rate and an
annealed Gumbel temperature over a budget of `masks.steps` optimizer steps.

`learn_masks` is one plain function (torchvision-references style) used by the `train-masks`
stage, by `compare` and by tests. It holds out a validation split from the training images, judges
every evaluation on it (never on the test set), and returns the best argmax masks seen, the
heuristic prior's masks at step 0 included, so the result is never worse than its start. The loss
is cross-entropy, distillation from the frozen dense model, or both; without labels
(`unlabeled=True`) distillation is the only loss and the validation score is the agreement with
the dense model. It checkpoints every `masks.checkpoint_every` steps and on SIGTERM, and resumes
exactly: batch order, Gumbel noise, optimiser state, best masks and early-stop count continue.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from pipeline.data.datasets import DataBundle, ResumableBatchSampler, make_loader
from pipeline.errors import PipelineError
from pipeline.masks.checkpoint import MaskCheckpoint
from pipeline.masks.eligibility import EligibilityReport
from pipeline.masks.gumbel import (attach_masks, current_indices, load_mask_logits, mask_logits,
                                   mask_training_mode, masked_modules, prepare_step, set_kept_magnitude_weight)
from pipeline.masks.schedules import (ArgmaxStopTracker, BestMasks, distillation_loss, feature_distillation_loss,
                                      holdout_split, steps_per_epoch, temperature, warmup_cosine_factor,
                                      warmup_steps)
from pipeline.recipe.config import MaskConfig, Recipe
from pipeline.training import evaluate, stop_on_signals
from pipeline.progress import progress

EVALUATIONS_PER_RUN = 20  # masks.eval_every = 0 evaluates this many times over the budget
VALIDATION_SHARE_LIMIT = 5  # the validation split takes at most 1/5 of the training images


@dataclass
class LearnResult:
    indices: dict[str, torch.Tensor]  # the best argmax masks on the validation split
    logits: dict[str, torch.Tensor]  # the logits at the last step
    history: list[dict] = field(default_factory=list)  # evaluations: step, epoch, top1, top5, changed, lr, tau
    steps: int = 0
    seconds: float = 0.0
    stopped: int = 0  # the signal number that ended the run early (resume to continue); 0 when it finished
    rank_checksums: list[str] = field(default_factory=list)
    best_step: int = 0
    best_score: float | None = None  # validation top-1 (agreement with the dense model when unlabeled)
    start_score: float | None = None  # the same for the prior's masks at step 0
    beat_prior: bool = False
    stopped_early: bool = False  # the argmax masks stopped changing (masks.stop_patience)
    loss: str = "ce"
    validation_images: int = 0
    train_images: int = 0


# The settings a CUDA run trains with (channels_last, bfloat16 autocast), also on CPU when True: the tests set it so
# that the code a GPU runs has run before (tests/test_gpu_check.py).
CUDA_SETTINGS_ON_CPU = False


def indices_checksum(indices: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(indices):
        digest.update(name.encode())
        digest.update(indices[name].to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def changed_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    changed = sum(int((before[name] != after[name]).sum()) for name in after)
    total = sum(tensor.numel() for tensor in after.values())
    return changed / max(total, 1)


def mask_optimizer(logits: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
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
    (README "Harder demo" has the measurements behind both)."""
    if unlabeled:
        if cfg.loss == "auto":
            return AUTO_LOSS_UNLABELED
        if "ce" in loss_terms(cfg.loss):
            raise PipelineError(f"masks.loss = {cfg.loss!r} reads labels, but --unlabeled has none; "
                                f"use masks.loss=auto ({AUTO_LOSS_UNLABELED}) or terms of pseudo, distill and "
                                "features (e.g. pseudo+distill)")
        return cfg.loss
    return AUTO_LOSS_LABELED if cfg.loss == "auto" else cfg.loss


def needs_teacher(loss: str) -> bool:
    return bool(loss_terms(loss) & {"pseudo", "distill", "features"})


def mask_loss(logits: torch.Tensor, labels: torch.Tensor | None, teacher_logits: torch.Tensor | None, loss: str,
              distill_temperature: float, features: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
              feature_weight: float = 1.0) -> torch.Tensor:
    """The training loss of one batch: the sum of its terms, cross-entropy on the labels (`ce`) or on the
    dense model's predicted classes (`pseudo`, no label read), distillation of the dense model's logits
    (`distill`) and, weighted by `feature_weight`, of the masked layers' outputs (`features`, given as
    (student outputs, dense outputs))."""
    terms = loss_terms(loss)
    total = logits.new_zeros((), dtype=torch.float32)
    if "ce" in terms:
        total = total + F.cross_entropy(logits.float(), labels)
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
        self.handles = [model.get_submodule(name).register_forward_hook(self._keeper(side, name))
                        for side, model in enumerate((student, teacher)) for name in self.names]

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
        taken = tuple([outputs[name] for name in self.names] for outputs in self.outputs)
        self.outputs = ({}, {})
        return taken

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class TeacherLabels(Dataset):
    """A dataset whose labels are the dense model's predictions: the validation split of an unlabeled
    run, so that top-1 on it is the agreement with the dense model and no true label is read."""

    def __init__(self, images: Dataset, predictions: torch.Tensor) -> None:
        self.images, self.predictions = images, predictions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index][0], self.predictions[index]


@torch.no_grad()
def predictions(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images.to(device)).argmax(1).cpu()
                      for images, _ in make_loader(dataset, batch_size=batch_size)])


def split_training_images(data: DataBundle, cfg: MaskConfig) -> tuple[Dataset, Dataset | None]:
    """(training subset, validation split) of the recipe's training images; the test set is never touched.
    The validation split is served without augmentation (`data.plain_train`), so its score is stable."""
    images = list(range(len(data.train)))
    if cfg.train_images and cfg.train_images < len(images):
        chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed + 17))
        images = sorted(chosen[:cfg.train_images].tolist())
    validation = min(cfg.validation_images, len(images) // VALIDATION_SHARE_LIMIT)
    if validation < 1:
        return (Subset(data.train, images) if len(images) < len(data.train) else data.train), None
    kept, held_out = holdout_split(len(images), validation, cfg.seed)
    return Subset(data.train, [images[i] for i in kept]), Subset(data.plain_train, [images[i] for i in held_out])


def prior_scores(model: nn.Module, report: EligibilityReport, cfg: MaskConfig, train: Dataset,
                 device: torch.device) -> dict[str, torch.Tensor] | None:
    """Per-weight scores of an activation-aware prior (wanda, sparsegpt) from calibration images."""
    if cfg.prior not in ("wanda", "sparsegpt"):
        return None
    from pipeline.masks.activation_aware import calibration_batches, layer_scores

    batches = calibration_batches(train, seed=cfg.seed)
    return layer_scores(copy.deepcopy(model).to(device).eval(), [layer.name for layer in report.masked], batches,
                        cfg.prior, device)


def learn_masks(model: nn.Module, report: EligibilityReport, recipe: Recipe, data: DataBundle,
                device: torch.device, *, checkpoint: Path | None = None, resume: bool = False,
                initial_indices: dict[str, torch.Tensor] | None = None, unlabeled: bool = False, rank: int = 0,
                world_size: int = 1, log: Callable[[str], None] = print) -> LearnResult:
    """Learn N:M masks for `report.masked` layers of `model` (weights stay frozen). A SIGTERM from
    the start on (set-up included) ends the run with a checkpoint at the next step."""
    with stop_on_signals() as stop:
        if rank == 0:  # also the readiness signal the tests wait for before sending SIGTERM
            log("SIGTERM or Ctrl-C now stops at the next step" +
                (f" and saves {checkpoint} (continue with --resume)" if checkpoint is not None else ""))
        return _learn_masks(model, report, recipe, data, device, checkpoint, resume, initial_indices, unlabeled,
                            rank, world_size, log, stop)


def _learn_masks(model: nn.Module, report: EligibilityReport, recipe: Recipe, data: DataBundle,
                 device: torch.device, checkpoint: Path | None, resume: bool,
                 initial_indices: dict[str, torch.Tensor] | None, unlabeled: bool, rank: int, world_size: int,
                 log: Callable[[str], None], stop) -> LearnResult:
    cfg = recipe.masks
    loss_kind = resolve_loss(cfg, unlabeled)
    train, validation = split_training_images(data, cfg)
    total_steps = cfg.steps
    per_epoch = steps_per_epoch(len(train), cfg.batch_size, world_size)
    eval_every = cfg.eval_every or max(1, -(-total_steps // EVALUATIONS_PER_RUN))
    model.eval()
    teacher = copy.deepcopy(model).to(device).eval() if needs_teacher(loss_kind) else None
    if validation is not None and unlabeled:
        validation = TeacherLabels(validation, predictions(model.to(device), validation,
                                                           recipe.data.eval_batch_size, device))
    scores = prior_scores(model, report, cfg, train, device)
    use_cuda = device.type == "cuda"
    cuda_settings = use_cuda or CUDA_SETTINGS_ON_CPU  # channels_last + bfloat16 autocast
    if cuda_settings:  # before the masks: their logits are 5-D, which channels_last cannot hold
        model.to(memory_format=torch.channels_last)
    attach_masks(model, report, cfg.n, cfg.m, cfg.prior, cfg.prior_strength, cfg.seed, initial_indices, scores,
                 cfg.logit_scale)
    set_kept_magnitude_weight(model, cfg.kept_magnitude_weight)
    model.to(device)
    trainable = [module.sparse_mask.logits for module in masked_modules(model).values()]
    if not trainable:
        raise PipelineError(f"model {recipe.name} has no eligible layers to mask; check masks.include/exclude")
    wrapped: nn.Module = model
    if world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None,
                                                      broadcast_buffers=False)

    layer_outputs = (LayerOutputs(model, teacher, [layer.name for layer in report.masked])
                     if "features" in loss_terms(loss_kind) else None)
    sampler = ResumableBatchSampler(len(train), cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank,
                                    world_size=world_size)
    optimizer = mask_optimizer(trainable, cfg.lr, cfg.weight_decay)
    warmup = warmup_steps(total_steps, cfg.warmup_share)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup, cfg.lr_final))
    # The RNG drives the Gumbel noise: offset per rank so ranks sample different noise.
    torch.manual_seed(cfg.seed * 1000 + rank)
    state = {"step": 0, "epoch": 0, "batch": 0, "history": [], "seconds": 0.0, "quiet": 0,
             "best": {"score": None, "step": -1, "start_score": None, "indices": {}}, "stopped_early": False}
    recipe_key = recipe.digest("masks", "arch", "num_classes") + (":unlabeled" if unlabeled else "")

    if resume and checkpoint is not None and checkpoint.is_file():
        saved = MaskCheckpoint.load(checkpoint, fix="delete it or drop --resume")
        if saved.recipe_key != recipe_key:
            raise PipelineError(f"{checkpoint} was written with other mask settings; drop --resume to start over")
        load_mask_logits(model, saved.logits)
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        state = saved.state
        torch.set_rng_state(saved.rng[rank] if rank < len(saved.rng) else saved.rng[0])
        log(f"resumed mask training at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})")
    saved_best = state["best"]
    best = BestMasks(score=-float("inf") if saved_best["score"] is None else saved_best["score"],
                     step=saved_best["step"], indices=saved_best["indices"], start_score=saved_best["start_score"])
    tracker = ArgmaxStopTracker(cfg.stop_patience, cfg.stop_changed, state["quiet"]) if cfg.stop_patience else None

    def sync_state() -> None:
        state["best"] = {"score": None if best.step < 0 else best.score, "step": best.step,
                         "start_score": best.start_score,
                         "indices": {name: idx.to(torch.int16) for name, idx in best.indices.items()}}
        state["quiet"] = tracker.quiet if tracker else 0

    def save_checkpoint(final: bool = False) -> None:
        sync_state()
        rng_states = [torch.get_rng_state()]
        if world_size > 1:
            rng_states = [torch.empty_like(rng_states[0]) for _ in range(world_size)]
            dist.all_gather(rng_states, torch.get_rng_state())
        if rank == 0 and checkpoint is not None:
            indices = best.indices if final and best.indices else current_indices(model)
            MaskCheckpoint(
                recipe_key=recipe_key, final=final, n=cfg.n, m=cfg.m, logits=mask_logits(model),
                indices={name: idx.to(torch.int16) for name, idx in indices.items()},
                shapes={name: list(mod.weight.shape) for name, mod in masked_modules(model).items()},
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), state=state, rng=rng_states,
            ).save(checkpoint)

    def run_evaluation(previous: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], bool]:
        """Evaluate the argmax masks on the validation split; (their indices, whether to stop early)."""
        indices = current_indices(model)
        changed = changed_share(previous, indices) if previous is not None else 0.0
        score = torch.tensor([float("nan")], dtype=torch.float64)
        if rank == 0:
            point = {"step": state["step"], "epoch": round(state["step"] / per_epoch, 3),
                     "lr": optimizer.param_groups[0]["lr"],
                     "tau": temperature(state["step"], total_steps, cfg.tau_start, cfg.tau_end, cfg.tau_schedule)}
            if validation is not None:
                model.eval()
                point.update(evaluate(model, validation, recipe.data.eval_batch_size, device,
                                      desc="validate (argmax masks)"))
                score[0] = point["top1"]
            point["changed"] = changed
            state["history"].append(point)
            shown = f"validation top1 {point['top1']:.2f}% " if validation is not None else ""
            log(f"step {point['step']} (epoch {point['epoch']:.2f}): {shown}argmax changed "
                f"{100 * changed:.2f}% of blocks")
        if world_size > 1:  # every rank keeps the same best masks
            dist.broadcast(score, 0)
        if validation is not None and best.update(float(score[0]), state["step"], indices) and rank == 0:
            state["history"][-1]["best"] = True
        stop_now = tracker is not None and previous is not None and tracker.update(changed)
        return indices, stop_now

    started = time.time() - state["seconds"]
    previous = current_indices(model)
    if not state["history"]:
        previous, _ = run_evaluation(None)
    stopped = False
    bar = progress(total=total_steps, initial=state["step"], desc="train masks", enabled=not rank)
    while state["step"] < total_steps and not stopped and not state["stopped_early"]:
        sampler.set_epoch(state["epoch"], state["batch"])
        for images, labels in make_loader(train, sampler, workers=recipe.data.workers):
            mask_training_mode(model)
            prepare_step(model, state["step"], temperature(state["step"], total_steps, cfg.tau_start,
                                                           cfg.tau_end, cfg.tau_schedule))
            images = images.to(device, non_blocking=True)
            labels = None if unlabeled else labels.to(device, non_blocking=True)
            if cuda_settings:
                images = images.contiguous(memory_format=torch.channels_last)
            with (torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda_settings),
                  layer_outputs.recording() if layer_outputs else contextlib.nullcontext()):
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                logits = wrapped(images)
                loss = mask_loss(logits, labels, teacher_logits, loss_kind, cfg.distill_temperature,
                                 layer_outputs.take() if layer_outputs else None, cfg.feature_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["batch"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            early = False
            if state["step"] % eval_every == 0 or state["step"] >= total_steps:
                previous, early = run_evaluation(previous)
            state["seconds"] = time.time() - started
            stop_now = bool(stop)
            if world_size > 1:  # all ranks must stop together
                flag = torch.tensor([int(stop_now)])
                dist.all_reduce(flag)
                stop_now = bool(flag.item())
            if early:
                state["stopped_early"] = True
                log(f"argmax masks changed at most {100 * cfg.stop_changed:.2f}% of blocks in "
                    f"{cfg.stop_patience} evaluations in a row: stopping at step {state['step']}")
                break
            if stop_now:
                save_checkpoint()
                log(f"stopped at step {state['step']}; checkpoint {checkpoint} (continue with --resume)")
                stopped = stop.signal_number
                break
            if state["step"] >= total_steps:
                break
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint()
        else:
            state["epoch"] += 1
            state["batch"] = 0
    bar.close()
    if layer_outputs:
        layer_outputs.remove()
    if not stopped:
        state["seconds"] = time.time() - started
        save_checkpoint(final=True)
    last = current_indices(model)
    indices = best.indices if best.indices else last
    checksums = [indices_checksum(indices)]
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, checksums[0])
        checksums = list(gathered)
        if len(set(checksums)) != 1:
            raise RuntimeError(f"ranks disagree on the learned masks: {checksums}")
    return LearnResult(indices, mask_logits(model), state["history"], state["step"], state["seconds"], stopped,
                       checksums, best_step=max(best.step, 0) if best.indices else state["step"],
                       best_score=best.score if best.indices else None, start_score=best.start_score,
                       beat_prior=best.beat_start, stopped_early=state["stopped_early"], loss=loss_kind,
                       validation_images=len(validation) if validation is not None else 0, train_images=len(train))
