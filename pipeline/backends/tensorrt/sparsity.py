"""Which layers TensorRT found eligible for, and built with, 2:4 sparse kernels, by PyTorch module name.

Every source TensorRT gives, each named in the report:
- the builder log, in either format. Before 10.14: "(Sparsity) Layers eligible for sparse math: a, b" and
  "(Sparsity) TRT inference plan picked sparse implementation for layers: b". From 10.14 (NVIDIA
  Model-Optimizer PR #1664, examples/sparse_quant_trt, on 10.14.1; the same on 11.1): "(Sparsity) Found N
  layer(s) eligible to use sparse tactics: ..." and "(Sparsity) Chose M layer(s) using sparse tactics: ...",
  one pair per fused (Myelin) block; every pair is kept. Only the picked/chose lines say what runs sparse.
- the inspector's tactic name of a layer ("..._sparse_conv_..." is a sparse kernel), and its
  HasSparseWeights field (2:4 weights: eligibility, not a pick).
A fused block (a layer holding several modules, e.g. a {ForeignNode[...]}) is reported as a block: its modules
are listed as inside it and are credited one by one only where the evidence names them one by one.
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
# TensorRT >= 10.14: one pair per fused block (the names after the colon may be missing)
FOUND_LINE = re.compile(r"\(Sparsity\) Found (\d+) layer\(s\) eligible to use sparse tactics(?::(.*))?$")
CHOSE_LINE = re.compile(r"\(Sparsity\) Chose (\d+) layer\(s\) using sparse tactics(?::(.*))?$")
OLD_FORMAT, NEW_FORMAT = "TensorRT < 10.14 lines", "TensorRT >= 10.14 lines (one pair per fused block)"
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
    names, depth, current = [], 0, list[str]()
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


def _add(found: dict[str, Any], key: str, names: list[str]) -> None:
    kept = found[key] if found[key] is not None else []
    kept.extend(name for name in names if name not in kept)
    found[key] = kept


def _new_format(line: str, found: dict[str, Any]) -> bool:
    """One 10.14+ line into `found` (a Found line opens a block, its Chose line closes it); False if neither."""
    for pattern, key, count_key in ((FOUND_LINE, "eligible", "eligible_count"), (CHOSE_LINE, "picked", "picked_count")):
        match = pattern.search(line.rstrip())
        if not match:
            continue
        count, names = int(match.group(1)), split_layer_list(match.group(2) or "")
        blocks = found["blocks"]
        if key == "eligible" or not blocks or blocks[-1]["picked_count"] is not None:
            blocks.append({"eligible_count": None, "eligible": None, "picked_count": None, "picked": None})
        blocks[-1][count_key], blocks[-1][key] = count, names if names or count == 0 else None
        found[count_key] = (found[count_key] or 0) + count
        if names or count == 0:
            _add(found, key, names)
        else:
            found["unnamed"].append(key)
        found["format"] = NEW_FORMAT
        return True
    return False


def parse_sparsity_log(lines: Iterable[str]) -> dict[str, Any]:
    """TensorRT layer names from the "(Sparsity)" lines of either format, in order, without repeats.

    "eligible"/"picked": None for a line never seen; "blocks": each 10.14+ Found/Chose pair (one per fused
    block), all kept; "eligible_count"/"picked_count": the counts those lines print; "unnamed": the kinds of
    line seen with a count but no names (then which layers they mean is not known by name)."""
    found: dict[str, Any] = {
        "eligible": None,
        "picked": None,
        "format": None,
        "blocks": [],
        "eligible_count": None,
        "picked_count": None,
        "unnamed": [],
    }
    for line in lines:
        if _new_format(line, found):
            continue
        for key, marker in (("eligible", ELIGIBLE_MARKER), ("picked", PICKED_MARKER)):
            at = line.find(marker)
            if at >= 0:
                _add(found, key, split_layer_list(line[at + len(marker) :]))
                found["format"] = found["format"] or OLD_FORMAT
    return found


@dataclass
class InspectedLayer:
    name: str
    layer_type: str = ""
    tactic: str = ""
    metadata: str = ""
    origin: str = ""
    has_sparse_weights: bool | None = None  # "HasSparseWeights", written for convolutions
    formats: list[str] = field(default_factory=list)  # each input's format and data type, as the inspector says

    @property
    def sparse_tactic(self) -> bool:
        """The tactic TensorRT picked is a sparse kernel (its names say so: "sm80_xmma_fprop_sparse_conv_...")."""
        return "sparse" in self.tactic.lower()

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


def _tensor_format(tensor: Any) -> str:
    """A tensor's format and type: 10.x writes one "Format/Datatype" string; 11.x splits it into "Format" and
    "DataType" (TensorRT 11 migration guide, engine inspector changes)."""
    if not isinstance(tensor, dict):
        return ""
    if "Format/Datatype" in tensor:
        return str(tensor["Format/Datatype"])
    return " ".join(str(tensor[key]) for key in ("Format", "DataType") if key in tensor)


class InspectorLayers(list):
    """The inspector's layers, with the engine's I/O tensor names ("Bindings" in 10.x, "I/O Tensors" in 11.x)."""

    io: list[str]


def inspector_io(text: str | None) -> list[str]:
    """The engine's I/O tensor names from the inspector JSON: "Bindings" in 10.x, "I/O Tensors" in 11.x."""
    return parse_inspector_json(text).io


