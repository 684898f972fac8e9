"""Which layers TensorRT found eligible for, and built with, 2:4 sparse kernels, by PyTorch module name.

Two sources, both read after a build:
- the builder log. Some TensorRT versions print, at INFO, "(Sparsity) Layers eligible for sparse
  math: a, b" and "(Sparsity) TRT inference plan picked sparse implementation for layers: b". Only
  the second line says which layers run sparse kernels. When it is missing the report says so; it
  does not guess from kernel names.
- the engine inspector's per-layer JSON (needs ProfilingVerbosity.DETAILED): layer name, type,
  tactic, "HasSparseWeights" for convolutions and "Metadata": one "[ONNX Layer: <node>]" record per
  ONNX node the layer came from (onnx-tensorrt's processMetadata writes "[ONNX Layer: <node> | Local
  Function: <fn>]" inside a local function). TensorRT joins the records of a fused layer with the unit
  separator 0x1F and groups of them with the record separator 0x1E; both are split here.

TensorRT names layers after ONNX nodes, possibly fused ("/a/Conv + /a/relu/Relu"), wrapped
("PWN(PWN(/a/Relu), /b/Add)") or merged into a Myelin range ("{ForeignNode[/a/Conv.../b/Gemm]}").
A range names only its first and last node, so layer names are the last resort: the inspector's
Metadata comes first. Reformat layers ("Reformatting CopyNode for Input Tensor 0 to <layer>")
belong to no module even though their name contains the layer they feed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ELIGIBLE_MARKER = "(Sparsity) Layers eligible for sparse math:"
PICKED_MARKER = "(Sparsity) TRT inference plan picked sparse implementation for layers:"
QDQ_SPARSE_ISSUE = "https://github.com/NVIDIA/TensorRT/issues/4694"

# Node types whose weights TensorRT can run with sparse kernels.
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Nodes that sit between an initializer and its Conv/Gemm without changing which weight it is.
_PASS_THROUGH_OPS = {"Cast", "Identity", "DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape"}
_NAME_TOKENS = re.compile(r"[\s+(),\[\]{}]+")
_ONNX_LAYER = re.compile(r"^\[ONNX Layer: ([^|\]]*?)\s*(?:\|[^\]]*)?\]$")
_RECORD_SEPARATORS = re.compile("[\x1e\x1f]")
_OPEN, _CLOSE = "([{", ")]}"


def split_layer_list(text: str) -> list[str]:
    """Split "a + b, PWN(PWN(c), d), e" on the commas that are outside any brackets."""
    names, depth, current = [], 0, []
    for char in text:
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            names.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    names.append("".join(current).strip())
    return [name for name in names if name]


def parse_sparsity_log(lines: Iterable[str]) -> dict[str, list[str] | None]:
    """TensorRT layer names from the "(Sparsity)" lines, in order, without repeats; None for a line never seen."""
    found: dict[str, list[str] | None] = {"eligible": None, "picked": None}
    for line in lines:
        for key, marker in (("eligible", ELIGIBLE_MARKER), ("picked", PICKED_MARKER)):
            at = line.find(marker)
            if at < 0:
                continue
            names = found[key] if found[key] is not None else []
            names.extend(name for name in split_layer_list(line[at + len(marker) :]) if name not in names)
            found[key] = names
    return found


@dataclass
class InspectedLayer:
    name: str
    layer_type: str = ""
    tactic: str = ""
    metadata: str = ""
    origin: str = ""
    has_sparse_weights: bool | None = None  # "HasSparseWeights", written for convolutions

    @property
    def onnx_nodes(self) -> list[str]:
        """ONNX node names from Metadata ("[ONNX Layer: a]\\x1f[ONNX Layer: b | Local Function: f]")."""
        nodes = []
        for record in _RECORD_SEPARATORS.split(self.metadata):
            match = _ONNX_LAYER.match(record.strip())
            if match and match.group(1) not in nodes:
                nodes.append(match.group(1))
        return nodes

    @property
    def is_reformat(self) -> bool:
        return (
            self.layer_type == "Reformat" or self.origin == "REFORMAT" or self.name.startswith("Reformatting CopyNode")
        )


def parse_inspector_json(text: str | None) -> list[InspectedLayer]:
    """Layers from IEngineInspector.get_engine_information(LayerInformationFormat.JSON).

    With ProfilingVerbosity.DETAILED each entry of "Layers" is a dict (Name, LayerType, TacticName,
    Metadata, ...); with less verbosity entries are bare layer names, which are kept without details.
    """
    if not text:
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    entries = data.get("Layers", []) if isinstance(data, dict) else data if isinstance(data, list) else []
    layers = []
    for entry in entries:
        if isinstance(entry, str):
            layers.append(InspectedLayer(name=entry))
        elif isinstance(entry, dict) and "Name" in entry:
            sparse = entry.get("HasSparseWeights")
            layers.append(
                InspectedLayer(
                    name=str(entry["Name"]),
                    layer_type=str(entry.get("LayerType", "")),
                    tactic=str(entry.get("TacticName", "")),
                    metadata=str(entry.get("Metadata", "")),
                    origin=str(entry.get("Origin", "")),
                    has_sparse_weights=None if sparse is None else bool(sparse),
                )
            )
    return layers


def module_from_scoped_name(node_name: str) -> str | None:
    """PyTorch module name from a TorchScript-exporter node name, or None if it is not one.

    "/layer1/layer1.0/conv1/Conv" -> "layer1.0.conv1"; a scope repeats its parent's last
    component for Sequential children: "/layer2/layer2.0/downsample/downsample.0/Conv" ->
    "layer2.0.downsample.0". The last component is the ONNX op type (possibly "Conv_1").
    """
    if not node_name.startswith("/") or "..." in node_name:
        return None
    parts = [p for p in node_name.strip("/").split("/") if p]
    if len(parts) < 2:
        return None
    path = ""
    last = ""
    for part in parts[:-1]:
        if last and part.startswith(last + "."):
            path += part[len(last) :]
        else:
            path = f"{path}.{part}" if path else part
        last = part
    return path


def is_foreign_node(layer_name: str) -> bool:
    return "ForeignNode[" in layer_name


@dataclass
class OnnxNameMap:
    """ONNX node name -> PyTorch module name, for the weighted nodes of one ONNX file."""

    nodes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_onnx(cls, onnx_path: Path) -> OnnxNameMap:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        initializers = {init.name for init in graph.initializer}
        producer = {out: node for node in graph.node for out in node.output}
        nodes = {}
        for index, node in enumerate(graph.node):
            if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
                continue
            name = node.name or f"{node.op_type}_{index}"
            torch_name = _module_from_weight(node.input[1], initializers, producer) or module_from_scoped_name(name)
            if torch_name:
                nodes[name] = torch_name
        return cls(nodes)

    def module_for_node(self, node_name: str) -> str | None:
        """The module of one ONNX node; a scoped weighted node missing from the ONNX is read from its scope."""
        name = self.nodes.get(node_name)
        if name is None and node_name.rsplit("/", 1)[-1].split("_")[0] in WEIGHTED_OPS:
            name = module_from_scoped_name(node_name)
        return name

    def torch_names(self, layer_name: str) -> list[str]:
        """Modules named by the ONNX nodes inside a TensorRT layer name (fused or wrapped; not a ForeignNode range)."""
        if is_foreign_node(layer_name):
            return []
        names = []
        for token in _NAME_TOKENS.split(layer_name):
            name = self.module_for_node(token) if token else None
            if name and name not in names:
                names.append(name)
        return names

    def modules_of(self, layer: InspectedLayer) -> list[str]:
        """Modules a built layer computes: from its Metadata first, else from its name; none for a reformat."""
        if layer.is_reformat:
            return []
        if layer.onnx_nodes:
            names = []
            for node in layer.onnx_nodes:
                name = self.module_for_node(node)
                if name and name not in names:
                    names.append(name)
            return names
        return self.torch_names(layer.name)


def _module_from_weight(tensor: str, initializers: set[str], producer: dict[str, Any]) -> str | None:
    """Follow a weight input back through casts and Q/DQ to its initializer; "layer1.0.conv1.weight" -> module."""
    for _ in range(4):
        if tensor in initializers:
            if tensor.endswith(".weight") and not tensor.startswith("onnx::"):
                return tensor[: -len(".weight")]
            return None  # e.g. "onnx::Conv_123": BatchNorm folded in, name lost
        node = producer.get(tensor)
        if node is None or node.op_type not in _PASS_THROUGH_OPS or not node.input:
            return None
        tensor = node.input[0]
    return None


class _ModuleMapper:
    """TensorRT layer names -> PyTorch modules (Metadata first), remembering the names that map to none."""

    def __init__(self, layers: list[InspectedLayer], names: OnnxNameMap):
        self.by_name, self.names, self.unmapped = {layer.name: layer for layer in layers}, names, []

    def modules(self, trt_names: Iterable[str]) -> list[str]:
        out: list[str] = []
        for trt_name in trt_names:
            layer = self.by_name.get(trt_name)
            found = self.names.modules_of(layer) if layer is not None else self.names.torch_names(trt_name)
            if not found and trt_name not in self.unmapped:
                self.unmapped.append(trt_name)
            out.extend(name for name in found if name not in out)
        return out


def _per_layer(layers: list[InspectedLayer], names: OnnxNameMap, log: dict) -> list[dict[str, Any]]:
    rows = []
    for layer in layers:
        mapped = names.modules_of(layer)
        if mapped:
            rows.append(
                {
                    "trt_layer": layer.name,
                    "modules": mapped,
                    "layer_type": layer.layer_type,
                    "tactic": layer.tactic,
                    "has_sparse_weights": layer.has_sparse_weights,
                    "log_eligible": None if log["eligible"] is None else layer.name in log["eligible"],
                    "picked_sparse": None if log["picked"] is None else layer.name in log["picked"],
                }
            )
    return rows


def _notes(per_layer: list[dict[str, Any]], picked: list[str] | None, quantized: bool) -> list[str]:
    if picked is None:
        return [
            "TensorRT printed no '(Sparsity) ... picked sparse implementation' line (only some versions print "
            "it, at INFO), so which layers run sparse kernels is not known; each layer's tactic is listed under "
            "'layers'"
        ]
    dense = [row["trt_layer"] for row in per_layer if row["has_sparse_weights"] and not row["picked_sparse"]]
    if quantized and dense:
        return [
            f"{len(dense)} Q/DQ layer(s) have 2:4 weights (HasSparseWeights=1) but TensorRT picked dense tactics "
            f"for them: a known TensorRT behaviour with Q/DQ graphs ({QDQ_SPARSE_ISSUE})"
        ]
    return []


def sparse_layer_report(
    log_lines: Iterable[str], inspector_json: str | None, names: OnnxNameMap, quantized: bool = False
) -> dict[str, Any]:
    """The sparse-layer report of one engine (BuildResult.sparse_layers); see docs/tensorrt.md.

    "picked_sparse" is None when TensorRT printed no "picked sparse implementation" line: then which
    layers run sparse kernels is not known, and "notes" says so.
    """
    log = parse_sparsity_log(log_lines)
    layers = parse_inspector_json(inspector_json)
    mapper = _ModuleMapper(layers, names)
    inspector_sparse = [layer.name for layer in layers if layer.has_sparse_weights]
    from_log = log["eligible"] is not None
    eligible = mapper.modules(log["eligible"] if from_log else inspector_sparse)
    picked = mapper.modules(log["picked"]) if log["picked"] is not None else None
    per_layer = _per_layer(layers, names, log)
    return {
        "eligible": eligible,
        "picked_sparse": picked,
        "layers": per_layer,
        "notes": _notes(per_layer, picked, quantized),
        "raw": {
            "source": "builder log" if picked is not None else "none (no '(Sparsity) ... picked' line in the log)",
            "eligible_source": "builder log" if from_log else "engine inspector HasSparseWeights",
            "log_eligible": log["eligible"],
            "log_picked": log["picked"],
            "inspector_has_sparse_weights": inspector_sparse,
            "inspector_layers": len(layers),
            "unmapped": mapper.unmapped,
        },
    }


def module_layer_times(times: dict[str, float], inspector_json: str | None, names: OnnxNameMap) -> dict[str, Any]:
    """Per-TensorRT-layer times (Runner.layer_times) summed per PyTorch module.

    Reformat layers are summed apart, never charged to the layer they feed; layers that belong to
    no module (pooling, ForeignNode ranges without Metadata) go to "other_ms".
    """
    by_name = {layer.name: layer for layer in parse_inspector_json(inspector_json)}
    modules: dict[str, float] = {}
    reformat = other = 0.0
    for trt_name, ms in times.items():
        layer = by_name.get(trt_name, InspectedLayer(name=trt_name))
        if layer.is_reformat:
            reformat += ms
            continue
        mapped = names.modules_of(layer)
        if not mapped:
            other += ms
            continue
        for name in mapped:  # a layer fusing several modules is split evenly between them
            modules[name] = modules.get(name, 0.0) + ms / len(mapped)
    return {"modules": modules, "reformat_ms": reformat, "other_ms": other}
