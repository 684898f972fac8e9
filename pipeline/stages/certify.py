"""`certify`: share of evaluation samples whose masked prediction is provably the dense one.

Bounds and their (reconstructed) statements: pipeline/verify/certify.py and docs/notebook/baselines.md. They are
worst-case bounds: a sample that is not certified may well keep its prediction; the report
gives the measured share of unchanged predictions next to the certified shares.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.args import add_device_argument
from pipeline.data.datasets import build_datasets
from pipeline.declaration import StageDeclaration, option_files
from pipeline.errors import PipelineError
from pipeline.io import write_json, write_text
from pipeline.masks.artifact import MaskArtifact
from pipeline.masks.methods import dense_for_artifact
from pipeline.paths import ArtifactPaths
from pipeline.progress import progress
from pipeline.recipe.config import Recipe
from pipeline.recipe.weight_files import read_state_dict
from pipeline.recipe.weights import build_network, dense_state_dict, load_state_dict_strict
from pipeline.training import check_device, select_device
from pipeline.verify.certify import certify_masks

DECLARATION = StageDeclaration(
    help="stability bounds of the masked classifier (paper, sec. 3.2)",
    kind="lab",
    reads=("masks", option_files("masks", "updated_weights")),
    writes=("config", "certify_json", "certify_md"),
    recipe=("*",),
    data=True,
    weights=True,
)


@dataclass
class Options:
    masks: str | None = None
    updated_weights: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("certify")
    group.add_argument(
        "--masks", default=None, metavar="MASKS_PT", help="mask artifact (default engines/<model>/masks.pt)"
    )
    group.add_argument(
        "--updated-weights",
        default=None,
        metavar="PTH",
        help="dense weights after an update: also certify the reused masks on them (Lemma 3.6), e.g. "
        "engines/<model>/dense_updated.pt from `updatable`",
    )
    add_device_argument(group)


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    masks_path = Path(options.masks) if options.masks else paths.masks
    if not masks_path.is_file():
        raise PipelineError(
            f"no masks at {masks_path}; run `python -m pipeline bake --model {recipe.name}` "
            "(or `compare`) first, or pass --masks FILE"
        )
    artifact = MaskArtifact.load(masks_path)
    if artifact.arch != recipe.arch:
        raise PipelineError(f"masks {masks_path} are for arch {artifact.arch}, model {recipe.name} is {recipe.arch}")
    dense, source = dense_state_dict(recipe, paths)
    load_state_dict_strict(build_network(recipe), dense, source)
    dense = dense_for_artifact(dense, artifact)
    updated = None
    if options.updated_weights:
        updated = read_state_dict(Path(options.updated_weights))
        load_state_dict_strict(build_network(recipe), updated, options.updated_weights)
        updated = dense_for_artifact(updated, artifact)
    device = select_device(options.device)
    data = build_datasets(recipe)
    report = certify_masks(
        lambda: build_network(recipe),
        dense,
        artifact,
        data.eval,
        recipe.data.eval_batch_size,
        device,
        updated_state=updated,
        progress=lambda it: progress(it, desc="certify", leave=False),
    )
    report.pop("per_sample")
    summary = {
        "model": recipe.name,
        "weights": source,
        "masks": str(masks_path),
        "method": artifact.method,
        "updated_weights": options.updated_weights,
        "data": data.description,
        "accuracy_meaningful": data.accuracy_meaningful,
        **report,
        "note": "worst-case Lipschitz bounds (reconstructed statements, see docs/notebook/baselines.md): a sample that "
        "is not certified may still keep its prediction",
    }
    write_json(paths.certify_json, summary)
    write_text(paths.certify_md, _markdown(summary))
    print(
        f"{report['samples']} samples: predictions unchanged by the masks {100 * report['prediction_unchanged_share']:.1f}%, "
        f"certified stable: Lemma 3.4 (these masks) {100 * report['lemma_3_4']['certified_share']:.1f}%, "
        f"Lemma 3.5 (any N:M masks) {100 * report['lemma_3_5']['certified_share']:.1f}%"
    )
    if "updated" in report:
        up = report["updated"]
        print(
            f"updated weights: unchanged {100 * up['prediction_unchanged_share']:.1f}%, certified: Lemma 3.4 "
            f"{100 * up['lemma_3_4']['certified_share']:.1f}%, Lemma 3.6 (reused masks) "
            f"{100 * up['lemma_3_6']['certified_share']:.1f}%"
        )
    print(f"-> {paths.certify_md}, {paths.certify_json}")
    return 0


def _markdown(summary: dict) -> str:
    def row(label: str, part: dict) -> str:
        return (
            f"| {label} | {100 * part['certified_share']:.1f} | {part['bound_median']:.3g} | "
            f"{part['actual_over_bound_median']:.2g} | {part['violations']} |"
        )

    lines = [
        f"# Stability certificate: {summary['model']}",
        "",
        f"Masks: {summary['masks']} ({summary['method']}); weights: {summary['weights']}; "
        f"{summary['samples']} samples of {summary['data']}.",
        "",
        f"Predictions unchanged by the masks (measured): {100 * summary['prediction_unchanged_share']:.1f}%. "
        f"Median logit margin {summary['margin_median']:.3g}, median softmax confidence "
        f"{summary['confidence_median']:.3f}.",
        "",
        "| bound | certified % | median bound on \\|\\|f~ - f\\|\\| | measured / bound (median) | violations |",
        "| --- | ---: | ---: | ---: | ---: |",
        row("Lemma 3.4 (these masks)", summary["lemma_3_4"]),
        row("Lemma 3.5 (any N:M masks)", summary["lemma_3_5"]),
    ]
    if "updated" in summary:
        up = summary["updated"]
        lines += [
            row("updated weights, Lemma 3.4", up["lemma_3_4"]),
            row("updated weights, Lemma 3.6 (reused masks)", up["lemma_3_6"]),
            "",
            f"Updated weights: predictions unchanged by the masks {100 * up['prediction_unchanged_share']:.1f}%.",
        ]
    lines += [
        "",
        "A sample is certified when its logit margin exceeds sqrt(2) x the bound. The bounds are worst case "
        "(they hold for every input), hence far above the measured change; see docs/notebook/baselines.md.",
    ]
    return "\n".join(lines) + "\n"
