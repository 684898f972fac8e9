"""`train-masks`: learn N:M masks on the frozen dense model (single process or torchrun)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.args import add_device_argument
from pipeline.data.datasets import build_datasets
from pipeline.data.preprocess_choice import choice_summary
from pipeline.data.splits import check_enough_to_train
from pipeline.declaration import (
    BASELINE_CHECK,
    MODEL,
    PREPROCESS_CHOICE,
    StageDeclaration,
    measured_preprocessing,
    option_files,
    when,
)
from pipeline.distributed import init_distributed, shutdown
from pipeline.errors import Interrupted, PipelineError
from pipeline.io import write_json
from pipeline.masks.artifact import MaskArtifact
from pipeline.masks.checkpoint import TrainingRecord
from pipeline.masks.eligibility import eligible_layers
from pipeline.masks.gumbel import use_argmax_masks
from pipeline.masks.learning import LearnResult, MaskLearning, learn_masks
from pipeline.masks.mask_step import resolve_loss
from pipeline.masks.schedules import steps_per_epoch
from pipeline.paths import ArtifactPaths, checked_name
from pipeline.plots import learning_curves
from pipeline.recipe.config import MASK_PRIORS, Recipe
from pipeline.recipe.resolve import with_measured_preprocessing, write_config
from pipeline.recipe.weights import load_dense_model
from pipeline.records import file_record
from pipeline.training import StepSettings, check_device, evaluate, select_device


def _untagged(recipe: Recipe, options: Options | None) -> bool:
    return not (options is not None and options.tag)


def _tagged_run(recipe: Recipe, paths: ArtifactPaths, options: Options | None) -> tuple:
    return paths.tagged_mask_run(options.tag) if options is not None and options.tag else ()


DECLARATION = StageDeclaration(
    help="learn N:M masks on frozen weights (Gumbel-Softmax)",
    reads=(option_files("masks_from"), PREPROCESS_CHOICE),
    writes=(
        "config",
        "layers",
        when(_untagged, "mask_checkpoint", "mask_training", "mask_training_plot"),
        _tagged_run,
        PREPROCESS_CHOICE,
    ),
    checkpoint="mask_checkpoint",
    recipe=(*MODEL, "weights", "data", "preprocess", "masks", BASELINE_CHECK),
    options=("masks_from", "unlabeled", "tag"),
    data=True,
    weights=True,
    in_engine=True,
)


MEASURES_PREPROCESSING = True  # in run, after the data checks (pipeline/stages/__init__.py stage_recipe)


@dataclass
class Options:
    steps: int | None = field(default=None, metadata={"recipe": "masks.steps"})
    prior: str | None = field(default=None, metadata={"recipe": "masks.prior"})
    masks_from: str | None = None
    unlabeled: bool = False
    resume: bool = False
    device: str = "auto"
    tag: str = ""
    cuda_path: bool = False

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.tag:
            checked_name(self.tag, "--tag")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mask training")
    group.add_argument("--steps", type=int, default=None, help="override masks.steps (the budget in optimizer steps)")
    group.add_argument(
        "--prior", choices=list(MASK_PRIORS), default=None, help="heuristic the logits start from (masks.prior)"
    )
    group.add_argument(
        "--masks-from",
        default=None,
        metavar="MASKS_PT",
        help="pull the starting logits towards another method's mask artifact",
    )
    group.add_argument(
        "--unlabeled",
        action="store_true",
        help="never read labels: distillation from the dense model is the only loss and the "
        "best masks are those agreeing most with it on the validation split",
    )
    group.add_argument(
        "--resume", action="store_true", help="continue from engines/<model>/masks.ckpt (after a kill or SIGTERM)"
    )
    add_device_argument(group)
    group.add_argument(
        "--cuda-path",
        action="store_true",
        help="run the CUDA step settings (bfloat16 autocast, channels_last) on any device, e.g. to "
        "test that code on CPU (slow there)",
    )
    group.add_argument(
        "--tag",
        default="",
        help="side run: writes masks.TAG.ckpt, train_masks.TAG.json/png "
        "instead of the main files (e.g. one run per prior)",
    )


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    cfg = recipe.masks
    resolve_loss(cfg, options.unlabeled)  # refuse a labelled loss without labels before anything is written
    checkpoint = paths.tagged_mask_run(options.tag)[0] if options.tag else paths.mask_checkpoint
    if options.resume and not checkpoint.is_file():
        raise PipelineError(
            f"--resume: there is no checkpoint {checkpoint} to continue; drop --resume to start a new run"
        )
    device = select_device(options.device)
    context = init_distributed(device)
    try:
        data = build_datasets(recipe, augment_train=cfg.augment)
        check_enough_to_train(data, cfg, cfg.batch_size * context.world_size, "mask training", "masks.batch_size")
        model, source = load_dense_model(recipe, paths)
        # the evaluation transform of own weights, measured here once the data are checked (run_stage applied a
        # recorded one already): the datasets and config.json follow it
        if options.unlabeled and measured_preprocessing(recipe):  # measuring the transform needs the labels
            print(
                "note: preprocessing: not measured under --unlabeled (it scores the dense model against the "
                "folder's labels); the recipe's transform is used: state it with --resize N|none",
                flush=True,
            )
        measured = with_measured_preprocessing(recipe, paths, measure=not options.unlabeled, model=model)
        if measured.preprocess != recipe.preprocess:
            recipe = measured
            data = build_datasets(recipe, augment_train=cfg.augment)
            write_config(recipe, paths)
        report = eligible_layers(model, recipe)
        settings = StepSettings.for_device(context.device, options.cuda_path, cfg.precision)
        settings.prepare_model(model.to(context.device))  # as the mask step will: its evaluations run alike
        dense_metrics = describe_start(model, report, recipe, data, context) if context.is_main else None
        initial = None
        if options.masks_from:
            initial = {layer.name: layer.indices for layer in MaskArtifact.load(Path(options.masks_from)).layers}
        result = learn_masks(
            model,
            report,
            MaskLearning.of(recipe),
            data,
            context.device,
            checkpoint=checkpoint,
            resume=options.resume,
            initial_indices=initial,
            unlabeled=options.unlabeled,
            rank=context.rank,
            world_size=context.world_size,
            settings=settings,
        )
        if context.is_main and not result.stopped and dense_metrics is not None:
            record = finish(
                model,
                report,
                recipe,
                paths,
                options,
                data,
                result,
                dense_metrics,
                source,
                checkpoint,
                context.world_size,
            )
            summarise(record, recipe, result)
        if result.stopped:
            raise Interrupted(result.stopped, f"checkpoint {checkpoint} saved; continue with --resume")
        return 0
    finally:
        shutdown(context)


def describe_start(model, report, recipe: Recipe, data, context) -> dict:
    """Print the masked and skipped layers (each skip with its reason) and the dense model's test accuracy."""
    print(
        f"{len(report.masked)} layers masked ({100 * report.masked_mac_fraction:.1f}% of MACs), "
        f"{len(report.skipped)} skipped:"
    )
    for layer in report.skipped:
        print(f"  skip {layer.name}: {layer.reason}")
    dense_metrics = evaluate(
        model.to(context.device), data.eval, recipe.data.eval_batch_size, context.device, desc="eval dense"
    )
    print(f"dense: top1 {dense_metrics['top1']:.2f}% top5 {dense_metrics['top5']:.2f}% ({data.description})")
    return dense_metrics


