"""BatchNorm re-estimation after masking: an explicit option (`masks.bn_reestimate_images`), off by default.

Pruning shifts every masked layer's output statistics, so the BatchNorm running mean and variance
that follow no longer match. Re-estimating them on training images (a cumulative average over a
seeded subset) changes no weight or bias, only the running statistics; but it does change the model, so it is never applied silently:
bake records it in bake.json, and its accuracy is reported apart from the masks-only result.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from pipeline.data.datasets import dataset_size, make_loader
from pipeline.errors import PipelineError
from pipeline.progress import progress

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _batchnorm(model: nn.Module, name: str) -> nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm:
    module = model.get_submodule(name)
    if not isinstance(module, _BATCHNORM):
        raise RuntimeError(
            f"{name} is a {type(module).__name__}, not one of the BatchNorm layers batchnorm_layers found"
        )
    return module


def batchnorm_layers(model: nn.Module) -> list[str]:
    return [
        name for name, module in model.named_modules() if isinstance(module, _BATCHNORM) and module.track_running_stats
    ]


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, dataset: Dataset, images: int, batch_size: int, device: torch.device, seed: int = 0
) -> list[str]:
    """Replace every BatchNorm's running mean/var with the plain average over `images` training images
    (a seeded subset) passed through `model` as it is (masked weights included). Returns the layers
    re-estimated. Weights, biases and the affine BatchNorm parameters are left untouched."""
    names = batchnorm_layers(model)
    if not names:
        raise PipelineError(
            "masks.bn_reestimate_images is set but the model has no BatchNorm layer with running "
            "statistics; set it to 0"
        )
    if images < 1:
        raise PipelineError(f"BatchNorm re-estimation needs at least 1 image, got {images}")
    chosen = torch.randperm(dataset_size(dataset), generator=torch.Generator().manual_seed(seed + 29))[:images]
    subset = Subset(dataset, sorted(chosen.tolist()))
    model.to(device).eval()
    saved_momentum = {}
    for name in names:
        module = _batchnorm(model, name)
        module.reset_running_stats()
        saved_momentum[name] = module.momentum
        module.momentum = None  # cumulative moving average: every batch weighs the same
        module.train()
    try:
        for batch, _ in progress(make_loader(subset, batch_size=batch_size), desc="re-estimate BatchNorm"):
            model(batch.to(device))
    finally:
        for name in names:
            module = _batchnorm(model, name)
            module.momentum = saved_momentum[name]
            module.eval()
    return names


def statistics_keys(layers: list[str]) -> set[str]:
    """state_dict keys of these BatchNorm layers' running statistics (mean, var and the batch counter)."""
    return {f"{name}.{buffer}" for name in layers for buffer in ("running_mean", "running_var", "num_batches_tracked")}


def running_statistics_keys(model: nn.Module) -> set[str]:
    """state_dict keys BatchNorm re-estimation may change in `model`."""
    return statistics_keys(batchnorm_layers(model))
