"""Build a recipe's network and load its dense weights."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.recipe.config import Recipe
from pipeline.errors import PipelineError
from pipeline.io import torch_load
from pipeline.paths import ArtifactPaths

SOURCE_KINDS = ("builtin", "torchvision")


def split_source(arch: str) -> tuple[str, str]:
    """`kind:name` of a source spec, checked against the known kinds."""
    kind, _, name = arch.partition(":")
    if kind not in SOURCE_KINDS or not name:
        raise PipelineError(f"arch = {arch!r} is not valid: use one of {', '.join(k + ':<name>' for k in SOURCE_KINDS)}")
    return kind, name


def build_network(recipe: Recipe) -> nn.Module:
    """The recipe's network with fresh weights, from its source spec (`arch`)."""
    kind, name = split_source(recipe.arch)
    if kind == "builtin":
        from pipeline.recipe.nets import ARCHITECTURES

        if name not in ARCHITECTURES:
            raise PipelineError(f"arch = {recipe.arch!r} is not valid: built-in networks are "
                                f"{', '.join('builtin:' + n for n in ARCHITECTURES)}")
        return ARCHITECTURES[name](recipe.num_classes)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise PipelineError(f"arch = {recipe.arch!r} is not valid: no torchvision classification model {name!r} "
                            "(see torchvision.models.list_models())")
    return torchvision.models.get_model(name, weights=None, num_classes=recipe.num_classes)


def state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a torchvision-style .pth (plain, or wrapped as {'model'|'state_dict': ...})."""
    payload = torch_load(path, "weights file")
    if isinstance(payload, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise PipelineError(f"weights file {path} holds no state_dict; save one with torch.save(model.state_dict(), PATH)")
    return {key.removeprefix("module."): value for key, value in payload.items()}


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PipelineError(f"{source} does not fit this architecture ({detail}); pass weights of the same model")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise PipelineError(f"{source}: {key} has shape {list(state_dict[key].shape)}, the model expects "
                                f"{list(tensor.shape)}; pass weights of the same architecture")
    model.load_state_dict(state_dict)


def dense_state_dict(recipe: Recipe, paths: ArtifactPaths) -> tuple[dict[str, torch.Tensor], str]:
    """The recipe's dense weights and a one-line description of where they came from."""
    source = recipe.weights
    model = build_network(recipe)
    if source == "random":
        torch.manual_seed(0)
        model = build_network(recipe)
        return model.state_dict(), "random initialisation (smoke run: accuracy means nothing)"
    if source == "pretrain":
        path = paths.dense_weights
        if not path.is_file():
            raise PipelineError(f"dense weights {path} do not exist yet; run `python -m pipeline pretrain "
                                f"--model {recipe.name}` (make engine does it)")
        return state_dict_from_file(path), f"pretrained by the pretrain stage ({path})"
    if source == "torchvision":
        kind, name = split_source(recipe.arch)
        if kind != "torchvision":
            raise PipelineError(f"arch {recipe.arch} has no torchvision weights; pass --weights PATH or random")
        import torchvision

        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:
            raise PipelineError(f"cannot download torchvision weights {weights} ({type(exc).__name__}); "
                                "pass --weights PATH to a local .pth or --weights random") from None
        return state, f"torchvision {weights}"
    return state_dict_from_file(Path(source)), f"file {source}"


def load_dense_model(recipe: Recipe, paths: ArtifactPaths) -> tuple[nn.Module, str]:
    state, description = dense_state_dict(recipe, paths)
    model = build_network(recipe)
    load_state_dict_strict(model, state, description)
    return model.eval(), description
