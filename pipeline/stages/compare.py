"""`compare`: every mask method against the dense model on the recipe's evaluation set, weights frozen.

Writes engines/<model>/compare.json, compare.md, compare.png and compare/masks.<method>.pt
(pipeline/compare/ does the work; docs/notebook/baselines.md explains the methods).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.args import add_device_argument, add_learned_argument
from pipeline.compare.methods_table import DEFAULT_METHODS, compare, parse_methods
from pipeline.declaration import StageDeclaration, option_files
from pipeline.masks.methods import METHODS
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.training import check_device, select_device

DECLARATION = StageDeclaration(
    help="compare mask methods on the evaluation set",
    kind="lab",
    reads=("mask_checkpoint", "mask_training", option_files("learned_init_from")),
    writes=("config", "compare_json", "compare_md", "compare_png", "compare_masks"),
    recipe=("*",),
    data=True,
    weights=True,
)


@dataclass
class Options:
    methods: str = DEFAULT_METHODS
    learned: str = "auto"
    learned_init_from: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compare")
    group.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated mask methods (default {DEFAULT_METHODS}); valid: {', '.join(METHODS)}",
    )
    add_learned_argument(
        group,
        "learned masks: reuse engines/<model>/masks.ckpt when it is a finished run with the "
        "same mask settings (auto, the default), require it (reuse) or always learn afresh (train)",
    )
    group.add_argument(
        "--learned-init-from",
        default=None,
        metavar="METHOD",
        help="start the learned logits from this compared method's masks (e.g. magnitude)",
    )
    add_device_argument(group)


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    methods = parse_methods(options.methods)
    device = select_device(options.device)
    summary = compare(recipe, paths, methods, device, options.learned, options.learned_init_from)
    if summary["learned_beats_best_heuristic"] is not None:
        print(
            f"learned {'beats' if summary['learned_beats_best_heuristic'] else 'does NOT beat'} the best heuristic "
            f"({summary['best_heuristic']}) on top-1"
        )
    print(f"-> {paths.compare_md}, {paths.compare_json}, {paths.compare_png}")
    return 0
