"""The mask-training loop: AdamW on the pattern logits only, StepLR, annealed Gumbel temperature.

`learn_masks` is one plain function (torchvision-references style) used by the
`train-masks` stage, by `compare` and by tests. It checkpoints every
`masks.checkpoint_every` steps, at every epoch end and on SIGTERM, and resumes exactly:
batch order, Gumbel noise and optimiser state continue where the checkpoint left them.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.recipe.config import Recipe
from pipeline.data.datasets import DataBundle, ResumableBatchSampler, make_loader
from pipeline.errors import PipelineError
from pipeline.masks.checkpoint import MaskCheckpoint
from pipeline.masks.eligibility import EligibilityReport
from pipeline.masks.gumbel import (attach_masks, current_indices, load_mask_logits, mask_logits,
                                      mask_training_mode, masked_modules, prepare_step)
from pipeline.training import evaluate, progress_disabled, stop_on_signals



@dataclass
class LearnResult:
    indices: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)  # evaluations: step, epoch, top1, top5, changed
    steps: int = 0
    seconds: float = 0.0
    stopped: int = 0  # the signal number that ended the run early (resume to continue); 0 when it finished
    rank_checksums: list[str] = field(default_factory=list)


def temperature(step: int, total: int, start: float, end: float, schedule: str) -> float:
    progress = min(step / max(total, 1), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "exponential":
        return start * (end / start) ** progress
    raise PipelineError(f"unknown masks.tau_schedule {schedule!r}; use constant, linear or exponential")


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


def learn_masks(model: nn.Module, report: EligibilityReport, recipe: Recipe, data: DataBundle,
                device: torch.device, *, checkpoint: Path | None = None, resume: bool = False,
                initial_indices: dict[str, torch.Tensor] | None = None, rank: int = 0, world_size: int = 1,
                log: Callable[[str], None] = print) -> LearnResult:
    """Learn N:M masks for `report.masked` layers of `model` (weights stay frozen)."""
    cfg = recipe.masks
    attach_masks(model, report, cfg.n, cfg.m, cfg.init, cfg.init_scale, cfg.seed, initial_indices)
    model.to(device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        model.to(memory_format=torch.channels_last)
    trainable = [module.sparse_mask.logits for module in masked_modules(model).values()]
    if not trainable:
        raise PipelineError(f"model {recipe.name} has no eligible layers to mask; check masks.include/exclude")
    wrapped: nn.Module = model
    if world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None,
                                                      broadcast_buffers=False)

    sampler = ResumableBatchSampler(len(data.train), cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank,
                                    world_size=world_size)
    steps_per_epoch = len(sampler)
    if steps_per_epoch == 0:
        raise PipelineError(f"training set has {len(data.train)} images, fewer than one batch of "
                            f"{cfg.batch_size} per process; lower masks.batch_size")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = mask_optimizer(trainable, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, round(cfg.lr_step_epochs * steps_per_epoch)), gamma=cfg.lr_gamma)
    # The RNG drives the Gumbel noise: offset per rank so ranks sample different noise.
    torch.manual_seed(cfg.seed * 1000 + rank)
    state = {"step": 0, "epoch": 0, "batch": 0, "history": [], "seconds": 0.0}
    recipe_key = recipe.digest("masks", "arch", "num_classes")

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

    def save_checkpoint(final: bool = False) -> None:
        rng_states = [torch.get_rng_state()]
        if world_size > 1:
            rng_states = [torch.empty_like(rng_states[0]) for _ in range(world_size)]
            dist.all_gather(rng_states, torch.get_rng_state())
        if rank == 0 and checkpoint is not None:
            MaskCheckpoint(
                recipe_key=recipe_key, final=final, n=cfg.n, m=cfg.m, logits=mask_logits(model),
                indices={name: idx.to(torch.int16) for name, idx in current_indices(model).items()},
                shapes={name: list(mod.weight.shape) for name, mod in masked_modules(model).items()},
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), state=state, rng=rng_states,
            ).save(checkpoint)

    def run_evaluation(previous: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        indices = current_indices(model)
        if rank == 0:
            model.eval()
            metrics = evaluate(model, data.eval, recipe.data.eval_batch_size, device, desc="eval (argmax masks)")
            point = {"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 3), **metrics,
                     "changed": changed_share(previous, indices) if previous is not None else 0.0}
            state["history"].append(point)
            log(f"step {point['step']} (epoch {point['epoch']:.2f}): top1 {point['top1']:.2f}% "
                f"top5 {point['top5']:.2f}% argmax changed {100 * point['changed']:.2f}% of blocks")
        if world_size > 1:
            dist.barrier()
        return indices

    started = time.time() - state["seconds"]
    previous = current_indices(model)
    if not state["history"]:
        previous = run_evaluation(None)
    stopped = False
    with stop_on_signals() as stop:
        if rank == 0:  # also the readiness signal the tests wait for before sending SIGTERM
            log("SIGTERM or Ctrl-C now stops at the next step" +
                (f" and saves {checkpoint} (continue with --resume)" if checkpoint is not None else ""))
        bar = tqdm(total=total_steps, initial=state["step"], desc="train masks", disable=progress_disabled() or rank)
        while state["step"] < total_steps and not stopped:
            sampler.set_epoch(state["epoch"], state["batch"])
            correct = seen = 0
            for images, labels in make_loader(data.train, sampler, workers=recipe.data.workers):
                mask_training_mode(model)
                prepare_step(model, state["step"], temperature(state["step"], total_steps, cfg.tau_start,
                                                               cfg.tau_end, cfg.tau_schedule))
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if use_cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
                    logits = wrapped(images)
                    loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                state["batch"] += 1
                correct += int((logits.argmax(1) == labels).sum())
                seen += labels.numel()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct / seen:.1f}")
                if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < total_steps:
                    previous = run_evaluation(previous)
                state["seconds"] = time.time() - started
                stop_now = bool(stop)
                if world_size > 1:  # all ranks must stop together
                    flag = torch.tensor([int(stop_now)])
                    dist.all_reduce(flag)
                    stop_now = bool(flag.item())
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
                if state["step"] < total_steps:
                    previous = run_evaluation(previous)
                    save_checkpoint()
        bar.close()
    if not stopped:
        previous = run_evaluation(previous)
        state["seconds"] = time.time() - started
        save_checkpoint(final=True)
    indices = current_indices(model)
    checksums = [indices_checksum(indices)]
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, checksums[0])
        checksums = list(gathered)
        if len(set(checksums)) != 1:
            raise RuntimeError(f"ranks disagree on the learned masks: {checksums}")
    return LearnResult(indices, mask_logits(model), state["history"], state["step"], state["seconds"], stopped,
                       checksums)
