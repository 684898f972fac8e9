"""`bake`: turn learned logits into the mask artifact (masks.pt) and the sparse weights (sparse.pt).

With `--masks FILE` it re-applies saved masks to (possibly updated) dense weights given by
`--weights FILE`: the masks stay valid while the model is updated (paper, sec. 3.2).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.datasets import build_datasets
from pipeline.declaration import MODEL, PREPROCESS_CHOICE, StageDeclaration, option_files, record, when
from pipeline.errors import PipelineError
from pipeline.io import torch_save
from pipeline.masks.artifact import MaskArtifact, apply_masks
from pipeline.masks.bake_report import BakeReport
from pipeline.masks.batchnorm import reestimate_batchnorm, statistics_keys
from pipeline.masks.checkpoint import MaskCheckpoint, TrainingRecord
from pipeline.masks.checks import check_baked
from pipeline.masks.methods import dense_for_artifact
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.recipe.weights import build_network, dense_state_dict, load_state_dict_strict
from pipeline.records import file_record
from pipeline.training import select_device


def _from_training(recipe: Recipe, options: Options | None) -> bool:
    return not (options is not None and (options.masks or options.checkpoint))


def _reestimates(recipe: Recipe, options: Options | None) -> bool:
    return bool(recipe.masks.bn_reestimate_images)


DECLARATION = StageDeclaration(
    help="write masks.pt and sparse.pt from the learned masks (or re-apply masks)",
    reads=(
        when(_from_training, "mask_checkpoint"),
        when(_from_training, record("mask_training")),
        option_files("masks", "checkpoint"),
        PREPROCESS_CHOICE,
    ),
    writes=("config", "masks", "sparse_weights", "bake_report"),
    recipe=(*MODEL, "weights", "masks", when(_reestimates, "data", "preprocess")),
    options=("masks", "checkpoint"),
    data=when(_reestimates),  # BatchNorm statistics re-estimated on training images
    weights=True,
    in_engine=True,
)


@dataclass
class Options:
    masks: str | None = None
    checkpoint: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--masks",
        default=None,
        metavar="MASKS_PT",
        help="re-apply this mask artifact instead of the learned logits in masks.ckpt",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="mask-training checkpoint (default engines/<model>/masks.ckpt)"
    )


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    if options.masks:
        artifact = MaskArtifact.load(Path(options.masks))
        if artifact.arch != recipe.arch:
            raise PipelineError(
                f"masks {options.masks} are for arch {artifact.arch}, model {recipe.name} is "
                f"{recipe.arch}; use masks of the same architecture"
            )
    else:
        checkpoint = Path(options.checkpoint) if options.checkpoint else paths.mask_checkpoint
        if not checkpoint.is_file():
            raise PipelineError(
                f"no learned masks at {checkpoint}; run `python -m pipeline train-masks "
                f"--model {recipe.name}` first or pass --masks FILE"
            )
        if not options.checkpoint:  # the run's own checkpoint: the one train-masks finished and recorded
            TrainingRecord.load(paths.mask_training, recipe.name).checked(checkpoint)
        artifact = MaskCheckpoint.load(checkpoint).to_artifact(checkpoint, recipe.name, recipe.arch, recipe.masks.prior)
    dense, source = dense_state_dict(recipe, paths)
    load_state_dict_strict(build_network(recipe), dense, source)  # same architecture, clear error otherwise
    dense = dense_for_artifact(dense, artifact)  # channel-permuted masks belong to permuted weights
    sparse = apply_masks(dense, artifact, source)
    reestimated = reestimate_statistics(recipe, sparse) if recipe.masks.bn_reestimate_images else []
    checks = check_baked(dense, sparse, artifact, statistics_keys(reestimated))
    if not checks["ok"]:
        bad = [x["name"] for x in checks["layers"] if x["nm_violations"] or not x["kept_bit_exact"]]
        raise RuntimeError(f"baked weights fail their own checks ({bad or checks['other_tensors_changed']})")
    artifact.meta["weights"] = source
    artifact.save(paths.masks)
    torch_save(sparse, paths.sparse_weights)
    masked = sum(x["density"] * _numel(x["shape"]) for x in checks["layers"])
    total = sum(_numel(x["shape"]) for x in checks["layers"])
    BakeReport(
        recipe.name,
        {path.name: file_record(path) for path in (paths.masks, paths.sparse_weights)},
        method=artifact.method,
        weights=source,
        masks_source=str(options.masks or options.checkpoint or paths.mask_checkpoint),
        layers_masked=len(artifact.layers),
        density_in_masked_layers=masked / max(total, 1),
        all_nm_in_tensorrt_layout=all(x["nm_violations"] == 0 for x in checks["layers"]),
        kept_weights_bit_exact=all(x["kept_bit_exact"] for x in checks["layers"]),
        other_tensors_unchanged=not checks["other_tensors_changed"],
        layers=checks["layers"],
        batchnorm_reestimated={"images": recipe.masks.bn_reestimate_images, "layers": reestimated}
        if reestimated
        else None,
    ).save(paths.bake_report)
    print(
        f"baked {len(artifact.layers)} layers: every masked weight is {artifact.layers[0].n}:{artifact.layers[0].m} "
        f"along input channels, kept weights bit-exact -> {paths.masks}, {paths.sparse_weights}"
    )
    if reestimated:
        print(
            f"BatchNorm statistics of {len(reestimated)} layers re-estimated on "
            f"{recipe.masks.bn_reestimate_images} training images (masks.bn_reestimate_images; weights unchanged)"
        )
    return 0


def reestimate_statistics(recipe: Recipe, sparse: dict) -> list[str]:
    """Re-estimate the sparse model's BatchNorm running statistics in place in `sparse`; the layers changed."""
    model = build_network(recipe)
    load_state_dict_strict(model, sparse, "sparse weights")
    train = build_datasets(recipe).plain_train
    if train is None:
        raise RuntimeError("DataBundle left plain_train unset (its __post_init__ defaults it to train)")
    names = reestimate_batchnorm(
        model,
        train,
        recipe.masks.bn_reestimate_images,
        recipe.data.eval_batch_size,
        select_device("auto"),
        recipe.masks.seed,
    )
    updated = model.state_dict()
    for key in statistics_keys(names):
        sparse[key] = updated[key].detach().cpu().clone()
    return names


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
