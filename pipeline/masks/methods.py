"""Mask methods by name. Every method returns the same artifact, so bake/export/verify work unchanged.

API (for `compare`, `bake` and anyone adding a method):

    result = compute_masks("permuted", MethodContext(recipe, model, report, data=..., device=...))
    result.artifact          # MaskArtifact (masks.pt), pattern indices per input-channel block
    result.dense_state_dict  # the dense weights the masks belong to: the original ones, or for
                             # `permuted` the permuted ones (same function, other channel order)
    result.seconds           # wall time to compute the mask
    result.info              # method-specific statistics (kept magnitude, skipped layers, ...)

    dense_for_artifact(state_dict, artifact)  # original dense weights -> the weights to mask
                                              # (applies meta["permutations"]; identity otherwise)

`bake --masks masks.pt` must call `dense_for_artifact` before `apply_masks`, so that a permuted
artifact is baked onto permuted weights.

Methods: magnitude, permuted, transposable (exact), transposable-greedy (2-approximation),
wanda and sparsegpt (activation-aware, calibration images from MethodContext.data.plain_train),
adaprune (magnitude masks, then the kept weights re-fitted: the only method in CHANGES_WEIGHTS,
whose `dense_state_dict` holds the changed weights), learned (Gumbel-Softmax on frozen weights;
`masks.prior` = magnitude | wanda | sparsegpt | uniform, optionally started from another method's masks via
MethodContext.initial).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.errors import Interrupted, PipelineError
from pipeline.masks.artifact import LayerMask, MaskArtifact, apply_masks
from pipeline.masks.eligibility import EligibilityReport
from pipeline.masks.patterns import magnitude_indices
from pipeline.recipe.config import Recipe


@dataclass
class MaskResult:
    artifact: MaskArtifact
    dense_state_dict: dict[str, torch.Tensor]
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodContext:
    recipe: Recipe
    model: nn.Module  # dense, eval mode; not modified by any method
    report: EligibilityReport
    data: Any = None  # DataBundle; needed by `learned`
    device: torch.device = torch.device("cpu")
    initial: MaskArtifact | None = None  # start `learned` from these masks
    checkpoint: Any = None  # Path for the learned method's checkpoint (None: no checkpoint)
    log: Callable[[str], None] = print


def dense_for_artifact(state_dict: dict[str, torch.Tensor], artifact: MaskArtifact) -> dict[str, torch.Tensor]:
    """The dense weights `artifact` was computed for: applies recorded channel permutations."""
    permutations = artifact.meta.get("permutations")
    if not permutations:
        return state_dict
    from pipeline.masks.permutation import permute_state_dict

    try:
        return permute_state_dict(state_dict, permutations)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise PipelineError(
            f"the mask artifact's channel permutations do not fit these weights ({exc}); "
            "use weights of the same architecture"
        ) from None


def kept_share(state_dict: dict[str, torch.Tensor], artifact: MaskArtifact) -> float:
    """Share of the masked layers' total |w| that the masks keep."""
    kept = total = 0.0
    for layer in artifact.layers:
        weight = state_dict[f"{layer.name}.weight"].detach().abs().float()
        kept += float((weight * layer.mask()).sum())
        total += float(weight.sum())
    return kept / max(total, 1e-12)


def _artifact(ctx: MethodContext, method: str, indices: dict[str, torch.Tensor], meta: dict) -> MaskArtifact:
    cfg = ctx.recipe.masks
    modules = dict(ctx.model.named_modules())
    layers = [
        LayerMask(layer.name, list(modules[layer.name].weight.shape), cfg.n, cfg.m, indices[layer.name].long())
        for layer in ctx.report.masked
    ]
    return MaskArtifact(ctx.recipe.name, ctx.recipe.arch, method, layers, meta)


def _state(ctx: MethodContext) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in ctx.model.state_dict().items()}


# --------------------------------------------------------------------------- methods
def magnitude(ctx: MethodContext) -> MaskResult:
    cfg = ctx.recipe.masks
    state = _state(ctx)
    indices = {
        layer.name: magnitude_indices(state[f"{layer.name}.weight"], cfg.n, cfg.m) for layer in ctx.report.masked
    }
    return MaskResult(_artifact(ctx, "magnitude", indices, {"rule": "per block keep the N largest |w|"}), state)


