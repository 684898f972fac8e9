"""The models around the classifiers, so clients can send raw image files.

    <model>_preprocess/    Python backend: input "image" (BYTES, one encoded image per batch row)
                           -> the classifiers' input tensor, by preprocessing.json
    <model>_<variant>_e2e/ ensemble: image -> <model>_preprocess -> <model>_<variant> -> logits

The same three models go into both repository flavours; the preprocess model needs numpy
and Pillow in the Python environment of the server's Python backend.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import write_json, write_text
from pipeline.package.model_config import LABELS_FILENAME, PYTHON_MODEL_FILENAME, VERSION, ServedModel, render_config
from pipeline.package.serving import labels_text, preprocessing
from pipeline.package.tensors import TensorSpec
from pipeline.recipe.config import Recipe

IMAGE_INPUT = "image"
PREPROCESS_TEMPLATE = Path(__file__).parent / "python_models" / "preprocess.py"


def preprocess_name(model: str) -> str:
    return f"{model}_preprocess"


def ensemble_name(model: str, variant: str) -> str:
    return f"{model}_{variant}_e2e"


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def render_ensemble(name: str, recipe: Recipe, classifier: ServedModel, image: TensorSpec) -> str:
    model_input = classifier.inputs[0]
    output = next(spec for spec in classifier.outputs if spec.name == classifier.label_output)
    wire = "preprocessed"
    lines = [
        f"# image file -> {preprocess_name(recipe.name)} -> {classifier.name}.",
        "# Written by `python -m pipeline package`; rerun it instead of editing this file.",
        f'name: "{name}"',
        'platform: "ensemble"',
        f"max_batch_size: {classifier.max_batch_size}",
        "input [",
        "  {",
        f'    name: "{image.name}"',
        f"    data_type: {image.data_type}",
        f"    dims: {_dims(image.without_batch())}",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{output.name}"',
        f"    data_type: {output.data_type}",
        f"    dims: {_dims(output.without_batch())}",
        f'    label_filename: "{LABELS_FILENAME}"',
        "  }",
        "]",
        "ensemble_scheduling {",
        "  step [",
        "    {",
        f'      model_name: "{preprocess_name(recipe.name)}"',
        "      model_version: -1",
        f'      input_map {{ key: "{image.name}" value: "{image.name}" }}',
        f'      output_map {{ key: "{model_input.name}" value: "{wire}" }}',
        "    },",
        "    {",
        f'      model_name: "{classifier.name}"',
        "      model_version: -1",
        f'      input_map {{ key: "{model_input.name}" value: "{wire}" }}',
        f'      output_map {{ key: "{output.name}" value: "{output.name}" }}',
        "    }",
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"


def write_preprocess_and_ensembles(
    repository: Path, recipe: Recipe, classifiers: dict[str, ServedModel]
) -> dict[str, Any]:
    """Write the preprocess model and one ensemble per variant into `repository`; returns their summary."""
    inputs = {variant: served.inputs[0] for variant, served in classifiers.items()}
    if len(set(inputs.values())) != 1:
        raise PipelineError(
            f"the variants take different inputs ({inputs}); one preprocess model cannot feed "
            "both: re-export dense and sparse from the same recipe"
        )
    model_input = next(iter(inputs.values()))
    any_classifier = next(iter(classifiers.values()))
    output = next(spec for spec in any_classifier.outputs if spec.name == any_classifier.label_output)
    image = TensorSpec(IMAGE_INPUT, "TYPE_STRING", (-1, 1))
    summary: dict[str, Any] = {}

    name = preprocess_name(recipe.name)
    model_dir = repository / name
    (model_dir / VERSION).mkdir(parents=True)
    shutil.copyfile(PREPROCESS_TEMPLATE, model_dir / VERSION / PYTHON_MODEL_FILENAME)
    served = ServedModel(
        name=name,
        kind="python",
        inputs=[image],
        outputs=[TensorSpec(model_input.name, model_input.data_type, model_input.dims)],
        max_batch_size=recipe.serve.max_batch_size,
        preferred_batch_sizes=list(recipe.serve.preferred_batch_sizes),
        max_queue_delay_us=recipe.serve.max_queue_delay_us,
        instance_count=recipe.serve.instance_count,
        instance_kind="KIND_CPU",
        comment=f"encoded image files (PNG, JPEG, ...) -> {recipe.name}'s input tensor, by preprocessing.json.\n"
        "Written by `python -m pipeline package`; rerun it instead of editing this file.",
    )
    write_text(model_dir / "config.pbtxt", render_config(served))
    write_json(model_dir / "preprocessing.json", preprocessing(recipe, model_input, output))
    summary[name] = {
        "kind": "python",
        "role": "preprocess",
        "files": [f"{VERSION}/{PYTHON_MODEL_FILENAME}"],
        "instance_kind": "KIND_CPU",
    }

    for variant, classifier in classifiers.items():
        name = ensemble_name(recipe.name, variant)
        model_dir = repository / name
        (model_dir / VERSION).mkdir(parents=True)  # Triton wants a version folder, even an empty one
        write_text(model_dir / "config.pbtxt", render_ensemble(name, recipe, classifier, image))
        write_text(model_dir / LABELS_FILENAME, labels_text(recipe))
        summary[name] = {
            "kind": "ensemble",
            "variant": variant,
            "steps": [preprocess_name(recipe.name), classifier.name],
            "files": [],
        }
    return summary
