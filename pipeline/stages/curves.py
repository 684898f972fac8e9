"""`curves`: top-1 against mask-training steps for every train-masks run of a model in one plot."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.declaration import StageDeclaration
from pipeline.errors import PipelineError
from pipeline.paths import ArtifactPaths
from pipeline.plots import learning_curves
from pipeline.recipe.config import Recipe
from pipeline.records import load_report


def _records(recipe: Recipe, paths: ArtifactPaths, options: Options | None) -> list:
    return paths.mask_training_records()


DECLARATION = StageDeclaration(
    help="plot top-1 against mask-training steps for every run of a model",
    kind="lab",
    reads=(_records,),
    writes=("curves",),  # no config.json: it plots the runs already made
    recipe=("name",),
)


@dataclass
class Options:
    """No flags beyond the model's."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


# what the plot reads
CURVE_KEYS: dict[str, type | tuple[type, ...]] = {
    "history": list,
    "prior": str,
    "loss": str,
    "steps": int,
    "test": dict,
}


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    runs = {}
    for log in paths.mask_training_records():
        summary = load_report(log, "train-masks", recipe.name, CURVE_KEYS)
        tag = log.stem.removeprefix("train_masks").lstrip(".") or "main"
        history = [point for point in summary["history"] if isinstance(point, dict) and "top1" in point]
        if not all(isinstance(point["top1"], (int, float)) for point in history) or "top1" not in summary["test"]:
            raise PipelineError(
                f"{log} is not a train-masks report (its history or test holds no numbers); "
                f"re-run `python -m pipeline train-masks --model {recipe.name}`"
            )
        if not history:
            print(f"{tag:12s} has no validation evaluations (masks.validation_images = 0); not plotted")
            continue
        runs[f"{tag} (prior {summary['prior']}, {summary['loss']})"] = history
        best = max(point["top1"] for point in history)
        print(
            f"{tag:12s} prior {summary['prior']:9s} loss {summary['loss']:10s} steps {summary['steps']:5d}  "
            f"validation: prior {history[0]['top1']:.2f}%  best {best:.2f}% (step {summary.get('best_step')})  "
            f"test of the kept masks ({summary.get('kept', 'best')}) {summary['test']['top1']:.2f}%"
        )
    if not runs:
        raise PipelineError(f"no train_masks*.json with validation evaluations in {paths.root}; run train-masks first")
    out = paths.curves
    # validation top-1 (held out from the training images): the test-set dense line would not compare
    learning_curves(runs, None, out, f"{recipe.name}: validation top-1 of argmax masks while learning")
    print(f"wrote {out}")
    return 0
