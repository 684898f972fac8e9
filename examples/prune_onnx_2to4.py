"""Prune an ONNX model to 2:4 by magnitude, outside the pipeline: a stand-in for a sparse model made by another tool.

    python examples/prune_onnx_2to4.py DENSE.onnx SPARSE.onnx [--layout tensorrt|flattened] [--include-gemm]

Every Conv with groups == 1 whose weights are an initializer is pruned: in each group of 4 weights the 2 smallest
magnitudes become 0. The groups run along
  * `tensorrt` (default): 4 consecutive input channels at each (k, r, s): TensorRT's layout (needs C % 4 == 0);
  * `flattened`: 4 consecutive entries of the flattened C*R*S axis, as ModelOpt's sparsegpt mode and the
    paper's public code do: for a 1x1 conv the same as TensorRT's, for a 3x3 conv not.
Gemm layers (transB=1 or 0, along the reduction axis) only with --include-gemm. Layers that cannot be pruned
(C not a multiple of 4, grouped, weights not an initializer) are listed with the reason. Only onnx and numpy.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import numpy_helper


def prune_last_axis(values: np.ndarray) -> np.ndarray:
    """Zero the 2 smallest magnitudes in every 4 consecutive entries of the last axis."""
    groups = values.reshape(-1, 4).copy()
    smallest = np.argsort(np.abs(groups), axis=1, kind="stable")[:, :2]
    np.put_along_axis(groups, smallest, 0.0, axis=1)
    return groups.reshape(values.shape)


def prune_conv(weight: np.ndarray, layout: str) -> np.ndarray:
    """weight [K, C, R, S] pruned 2:4 along input channels (tensorrt) or the flattened C*R*S axis."""
    if layout == "flattened":
        return prune_last_axis(weight.reshape(weight.shape[0], -1)).reshape(weight.shape)
    channels_last = np.moveaxis(weight, 1, -1)  # [K, R, S, C]
    return np.moveaxis(prune_last_axis(channels_last), -1, 1)


def prune_gemm(weight: np.ndarray, trans_b: int) -> np.ndarray:
    """Gemm B along the reduction axis: [N, K] with transB=1, [K, N] otherwise."""
    return prune_last_axis(weight) if trans_b else prune_last_axis(weight.T).T


def _attribute(node, name, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _reason(node, weight, layout: str) -> str:
    if weight is None:
        return "weights are not an initializer"
    if node.op_type == "Conv" and _attribute(node, "group", 1) != 1:
        return "grouped conv"
    if node.op_type == "Conv":
        length = weight.shape[1] if layout == "tensorrt" else int(np.prod(weight.shape[1:]))
    else:
        length = weight.shape[1] if _attribute(node, "transB", 0) else weight.shape[0]
    return "" if length % 4 == 0 else f"reduction length {length} is not a multiple of 4"


def prune_model(model: onnx.ModelProto, layout: str = "tensorrt", include_gemm: bool = False) -> list[str]:
    """Prune MODEL in place; returns one line per Conv/Gemm: pruned or skipped with the reason."""
    initializers = {init.name: init for init in model.graph.initializer}
    lines = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or (node.op_type == "Gemm" and not include_gemm):
            continue
        init = initializers.get(node.input[1])
        weight = numpy_helper.to_array(init) if init is not None else None
        reason = _reason(node, weight, layout)
        if reason:
            lines.append(f"skipped {node.name}: {reason}")
            continue
        pruned = (
            prune_conv(weight, layout) if node.op_type == "Conv" else prune_gemm(weight, _attribute(node, "transB", 0))
        )
        init.CopyFrom(numpy_helper.from_array(pruned.astype(weight.dtype), init.name))
        lines.append(
            f"pruned {node.name} {list(weight.shape)} 2:4 along "
            f"{'input channels' if layout == 'tensorrt' or node.op_type == 'Gemm' else 'flattened C*R*S'}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dense")
    parser.add_argument("sparse")
    parser.add_argument("--layout", choices=("tensorrt", "flattened"), default="tensorrt")
    parser.add_argument("--include-gemm", action="store_true")
    args = parser.parse_args(argv)
    model = onnx.load(args.dense)
    for line in prune_model(model, args.layout, args.include_gemm):
        print(line)
    onnx.save(model, args.sparse)
    print(f"wrote {args.sparse}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
