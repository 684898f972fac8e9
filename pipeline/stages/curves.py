"""`curves`: top-1 against mask-training steps for every train-masks run of a model in one plot."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.plots import learning_curves
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe


@dataclass
class Options:
    """No flags beyond the model's."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    runs, dense = {}, None
    for log in sorted(paths.root.glob("train_masks*.json")):
        summary = read_json(log)
        tag = log.stem.removeprefix("train_masks").lstrip(".") or "main"
        runs[f"{tag} (init {summary['init']})"] = summary["history"]
        if summary.get("dense") and summary.get("accuracy_meaningful"):
            dense = summary["dense"]["top1"]
        final = summary["history"][-1]
        print(f"{tag:12s} init {summary['init']:9s} steps {summary['steps']:5d}  start top1 "
              f"{summary['history'][0]['top1']:.2f}%  final {final['top1']:.2f}%")
    if not runs:
        raise PipelineError(f"no train_masks*.json in {paths.root}; run train-masks first")
    out = paths.root / "curves.png"
    learning_curves(runs, dense, out, f"{recipe.name}: top-1 of argmax masks while learning")
    print(f"wrote {out}")
    return 0
