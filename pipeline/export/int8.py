"""INT8 through explicit quantization: FP32 ONNX -> Q/DQ ONNX in the form TensorRT builds from.

TensorRT's INT8 is symmetric: weights per output channel, activations per tensor, every zero
point 0, and the graph carries QuantizeLinear -> DequantizeLinear pairs (QDQ format). The weights
stay FP32 behind their own Q/DQ pair (TensorRT quantizes them with the Q scale when it builds),
and biases are not quantized (TensorRT has no INT32 DequantizeLinear). Zero weights quantize to 0
and dequantize to 0 with a zero point of 0, so a 2:4 pattern survives, and polygraphy's
`inspect sparsity`, which looks back through Q/DQ to FP32 initializers, still sees it.

The Q/DQ graph is made with ONNX Runtime's static quantization (onnxruntime is a core
dependency and runs on CPU). NVIDIA ModelOpt's ONNX PTQ would pull onnxruntime-gpu, cupy and an
older onnx into the environment, which the CPU pipeline cannot take.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io import atomic_path

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
INT8_RANGE = (-128, 127)


def calibration_batches(dataset, count: int, batch_size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """`count` images of `dataset` (the recipe's training split), drawn without repeats, as float32 batches."""
    if count < 1:
        raise PipelineError(f"INT8 calibration needs at least one image; asked for {count}")
    count = min(count, len(dataset))
    indices = np.random.default_rng(seed).permutation(len(dataset))[:count]
    batches = []
    for start in range(0, count, batch_size):
        images = [dataset[int(i)][0] for i in indices[start : start + batch_size]]
        batches.append(np.stack([np.asarray(image, dtype=np.float32) for image in images]))
    return batches


class _Batches:
    """onnxruntime.quantization.CalibrationDataReader over a list of numpy batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self._items = iter([{input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches])

    def get_next(self):
        return next(self._items, None)


def quantize_qdq(fp32_onnx: Path, calibration: Iterable[np.ndarray], out: Path) -> Path:
    """Write the Q/DQ graph of `fp32_onnx` to `out` (ArtifactPaths.int8_onnx names it), calibrated on `calibration`.

    Activation ranges are the min/max seen on the calibration batches, made symmetric. The result
    is checked with `qdq_problems` before it replaces any earlier file.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32_onnx = Path(fp32_onnx)
    out = Path(out)
    if not fp32_onnx.is_file():
        raise PipelineError(f"{fp32_onnx} does not exist; run the export stage first")
    batches = [np.asarray(batch) for batch in calibration]
    if not batches:
        raise PipelineError("INT8 calibration needs at least one batch of the recipe's data; got none")
    model = onnx.load(str(fp32_onnx))
    graph_inputs = [i.name for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
    if len(graph_inputs) != 1:
        raise PipelineError(f"{fp32_onnx} has inputs {graph_inputs}; INT8 calibration handles single-input models")
    with atomic_path(out) as tmp, _quiet_root_logger():
        try:
            quantize_static(
                model,
                str(tmp),
                _Batches(graph_inputs[0], batches),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "AddQDQPairToWeight": True,
                    "QuantizeBias": False,
                    "DedicatedQDQPair": True,
                },
            )
        except Exception as exc:  # onnxruntime raises many types; keep it one line and name the model
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PipelineError(
                f"INT8 quantization of {fp32_onnx} failed ({type(exc).__name__}: {first[:200]})"
            ) from None
        problems = qdq_problems(onnx.load(str(tmp)))
        if problems:
            raise PipelineError(
                f"the Q/DQ graph of {fp32_onnx} is not in TensorRT's form: {problems[0]} ({len(problems)} problem(s))"
            )
    return out


@dataclass
class WeightQuantization:
    """One weight's Q/DQ pair: FP32 initializer -> QuantizeLinear -> DequantizeLinear -> Conv/Gemm/MatMul."""

    node: str
    op_type: str
    initializer: str
    weight: np.ndarray  # FP32, as stored
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None  # None: one scale for the whole tensor
    output_channel_axis: int  # 0 for Conv and Gemm(transB=1); 1 for MatMul and Gemm(transB=0)

    def _per_element(self, values: np.ndarray) -> np.ndarray:
        if self.axis is None:
            return values.reshape(())
        return np.expand_dims(values, [d for d in range(self.weight.ndim) if d != self.axis])

    def quantized(self) -> np.ndarray:
        """The INT8 values TensorRT stores for this weight (round half to even, saturate)."""
        q = np.rint(self.weight / self._per_element(self.scale)) + self._per_element(self.zero_point)
        return np.clip(q, *INT8_RANGE).astype(np.int8)

    def dequantized(self) -> np.ndarray:
        zero = self._per_element(self.zero_point).astype(np.float32)
        return (self.quantized().astype(np.float32) - zero) * self._per_element(self.scale)


def weight_quantizations(proto) -> list[WeightQuantization]:
    """Every weighted node's weight Q/DQ pair in a Q/DQ graph."""
    from onnx import numpy_helper

    inits = {init.name: init for init in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    found = []
    for node in proto.graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inits:
            continue
        axis = next((attr.i for attr in q.attribute if attr.name == "axis"), 1)
        scale = numpy_helper.to_array(inits[q.input[1]])
        zero = numpy_helper.to_array(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] else np.zeros_like(scale)
        trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
        found.append(
            WeightQuantization(
                node.name,
                node.op_type,
                q.input[0],
                numpy_helper.to_array(inits[q.input[0]]),
                scale,
                zero,
                axis if scale.ndim == 1 and scale.size > 1 else None,
                0 if node.op_type == "Conv" or trans_b else 1,
            )
        )
    return found


def qdq_problems(proto) -> list[str]:
    """Ways a Q/DQ graph differs from TensorRT's form (empty when it matches)."""
    from onnx import TensorProto, numpy_helper

    inits = {init.name: init for init in proto.graph.initializer}
    problems = []
    weights = weight_quantizations(proto)
    if not weights:
        problems.append("no weight has a QuantizeLinear/DequantizeLinear pair")
    for entry in weights:
        if entry.axis is None and entry.weight.shape[entry.output_channel_axis] > 1:
            problems.append(f"weight {entry.initializer} of {entry.node} is quantized per tensor, not per channel")
        elif entry.axis is not None and entry.axis != entry.output_channel_axis:
            problems.append(
                f"weight {entry.initializer} of {entry.node} is quantized along axis {entry.axis}, "
                f"not its output channels ({entry.output_channel_axis})"
            )
        if np.any(entry.zero_point != 0):
            problems.append(f"weight {entry.initializer} of {entry.node} has a non-zero zero point")
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
            continue
        zero = inits.get(node.input[2])
        if zero is None:
            continue
        if zero.data_type != TensorProto.INT8:
            problems.append(
                f"{node.op_type} {node.name} quantizes to {TensorProto.DataType.Name(zero.data_type)}, not INT8"
            )
        elif np.any(numpy_helper.to_array(zero) != 0):
            problems.append(f"{node.op_type} {node.name} has a non-zero zero point (TensorRT is symmetric)")
    return problems


def sparse_weights_survive(proto, n: int = 2, m: int = 4) -> dict[str, dict[str, Any]]:
    """Per quantized weight: does the INT8 weight, dequantized and in TensorRT's layout, keep N:M along input channels?

    Also reports whether every FP32 zero is still zero after quantization (it must be, with zero point 0).
    """
    from pipeline.export.onnx import nm_violations_np

    results = {}
    for entry in weight_quantizations(proto):
        weight, dequantized = entry.weight, entry.dequantized()
        if entry.output_channel_axis == 1:
            weight, dequantized = weight.T, dequantized.T  # [in, out] -> [out, in]
        results[entry.initializer] = {
            "node": entry.node,
            "zeros_kept": bool(np.all(dequantized[weight == 0] == 0)),
            "nm_violations_fp32": nm_violations_np(weight, n, m),
            "nm_violations_int8": nm_violations_np(dequantized, n, m),
        }
    return results


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs advice ("consider pre-processing") on the root logger; keep it off stderr."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def polygraphy_sparsity(onnx_path: Path) -> dict[str, list[str]]:
    """`polygraphy inspect sparsity` on an ONNX file: weight initializers that do / do not hold 2:4.

    Polygraphy follows each Conv/Gemm/MatMul weight back through Q/DQ and Cast to its FP32/FP16
    initializer; tensors whose input-channel axis is not a multiple of 4 are in neither list.
    """
    tool = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    if tool is None:
        raise PipelineError("polygraphy is not installed; pip install polygraphy")
    run = subprocess.run([tool, "inspect", "sparsity", str(onnx_path)], capture_output=True, text=True, timeout=600)
    text = run.stdout + run.stderr
    if run.returncode != 0:
        raise PipelineError(f"polygraphy inspect sparsity {onnx_path} failed: {text.strip().splitlines()[-1:]}")
    return {
        "sparse": re.findall(r"Found sparse tensor: (\S+)", text),
        "not_sparse": re.findall(r"Found non-sparse tensor: (\S+)", text),
    }


def onnxruntime_top1(onnx_path: Path, dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of an ONNX graph (FP32 or Q/DQ) on ONNX Runtime's CPU provider over a whole (image, label) dataset."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = np.stack([np.asarray(image, dtype=np.float32) for image, _ in items])
        labels = np.array([int(label) for _, label in items])
        correct += int(np.sum(session.run(None, {name: images})[0].argmax(1) == labels))
    return correct / max(len(dataset), 1)
