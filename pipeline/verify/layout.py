"""Per-layer 2:4 layout of an ONNX model's weights: which layers TensorRT can run with sparse kernels.

TensorRT's rule (docs/tensorrt.md): a Conv weight [K, C, R, S] runs sparse kernels when every 4
consecutive input channels at each (k, r, s) hold at least 2 zeros and C % 4 == 0; a Gemm or MatMul
along its reduction axis (Gemm with transB=1 stores B as [N, K]: the reduction axis is the last one).
Grouped and depthwise convolutions never get sparse kernels. A model can be "2:4 sparse" by count
and still gain nothing: ModelOpt's sparsegpt mode and the paper's public code group the flattened
C*R*S axis, which for a 3x3 conv is not TensorRT's layout. Each layer gets one class:

- `tensorrt 2:4`: accelerable;
- `2:4 in another layout`: 2-of-4 groups along another axis (the axis is named): NOT accelerable;
- `dense`: no 2:4 pattern (with the share of zeros, if any);
- `grouped/depthwise (never sparse)`;
- `too small to matter`: a dense layer holding less than SMALL_SHARE of the model's MACs.

Weights are read from initializers and Constant nodes, also through Identity/Cast, Transpose, Reshape,
QuantizeLinear and DequantizeLinear (per-tensor or per-axis): a strongly typed Q/DQ network (the INT8 export,
pipeline/export/int8.py; TensorRT 11) feeds a conv its weight as FP32 initializer -> Q -> DQ -> Conv or as an INT8
initializer -> DQ -> Conv, and the layout checked is that of the quantized values (zeros stay zeros). A Conv/Gemm/MatMul whose weights are not constant is
listed as skipped, with that reason. MACs are per image, from ONNX shape inference at batch 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.export.onnx import node_attribute

TENSORRT = "tensorrt 2:4"
OTHER_LAYOUT = "2:4 in another layout"
DENSE = "dense"
GROUPED = "grouped/depthwise (never sparse)"
SMALL = "too small to matter"
NOT_CONSTANT = "weights not constant (skipped)"
CLASSES = (TENSORRT, OTHER_LAYOUT, DENSE, GROUPED, SMALL, NOT_CONSTANT)
SMALL_SHARE = 0.005  # a dense layer below this share of the MACs is not worth a sparse kernel
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_PASS_THROUGH = ("Identity", "Cast")


@dataclass
class WeightedLayer:
    """A Conv/Gemm/MatMul with constant weights in canonical form: `weight[k, c, *taps]`, axis 1 the reduction
    axis TensorRT groups (input channels of a conv, the reduction axis of a matrix product)."""

    name: str
    op: str
    weight_name: str
    weight: np.ndarray
    onnx_shape: list[int]
    groups: int = 1
    macs: int = 0
    source: str = "initializer"

    def describe(self) -> str:
        return f"{self.name} ({self.op} {self.weight_name} {list(self.onnx_shape)})"


@dataclass
class SkippedLayer:
    name: str
    op: str
    reason: str


@dataclass
class LayerLayout:
    name: str
    op: str
    weight: str
    shape: list[int]  # the ONNX weight shape
    groups: int
    macs: int
    layout: str  # one of CLASSES
    axis: str = ""  # the axis the 2-of-4 groups were found along
    zero_share: float = 0.0
    kept: str = ""  # against the dense model: unchanged | masks only | changed (fine-tuned)
    max_kept_change: float = 0.0  # largest |sparse - dense| of a kept weight, relative to max |dense|
    note: str = ""

    @property
    def accelerable(self) -> bool:
        return self.layout == TENSORRT

    @property
    def masked(self) -> bool:
        """2-of-4 groups along some axis (accelerable or not)."""
        return self.layout in (TENSORRT, OTHER_LAYOUT) or (self.layout == GROUPED and bool(self.axis))

    def to_dict(self) -> dict[str, Any]:
        """The entry of report.json's layout.layers; also the keys the verify report's coverage list uses."""
        entry = asdict(self)
        entry.update(
            kind=self.op,
            masked=self.masked,
            accelerable=self.accelerable,
            reason="" if self.accelerable else self.layout + (f" ({self.axis})" if self.axis else ""),
        )
        return entry


@dataclass
class LayoutReport:
    layers: list[LayerLayout] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def macs_by_class(self) -> dict[str, int]:
        totals = {name: 0 for name in CLASSES if name != NOT_CONSTANT}
        for layer in self.layers:
            totals[layer.layout] += layer.macs
        return totals

    def share(self, predicate) -> float:
        return sum(layer.macs for layer in self.layers if predicate(layer)) / max(self.total_macs, 1)

    @property
    def accelerable_mac_fraction(self) -> float:
        return self.share(lambda layer: layer.accelerable)

    @property
    def masked_mac_fraction(self) -> float:
        return self.share(lambda layer: layer.masked)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": "TensorRT: >= 2 zeros in every 4 consecutive input channels at each (k, r, s), C % 4 == 0; "
            "Gemm/MatMul along the reduction axis; grouped convs never",
            "total_macs": self.total_macs,
            "macs_by_class": self.macs_by_class(),
            "accelerable_mac_fraction": self.accelerable_mac_fraction,
            "masked_mac_fraction": self.masked_mac_fraction,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": [asdict(layer) for layer in self.skipped],
        }


# --------------------------------------------------------------------------- reading the weights
def constant_tensors(model) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' values by tensor name."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _per_axis(node, ndim: int, values: np.ndarray) -> np.ndarray:
    """A scale or zero point shaped to broadcast over an input of rank NDIM: one value, or one per `axis` entry."""
    if values.size <= 1:
        return values.astype(np.float64).reshape(())
    shape = [1] * ndim
    shape[node_attribute(node, "axis", 1) % max(ndim, 1)] = values.size
    return values.astype(np.float64).reshape(shape)


def _scale_and_zero(node, resolve) -> tuple[tuple[np.ndarray, str], np.ndarray, np.ndarray | None] | None:
    """((x, source), scale, zero point or None) of a QuantizeLinear/DequantizeLinear with constant inputs, or None
    (blocked quantization, or an input that is not constant)."""
    if node_attribute(node, "block_size", 0):
        return None
    found = [resolve(name) if name else None for name in list(node.input) + [""] * (3 - len(node.input))]
    if found[0] is None or found[1] is None:
        return None
    return found[0], found[1][0], found[2][0] if found[2] is not None else None


def _dequantize(node, resolve) -> tuple[np.ndarray, str] | None:
    """(x - zero_point) * scale, per tensor or along `axis`; None for blocked quantization or non-constant inputs."""
    found = _scale_and_zero(node, resolve)
    if found is None:
        return None
    (x, via), scale, zero = found
    zero = np.zeros((), dtype=x.dtype) if zero is None else zero
    value = (x.astype(np.float64) - _per_axis(node, x.ndim, zero)) * _per_axis(node, x.ndim, scale)
    return value.astype(np.float32), f"DequantizeLinear({via})"


def _quantized_type(node, zero: np.ndarray | None) -> np.dtype | None:
    """The integer type a QuantizeLinear writes: its zero point's, else `output_dtype` (opset 21), else uint8."""
    if zero is not None:
        dtype = zero.dtype
    elif node_attribute(node, "output_dtype", 0):
        from onnx import helper

        dtype = helper.tensor_dtype_to_np_dtype(int(node_attribute(node, "output_dtype", 0)))
    else:
        dtype = np.dtype(np.uint8)
    return np.dtype(dtype) if np.issubdtype(dtype, np.integer) else None


