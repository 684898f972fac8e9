"""Tiny ONNX classifiers written with onnx.helper (no exporter, milliseconds), and the example pruner.

The graph: input [N, 1, 8, 8] -> conv1 3x3 (C=1) -> Relu -> conv2 3x3 (8->8) -> Relu -> conv3 1x1 (8->8) -> Relu
-> dw 3x3 depthwise (group 8) -> GlobalAveragePool -> Flatten -> fc Gemm (transB=1) -> logits [N, classes].
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "conv1.weight": (8, 1, 3, 3),
    "conv2.weight": (8, 8, 3, 3),
    "conv3.weight": (8, 8, 1, 1),
    "dw.weight": (8, 1, 3, 3),
}


def weights(seed: int = 0, classes: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    found = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    found["fc.weight"] = rng.standard_normal((classes, 8)).astype(np.float32)
    found["fc.bias"] = rng.standard_normal(classes).astype(np.float32)
    return found


def classifier(
    values: dict[str, np.ndarray] | None = None,
    classes: int = 4,
    input_name: str = "input",
    as_inputs: bool = False,
    size: int = 8,
) -> onnx.ModelProto:
    """The tiny classifier; `as_inputs` makes the weights graph inputs instead of initializers."""
    values = weights(classes=classes) if values is None else values
    conv = lambda name, x, w, y, **kw: helper.make_node("Conv", [x, w], [y], name=name, **kw)  # noqa: E731
    nodes = [
        conv("/conv1/Conv", input_name, "conv1.weight", "a1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        conv("/conv2/Conv", "r1", "conv2.weight", "a2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        conv("/conv3/Conv", "r2", "conv3.weight", "a3"),
        helper.make_node("Relu", ["a3"], ["r3"]),
        conv("/dw/Conv", "r3", "dw.weight", "a4", pads=[1, 1, 1, 1], group=8),
        helper.make_node("GlobalAveragePool", ["a4"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    tensors = [numpy_helper.from_array(array, name) for name, array in values.items()]
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, size, size])]
    if as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in tensors]
        tensors = []
    graph = helper.make_graph(
        nodes, "tiny", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], tensors
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def pruner():
    """examples/prune_onnx_2to4.py, the stand-in for a tool outside the pipeline."""
    spec = importlib.util.spec_from_file_location("prune_onnx_2to4", REPO / "examples" / "prune_onnx_2to4.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pruned(layout: str = "tensorrt", classes: int = 4, include_gemm: bool = False) -> onnx.ModelProto:
    model = classifier(classes=classes)
    pruner().prune_model(model, layout, include_gemm)
    return model


def image_folder(root: Path, classes: int, per_class: int = 3, size: int = 8) -> Path:
    """root/<class>/img.png, grayscale SIZExSIZE: an ImageFolder whose folder names sort in output order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(classes):
        folder = Path(root) / f"class_{index:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for image in range(per_class):
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{image}.png")
    return Path(root)
