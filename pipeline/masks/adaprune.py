"""AdaPrune (Hubara et al., NeurIPS 2021, sec. 6): keep a 2:4 mask, re-fit the kept weights. CHANGES WEIGHTS.

Every other mask method leaves the dense weights alone; this baseline does not, so every table
that lists it must say so (`methods.CHANGES_WEIGHTS`). Per masked layer, with X the layer's input
on calibration images from the frozen dense model (im2col rows for a conv) and H = X X^T / n, the
kept weights v of every output row k minimise the squared reconstruction error of that row's
output against the dense one,
    ||X^T (v - w_k)||^2 / n = (v - w_k)^T H (v - w_k),   v zero outside the row's mask,
a least-squares problem per output row (the paper optimises the same objective with a few hundred
Adam steps; here it is solved directly). All rows are solved together by conjugate gradients
restricted to each row's kept entries, with H damped by 1% of its mean diagonal (a ridge towards
the dense weights where the calibration data does not constrain them). The pruned entries keep
their dense values in the returned weights; `apply_masks` zeroes them, as for any method.

Layers are fitted independently on the dense network's activations (not sequentially on the
already-pruned network's).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.masks.activation_aware import HESSIAN_DAMPING, damped, input_hessians
from pipeline.masks.artifact import MaskArtifact

CG_ITERATIONS = 100
CG_TOLERANCE = 1e-6  # relative residual norm at which a layer's solve stops


def reconstruction_error(original: torch.Tensor, candidate: torch.Tensor, hessian: torch.Tensor) -> float:
    """Squared output error of `candidate` against `original` on the calibration inputs, relative to
    the dense output's energy: tr((V - W) H (V - W)^T) / tr(W H W^T)."""
    w = original.reshape(original.shape[0], -1).double()
    d = candidate.reshape(candidate.shape[0], -1).double() - w
    return float(((d @ hessian) * d).sum() / ((w @ hessian) * w).sum().clamp_min(1e-30))


def masked_least_squares(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    iterations: int = CG_ITERATIONS,
    tolerance: float = CG_TOLERANCE,
) -> torch.Tensor:
    """Per row k of the [K, D] `weight`: argmin over v with v = 0 where mask is 0 of (v - w_k)^T H (v - w_k).

    Conjugate gradients on every row at once, started from the masked weight; `hessian` must be
    positive definite (use `damped`). Returns [K, D] with the pruned entries equal to zero."""
    a = hessian.to(torch.float32)
    w = weight.to(torch.float32)
    keep = mask.to(torch.float32)
    v = w * keep
    r = keep * ((w - v) @ a)  # minus the gradient, restricted to the kept entries
    p = r.clone()
    rr = (r * r).sum(1)
    start = float(rr.sum().sqrt())
    for _ in range(iterations):
        if float(rr.sum().sqrt()) <= tolerance * max(start, 1e-30):
            break
        ap = keep * (p @ a)
        alpha = rr / (p * ap).sum(1).clamp_min(1e-30)
        v += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rr_next = (r * r).sum(1)
        p = r + (rr_next / rr.clamp_min(1e-30))[:, None] * p
        rr = rr_next
    return v * keep


def refit_kept_weights(
    model: nn.Module,
    artifact: MaskArtifact,
    batches: list[torch.Tensor],
    device: torch.device,
    iterations: int = CG_ITERATIONS,
    damping: float = HESSIAN_DAMPING,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Re-fitted weights of every masked layer ({"<layer>.weight": tensor}, pruned entries left dense)
    and per layer the relative reconstruction error of plain masking and after re-fitting."""
    hessians = input_hessians(model, [layer.name for layer in artifact.layers], batches, device)
    modules = dict(model.named_modules())
    weights, stats = {}, {}
    for layer in artifact.layers:
        dense = modules[layer.name].weight.detach().cpu()
        mask = layer.mask().to(torch.bool)
        hessian = hessians.pop(layer.name)
        flat = dense.reshape(dense.shape[0], -1)
        fitted = masked_least_squares(flat, mask.reshape(flat.shape), damped(hessian, damping), iterations)
        refitted = torch.where(mask, fitted.reshape(dense.shape).to(dense.dtype), dense)
        weights[f"{layer.name}.weight"] = refitted
        stats[layer.name] = {
            "masked": reconstruction_error(dense, dense * mask, hessian),
            "refitted": reconstruction_error(dense, refitted * mask, hessian),
        }
    return weights, stats
