"""The mask-training loop: AdamW on the pattern logits only, warm-up + cosine learning rate and an
annealed Gumbel temperature over a budget of `masks.steps` optimizer steps, stopped at the plateau.

`learn_masks` is the entry point used by the `train-masks` stage, by `compare`, `bench-masks` and by tests; a
`MaskTraining` (explicit state in `LoopState`) runs it. It holds out a validation split from the training
images, judges every evaluation on it (never on the test set), and returns the argmax masks that masks.keep
names (`keep_masks`): by default the final ones (after the cooldown), or the best ones seen when the final ones
score below the heuristic prior's masks at step 0, so the result is never worse than its start on the validation
split. The step itself
(`pipeline.masks.mask_step`) is the one bench-train times. Training stops at the plateau (`PlateauRule`,
masks.stop_patience / stop_changed): at once when the argmax has settled by itself, else after a cooldown that
anneals the learning rate and the temperature over masks.cooldown of the budget (`Cooldown`); masks.steps is
the ceiling. It checkpoints every
`masks.checkpoint_every` steps and on SIGTERM (outside the step, timm's CheckpointSaver spirit), and resumes
exactly: batch order, Gumbel noise, optimiser state, best masks and evaluation history continue.

Randomness: the Gumbel noise comes from the noise pool's own generators; torch's global RNG drives only data
augmentation (masks.augment), and the loop runs in a fork of it seeded from masks.seed and the rank, so the
caller's global RNG is left as it was and a fixed seed gives the same masks.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from pipeline.data.datasets import DataBundle, ResumableBatchSampler, dataset_size, make_loader
from pipeline.data.splits import split_training_images
from pipeline.errors import PipelineError
from pipeline.masks.checkpoint import MaskCheckpoint
from pipeline.masks.eligibility import EligibilityReport
from pipeline.masks.fused import status as fused_status
from pipeline.masks.gumbel import (
    GumbelNoisePool,
    current_indices,
    load_mask_logits,
    mask_logits,
    masked_modules,
    noise_pool,
)
from pipeline.masks.mask_step import MaskStep, build_mask_step, resolve_loss
from pipeline.masks.schedules import BestMasks, Cooldown, KeptMasks, PlateauRule, keep_masks, steps_per_epoch
from pipeline.progress import progress
from pipeline.recipe.config import MaskConfig, Recipe, digest_of
from pipeline.training import StepSettings, evaluate, stop_on_signals

EVALUATIONS_PER_RUN = 20  # masks.eval_every = 0 evaluates this many times over the budget


@dataclass
class LearnResult:
    indices: dict[str, torch.Tensor]  # the argmax masks kept (masks.keep): kept_step, kept_score, kept_why
    logits: dict[str, torch.Tensor]  # the logits at the last step
    history: list[dict] = field(default_factory=list)  # evaluations: step, epoch, top1, top5, changed, lr, tau
    steps: int = 0
    seconds: float = 0.0
    stopped: int = 0  # the signal number that ended the run early (resume to continue); 0 when it finished
    rank_checksums: list[str] = field(default_factory=list)
    best_step: int = 0  # the best masks seen on the validation split (kept with masks.keep = best)
    best_score: float | None = None  # validation top-1 (agreement with the dense model when unlabeled)
    kept_step: int = 0  # the masks returned: their step, validation score and why these (`keep_masks`)
    kept_score: float | None = None
    kept_why: str = "final"
    start_score: float | None = None  # the same for the prior's masks at step 0
    beat_prior: bool = False  # the kept masks scored above the prior's masks at step 0 on the validation split
    stop_reason: str | None = None  # why training stopped before masks.steps (the plateau rule); None: it did not
    cooldown_start: int | None = None  # the step where the plateau started the cooldown; None: no cooldown
    loss: str = "ce"
    validation_images: int = 0
    train_images: int = 0


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


class TeacherLabels(Dataset):
    """A dataset whose labels are the dense model's predictions: the validation split of an unlabeled
    run, so that top-1 on it is the agreement with the dense model and no true label is read."""

    def __init__(self, images: Dataset, predictions: torch.Tensor) -> None:
        self.images, self.predictions = images, predictions

    def __len__(self) -> int:
        return dataset_size(self.images)

    def __getitem__(self, index: int):
        return self.images[index][0], self.predictions[index]


@torch.no_grad()
def predictions(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model(images.to(device)).argmax(1).cpu() for images, _ in make_loader(dataset, batch_size=batch_size)]
    )


def prior_scores(
    model: nn.Module, report: EligibilityReport, cfg: MaskConfig, train: Dataset, device: torch.device
) -> dict[str, torch.Tensor] | None:
    """Per-weight scores of an activation-aware prior (wanda, sparsegpt) from calibration images."""
    if cfg.prior not in ("wanda", "sparsegpt"):
        return None
    from pipeline.masks.activation_aware import calibration_batches, layer_scores

    batches = calibration_batches(train, seed=cfg.seed)
    return layer_scores(
        copy.deepcopy(model).to(device).eval(), [layer.name for layer in report.masked], batches, cfg.prior, device
    )


@dataclass
class LoopState:
    """Everything the loop changes, as plain data: checkpointed (`to_dict`) and restored (`from_dict`)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of the current epoch already trained
    seconds: float = 0.0  # training time (evaluation hooks of benchmarks excluded)
    history: list[dict] = field(default_factory=list)  # one point per evaluation
    best: BestMasks = field(default_factory=BestMasks)
    stop_reason: str | None = None  # set by the plateau rule before the budget ran out
    stop_step: int | None = None
    cooldown: list[int] | None = None  # [start, length] once the plateau started the cooldown
    plateau: str | None = None  # why the cooldown started
    kept: dict[str, Any] | None = None  # step, score, why of the masks a finished run returned

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "seconds": self.seconds,
            "history": self.history,
            "stop_reason": self.stop_reason,
            "stop_step": self.stop_step,
            "cooldown": self.cooldown,
            "plateau": self.plateau,
            "kept": self.kept,
            "best": {
                "score": None if best.step < 0 else best.score,
                "step": best.step,
                "start_score": best.start_score,
                "indices": {name: idx.to(torch.int16) for name, idx in best.indices.items()},
            },
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        best = saved["best"]
        return cls(
            saved["step"],
            saved["epoch"],
            saved["batch"],
            saved["seconds"],
            saved["history"],
            BestMasks(
                -float("inf") if best["score"] is None else best["score"],
                best["step"],
                best["indices"],
                best["start_score"],
            ),
            saved.get("stop_reason"),
            saved.get("stop_step"),
            saved.get("cooldown"),
            saved.get("plateau"),
            saved.get("kept"),
        )