def permuted(ctx: MethodContext) -> MaskResult:
    from pipeline.masks.permutation import (
        channel_spaces,
        consumer_matrix,
        output_difference,
        permute_state_dict,
        search_permutation,
    )

    cfg = ctx.recipe.masks
    state = _state(ctx)
    masked = {layer.name for layer in ctx.report.masked}
    spaces, reads, _ = channel_spaces(ctx.model, ctx.recipe.input_shape)
    permutations: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    searches = []
    for index, space in enumerate(spaces):
        targets = [name for name in space.consumers if name in masked]
        if not targets:
            continue
        if space.fixed:
            for name in targets:
                skipped[name] = f"input channels cannot be reordered: {space.fixed}"
            continue
        if not space.producers:
            for name in targets:
                skipped[name] = "input channels have no producing layer to reorder with them"
            continue
        order, stats = search_permutation(consumer_matrix(state, targets), cfg.n, cfg.m, seed=cfg.seed + index)
        searches.append({"consumers": targets, **stats})
        if stats["kept_after"] <= stats["kept_before"]:
            continue  # identity is already best: leave the weights alone
        permutations[f"space{index}"] = {
            "order": order.tolist(),
            "producers": list(space.producers),
            "holders": list(space.holders),
            "consumers": list(space.consumers),
        }
    permuted_state = permute_state_dict(state, permutations)
    difference = output_difference(copy.deepcopy(ctx.model), state, permuted_state, ctx.recipe.input_shape)
    indices = {
        layer.name: magnitude_indices(permuted_state[f"{layer.name}.weight"], cfg.n, cfg.m)
        for layer in ctx.report.masked
    }
    meta = {
        "permutations": permutations,
        "permutation_skipped": skipped,
        "permuted_output_max_abs_difference": difference,
        "searches": searches,
    }
    for name, reason in skipped.items():
        ctx.log(f"  permuted: {name} keeps its channel order ({reason})")
    return MaskResult(
        _artifact(ctx, "permuted", indices, meta),
        permuted_state,
        info={"skipped": skipped, "output_max_abs_difference": difference, "spaces_permuted": len(permutations)},
    )


def _transposable(ctx: MethodContext, solver: str, method: str) -> MaskResult:
    from pipeline.masks.transposable import can_transpose, indices_from_mask, transposable_mask

    cfg = ctx.recipe.masks
    state = _state(ctx)
    indices, fallback = {}, {}
    for layer in ctx.report.masked:
        weight = state[f"{layer.name}.weight"]
        reason = can_transpose(weight.shape, cfg.m)
        if reason:
            fallback[layer.name] = f"plain magnitude N:M: {reason}"
            indices[layer.name] = magnitude_indices(weight, cfg.n, cfg.m)
            continue
        indices[layer.name] = indices_from_mask(transposable_mask(weight, cfg.n, cfg.m, solver), cfg.n, cfg.m)
    for name, reason in fallback.items():
        ctx.log(f"  {method}: {name} uses {reason}")
    meta = {"solver": solver, "block": "M output x M input channels at each (r, s)", "fallback": fallback}
    return MaskResult(_artifact(ctx, method, indices, meta), state, info={"fallback": fallback})


def transposable(ctx: MethodContext) -> MaskResult:
    return _transposable(ctx, "auto", "transposable")


def transposable_greedy(ctx: MethodContext) -> MaskResult:
    return _transposable(ctx, "greedy", "transposable-greedy")


def _calibration(ctx: MethodContext, method: str) -> list[torch.Tensor]:
    from pipeline.masks.activation_aware import calibration_batches

    if ctx.data is None:
        raise PipelineError(f"the {method} method needs calibration images (MethodContext.data)")
    return calibration_batches(ctx.data.plain_train, seed=ctx.recipe.masks.seed)


def _activation_aware(ctx: MethodContext, method: str, rule: str) -> MaskResult:
    from pipeline.masks import activation_aware

    cfg = ctx.recipe.masks
    batches = _calibration(ctx, method)
    names = [layer.name for layer in ctx.report.masked]
    model = copy.deepcopy(ctx.model).to(ctx.device)
    compute = activation_aware.wanda_indices if method == "wanda" else activation_aware.sparsegpt_indices
    indices = compute(model, names, batches, cfg.n, cfg.m, ctx.device)
    images = sum(len(batch) for batch in batches)
    meta = {"rule": rule, "calibration_images": images, "block": "M input channels at each (k, r, s)"}
    return MaskResult(_artifact(ctx, method, indices, meta), _state(ctx), info={"calibration_images": images})


def wanda(ctx: MethodContext) -> MaskResult:
    return _activation_aware(ctx, "wanda", "per block keep the N largest |w| x input-channel activation norm")


def sparsegpt(ctx: MethodContext) -> MaskResult:
    return _activation_aware(ctx, "sparsegpt", "per block keep the N largest w^2 / [H^-1]_jj, no weight update")