def _quantize(node, resolve) -> tuple[np.ndarray, str] | None:
    """saturate(round(x / scale) + zero_point) in the zero point's integer type (TensorRT quantizes a Q/DQ weight
    the same way when it builds): a weight that is 0 stays 0 after DequantizeLinear. None for float8/int4 targets,
    blocked quantization or non-constant inputs."""
    found = _scale_and_zero(node, resolve)
    if found is None:
        return None
    (x, via), scale, zero = found
    dtype = _quantized_type(node, zero)
    if dtype is None or dtype.itemsize > 4:
        return None
    limits = np.iinfo(dtype)
    offset = _per_axis(node, x.ndim, zero) if zero is not None else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero scale: saturate, as TensorRT would reject it
        quantized = np.nan_to_num(np.rint(x.astype(np.float64) / _per_axis(node, x.ndim, scale)) + offset)
    return np.clip(quantized, limits.min, limits.max).astype(dtype), f"QuantizeLinear({via})"


def _reshape(node, resolve) -> tuple[np.ndarray, str] | None:
    """Reshape with ONNX's rules: 0 copies the input's size on that axis (unless allowzero), -1 is inferred."""
    found, target = resolve(node.input[0]), resolve(node.input[1]) if len(node.input) > 1 else None
    if found is None or target is None:
        return None
    x, dims = found[0], [int(d) for d in np.asarray(target[0]).reshape(-1)]
    if not node_attribute(node, "allowzero", 0):
        dims = [x.shape[i] if d == 0 and i < x.ndim else d for i, d in enumerate(dims)]
    try:
        return np.reshape(x, dims), f"Reshape({found[1]})"
    except ValueError:
        return None