def finish(
    model,
    report,
    recipe: Recipe,
    paths: ArtifactPaths,
    options: Options,
    data,
    result: LearnResult,
    dense_metrics: dict,
    source: str,
    checkpoint,
    world_size: int,
) -> TrainingRecord:
    """Test the kept masks (masks.keep) and write config.json, layers.json and train_masks.json (through its owner)."""
    cfg = recipe.masks
    use_argmax_masks(model, result.indices)
    test = evaluate(model.eval(), data.eval, recipe.data.eval_batch_size, model_device(model), desc="test (kept masks)")
    write_json(paths.layers, report.to_dict())
    log_path = paths.tagged_mask_run(options.tag)[1] if options.tag else paths.mask_training
    details = {
        "weights": source,
        "data": data.description,
        "accuracy_meaningful": data.accuracy_meaningful,
        "prior": cfg.prior,
        "n": cfg.n,
        "m": cfg.m,
        "loss": result.loss,
        "unlabeled": options.unlabeled,
        "train_images": result.train_images,
        "validation_images": result.validation_images,
        "validation_score": "agreement with the dense model (%)" if options.unlabeled else "top-1 (%)",
        "steps": result.steps,
        "budget_steps": cfg.steps,
        "epochs": round(result.steps / steps_per_epoch(result.train_images, cfg.batch_size, world_size), 3),
        "stopped_early": result.stop_reason is not None,
        "stop_reason": result.stop_reason,
        "stop_step": result.steps if result.stop_reason else None,
        "cooldown_start": result.cooldown_start,
        "seconds": round(result.seconds, 1),
        "world_size": world_size,
        "rank_mask_checksums": result.rank_checksums,
        "dense": dense_metrics,
        "preprocessing": choice_summary(recipe, paths),
        "keep": cfg.keep,
        "kept": result.kept_why,
        "kept_step": result.kept_step,
        "kept_validation": result.kept_score,
        "best_step": result.best_step,
        "best_validation": result.best_score,
        "prior_validation": result.start_score,
        "beat_prior": result.beat_prior,
        "test": test,
        "history": result.history,
        "masked_mac_fraction": report.masked_mac_fraction,
        "config": recipe.to_dict()["masks"],
    }
    record = TrainingRecord(recipe.name, {checkpoint.name: file_record(checkpoint)}, details)  # bake checks masks.ckpt
    record.save(log_path)
    if result.validation_images:
        learning_curves(
            {cfg.prior: result.history},
            None,
            paths.tagged_mask_run(options.tag)[2] if options.tag else paths.mask_training_plot,
            f"{recipe.name}: learned {cfg.n}:{cfg.m} masks (validation split)",
        )
    return record


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def summarise(record: TrainingRecord, recipe: Recipe, result: LearnResult) -> None:
    details = record.details
    test, dense = details["test"], details["dense"]
    if result.stop_reason:
        print(f"stopped at step {result.steps} of {recipe.masks.steps} ({result.stop_reason})")
    print(
        f"learned masks: test top1 {test['top1']:.2f}% (dense {dense['top1']:.2f}%, drop "
        f"{dense['top1'] - test['top1']:.2f} pt); kept the {result.kept_why} masks, step {result.kept_step} of "
        f"{result.steps} (best on validation: step {result.best_step}), {result.seconds:.0f}s"
    )
    if not result.beat_prior and result.start_score is not None:
        what = f"the {recipe.masks.prior} prior's masks" if result.kept_step == 0 else "masks that score no better"
        print(
            f"training did not beat its prior on the validation split (prior {result.start_score:.2f}, kept "
            f"{result.kept_score}): the result is {what}"
        )
