"""Input/output tensor specs of a model file, in Triton's terms (name, TYPE_*, dims).

Dims keep the batch axis; -1 marks a dynamic axis. Specs come from an ONNX graph
(`specs_from_onnx`) or from the engine metadata JSON the TensorRT backend writes next
to a plan (`specs_from_metadata`), since a plan cannot be read without TensorRT and a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

# onnx.TensorProto element type -> Triton data type
ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}

# spellings of data types in engine metadata (numpy names, TensorRT enum names) -> Triton data type
_NAME_TO_TRITON = {
    "float32": "TYPE_FP32",
    "float": "TYPE_FP32",
    "fp32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "half": "TYPE_FP16",
    "fp16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "bf16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "double": "TYPE_FP64",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "int16": "TYPE_INT16",
    "uint16": "TYPE_UINT16",
    "int32": "TYPE_INT32",
    "uint32": "TYPE_UINT32",
    "int64": "TYPE_INT64",
    "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton TYPE_*
    dims: tuple[int, ...]  # with the batch axis; -1 = dynamic

    def without_batch(self) -> tuple[int, ...]:
        return self.dims[1:]


def triton_dtype(value: Any, where: str) -> str:
    """Normalise a dtype spelling ('float32', 'DataType.HALF', 'TYPE_FP16', 1) to Triton's TYPE_*."""
    if isinstance(value, int):
        if value in ONNX_TO_TRITON:
            return ONNX_TO_TRITON[value]
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("TYPE_"):
            return text
        key = text.split(".")[-1].lower()  # DataType.HALF, numpy.float16, <class 'numpy.float32'>
        key = key.strip("<>'\" ").removeprefix("class ")
        if key in _NAME_TO_TRITON:
            return _NAME_TO_TRITON[key]
    raise PipelineError(f"{where}: unknown data type {value!r}; expected e.g. float32 or float16")


def specs_from_onnx(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (minus initializers) and outputs of an ONNX file, without loading its weights."""
    import onnx

    from pipeline.io import readable_file

    path = readable_file(path, "ONNX file", "run `python -m pipeline export` first")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for corrupt files
        raise PipelineError(
            f"{path} is not a readable ONNX file ({type(exc).__name__}); rerun the export stage"
        ) from None
    if not model.graph.input or not model.graph.output:
        raise PipelineError(f"{path} is not a complete ONNX graph (no inputs or outputs); rerun the export stage")
    initializers = {init.name for init in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, triton_dtype(tensor.elem_type, f"{path} tensor {value.name}"), dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def onnx_external_files(path: Path) -> list[str]:
    """Relative locations of external-data files an ONNX model refers to (copied along with it)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    found: list[str] = []
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
            if location and location not in found:
                found.append(location)
    return found


def specs_from_metadata(meta: dict[str, Any], where: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs/outputs from engine metadata: {"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}.

    Also accepts a mapping name -> {"dtype", "shape"} and the keys data_type/dims.
    """

    def read(key: str) -> list[TensorSpec]:
        entries = meta.get(key)
        if isinstance(entries, dict):
            entries = [{"name": name, **info} for name, info in entries.items()]
        if not isinstance(entries, list) or not entries:
            raise PipelineError(
                f"{where} has no {key!r} list (name, dtype, shape per tensor); rebuild the engine with the build stage"
            )
        specs = []
        for entry in entries:
            try:
                name = entry["name"]
                dtype = entry.get("dtype", entry.get("data_type"))
                shape = entry.get("shape", entry.get("dims"))
                dims = tuple(int(d) for d in shape)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise PipelineError(f"{where}: entry {entry!r} in {key!r} needs name, dtype and shape") from None
            specs.append(TensorSpec(str(name), triton_dtype(dtype, f"{where} tensor {name}"), dims))
        return specs

    return read("inputs"), read("outputs")