@dataclass(frozen=True)
class MaskLearning:
    """What mask learning reads of a recipe, instead of the recipe: its masks section, the evaluation batch size
    and loader workers of its data section, and the key a checkpoint must match (masks, arch and classes)."""

    masks: MaskConfig
    eval_batch_size: int
    workers: int
    key: str

    @classmethod
    def of(cls, recipe: Recipe, masks: MaskConfig | None = None) -> MaskLearning:
        """RECIPE's, with MASKS in place of its masks section where given (a benchmark's budget)."""
        masks = masks or recipe.masks
        # recipe.digest("masks", "arch", "num_classes") with these masks, reading no other field
        key = digest_of({"masks": asdict(masks), "arch": recipe.arch, "num_classes": recipe.num_classes})
        return cls(masks, recipe.data.eval_batch_size, recipe.data.workers, key)


@dataclass
class RunContext:
    """Where a run stands in the job: its checkpoint, its rank, its log and the signal flag."""

    checkpoint: Path | None = None
    recipe_key: str = ""
    rank: int = 0
    world_size: int = 1
    log: Callable[[str], None] = print
    stop: Any = None  # StopRequested
    on_evaluation: Callable[[MaskTraining, dict], None] | None = None  # benchmarks: extra fields per point


class MaskTraining:
    """One mask-training run: the step (`MaskStep`), the data, the state (`LoopState`) and the rule that ends
    it (`PlateauRule`, None: the whole budget)."""

    def __init__(
        self,
        step: MaskStep,
        train: Dataset,
        validation: Dataset | None,
        learning: MaskLearning,
        rule: PlateauRule | None,
        unlabeled: bool,
        run: RunContext,
    ) -> None:
        self.step_fn, self.train, self.validation, self.rule, self.unlabeled = step, train, validation, rule, unlabeled
        self.cfg, self.run_ctx = learning.masks, run
        self.eval_batch, self.workers = learning.eval_batch_size, learning.workers
        self.per_epoch = steps_per_epoch(dataset_size(train), self.cfg.batch_size, run.world_size)
        self.eval_every = self.cfg.eval_every or max(1, -(-self.cfg.steps // EVALUATIONS_PER_RUN))
        # whole evaluation intervals, so that the cooldown ends on an evaluation of the annealed masks
        self.cooldown_steps = -(-round(self.cfg.cooldown * self.cfg.steps) // self.eval_every) * self.eval_every
        self.sampler = ResumableBatchSampler(
            dataset_size(train),
            self.cfg.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            rank=run.rank,
            world_size=run.world_size,
        )
        self.state = LoopState()
        self.previous: dict[str, torch.Tensor] = {}
        self.interrupted = 0  # the signal number that ended the run
        self.started = 0.0

    @property
    def model(self) -> nn.Module:
        return self.step_fn.model

    # ------------------------------------------------------------------ the loop
    def run(self) -> LearnResult:
        self.started = time.time() - self.state.seconds
        self.previous = current_indices(self.model)
        if not self.state.history:
            self.evaluate()
        loader = make_loader(self.train, self.sampler, workers=self.workers)  # built once: workers persist
        bar = progress(total=self.cfg.steps, initial=self.state.step, desc="train masks", enabled=not self.run_ctx.rank)
        while not self.finished():
            self.sampler.set_epoch(self.state.epoch, self.state.batch)
            for images, labels in loader:
                loss = self.step_fn.step(images, None if self.unlabeled else labels, self.state.step)
                self.state.step += 1
                self.state.batch += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if self.after_step():
                    break
            else:
                self.state.epoch, self.state.batch = self.state.epoch + 1, 0
        bar.close()
        self.step_fn.close()
        if not self.interrupted:
            self.state.seconds = time.time() - self.started
            self.save(final=True)
        return self.result()

    def finished(self) -> bool:
        return bool(self.state.step >= self.cfg.steps or self.interrupted or self.state.stop_reason)

    def after_step(self) -> bool:
        """Evaluate, checkpoint or stop after a step; True to leave the epoch."""
        state = self.state
        if state.step % self.eval_every == 0 or state.step >= self.cfg.steps:
            self.evaluate()
        state.seconds = time.time() - self.started
        signalled = self.stop_requested()  # every rank, every step: they stop together
        if state.stop_reason:
            kept = self.kept()
            self.run_ctx.log(
                f"stopping at step {state.step} of {self.cfg.steps}: {state.stop_reason}; keeping the "
                f"{kept.why} masks (step {kept.step})"
            )
            return True
        if signalled:
            self.save()
            self.run_ctx.log(
                f"stopped at step {state.step}; checkpoint {self.run_ctx.checkpoint} (continue with --resume)"
            )
            self.interrupted = self.run_ctx.stop.signal_number
            return True
        if state.step >= self.cfg.steps:
            return True
        if self.cfg.checkpoint_every and state.step % self.cfg.checkpoint_every == 0:
            self.save()
        return False

    def stop_requested(self) -> bool:
        stop_now = bool(self.run_ctx.stop)
        if self.run_ctx.world_size > 1:
            flag = torch.tensor([int(stop_now)])
            dist.all_reduce(flag)
            stop_now = bool(flag.item())
        return stop_now

    # ------------------------------------------------------------------ evaluation and the plateau rule
    def evaluate(self) -> None:
        """Score the argmax masks on the validation split, keep the best, and apply the plateau rule."""
        state = self.state
        indices = current_indices(self.model)
        point = {
            "step": state.step,
            "epoch": round(state.step / self.per_epoch, 3),
            "lr": self.step_fn.optimizer.param_groups[0]["lr"],
            "tau": self.step_fn.tau(state.step),
            "changed": changed_share(self.previous, indices) if state.history else 0.0,
        }
        if self.validation is not None:
            point.update(self.validation_metrics())
            if state.best.update(point["top1"], state.step, indices):
                point["best"] = True
        point["seconds"] = round(time.time() - self.started, 2)  # training time up to this evaluation's end
        self.previous = indices
        state.history.append(point)
        if self.run_ctx.on_evaluation is not None:  # its time is not training time
            hook_started = time.time()
            self.run_ctx.on_evaluation(self, point)
            self.started += time.time() - hook_started
        if self.rule is not None and state.step < self.cfg.steps:
            self.apply_rule()
        if self.run_ctx.rank == 0:
            shown = f"validation top1 {point['top1']:.2f}% " if "top1" in point else ""
            self.run_ctx.log(
                f"step {point['step']} (epoch {point['epoch']:.2f}): {shown}argmax changed "
                f"{100 * point['changed']:.2f}% of blocks"
            )

    def apply_rule(self) -> None:
        """The plateau rule after an evaluation: stop now (the argmax has settled by itself, or the cooldown is
        over), start the cooldown (the score has plateaued, the argmax still moves), or go on."""
        state = self.state
        if state.cooldown is not None:
            start, length = state.cooldown
            if state.step >= start + length:
                state.stop_reason = (
                    f"{state.plateau} at step {start}, then the learning rate and the temperature "
                    f"annealed over {length} steps (masks.cooldown); the argmax changed on "
                    f"{100 * state.history[-1]['changed']:.3f}% of blocks in the last evaluation"
                )
                state.stop_step = state.step
            return
        rule = self.rule
        if rule is None:
            raise RuntimeError("apply_rule without a plateau rule (evaluate calls it only with one)")
        state.stop_reason = rule.reason(state.history)
        state.stop_step = state.step if state.stop_reason else None
        plateau = None if state.stop_reason or not self.cooldown_steps else rule.plateau(state.history)
        if plateau:
            length = min(self.cooldown_steps, self.cfg.steps - state.step)
            state.cooldown, state.plateau = [state.step, length], plateau
            self.step_fn.schedule.cooldown = Cooldown(state.step, length)
            if self.run_ctx.rank == 0:
                self.run_ctx.log(
                    f"step {state.step}: {plateau}; annealing the learning rate and the temperature "
                    f"over the next {length} steps (masks.cooldown), then stopping"
                )

    def validation_metrics(self) -> dict[str, float]:
        """Top-1/top-5 on the validation split, computed by rank 0; every rank gets the same top-1."""
        score = torch.tensor([float("nan")], dtype=torch.float64)
        metrics: dict[str, float] = {}
        if self.run_ctx.rank == 0:
            self.model.eval()
            metrics = evaluate(
                self.model, self.validation, self.eval_batch, self.step_fn.device, desc="validate (argmax masks)"
            )
            score[0] = metrics["top1"]
        if self.run_ctx.world_size > 1:
            dist.broadcast(score, 0)
        return {**metrics, "top1": float(score[0])}

    # ------------------------------------------------------------------ checkpoints (outside the step)
    def rng_states(self) -> list[torch.Tensor]:
        """Per rank: torch's (forked) CPU RNG state followed by the noise pool's offset generator state."""
        mine = torch.cat([torch.get_rng_state(), self.noise().offsets.get_state()])
        if self.run_ctx.world_size == 1:
            return [mine]
        gathered = [torch.empty_like(mine) for _ in range(self.run_ctx.world_size)]
        dist.all_gather(gathered, mine)
        return gathered

    def noise(self) -> GumbelNoisePool:
        """The masked layers' noise pool (attach_masks made it before the loop)."""
        pool = noise_pool(self.model)
        if pool is None:
            raise RuntimeError("the mask-training model has no Gumbel noise pool (attach_masks makes it)")
        return pool

    def save(self, final: bool = False) -> None:
        rng = self.rng_states()  # a collective: every rank takes part
        if self.run_ctx.rank != 0 or self.run_ctx.checkpoint is None:
            return
        if final:
            kept = self.kept()
            indices = kept.indices
            self.state.kept = {"step": kept.step, "score": kept.score, "why": kept.why}
        else:
            indices = current_indices(self.model)
        MaskCheckpoint(
            recipe_key=self.run_ctx.recipe_key,
            final=final,
            n=self.cfg.n,
            m=self.cfg.m,
            logits=mask_logits(self.model),
            indices={name: idx.to(torch.int16) for name, idx in indices.items()},
            shapes={name: list(mod.weight.shape) for name, mod in masked_modules(self.model).items()},
            optimizer=self.step_fn.optimizer.state_dict(),
            scheduler=self.step_fn.scheduler.state_dict(),
            state=self.state.to_dict(),
            rng=rng,
        ).save(self.run_ctx.checkpoint)

    def resume(self) -> None:
        path = self.run_ctx.checkpoint
        if path is None:
            raise RuntimeError("resume without a checkpoint path (--resume needs the run's checkpoint)")
        saved = MaskCheckpoint.load(path, fix="delete it or drop --resume")
        if saved.recipe_key != self.run_ctx.recipe_key:
            raise PipelineError(f"{path} was written with other mask settings; drop --resume to start over")
        load_mask_logits(self.model, saved.logits)
        self.step_fn.optimizer.load_state_dict(saved.optimizer)
        self.step_fn.scheduler.load_state_dict(saved.scheduler)
        self.state = LoopState.from_dict(saved.state)
        if self.state.cooldown is not None:
            self.step_fn.schedule.cooldown = Cooldown(*self.state.cooldown)
        rng = saved.rng[self.run_ctx.rank] if self.run_ctx.rank < len(saved.rng) else saved.rng[0]
        half = rng.numel() // 2
        torch.set_rng_state(rng[:half].clone())
        self.noise().offsets.set_state(rng[half:].clone())
        self.run_ctx.log(
            f"resumed mask training at step {self.state.step} (epoch {self.state.epoch}, batch {self.state.batch})"
        )

    # ------------------------------------------------------------------ result
    def kept(self) -> KeptMasks:
        """The masks the run returns if it ends now (masks.keep): the argmax now, scored by the last evaluation
        when that was at this step (whose argmax `evaluate` kept in `previous`), or the best masks seen."""
        last = self.state.history[-1] if self.state.history else {}
        if last.get("step") == self.state.step:
            return keep_masks(self.cfg.keep, self.state.best, self.previous, self.state.step, last.get("top1"))
        return keep_masks(self.cfg.keep, self.state.best, current_indices(self.model), self.state.step, None)

    def result(self) -> LearnResult:
        state, best = self.state, self.state.best
        kept = self.kept()
        indices = kept.indices
        checksums = [indices_checksum(indices)]
        if self.run_ctx.world_size > 1:
            gathered: list[object] = [None] * self.run_ctx.world_size
            dist.all_gather_object(gathered, indices_checksum(indices))
            checksums = [str(checksum) for checksum in gathered]
            if len(set(checksums)) != 1:
                raise RuntimeError(f"ranks disagree on the learned masks: {checksums}")
        return LearnResult(
            indices,
            mask_logits(self.model),
            state.history,
            state.step,
            state.seconds,
            self.interrupted,
            checksums,
            best_step=max(best.step, 0) if best.indices else state.step,
            best_score=best.score if best.indices else None,
            kept_step=kept.step,
            kept_score=kept.score,
            kept_why=kept.why,
            start_score=best.start_score,
            beat_prior=kept.beat(best.start_score),
            stop_reason=state.stop_reason,
            cooldown_start=state.cooldown[0] if state.cooldown else None,
            loss=self.step_fn.loss.kind,
            validation_images=dataset_size(self.validation) if self.validation is not None else 0,
            train_images=dataset_size(self.train),
        )


def plateau_rule(cfg: MaskConfig, validation: Dataset | None, log: Callable[[str], None]) -> PlateauRule | None:
    """The recipe's plateau rule; None when it is off (masks.stop_patience = 0) or there is no validation split."""
    if not cfg.stop_patience:
        return None
    if validation is None:
        log("no validation split (masks.validation_images = 0): training runs the whole budget of masks.steps")
        return None
    return PlateauRule(cfg.stop_patience, cfg.stop_changed, dataset_size(validation))


def prepare_training(
    model: nn.Module,
    report: EligibilityReport,
    learning: MaskLearning,
    data: DataBundle,
    device: torch.device,
    settings: StepSettings,
    unlabeled: bool,
    run: RunContext,
    initial_indices: dict[str, torch.Tensor] | None,
) -> MaskTraining:
    cfg = learning.masks
    loss = resolve_loss(cfg, unlabeled)
    if run.rank == 0:
        run.log(f"mask training precision: {settings.describe()} (masks.precision = {cfg.precision})")
        if device.type == "cpu":
            run.log(
                f"mask layers' per-block work: {fused_status() if cfg.kernel == 'auto' else 'PyTorch ops'} "
                f"(masks.kernel = {cfg.kernel})"
            )
    train, validation = split_training_images(data, cfg)
    model.eval()
    if validation is not None and unlabeled:
        validation = TeacherLabels(
            validation, predictions(model.to(device), validation, learning.eval_batch_size, device)
        )
    scores = prior_scores(model, report, cfg, train, device)
    step = build_mask_step(
        model,
        report,
        cfg,
        device,
        loss,
        settings,
        rank=run.rank,
        world_size=run.world_size,
        initial_indices=initial_indices,
        scores=scores,
    )
    run.recipe_key = learning.key + (":unlabeled" if unlabeled else "")
    return MaskTraining(step, train, validation, learning, plateau_rule(cfg, validation, run.log), unlabeled, run)


def learn_masks(
    model: nn.Module,
    report: EligibilityReport,
    learning: MaskLearning,
    data: DataBundle,
    device: torch.device,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    initial_indices: dict[str, torch.Tensor] | None = None,
    unlabeled: bool = False,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = print,
    settings: StepSettings | None = None,
    on_evaluation: Callable[[MaskTraining, dict], None] | None = None,
) -> LearnResult:
    """Learn N:M masks for `report.masked` layers of `model` (weights stay frozen). A SIGTERM from
    the start on (set-up included) ends the run with a checkpoint at the next step. `settings`: the step's
    autocast and memory format (default: those of `device`). LEARNING: `MaskLearning.of(recipe)`."""
    settings = settings or StepSettings.for_device(device, precision=learning.masks.precision)
    with stop_on_signals() as stop, torch.random.fork_rng(devices=[]):
        torch.manual_seed(learning.masks.seed * 1000 + rank)  # augmentation only, in a fork: the caller's RNG is kept
        if rank == 0:  # also the readiness signal the tests wait for before sending SIGTERM
            log(
                "SIGTERM or Ctrl-C now stops at the next step"
                + (f" and saves {checkpoint} (continue with --resume)" if checkpoint is not None else "")
            )
        run = RunContext(checkpoint, "", rank, world_size, log, stop, on_evaluation)
        training = prepare_training(model, report, learning, data, device, settings, unlabeled, run, initial_indices)
        if resume and checkpoint is not None and checkpoint.is_file():
            training.resume()
        return training.run()