def parse_inspector_json(text: str | None) -> InspectorLayers:
    """Layers from IEngineInspector.get_engine_information(LayerInformationFormat.JSON).

    With ProfilingVerbosity.DETAILED each entry of "Layers" is a dict (Name, LayerType, TacticName,
    Metadata, ...); with less verbosity entries are bare layer names, which are kept without details.
    """
    layers = InspectorLayers()
    layers.io = []
    try:
        data = json.loads(text) if text else None
    except json.JSONDecodeError:
        return layers
    entries = data.get("Layers", []) if isinstance(data, dict) else data if isinstance(data, list) else []
    if isinstance(data, dict):
        names = data.get("I/O Tensors", data.get("Bindings")) or []
        layers.io = [str(entry.get("Name", "")) if isinstance(entry, dict) else str(entry) for entry in names]
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
                    formats=[_tensor_format(tensor) for tensor in entry.get("Inputs", [])],
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
    """TensorRT layer names -> PyTorch modules (Metadata first), remembering the names that map to none.

    A name of a fused block (a layer holding several modules) gives no module one by one: `blocks` collects it,
    with the modules inside, so a report lists them as inside the block and credits none of them by guess."""

    def __init__(self, layers: list[InspectedLayer], names: OnnxNameMap):
        self.by_name, self.names = {layer.name: layer for layer in layers}, names
        self.unmapped: list[str] = []

    def split(self, trt_names: Iterable[str]) -> tuple[list[str], list[dict[str, Any]]]:
        """(modules named one by one, blocks named as a whole [{trt_layer, modules}])."""
        out: list[str] = []
        blocks: list[dict[str, Any]] = []
        for trt_name in trt_names:
            layer = self.by_name.get(trt_name)
            found = self.names.modules_of(layer) if layer is not None else self.names.torch_names(trt_name)
            if not found and trt_name not in self.unmapped:
                self.unmapped.append(trt_name)
            if len(found) > 1:
                blocks.append({"trt_layer": trt_name, "modules": found})
                continue
            out.extend(name for name in found if name not in out)
        return out, blocks

    def modules(self, trt_names: Iterable[str]) -> list[str]:
        """Every module the names cover, blocks' included (for eligibility, which is no claim of a kernel)."""
        single, blocks = self.split(trt_names)
        return single + [m for block in blocks for m in block["modules"] if m not in single]


def _row(layer: InspectedLayer, mapped: list[str], log: dict, log_named: list[str]) -> dict[str, Any]:
    """One layer's row. LOG_NAMED: modules whose own ONNX node the log's pick lines name."""
    in_log = lambda key: None if log[key] is None else layer.name in log[key]  # noqa: E731
    block, named = len(mapped) > 1, [m for m in mapped if m in log_named]
    sources = [
        source
        for source, said in (
            ("builder log", in_log("picked")),
            ("inspector tactic name", layer.sparse_tactic),
            ("builder log names " + ("a node inside it" if block else "its ONNX node"), bool(named)),
        )
        if said
    ]
    return {
        "trt_layer": layer.name,
        "kind": "block" if block else "layer",
        "modules": mapped,
        "layer_type": layer.layer_type,
        "tactic": layer.tactic,
        "has_sparse_weights": layer.has_sparse_weights,
        "log_eligible": in_log("eligible"),
        "picked_sparse": True if sources else in_log("picked"),
        # inside a block: the modules the evidence names one by one (the others are not credited)
        "modules_named_sparse": named if block else None,
        "evidence": sources,
    }


def _per_layer(layers: list[InspectedLayer], names: OnnxNameMap, log: dict) -> list[dict]:
    by_name = {layer.name for layer in layers}
    log_named = [m for name in log["picked"] or [] if name not in by_name for m in names.torch_names(name)]
    rows = []
    for layer in layers:
        mapped = names.modules_of(layer)
        if mapped:
            rows.append(_row(layer, mapped, log, log_named))
    return rows


