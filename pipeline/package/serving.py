"""What a client must do around the model: preprocessing.json and labels.txt.

The engines take normalised NCHW tensors, not images. preprocessing.json records the exact
evaluation transform of the recipe (the one verify measured accuracy with), so any
client can reproduce it; labels.txt feeds Triton's classification extension.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import PipelineError
from pipeline.package.tensors import TensorSpec
from pipeline.recipe.config import Recipe

PREPROCESSING_FORMAT = 1


def labels(recipe: Recipe) -> list[str]:
    """recipe.labels, or class_<i> when the recipe names none."""
    if not recipe.labels:
        return [f"class_{i}" for i in range(recipe.num_classes)]
    if len(recipe.labels) != recipe.num_classes:
        raise PipelineError(
            f"recipe {recipe.name} has {len(recipe.labels)} labels for {recipe.num_classes} classes; "
            "fix labels in models/" + recipe.name + ".py"
        )
    bad = [label for label in recipe.labels if "\n" in label or not label.strip()]
    if bad:
        raise PipelineError(f"recipe {recipe.name}: labels must be non-empty single lines, got {bad[:3]!r}")
    return list(recipe.labels)


def labels_text(recipe: Recipe) -> str:
    return "\n".join(labels(recipe)) + "\n"


def preprocessing(recipe: Recipe, model_input: TensorSpec, model_output: TensorSpec) -> dict[str, Any]:
    pre = recipe.preprocess
    channels = recipe.input_shape[0]
    if pre.color not in ("L", "RGB"):
        raise PipelineError(f"recipe {recipe.name}: preprocess.color {pre.color!r} must be L or RGB")
    expected_channels = 1 if pre.color == "L" else 3
    if channels != expected_channels:
        raise PipelineError(
            f"recipe {recipe.name}: preprocess.color {pre.color} gives {expected_channels} channels, "
            f"input_shape has {channels}"
        )
    mean = list(pre.mean) * (channels if len(pre.mean) == 1 else 1)
    std = list(pre.std) * (channels if len(pre.std) == 1 else 1)
    if len(mean) != channels or len(std) != channels:
        raise PipelineError(f"recipe {recipe.name}: preprocess.mean/std need 1 or {channels} values")
    steps = [f"decode the image and convert it to PIL mode {pre.color}"]
    if pre.resize and pre.resize_shape == "square":
        steps.append(
            f"resize the whole image to {pre.resize}x{pre.resize} px ({pre.interpolation}, antialiased; "
            "torchvision Resize((N, N)))"
        )
    elif pre.resize:
        steps.append(
            f"resize so the shorter side is {pre.resize} px ({pre.interpolation}, antialiased; torchvision Resize)"
        )
    else:
        steps.append(
            f"no resize (preprocess.resize = 0): images of {pre.crop}x{pre.crop} pass whole, as the model was evaluated"
        )
    steps += [
        f"center-crop {pre.crop}x{pre.crop} (torchvision CenterCrop, zero-pads smaller images)",
        "convert to float32 and divide by 255 (values in [0, 1])",
        "per channel: (x - mean) / std",
        "lay out as C,H,W and stack images along a leading batch axis (N,C,H,W)",
        f"send as {model_input.data_type.removeprefix('TYPE_')} (cast if it is FP16)",
    ]
    return {
        "format": PREPROCESSING_FORMAT,
        "model": recipe.name,
        "input": {
            "name": model_input.name,
            "datatype": model_input.data_type.removeprefix("TYPE_"),
            "shape": [-1, *recipe.input_shape],
            "layout": "NCHW",
        },
        "color": pre.color,
        "resize": pre.resize,
        "resize_shape": pre.resize_shape,
        "resize_interpolation": pre.interpolation,
        "crop": pre.crop,
        "scale": 1.0 / 255.0,
        "mean": mean,
        "std": std,
        "steps": steps,
        "output": {
            "name": model_output.name,
            "datatype": model_output.data_type.removeprefix("TYPE_"),
            "meaning": "unnormalised class scores (logits); apply softmax for probabilities",
            "labels": "labels.txt (line i names class i)",
        },
    }
