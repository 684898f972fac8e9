"""The models a compared method's masks define, and the learned masks (reused from train-masks or learned).

Shared by the compare step and the updatable-model demo (`pipeline.updatable`).
"""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError
from pipeline.masks.artifact import MaskArtifact, apply_masks
from pipeline.masks.checkpoint import MaskCheckpoint
from pipeline.masks.methods import CHANGES_WEIGHTS, MaskResult, MethodContext, compute_masks, dense_for_artifact
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.recipe.weights import build_network, load_state_dict_strict


def method_model(recipe: Recipe, original: dict[str, torch.Tensor], result: MaskResult, device: torch.device):
    """The model a method's masks define. `masked_model` applies the artifact's recorded channel
    permutations itself, so it takes the original weights, never `result.dense_state_dict`
    (already permuted: permuting twice computes another function), except for the methods that
    change weights (adaprune), whose masks apply to their own weights."""
    weights = result.dense_state_dict if result.artifact.method in CHANGES_WEIGHTS else original
    return masked_model(recipe, weights, result.artifact, device)


def masked_model(recipe: Recipe, dense: dict[str, torch.Tensor], artifact: MaskArtifact, device: torch.device):
    model = build_network(recipe)
    load_state_dict_strict(model, apply_masks(dense_for_artifact(dense, artifact), artifact), "masked weights")
    return model.to(device).eval()


def reuse_learned(recipe: Recipe, paths: ArtifactPaths) -> tuple[MaskArtifact, float] | str:
    """The finished mask-training run in masks.ckpt, when its mask settings match the recipe's;
    otherwise the reason it cannot be reused."""
    path = paths.mask_checkpoint
    if not path.is_file():
        return f"no {path}"
    try:
        saved = MaskCheckpoint.load(path)
    except PipelineError:
        return f"{path} is not a mask-training checkpoint"
    if not saved.final:
        return f"{path} is an unfinished run"
    if saved.recipe_key != recipe.digest("masks", "arch", "num_classes"):
        return f"{path} was trained with other mask settings"
    artifact = saved.to_artifact(path, recipe.name, recipe.arch, recipe.masks.prior)
    artifact.meta["reused_from"] = str(path)
    return artifact, float(saved.state.get("seconds", 0.0))


def learned_result(ctx: MethodContext, paths: ArtifactPaths, mode: str) -> MaskResult:
    if mode != "train" and ctx.initial is None:
        found = reuse_learned(ctx.recipe, paths)
        if not isinstance(found, str):
            artifact, seconds = found
            state = {k: v.detach().cpu().clone() for k, v in ctx.model.state_dict().items()}
            ctx.log(f"learned: reusing {paths.mask_checkpoint} (same mask settings; trained in {seconds:.0f}s)")
            return MaskResult(artifact, state, seconds, {"reused": True})
        if mode == "reuse":
            raise PipelineError(
                f"--learned reuse: {found}; run `python -m pipeline train-masks --model "
                f"{ctx.recipe.name}` first or use --learned train"
            )
        ctx.log(f"learned: training afresh ({found})")
    return compute_masks("learned", ctx)