def _notes(per_layer: list[dict[str, Any]], picked: list[str] | None, log: dict, quantized: bool) -> list[str]:
    if picked is None:
        if "picked" in log["unnamed"]:
            return [
                f"TensorRT chose {log['picked_count']} layer(s) using sparse tactics but did not name them, and no "
                "tactic name says sparse: which layers run sparse kernels is not known"
            ]
        return [
            "TensorRT printed no '(Sparsity) ... picked sparse implementation' or '(Sparsity) Chose ...' line, and "
            "no tactic name says sparse, so which layers run sparse kernels is not known; each layer's tactic is "
            "listed under 'layers'"
        ]
    notes = []
    blocks = [row for row in per_layer if row["kind"] == "block" and row["picked_sparse"]]
    if blocks:
        notes.append(
            f"{len(blocks)} fused block(s) run sparse tactics as a whole; the modules inside them are listed under "
            "'sparse_blocks' and credited one by one only where the log names them"
        )
    dense = [row["trt_layer"] for row in per_layer if row["has_sparse_weights"] and not row["picked_sparse"]]
    if quantized and dense:
        notes.append(
            f"{len(dense)} Q/DQ layer(s) have 2:4 weights (HasSparseWeights=1) but TensorRT picked dense tactics "
            f"for them: a known TensorRT behaviour with Q/DQ graphs ({QDQ_SPARSE_ISSUE})"
        )
    return notes


def _picked(log: dict, layers: list[InspectedLayer], mapper: _ModuleMapper):
    """(modules running sparse kernels one by one or None if unknown, blocks running them as a whole, sources)."""
    tactic_layers = [layer.name for layer in layers if layer.sparse_tactic]
    if log["picked"] is None and not tactic_layers:
        return None, [], []
    single, blocks = mapper.split([*(log["picked"] or []), *tactic_layers])
    sources = (["builder log (" + str(log["format"]) + ")"] if log["picked"] is not None else []) + (
        ["engine inspector tactic names"] if tactic_layers else []
    )
    if log["picked"] is None and "picked" in log["unnamed"]:
        sources.append(f"builder log: {log['picked_count']} layer(s) chosen, unnamed")
    return single, blocks, sources


def sparse_layer_report(
    log_lines: Iterable[str], inspector_json: str | None, names: OnnxNameMap, quantized: bool = False
) -> dict[str, Any]:
    """The sparse-layer report of one engine (BuildResult.sparse_layers); see docs/tensorrt.md.

    "picked_sparse": modules the evidence says run sparse kernels, one by one (None when nothing says which);
    "sparse_blocks": fused blocks that run sparse tactics as a whole, with the modules inside (not credited)."""
    log = parse_sparsity_log(log_lines)
    layers = parse_inspector_json(inspector_json)
    mapper = _ModuleMapper(layers, names)
    inspector_sparse = [layer.name for layer in layers if layer.has_sparse_weights]
    from_log = log["eligible"] is not None
    eligible = mapper.modules(log["eligible"] if from_log else inspector_sparse)
    picked, blocks, sources = _picked(log, layers, mapper)
    per_layer = _per_layer(layers, names, log)
    return {
        "eligible": eligible,
        "picked_sparse": picked,
        "sparse_blocks": blocks,
        "layers": per_layer,
        "notes": _notes(per_layer, picked, log, quantized),
        "raw": {
            "source": ", ".join(sources) or "none (no '(Sparsity)' pick line in the log, no sparse tactic name)",
            "sources": sources,
            "log_format": log["format"],
            "eligible_source": "builder log" if from_log else "engine inspector HasSparseWeights",
            "log_eligible": log["eligible"],
            "log_picked": log["picked"],
            "log_blocks": log["blocks"],
            "log_counts": {"eligible": log["eligible_count"], "picked": log["picked_count"]},
            "inspector_has_sparse_weights": inspector_sparse,
            "inspector_layers": len(layers),
            "unmapped": mapper.unmapped,
        },
    }


def module_layer_times(times: dict[str, float], inspector_json: str | None, names: OnnxNameMap) -> dict[str, Any]:
    """Per-TensorRT-layer times (Runner.layer_times) per PyTorch module, and per fused block.

    A layer of one module is charged to it; a fused block's time stays the block's ("blocks": {layer: {ms,
    modules}}), never split among its modules by guess. Reformat layers are summed apart, never charged to the
    layer they feed; layers that belong to no module (pooling, ranges without Metadata) go to "other_ms"."""
    by_name = {layer.name: layer for layer in parse_inspector_json(inspector_json)}
    modules: dict[str, float] = {}
    blocks: dict[str, dict[str, Any]] = {}
    reformat = other = 0.0
    for trt_name, ms in times.items():
        layer = by_name.get(trt_name, InspectedLayer(name=trt_name))
        if layer.is_reformat:
            reformat += ms
            continue
        mapped = names.modules_of(layer)
        if not mapped:
            other += ms
        elif len(mapped) == 1:
            modules[mapped[0]] = modules.get(mapped[0], 0.0) + ms
        else:
            blocks[trt_name] = {"ms": blocks.get(trt_name, {}).get("ms", 0.0) + ms, "modules": mapped}
    return {"modules": modules, "blocks": blocks, "reformat_ms": reformat, "other_ms": other}