def resolve_constant(
    name: str, constants: dict[str, np.ndarray], producers: dict[str, Any], depth: int = 8
) -> tuple[np.ndarray, str] | None:
    """The constant value of tensor NAME (through Identity/Cast, Transpose, Reshape, QuantizeLinear and
    DequantizeLinear), or None."""
    if name in constants:
        return constants[name], "initializer"
    node = producers.get(name)
    if node is None or depth == 0 or not node.input:
        return None

    def resolve(other: str):
        return resolve_constant(other, constants, producers, depth - 1)

    if node.op_type in _PASS_THROUGH:
        found = resolve(node.input[0])
        return None if found is None else (found[0], f"{node.op_type}({found[1]})")
    if node.op_type == "Transpose":
        found = resolve(node.input[0])
        if found is None:
            return None
        perm = node_attribute(node, "perm", None)
        return np.transpose(found[0], perm), f"Transpose({found[1]})"
    steps = {"DequantizeLinear": _dequantize, "QuantizeLinear": _quantize, "Reshape": _reshape}
    return steps[node.op_type](node, resolve) if node.op_type in steps else None


def _canonical(node, inputs: list[tuple[np.ndarray, str] | None]) -> tuple[np.ndarray, int, str, list[int]] | None:
    """(weight[k, c, *taps], index of the weight input, source, ONNX shape) of a Conv/Gemm/MatMul, or None."""
    if node.op_type == "Conv":
        found = inputs[1]
        return None if found is None or found[0].ndim < 3 else (found[0], 1, found[1], list(found[0].shape))
    if node.op_type == "Gemm":
        if inputs[1] is not None and inputs[1][0].ndim == 2:  # B: [N, K] with transB, else [K, N]
            b = inputs[1][0]
            return (b if node_attribute(node, "transB", 0) else b.T), 1, inputs[1][1], list(b.shape)
        if inputs[0] is not None and inputs[0][0].ndim == 2:  # A: [M, K], or [K, M] with transA
            a = inputs[0][0]
            return (a.T if node_attribute(node, "transA", 0) else a), 0, inputs[0][1], list(a.shape)
        return None
    if inputs[1] is not None and inputs[1][0].ndim >= 2:  # MatMul B: [..., K, N] -> [N', K]
        b = inputs[1][0]
        matrix = np.swapaxes(b.reshape(-1, *b.shape[-2:]), 1, 2).reshape(-1, b.shape[-2])
        return matrix, 1, inputs[1][1], list(b.shape)
    if inputs[0] is not None and inputs[0][0].ndim >= 2:  # MatMul A: [..., M, K] -> [M', K]
        a = inputs[0][0]
        return a.reshape(-1, a.shape[-1]), 0, inputs[0][1], list(a.shape)
    return None


