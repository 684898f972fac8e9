"""Build a recipe's network from its source spec and load its dense weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.paths import ArtifactPaths
from pipeline.pretrain.artifacts import DenseWeights
from pipeline.recipe.config import Recipe
from pipeline.recipe.sources import TorchvisionSource, resolve_source
from pipeline.recipe.weight_files import check_finite, fit_to_network, read_weight_file

# `weights = ...` values that are not a file: `torchvision` and `hub` download the source's published weights.
NAMED_WEIGHTS = ("random", "pretrain", "torchvision", "hub")


def head_size(model: nn.Module, classifier: str) -> int | None:
    """Outputs of the module named `classifier` (a Linear, or a 1x1-conv head); None when there is no such module."""
    head = dict(model.named_modules()).get(classifier)
    if isinstance(head, nn.Linear):
        return head.out_features
    return head.out_channels if isinstance(head, nn.Conv2d) else None


def build_network(recipe: Recipe) -> nn.Module:
    """The recipe's network with fresh weights, from its source spec (`arch`); its head must be the recipe's."""
    model = resolve_source(recipe.arch).build(recipe.num_classes)
    outputs = head_size(model, recipe.classifier)
    if outputs is None:
        layers = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
        raise PipelineError(
            f"classifier = {recipe.classifier!r} names no Linear or Conv2d layer of {recipe.arch}; "
            f"name the head with --classifier (its last layers: {', '.join(layers[-3:])})"
        )
    if outputs != recipe.num_classes:
        raise PipelineError(
            f"{recipe.arch} builds a head {recipe.classifier} with {outputs} outputs, the recipe "
            f"needs {recipe.num_classes}; let the factory take a num_classes argument, or set "
            f"--num-classes {outputs}"
        )
    return model


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load STATE_DICT into MODEL: every key of the network, with the shape and dtype it has, after the prefix the
    file's keys carry (DDP, torch.compile, a LightningModule's attribute) is found by matching the network's keys."""
    expected = model.state_dict()
    fitted = fit_to_network(state_dict, expected)
    if fitted is not None:
        said = fitted.describe(source)
        if said:
            print(f"note: weights: {said}", flush=True)
        state_dict = fitted.state_dict
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PipelineError(f"{source} does not fit this architecture ({detail}); pass weights of the same model")
    for key, tensor in expected.items():
        given = state_dict[key]
        if not isinstance(given, torch.Tensor):
            raise PipelineError(f"{source}: {key} is a {type(given).__name__}, not a tensor; pass a state_dict")
        if tuple(given.shape) != tuple(tensor.shape):
            raise PipelineError(
                f"{source}: {key} has shape {list(given.shape)}, the model expects "
                f"{list(tensor.shape)}; pass weights of the same architecture"
            )
        if given.is_floating_point() != tensor.is_floating_point() or given.dtype == torch.bool != tensor.dtype:
            raise PipelineError(
                f"{source}: {key} has dtype {str(given.dtype).removeprefix('torch.')}, the model "
                f"expects {str(tensor.dtype).removeprefix('torch.')}; pass weights of the same model"
            )
    check_finite(state_dict, source)
    model.load_state_dict(state_dict)


def published_state_dict(recipe: Recipe) -> tuple[dict[str, torch.Tensor], str]:
    """The source's published weights (`weights = "hub"`, or `"torchvision"` for torchvision sources)."""
    source = resolve_source(recipe.arch)
    if recipe.weights == "torchvision" and not isinstance(source, TorchvisionSource):
        raise PipelineError(
            f"weights = 'torchvision', but {recipe.arch} is not a torchvision model; use "
            "--weights hub (the source's published weights), a weights file or random"
        )
    return source.pretrained_state_dict()


def dense_state_dict(recipe: Recipe, paths: ArtifactPaths) -> tuple[dict[str, torch.Tensor], str]:
    """The recipe's dense weights and a one-line description of where they came from."""
    if recipe.weights == "random":
        with torch.random.fork_rng(devices=[]):  # seed 0 for the initialisation; the caller's RNG is left as it was
            torch.manual_seed(0)
            state = build_network(recipe).state_dict()
        return state, "random initialisation (smoke run: accuracy means nothing)"
    if recipe.weights == "pretrain":
        path = paths.dense_weights
        if not path.is_file():
            raise PipelineError(
                f"dense weights {path} do not exist yet; run `python -m pipeline pretrain "
                f"--model {recipe.name}` (make engine does it)"
            )
        return DenseWeights.load(path).state_dict, f"pretrained by the pretrain stage ({path})"
    if recipe.weights in ("torchvision", "hub"):
        return published_state_dict(recipe)
    weight_file = read_weight_file(recipe.weights)
    source = weight_file.describe(Path(recipe.weights), full=False)
    fitted = fit_to_network(weight_file.state_dict, build_network(recipe).state_dict())
    if fitted is None:  # load_state_dict_strict names what is missing
        return weight_file.state_dict, source
    said = fitted.describe(source)
    if said:
        print(f"note: weights: {said}", flush=True)
    return fitted.state_dict, source


def load_dense_model(recipe: Recipe, paths: ArtifactPaths) -> tuple[nn.Module, str]:
    state, description = dense_state_dict(recipe, paths)
    model = build_network(recipe)
    load_state_dict_strict(model, state, description)
    return model.eval(), description
