"""PyTorch -> ONNX (FP32 and FP16) and the checks that the sparse ONNX still holds the N:M masks.

The export uses the torch.export-based exporter with its graph optimiser on, which folds
eval-mode BatchNorm into the preceding Conv. Folding scales each output channel, so zeros
stay zeros and kept weights of the dense and sparse graphs are scaled by the same factor:
the N:M check and the "kept weights equal" check both run on the ONNX tensors themselves.
ONNX initializers are mapped back to PyTorch layer names from the exporter's metadata
(`pkg.torch.onnx.name_scopes`), the initializer name, or the TorchScript node scope.
"""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.recipe.config import InputSpec

# ONNX Runtime vs PyTorch (FP32 reference): pass when max|diff| <= atol + rtol * max|reference|
TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-4}, "fp16": {"atol": 1e-2, "rtol": 1e-2}}
MIN_OPSET = 18  # the torch.export-based exporter writes opset 18 and newer
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def effective_opset(requested: int) -> int:
    return max(int(requested), MIN_OPSET)


def ModelProtoFromTorch(
    model: nn.Module,
    input_shape: list[int],
    opset: int,
    input_name: str,
    output_name: str,
    fp16: bool = False,
    max_batch: int = 4096,
):
    """Export `model` (eval mode) with a dynamic batch axis; FP16 keeps FP32 input/output (Casts in the graph)."""
    import onnx

    model = model.eval()
    hooks = []
    if fp16:
        model = _half_copy(model)
        hooks.append(model.register_forward_pre_hook(lambda module, args: (args[0].to(torch.float16),)))
        hooks.append(model.register_forward_hook(lambda module, args, out: out.to(torch.float32)))
    example = torch.randn(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stdout(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                None,
                dynamo=True,
                opset_version=opset,
                optimize=True,
                verbose=False,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=({0: batch},),
            )
    except Exception as exc:  # the exporter raises many types; name the failing model, keep it one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(f"ONNX export failed ({type(exc).__name__}: {first[:200]})") from None
    finally:
        for handle in hooks:
            handle.remove()
    if program is None:  # the dynamo exporter always returns one; None is the legacy exporter's result
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
    proto = program.model_proto
    proto.producer_name = "sparse-pipeline"
    onnx.helper.set_model_props(proto, {"precision": "fp16" if fp16 else "fp32", "io_dtype": "float32"})
    return proto


def graph_for(model: nn.Module, spec: InputSpec, opset: int, precision: str = "fp32"):
    """`ModelProtoFromTorch` for the network SPEC describes (its sample shape and tensor names), at PRECISION
    (fp32 or fp16): the exporter's seam takes the input spec, not the recipe."""
    return ModelProtoFromTorch(
        model, list(spec.shape), opset, spec.input_name, spec.output_name, fp16=precision == "fp16"
    )


def _half_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).half().eval()


def check_model(proto) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise PipelineError(f"exported ONNX fails onnx.checker ({str(exc).splitlines()[0][:200]})") from None


# --------------------------------------------------------------------------- layer <-> initializer mapping
@dataclass
class OnnxWeight:
    layer: str  # PyTorch module name
    node: str  # ONNX node name
    op_type: str
    initializer: str
    array: np.ndarray  # in PyTorch layout: [K, C, *kernel] or [out, in]
    mapped_by: str  # name_scopes | initializer | scope


def _scope_from_metadata(node) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            import ast

            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # [..., 'layer1.0.conv1', 'conv2d']: the module is the entry before the op
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def scope_from_torchscript_name(node_name: str) -> str | None:
    """'/layer2/layer2.0/downsample/downsample.0/Conv' -> 'layer2.0.downsample.0'."""
    parts = [part for part in node_name.split("/") if part][:-1]
    if not parts:
        return None
    current = ""
    for part in parts:
        prefix, _, last = part.rpartition(".")
        if prefix and (current == prefix or current.endswith("." + prefix)):
            current = f"{current}.{last}"
        else:
            current = f"{current}.{part}" if current else part
    return current


def node_attribute(node, name: str, default: Any = 0) -> Any:
    """The value of an ONNX node's attribute NAME (int, ints, float, ...), DEFAULT when the node has none."""
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def onnx_layer_weights(proto, layer_names: list[str], prefix: str = "") -> dict[str, OnnxWeight]:
    """Find the weight initializer of every named PyTorch layer in an exported graph."""
    from onnx import numpy_helper

    wanted = set(layer_names)
    initializers = {init.name: init for init in proto.graph.initializer}
    found: dict[str, OnnxWeight] = {}
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight_name = node.input[1]
        candidates = [
            (_scope_from_metadata(node), "name_scopes"),
            (weight_name.removesuffix(".weight") if weight_name.endswith(".weight") else None, "initializer"),
            (scope_from_torchscript_name(node.name), "scope"),
        ]
        for candidate, how in candidates:
            if candidate is not None and prefix and candidate.startswith(prefix):
                candidate = candidate[len(prefix) :]
            if candidate in wanted and candidate not in found:
                array = numpy_helper.to_array(initializers[weight_name])
                # Gemm(transB=0) and MatMul hold [in, out]; bring them to PyTorch's [out, in]
                if (
                    node.op_type == "MatMul" or (node.op_type == "Gemm" and not node_attribute(node, "transB"))
                ) and array.ndim == 2:
                    array = array.T
                found[candidate] = OnnxWeight(candidate, node.name, node.op_type, weight_name, array, how)
                break
    return found