def has_constant_weights(model) -> bool:
    """Whether some Conv/Gemm/MatMul reads a constant weight (initializer, Constant, through Q/DQ and Transpose)."""
    constants = constant_tensors(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    return any(
        resolve_constant(tensor, constants, producers) is not None
        for node in model.graph.node
        if node.op_type in WEIGHTED_OPS
        for tensor in node.input[:2]
        if tensor
    )


def weighted_layers(model, input_shape: list[int] | None = None) -> tuple[list[WeightedLayer], list[SkippedLayer]]:
    """Every Conv/Gemm/MatMul in graph order: with constant weights (canonical form, MACs per image) or skipped."""
    constants = constant_tensors(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    shapes = _output_shapes(model, input_shape)
    layers, skipped = [], []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHTED_OPS:
            continue
        name = node.name or f"{node.op_type}_{index}"
        inputs = [resolve_constant(tensor, constants, producers) if tensor else None for tensor in node.input[:2]]
        found = _canonical(node, inputs)
        if found is None:
            skipped.append(
                SkippedLayer(
                    name,
                    node.op_type,
                    "its weights are not a constant tensor (an initializer, "
                    "also through Cast/Transpose/Reshape/QuantizeLinear/DequantizeLinear)",
                )
            )
            continue
        weight, position, source, onnx_shape = found
        groups = int(node_attribute(node, "group", 1)) if node.op_type == "Conv" else 1
        weight_name = _origin(node.input[position], constants, producers)
        layer = WeightedLayer(name, node.op_type, weight_name, weight, onnx_shape, groups, source=source)
        layer.macs = _macs(layer, shapes.get(node.output[0]))
        layers.append(layer)
    return layers, skipped


def _origin(name: str, constants: dict[str, np.ndarray], producers: dict[str, Any]) -> str:
    """The initializer (or Constant) a weight tensor is read from, through the ops resolve_constant follows: a Q/DQ
    conv's weight is named by its FP32 or INT8 initializer, not by the DequantizeLinear output."""
    for _ in range(8):
        node = producers.get(name)
        if name in constants or node is None or not node.input or node.op_type == "Constant":
            return name
        name = node.input[0]
    return name


def _output_shapes(model, input_shape: list[int] | None) -> dict[str, list[int]]:
    """Static output shapes (batch 1) of every tensor shape inference can size; {} where it fails."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    initializers = {init.name for init in probe.graph.initializer}
    for graph_input in probe.graph.input:
        if graph_input.name in initializers:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        wanted = [1, *input_shape] if input_shape and len(input_shape) + 1 == len(dims) else None
        for position, dim in enumerate(dims):
            if position == 0 or wanted is not None:
                dim.Clear()
                dim.dim_value = 1 if wanted is None else int(wanted[position])  # wanted[0] is the batch, 1
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:
        return {}
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[info.name] = dims
    return shapes


def _macs(layer: WeightedLayer, output_shape: list[int] | None) -> int:
    """Multiply-accumulates per image: outputs per image x reduction length (x taps for a conv)."""
    per_output = int(np.prod(layer.weight.shape[1:]))
    if output_shape is None:  # unknown output size: one output position per output channel
        return int(layer.weight.shape[0] * per_output)
    return int(np.prod(output_shape[1:]) * per_output)


# --------------------------------------------------------------------------- the 2:4 patterns
def two_of_four_share(values: np.ndarray) -> float:
    """Share of the 4-groups along the LAST axis holding >= 2 zeros (0 when the axis is not a multiple of 4)."""
    if values.shape[-1] % 4:
        return 0.0
    groups = (values.reshape(-1, 4) == 0).sum(axis=1) >= 2
    return float(groups.mean()) if groups.size else 0.0


def candidate_axes(layer: WeightedLayer) -> list[tuple[str, np.ndarray]]:
    """(axis name, weights with that axis last), TensorRT's first."""
    w = layer.weight
    taps = tuple(range(2, w.ndim))
    if layer.op == "Conv":
        first = ("input channels", np.transpose(w, (0, *taps, 1)))
        others = [
            ("flattened C*R*S", w.reshape(w.shape[0], -1)),
            ("output channels", np.transpose(w, (1, *taps, 0))),
            ("flattened K*C*R*S", w.reshape(1, -1)),
        ]
    else:
        first = ("reduction axis", w)
        others = [("output axis", w.T), ("flattened, row-major", w.reshape(1, -1))]
    return [first] + others


def classify(layer: WeightedLayer, total_macs: int) -> LayerLayout:
    w = layer.weight
    result = LayerLayout(
        layer.name,
        layer.op,
        layer.weight_name,
        layer.onnx_shape,
        layer.groups,
        layer.macs,
        DENSE,
        zero_share=float((w == 0).mean()) if w.size else 0.0,
    )
    axes = candidate_axes(layer)
    found = next((name for name, values in axes if two_of_four_share(values) == 1.0), "")
    result.axis = found
    if layer.groups > 1:
        result.layout = GROUPED
        result.note = "TensorRT has no sparse kernels for groups > 1"
    elif found and found == axes[0][0]:
        result.layout = TENSORRT
    elif found:
        result.layout = OTHER_LAYOUT
        result.note = f"2-of-4 groups along the {found}, not along the {axes[0][0]}: TensorRT runs it dense"
    elif layer.macs < SMALL_SHARE * max(total_macs, 1):
        result.layout = SMALL
    if result.layout in (DENSE, SMALL):
        result.note = _dense_note(layer, result.zero_share)
    return result


def _dense_note(layer: WeightedLayer, zero_share: float) -> str:
    notes = []
    channels = layer.weight.shape[1]
    if channels % 4:
        notes.append(f"{'C' if layer.op == 'Conv' else 'reduction length'} = {channels} is not a multiple of 4")
    if zero_share >= 0.25:
        share = two_of_four_share(candidate_axes(layer)[0][1])
        notes.append(
            f"{100 * zero_share:.0f}% zeros, but only {100 * share:.1f}% of the 4-groups along the "
            f"{candidate_axes(layer)[0][0]} hold 2 zeros (unstructured): runs dense"
        )
    return "; ".join(notes)


def layout_report(layers: list[WeightedLayer], skipped: list[SkippedLayer]) -> LayoutReport:
    total = sum(layer.macs for layer in layers)
    return LayoutReport([classify(layer, total) for layer in layers], list(skipped))


# --------------------------------------------------------------------------- against the dense model
def pair_layers(dense: list[WeightedLayer], sparse: list[WeightedLayer], dense_file: str, sparse_file: str) -> None:
    """The same layer structure: as many weighted layers, each with the same op and weight shape, in graph order."""
    if len(dense) != len(sparse):
        raise PipelineError(
            f"layer structure differs: {dense_file} has {len(dense)} Conv/Gemm/MatMul layers with "
            f"constant weights, {sparse_file} has {len(sparse)}; the sparse model must be the dense "
            "model with zeros in its weights"
        )
    for index, (a, b) in enumerate(zip(dense, sparse)):
        if a.op != b.op or a.weight.shape != b.weight.shape or a.groups != b.groups:
            raise PipelineError(
                f"layer {index + 1} differs: {dense_file} {a.describe()} vs {sparse_file} "
                f"{b.describe()}; the sparse model must be the dense model with zeros in its weights"
            )


def kept_tolerance(dense: WeightedLayer, sparse: WeightedLayer) -> tuple[float, str]:
    """(largest change of a kept weight, relative to max |dense|, that still counts as equal; why).

    Float32 against float32: 1e-5. A side stored in float16: its rounding (1e-3). A side read through
    DequantizeLinear: one INT8 step (1/127), so a Q/DQ export of the same masked weights reads `masks only`."""
    sources = (dense.source, sparse.source)
    if any("DequantizeLinear" in source for source in sources):
        return 1.0 / 127, " (within INT8 rounding)"
    if np.float16 in (dense.weight.dtype, sparse.weight.dtype):
        return 1e-3, " (within FP16 rounding)"
    return 1e-5, ""


def compare_kept(report: LayoutReport, dense: list[WeightedLayer], sparse: list[WeightedLayer]) -> None:
    """Per layer: are the sparse model's non-zero weights the dense model's (masks only) or changed?"""
    for entry, a, b in zip(report.layers, dense, sparse):
        reference, weights = a.weight.astype(np.float64), b.weight.astype(np.float64)
        kept = weights != 0
        scale = max(float(np.abs(reference).max()) if reference.size else 0.0, 1e-30)
        change = float(np.abs(weights[kept] - reference[kept]).max()) / scale if kept.any() else 0.0
        new_zeros = int(((reference != 0) & ~kept).sum())
        entry.max_kept_change = change
        tolerance, rounding = kept_tolerance(a, b)
        if change > tolerance:
            entry.kept = "changed (fine-tuned)"
        else:
            entry.kept = ("masks only" if new_zeros else "unchanged") + (rounding if change else "")
