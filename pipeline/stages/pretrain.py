"""Dense training of the demo network (recipes whose weights are `pretrain`), cached.

A plain loop in the spirit of torchvision's references: SGD with Nesterov momentum, one-cycle learning rate
(`pretrain.warmup_share` of it rising), random crop + flip (`pretrain.augment`), every step through `pipeline.training.train_step`;
a checkpoint (`PretrainCheckpoint`) every epoch and on SIGTERM, dense.pt written through `DenseWeights`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from pipeline.args import add_device_argument
from pipeline.data.datasets import ResumableBatchSampler, build_datasets, dataset_size, make_loader
from pipeline.data.splits import check_enough_to_train, without_mask_validation
from pipeline.declaration import MODEL, StageDeclaration, recipe_values
from pipeline.errors import Interrupted, PipelineError
from pipeline.io import read_json, write_json
from pipeline.paths import ArtifactPaths
from pipeline.pretrain.artifacts import DenseWeights, PretrainCheckpoint
from pipeline.progress import progress
from pipeline.recipe.config import Recipe
from pipeline.recipe.weights import build_network
from pipeline.training import (
    LossFn,
    StepSettings,
    check_device,
    cross_entropy_loss,
    evaluate,
    select_device,
    stop_on_signals,
    train_step,
)


def _pretrains(recipe: Recipe) -> bool:
    return recipe.weights == "pretrain"


DECLARATION = StageDeclaration(
    help="train the demo network's dense weights (cached)",
    reads=("pretrain_log",),  # cached(): the recipe fields dense.pt was trained with
    writes=("config", "dense_weights", "pretrain_log", "pretrain_checkpoint"),
    checkpoint="pretrain_checkpoint",
    # it trains on the training images less mask training's validation split (without_mask_validation), so the
    # fields that draw the split are inputs too
    recipe=(
        *MODEL,
        "weights",
        "data",
        "preprocess",
        "pretrain",
        "masks.seed",
        "masks.validation_images",
        "masks.train_images",
    ),
    data=True,
    cached=True,
    in_engine=True,
    applies=_pretrains,
)


@dataclass
class Options:
    epochs: int | None = field(default=None, metadata={"recipe": "pretrain.epochs"})
    resume: bool = False
    force: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="override pretrain.epochs")
    parser.add_argument("--resume", action="store_true", help="continue from pretrain.ckpt")
    parser.add_argument("--force", action="store_true", help="retrain even when dense.pt exists")
    add_device_argument(parser)


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    if cached(recipe, paths, options):
        print(f"dense weights exist: {paths.dense_weights} (use --force to retrain)")
        return 0
    device = select_device(options.device)
    started = time.time()
    with torch.random.fork_rng(devices=[]), stop_on_signals() as stop:
        torch.manual_seed(recipe.pretrain.seed)  # initialisation and augmentation, in a fork of torch's RNG
        data = build_datasets(recipe, augment_train=recipe.pretrain.augment)
        check_enough_to_train(data, recipe.masks, recipe.pretrain.batch_size, "pretraining", "pretrain.batch_size")
        run_ = setup(recipe, data, device)
        if options.resume:
            run_.resume(paths.pretrain_checkpoint)
        while run_.state["epoch"] < recipe.pretrain.epochs:
            run_.train_epoch(stop, paths.pretrain_checkpoint)
            run_.test_epoch(data.eval, recipe.data.eval_batch_size)
            run_.checkpoint().save(paths.pretrain_checkpoint)  # outside the step, once per epoch
    finish(recipe, paths, run_, data.description, time.time() - started)
    return 0


def cached(recipe: Recipe, paths: ArtifactPaths, options: Options) -> bool:
    """True when dense.pt exists and no retraining was asked for; refuses what pretrain cannot do."""
    if recipe.weights != "pretrain":
        raise PipelineError(
            f"model {recipe.name} takes weights from {recipe.weights!r}; pretrain only applies to "
            "recipes with weights=pretrain (the demo)"
        )
    if options.resume and not paths.pretrain_checkpoint.is_file():
        raise PipelineError(
            f"--resume: there is no checkpoint {paths.pretrain_checkpoint} to continue; drop "
            "--resume to start a new run"
        )
    return paths.dense_weights.is_file() and not options.force and not options.resume and trained_with(recipe, paths)


def declared_inputs(recipe: Recipe) -> dict:
    """The recipe fields dense.pt depends on (DECLARATION), as pretrain.json records them."""
    return recipe_values(recipe, DECLARATION.recipe_keys(recipe))


def trained_with(recipe: Recipe, paths: ArtifactPaths) -> bool:
    """False when pretrain.json records other settings than RECIPE's for dense.pt (e.g. masks.seed, which draws
    the validation split pretraining leaves out): then dense.pt is retrained. No record: dense.pt is kept."""
    try:
        recorded = read_json(paths.pretrain_log, fix="").get("inputs") if paths.pretrain_log.is_file() else None
    except (PipelineError, AttributeError):
        recorded = {}  # damaged: nothing says what dense.pt was trained with
    if recorded is None or recorded == declared_inputs(recipe):
        return True
    changed = sorted(key for key, value in declared_inputs(recipe).items() if (recorded or {}).get(key) != value)
    print(
        f"note: dense.pt was trained with other settings ({', '.join(changed) or paths.pretrain_log.name}); retraining"
    )
    return False


@dataclass
class DenseRun:
    """One pretraining run: SGD with Nesterov momentum and a one-cycle learning rate, through `train_step`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader  # built once: its workers (if any) persist across epochs
    sampler: ResumableBatchSampler
    loss: LossFn
    settings: StepSettings
    device: torch.device
    epochs: int
    state: dict = field(default_factory=lambda: {"epoch": 0, "batch": 0, "history": []})

    def train_epoch(self, stop, checkpoint_path) -> None:
        self.model.train()
        self.sampler.set_epoch(self.state["epoch"], self.state["batch"])
        bar = progress(
            self.loader,
            total=len(self.sampler),
            initial=self.state["batch"],
            desc=f"pretrain epoch {self.state['epoch'] + 1}/{self.epochs}",
        )
        correct = seen = 0
        for images, labels in bar:
            images, labels = self.settings.prepare_images(images, self.device), labels.to(self.device)
            loss, logits = train_step(
                self.model, images, labels, self.loss, self.optimizer, self.scheduler, self.settings
            )
            self.state["batch"] += 1
            correct += int((logits.argmax(1) == labels).sum())
            seen += labels.numel()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct / seen:.1f}")
            if stop:
                self.checkpoint().save(checkpoint_path)
                raise Interrupted(
                    stop.signal_number,
                    f"checkpoint {checkpoint_path} at epoch {self.state['epoch']} "
                    f"batch {self.state['batch']} saved; continue with --resume",
                )

    def test_epoch(self, dataset, batch_size: int) -> None:
        """Test top-1 after the epoch: in the training step's precision (bfloat16 autocast is 4.5x faster than
        float32 here), the last epoch in float32, which is the figure dense.pt is reported with."""
        bfloat16 = self.settings.autocast and self.state["epoch"] + 1 < self.epochs
        precision = "bfloat16 autocast" if bfloat16 else "float32"
        with StepSettings(autocast=bfloat16).autocast_context(self.device):
            metrics = evaluate(self.model.eval(), dataset, batch_size, self.device, desc="test")
        self.state["history"].append({"epoch": self.state["epoch"] + 1, "precision": precision, **metrics})
        print(
            f"epoch {self.state['epoch'] + 1}: test top1 {metrics['top1']:.2f}% top5 {metrics['top5']:.2f}%"
            + ("" if precision == "float32" else f" ({precision})"),
            flush=True,
        )
        self.state["epoch"] += 1
        self.state["batch"] = 0

    def checkpoint(self) -> PretrainCheckpoint:
        return PretrainCheckpoint(
            self.model.state_dict(),
            self.optimizer.state_dict(),
            self.scheduler.state_dict(),
            self.state,
            torch.get_rng_state(),
        )

    def resume(self, path) -> None:
        saved = PretrainCheckpoint.load(path)
        self.model.load_state_dict(saved.model)
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        self.state = saved.state
        torch.set_rng_state(saved.rng)
        print(f"resumed pretraining at epoch {self.state['epoch']} batch {self.state['batch']}")


