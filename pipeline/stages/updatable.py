"""`updatable`: the paper's "model stays updatable" demo (sec. 3.2).

Fine-tune the dense weights briefly, re-apply the old masks to the updated weights, and compare with
masks learned afresh on them; writes engines/<model>/updatable.json, updatable.md, dense_updated.pt.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.args import add_device_argument, add_learned_argument
from pipeline.declaration import StageDeclaration, option_files
from pipeline.errors import PipelineError
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.training import check_device, select_device
from pipeline.updatable.demo import updatable_demo

DECLARATION = StageDeclaration(
    help="fine-tune the dense weights, re-apply the old masks, compare",
    kind="lab",
    reads=("masks", "mask_checkpoint", "mask_training", option_files("masks")),
    writes=("config", "compare_masks", "updated_weights", "updatable_json", "updatable_md"),
    recipe=("*",),
    data=True,
    weights=True,
)


@dataclass
class Options:
    masks: str | None = None
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    learned: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.finetune_steps < 1:
            raise PipelineError(f"--finetune-steps {self.finetune_steps}: not valid; valid: at least 1")
        if self.finetune_lr <= 0:
            raise PipelineError(f"--finetune-lr {self.finetune_lr}: not valid; valid: greater than 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("updatable-model demo")
    group.add_argument(
        "--masks",
        default=None,
        metavar="MASKS_PT",
        help="the old masks (default engines/<model>/masks.pt, else learned now)",
    )
    group.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps of all weights (default 300)")
    group.add_argument("--finetune-lr", type=float, default=1e-3, help="SGD learning rate (default 1e-3)")
    add_learned_argument(
        group, "when no old masks exist: reuse engines/<model>/masks.ckpt (auto, reuse) or learn (train)"
    )
    add_device_argument(group)


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    device = select_device(options.device)
    summary = updatable_demo(
        recipe, paths, device, options.masks, options.finetune_steps, options.finetune_lr, options.learned
    )
    for name, r in summary["results"].items():
        print(f"{name}: top1 {r['top1']:.2f}% top5 {r['top5']:.2f}%")
    print(f"-> {paths.updatable_md}, {paths.updatable_json}")
    return 0