# --------------------------------------------------------------------------- sparse export checks
def nm_violations_np(weight: np.ndarray, n: int, m: int) -> int:
    """Blocks of m consecutive input channels (axis 1) holding more than n non-zeros; -1 if C % m."""
    if weight.ndim < 2 or weight.shape[1] % m:
        return -1
    moved = np.moveaxis(weight, 1, -1)
    blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    return int(((blocks != 0).sum(-1) > n).sum())


def check_sparse_layers(
    dense_proto, sparse_proto, masked: list[str], sparse_state: dict[str, torch.Tensor], n: int, m: int
) -> list[dict[str, Any]]:
    """Per masked layer: found in both graphs, N:M in TensorRT layout, pruned positions zero, kept == dense."""
    dense = onnx_layer_weights(dense_proto, masked)
    sparse = onnx_layer_weights(sparse_proto, masked)
    results = []
    for name in masked:
        entry: dict[str, Any] = {"layer": name, "ok": False}
        if name not in sparse or name not in dense:
            entry["problem"] = "weight initializer not found in the ONNX graph"
            results.append(entry)
            continue
        s, d = sparse[name], dense[name]
        reference = sparse_state[f"{name}.weight"].float().numpy()
        kept = reference != 0
        entry.update(
            onnx_node=s.node,
            initializer=s.initializer,
            op_type=s.op_type,
            mapped_by=s.mapped_by,
            shape=list(s.array.shape),
            dtype=str(s.array.dtype),
        )
        if s.array.shape != reference.shape or d.array.shape != reference.shape:
            entry["problem"] = f"shape {list(s.array.shape)} differs from PyTorch {list(reference.shape)}"
            results.append(entry)
            continue
        violations = nm_violations_np(s.array, n, m)
        pruned_nonzero = int(np.count_nonzero(s.array[~kept]))
        kept_mismatch = int(np.count_nonzero(s.array[kept] != d.array[kept]))
        entry.update(
            nm_violations=violations,
            pruned_nonzero=pruned_nonzero,
            kept_mismatch=kept_mismatch,
            zero_fraction=float(np.mean(s.array == 0)),
        )
        entry["ok"] = violations == 0 and pruned_nonzero == 0 and kept_mismatch == 0
        if not entry["ok"]:
            entry["problem"] = (
                f"{violations} blocks break {n}:{m}"
                if violations
                else f"{pruned_nonzero} pruned weights are non-zero"
                if pruned_nonzero
                else f"{kept_mismatch} kept weights differ from the dense export"
            )
        results.append(entry)
    return results


def other_initializers_differ(dense_proto, sparse_proto, masked_initializers: set[str]) -> list[str]:
    """Initializers outside the masked layers that differ between the dense and the sparse graph."""
    from onnx import numpy_helper

    dense = {init.name: init for init in dense_proto.graph.initializer}
    differ = []
    for init in sparse_proto.graph.initializer:
        if init.name in masked_initializers or init.name not in dense:
            continue
        if not np.array_equal(numpy_helper.to_array(init), numpy_helper.to_array(dense[init.name])):
            differ.append(init.name)
    return differ


# --------------------------------------------------------------------------- ONNX Runtime vs PyTorch
def compare_with_torch(proto, reference: np.ndarray, batch: np.ndarray, precision: str) -> dict[str, Any]:
    """Run the graph on ONNX Runtime (CPU) and compare with the FP32 PyTorch output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float32)
    tolerance = TOLERANCES[precision]
    diff = float(np.max(np.abs(output - reference))) if output.shape == reference.shape else float("inf")
    scale = float(np.max(np.abs(reference)))
    allowed = tolerance["atol"] + tolerance["rtol"] * scale
    agree = float(np.mean(output.argmax(1) == reference.argmax(1))) if output.shape == reference.shape else 0.0
    return {
        "precision": precision,
        "max_abs_diff": diff,
        "max_abs_reference": scale,
        "allowed": allowed,
        **tolerance,
        "top1_agreement": agree,
        "ok": bool(diff <= allowed),
    }
