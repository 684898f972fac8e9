"""Activation-aware one-shot 2:4 masks in TensorRT's layout: `wanda` and `sparsegpt` (no weight update).

Both score every weight of a masked layer from calibration images run through the frozen dense
model (forward pre-hooks read each masked layer's input), then keep, in every block of M
consecutive input channels at each (k, r, s), the N weights with the largest score - exactly the
blocks `patterns.to_blocks` defines and TensorRT accelerates.

* wanda (Sun et al., "A Simple and Effective Pruning Approach for LLMs", 2023): score
  |W[k, c, r, s]| * ||X_c||_2, with ||X_c||_2 the L2 norm of input channel c over every calibration
  image and spatial position. With equal channel norms it is plain magnitude.
* sparsegpt (Frantar & Alistarh, "SparseGPT", 2023), selection only: the OBS saliency of pruning one
  weight alone, w^2 / [H^-1]_jj, with H = X X^T / n the (damped) Hessian of the layer's squared
  reconstruction error over its unfolded input. For a conv, X is the im2col input: the axis
  j = c * R * S + r * S + s (F.unfold's order, the same as weight.reshape(K, C * R * S)), so H is
  (C R S) x (C R S) and weight (k, c, r, s) uses the diagonal entry at j(c, r, s). The 2:4 groups
  are then {j(c0, r, s), ..., j(c0 + 3, r, s)}: four entries R * S apart on the unfolded axis, not
  four consecutive ones. Since no weight is updated, only the diagonal of H^-1 enters and the
  grouping does not change any saliency. (NVIDIA ModelOpt's sparsegpt mode instead groups four
  consecutive entries of the flattened C R S axis, i.e. kernel positions of one channel, which
  TensorRT cannot accelerate for 3x3 convs.) With H = I it is plain magnitude.

`calibration_batches` draws the images (a seeded subset of the training set; never the test set),
and `input_hessians` is shared with `adaprune`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from pipeline.data.datasets import dataset_size
from pipeline.errors import PipelineError
from pipeline.masks.patterns import magnitude_indices

CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 32
HESSIAN_DAMPING = 0.01  # share of the mean diagonal added to H (SparseGPT's default)

ConvOrLinear = nn.Conv2d | nn.Linear  # the layers these rules score


def calibration_batches(
    dataset: Dataset, images: int = CALIBRATION_IMAGES, batch_size: int = CALIBRATION_BATCH, seed: int = 0
) -> list[torch.Tensor]:
    """A seeded random subset of `dataset` (the training images), as a list of image batches."""
    from pipeline.data.datasets import make_loader

    size = dataset_size(dataset)
    if size == 0:
        raise PipelineError("calibration needs training images, but the training set is empty")
    count = min(images, size)
    chosen = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return [batch[0] for batch in make_loader(Subset(dataset, chosen.tolist()), batch_size=batch_size)]


def _conv_linear_modules(model: nn.Module, names: Iterable[str]) -> dict[str, ConvOrLinear]:
    modules = dict(model.named_modules())
    found: dict[str, ConvOrLinear] = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise PipelineError(f"layer {name} is not a Conv2d/Linear of this model")
        found[name] = module
    return found


def run_with_input_hooks(
    model: nn.Module,
    modules: Mapping[str, ConvOrLinear],
    batches: list[torch.Tensor],
    device: torch.device,
    update: Callable[[str, ConvOrLinear, torch.Tensor], None],
) -> None:
    """Run the frozen model (eval, no grad) on `batches`, calling update(name, module, input) per masked layer."""

    def hook_for(name: str, layer: ConvOrLinear):
        def hook(module: nn.Module, inputs) -> None:  # module is `layer`, which the hook is registered on
            update(name, layer, inputs[0].detach())

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name, module)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images in batches:
                model(images.to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def unfolded_rows(module: ConvOrLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its weight's input axis: [samples, C*R*S] (conv, im2col) or [samples, in]."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if module.groups != 1:
        raise PipelineError(f"grouped conv (groups={module.groups}) has no single input Hessian")
    if isinstance(module.padding, str):  # F.unfold takes only numeric padding
        raise PipelineError(
            f"conv with padding={module.padding!r} has no im2col input here; use wanda, or exclude the layer "
            "(masks.exclude)"
        )
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, C*R*S, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_channel_norms(
    model: nn.Module, names: Iterable[str], batches: list[torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Per masked layer, the L2 norm of each input channel over all images and positions: [C] (float64)."""
    modules = _conv_linear_modules(model, names)
    sums: dict[str, torch.Tensor] = {}

    def update(name: str, module: ConvOrLinear, x: torch.Tensor) -> None:
        axes = tuple(d for d in range(x.dim()) if d != (1 if isinstance(module, nn.Conv2d) else x.dim() - 1))
        squares = x.double().pow(2).sum(dim=axes).cpu()
        sums[name] = sums[name] + squares if name in sums else squares

    run_with_input_hooks(model, modules, batches, device, update)
    return {name: value.sqrt() for name, value in sums.items()}


