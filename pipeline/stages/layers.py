"""`layers`: which Conv/Linear layers get an N:M mask, which are skipped and why, with MAC shares.

Eligibility depends on the architecture and the recipe's mask rules only, so no weights are loaded.
Writes layers.json (the same format train-masks writes).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.declaration import MODEL, StageDeclaration
from pipeline.io import write_json
from pipeline.masks.eligibility import eligible_layers
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.recipe.weights import build_network

DECLARATION = StageDeclaration(
    help="list masked and skipped layers with reasons and MAC shares",
    writes=("config", "layers"),
    recipe=(*MODEL, "masks.n", "masks.m", "masks.include", "masks.exclude", "masks.include_classifier"),
)


@dataclass
class Options:
    """No flags beyond the model's."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    cfg = recipe.masks
    report = eligible_layers(build_network(recipe), recipe)
    total = max(report.total_macs, 1)
    width = max((len(layer.name) for layer in report.layers), default=10)
    print(
        f"{recipe.name}: {len(report.masked)} of {len(report.layers)} Conv/Linear layers get {cfg.n}:{cfg.m} masks, "
        f"{100 * report.masked_mac_fraction:.1f}% of {report.total_macs / 1e6:.1f} MMACs per image"
    )
    print(report.gain_note(cfg.n, cfg.m))
    print(f"{'layer':<{width}}  {'kind':<6} {'MAC %':>6}  status")
    for layer in report.layers:
        status = "masked" if layer.eligible else f"skipped: {layer.reason}"
        print(f"{layer.name:<{width}}  {layer.kind:<6} {100 * layer.macs / total:6.2f}  {status}")
    write_json(paths.layers, report.to_dict())
    print(f"wrote {paths.layers}")
    return 0
