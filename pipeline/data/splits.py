"""The split of the training images into what mask training learns from and the validation split it judges
on. One function, used by train-masks and by the demo's pretraining, which leaves the validation split out of
the dense model's training so the split measures the masks on images the model has never seen."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, Subset

from pipeline.data.datasets import dataset_size
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.data.datasets import DataBundle
    from pipeline.recipe.config import MaskConfig

VALIDATION_SHARE_LIMIT = 5  # the validation split takes at most 1/5 of the training images


def holdout_split(size: int, validation: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of `size` training images into (train, validation) index lists (never the test set)."""
    if not 0 < validation < size:
        raise PipelineError(
            f"a validation split of {validation} images needs between 1 and {size - 1} of the {size} training images"
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[validation:].tolist()), sorted(order[:validation].tolist())


def mask_split(size: int, cfg: MaskConfig) -> tuple[list[int], list[int]]:
    """(indices mask training learns from, indices of its validation split) among `size` training images:
    `masks.train_images` of them when set (seeded), of which `masks.validation_images` (at most a fifth) held out."""
    images = list(range(size))
    if cfg.train_images and cfg.train_images < size:
        chosen = torch.randperm(size, generator=torch.Generator().manual_seed(cfg.seed + 17))
        images = sorted(chosen[: cfg.train_images].tolist())
    validation = min(cfg.validation_images, len(images) // VALIDATION_SHARE_LIMIT)
    if validation < 1:
        return images, []
    kept, held_out = holdout_split(len(images), validation, cfg.seed)
    return [images[i] for i in kept], [images[i] for i in held_out]


def split_training_images(data: DataBundle, cfg: MaskConfig) -> tuple[Dataset, Dataset | None]:
    """(training subset, validation split) of the recipe's training images; the test set is never touched.
    The validation split is served without augmentation (`data.plain_train`), so its score is stable."""
    if data.plain_train is None:
        raise RuntimeError("internal: DataBundle.plain_train is set in __post_init__ and never None")
    size = dataset_size(data.train)
    train, validation = mask_split(size, cfg)
    training = Subset(data.train, train) if len(train) < size else data.train
    return training, (Subset(data.plain_train, validation) if validation else None)


def without_mask_validation(data: DataBundle, cfg: MaskConfig) -> Dataset:
    """The training images less mask training's validation split (what the demo's dense model trains on)."""
    size = dataset_size(data.train)
    held_out = set(mask_split(size, cfg)[1])
    if not held_out:
        return data.train
    return Subset(data.train, [index for index in range(size) if index not in held_out])


def check_enough_to_train(data: DataBundle, cfg: MaskConfig, batch_size: int, what: str, batch_key: str) -> int:
    """The number of images WHAT trains on once mask training's validation split is held out; one error line
    (before any work) when that is less than one batch of BATCH_SIZE (BATCH_KEY sets it)."""
    size = dataset_size(data.train)
    train, validation = mask_split(size, cfg)
    if len(train) >= batch_size:
        return len(train)
    raise PipelineError(
        f"{what} needs at least one batch of {batch_size} training images, but {data.description} has "
        f"{size} training images, {len(train)} once the validation split of {len(validation)} is held "
        f"out: give it more training images, or pass --set {batch_key}={max(len(train), 1)} (or --set "
        "masks.validation_images=N to hold out fewer)"
    )