def setup(recipe: Recipe, data, device: torch.device) -> DenseRun:
    cfg = recipe.pretrain
    settings = StepSettings.for_device(device, precision=cfg.precision)
    print(f"pretraining precision: {settings.describe()} (pretrain.precision = {cfg.precision})", flush=True)
    model = settings.prepare_model(build_network(recipe).to(device))
    train = without_mask_validation(data, recipe.masks)  # the masks' validation split stays unseen
    sampler = ResumableBatchSampler(dataset_size(train), cfg.batch_size, shuffle=True, seed=cfg.seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(sampler), pct_start=cfg.warmup_share
    )
    return DenseRun(
        model,
        optimizer,
        scheduler,
        make_loader(train, sampler, workers=recipe.data.workers),
        sampler,
        cross_entropy_loss(cfg.label_smoothing),
        settings,
        device,
        cfg.epochs,
    )


def finish(recipe: Recipe, paths: ArtifactPaths, run_: DenseRun, description: str, seconds: float) -> None:
    DenseWeights({key: value.contiguous() for key, value in run_.model.cpu().eval().state_dict().items()}).save(
        paths.dense_weights
    )
    final = run_.state["history"][-1] if run_.state["history"] else {}
    write_json(
        paths.pretrain_log,
        {
            "model": recipe.name,
            "epochs": recipe.pretrain.epochs,
            "seconds": seconds,
            "test": final,
            "history": run_.state["history"],
            "data": description,
            "inputs": declared_inputs(recipe),
        },
    )
    paths.pretrain_checkpoint.unlink(missing_ok=True)
    print(f"dense weights: {paths.dense_weights} (test top1 {final.get('top1', float('nan')):.2f}%)")