def input_hessians(
    model: nn.Module, names: Iterable[str], batches: list[torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Per masked layer, H = X X^T / n over its unfolded input (float64, undamped): [D, D], D = C*R*S."""
    modules = _conv_linear_modules(model, names)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def update(name: str, module: ConvOrLinear, x: torch.Tensor) -> None:
        rows = unfolded_rows(module, x).float()
        gram = (rows.T @ rows).double().cpu()
        sums[name] = sums[name] + gram if name in sums else gram
        counts[name] = counts.get(name, 0) + rows.shape[0]

    run_with_input_hooks(model, modules, batches, device, update)
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def damped(hessian: torch.Tensor, damping: float = HESSIAN_DAMPING) -> torch.Tensor:
    """H + damping * mean(diag H) * I (a zero Hessian gets the identity), so H is invertible."""
    scale = float(hessian.diagonal().mean())
    return hessian + (damping * scale if scale > 0 else 1.0) * torch.eye(hessian.shape[0], dtype=hessian.dtype)


def wanda_scores(weight: torch.Tensor, channel_norms: torch.Tensor) -> torch.Tensor:
    """|W| times the norm of the input channel each weight reads, in weight layout."""
    shape = [1, -1] + [1] * (weight.dim() - 2)
    return weight.detach().double().abs() * channel_norms.double().view(shape)


def obs_saliency(weight: torch.Tensor, hessian: torch.Tensor, damping: float = HESSIAN_DAMPING) -> torch.Tensor:
    """w^2 / [H^-1]_jj per weight (the OBS cost of pruning it alone), in weight layout."""
    inverse_diagonal = torch.cholesky_inverse(torch.linalg.cholesky(damped(hessian, damping))).diagonal()
    flat = weight.detach().double().reshape(weight.shape[0], -1)
    if flat.shape[1] != inverse_diagonal.numel():
        raise PipelineError(f"Hessian of size {inverse_diagonal.numel()} does not fit a weight {list(weight.shape)}")
    return (flat.pow(2) / inverse_diagonal).reshape(weight.shape)


def indices_from_scores(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per block of m input channels, the pattern keeping the n largest (non-negative) scores."""
    return magnitude_indices(scores, n, m)


def layer_scores(
    model: nn.Module,
    names: list[str],
    batches: list[torch.Tensor],
    rule: str,
    device: torch.device,
    damping: float = HESSIAN_DAMPING,
) -> dict[str, torch.Tensor]:
    """Per-weight importance of each named layer in weight layout: `wanda` (|w| x input-channel
    activation norm) or `sparsegpt` (w^2 / [H^-1]_jj). Masks keep the larger scores; the mask
    prior of `learn_masks` starts from them."""
    modules = _conv_linear_modules(model, names)
    if rule == "wanda":
        norms = input_channel_norms(model, names, batches, device)
        return {name: wanda_scores(modules[name].weight.cpu(), norms[name]) for name in names}
    if rule == "sparsegpt":
        hessians = input_hessians(model, names, batches, device)
        return {name: obs_saliency(modules[name].weight.cpu(), hessians.pop(name), damping) for name in names}
    raise PipelineError(f"unknown activation-aware rule {rule!r}; use wanda or sparsegpt")


def wanda_indices(
    model: nn.Module, names: list[str], batches: list[torch.Tensor], n: int, m: int, device: torch.device
) -> dict[str, torch.Tensor]:
    scores = layer_scores(model, names, batches, "wanda", device)
    return {name: indices_from_scores(scores[name], n, m) for name in names}


def sparsegpt_indices(
    model: nn.Module,
    names: list[str],
    batches: list[torch.Tensor],
    n: int,
    m: int,
    device: torch.device,
    damping: float = HESSIAN_DAMPING,
) -> dict[str, torch.Tensor]:
    scores = layer_scores(model, names, batches, "sparsegpt", device, damping)
    return {name: indices_from_scores(scores[name], n, m) for name in names}