def adaprune(ctx: MethodContext) -> MaskResult:
    from pipeline.masks.adaprune import refit_kept_weights

    cfg = ctx.recipe.masks
    batches = _calibration(ctx, "adaprune")
    state = _state(ctx)
    indices = {
        layer.name: magnitude_indices(state[f"{layer.name}.weight"], cfg.n, cfg.m) for layer in ctx.report.masked
    }
    artifact = _artifact(ctx, "adaprune", indices, {})
    refitted, stats = refit_kept_weights(copy.deepcopy(ctx.model).to(ctx.device), artifact, batches, ctx.device)
    state.update(refitted)
    artifact.meta.update(
        {
            "rule": "magnitude masks; kept weights re-fitted to the dense layer outputs",
            "changes_weights": True,
            "calibration_images": sum(len(batch) for batch in batches),
            "reconstruction": stats,
        }
    )
    return MaskResult(artifact, state, info={"changes_weights": True, "reconstruction": stats})


def learned(ctx: MethodContext) -> MaskResult:
    from pipeline.masks.learning import MaskLearning, learn_masks

    if ctx.data is None:
        raise PipelineError("the learned method needs training data (MethodContext.data)")
    state = _state(ctx)
    model = copy.deepcopy(ctx.model)
    initial = None
    if ctx.initial is not None:
        initial = {layer.name: layer.indices for layer in dense_initial_check(ctx)}
    result = learn_masks(
        model,
        ctx.report,
        MaskLearning.of(ctx.recipe),
        ctx.data,
        ctx.device,
        checkpoint=ctx.checkpoint,
        initial_indices=initial,
        log=ctx.log,
    )
    if result.stopped:
        raise Interrupted(result.stopped, "mask learning stopped; nothing compared")
    meta = {
        "prior": ctx.recipe.masks.prior,
        "init_from": ctx.initial.method if ctx.initial else None,
        "steps": result.steps,
        "kept": result.kept_why,
        "kept_step": result.kept_step,
        "validation_top1": result.kept_score,
        "best_step": result.best_step,
        "beat_prior": result.beat_prior,
    }
    return MaskResult(
        _artifact(ctx, "learned", result.indices, meta),
        state,
        info={"steps": result.steps, "history": result.history, "beat_prior": result.beat_prior},
    )


def dense_initial_check(ctx: MethodContext) -> list[LayerMask]:
    """Layers of `ctx.initial` (a mask artifact), checked against the model's masked layers."""
    initial = ctx.initial
    if initial is None:
        raise RuntimeError("dense_initial_check without masks.init_from's artifact (ctx.initial)")
    if initial.meta.get("permutations"):
        raise PipelineError(
            f"masks from method {initial.method} belong to permuted weights; learned masks start "
            "from masks of the original channel order (magnitude, transposable, learned)"
        )
    by_name = initial.by_name()
    modules = dict(ctx.model.named_modules())
    layers = []
    for layer in ctx.report.masked:
        if layer.name not in by_name:
            continue
        if list(by_name[layer.name].shape) != list(modules[layer.name].weight.shape):
            raise PipelineError(
                f"initial masks: layer {layer.name} has shape {by_name[layer.name].shape}, the "
                f"model {list(modules[layer.name].weight.shape)}"
            )
        layers.append(by_name[layer.name])
    return layers


METHODS: dict[str, Callable[[MethodContext], MaskResult]] = {
    "magnitude": magnitude,
    "permuted": permuted,
    "transposable": transposable,
    "transposable-greedy": transposable_greedy,
    "wanda": wanda,
    "sparsegpt": sparsegpt,
    "adaprune": adaprune,
    "learned": learned,
}

# Methods whose result carries changed dense weights (MaskResult.dense_state_dict); every table labels them.
CHANGES_WEIGHTS = frozenset({"adaprune"})

# Which constraint bounds each method's admissible masks (for the mask-diversity column).
CONSTRAINT = {
    "magnitude": "nm",
    "permuted": "nm",
    "transposable": "transposable",
    "transposable-greedy": "transposable",
    "wanda": "nm",
    "sparsegpt": "nm",
    "adaprune": "nm",
    "learned": "nm",
}


def compute_masks(method: str, ctx: MethodContext) -> MaskResult:
    """Run one method, timing it; the result's artifact has `method` set to the method name."""
    if method not in METHODS:
        raise PipelineError(f"unknown mask method {method!r}; valid: {', '.join(METHODS)}")
    started = time.perf_counter()
    result = METHODS[method](ctx)
    result.seconds = time.perf_counter() - started
    result.artifact.meta.setdefault("seconds", result.seconds)
    return result


def masked_state(result: MaskResult) -> dict[str, torch.Tensor]:
    """The sparse weights of a method's result (its dense weights with its masks applied)."""
    return apply_masks(result.dense_state_dict, result.artifact, f"{result.artifact.method} weights")
