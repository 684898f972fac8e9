"""ONNX files given to `verify --dense/--sparse`: loaded and checked before anything runs or is written.

Every problem is one PipelineError naming the file and the fix: a missing, empty or truncated file, a
directory, a file that is not ONNX, weights kept outside the file that are not beside it, and a dense
and sparse model whose inputs or outputs (names, shapes, element types) differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError


def check_file(path: Path, flag: str, what: str) -> Path:
    """PATH is an existing, non-empty regular file."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{flag} {path} is a directory; pass the {what} file itself")
    if not path.exists():
        raise PipelineError(f"{flag} {path}: no such file; pass the {what} file")
    if not path.is_file():
        raise PipelineError(f"{flag} {path} is not a regular file; pass the {what} file")
    if path.stat().st_size == 0:
        raise PipelineError(f"{flag} {path} is empty (0 bytes); the file was not written completely: export it again")
    return path


def load_onnx(path: Path, flag: str):
    """The ModelProto of PATH with its weights (external data beside it is read too), checked."""
    import onnx

    path = check_file(path, flag, "ONNX")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise PipelineError(
            f"{flag} {path} is not an ONNX model or is truncated ({first}); pass a complete "
            ".onnx file (export it again)"
        ) from None
    if not model.graph.node or model.ir_version <= 0:
        raise PipelineError(
            f"{flag} {path} is not an ONNX model (no graph nodes or no IR version); pass a complete .onnx file"
        )
    _load_external_data(model, path, flag)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PipelineError(f"{flag} {path} fails the ONNX checker ({first}); export it again") from None
    return model


def _load_external_data(model, path: Path, flag: str) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    missing = sorted(
        {
            entry.value
            for init in model.graph.initializer
            if uses_external_data(init)
            for entry in init.external_data
            if entry.key == "location" and not (path.parent / entry.value).is_file()
        }
    )
    if missing:
        raise PipelineError(
            f"{flag} {path}: its weights are stored outside the file, in {', '.join(missing)}, which "
            f"is not in {path.parent}; keep the external data file(s) next to the .onnx file"
        )
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise PipelineError(
            f"{flag} {path}: its weights stored outside the file cannot be read ({first}); export it again"
        ) from None


@dataclass(frozen=True)
class TensorSignature:
    name: str
    dtype: str
    shape: tuple  # ints, or dimension names for dynamic axes ('?' when unnamed)

    def __str__(self) -> str:
        return f"{self.name!r} {self.dtype} [{', '.join(map(str, self.shape))}]"

    def matches(self, other: TensorSignature) -> bool:
        """Same name and type, same rank, and the same size wherever both fix one (dynamic axes may differ)."""
        if self.name != other.name or self.dtype != other.dtype or len(self.shape) != len(other.shape):
            return False
        return all(a == b for a, b in zip(self.shape, other.shape) if isinstance(a, int) and isinstance(b, int))


def signature(model, kind: str) -> list[TensorSignature]:
    """The graph's inputs (without initializers listed as inputs) or outputs."""
    import onnx

    initializers = {init.name for init in model.graph.initializer}
    values = model.graph.input if kind == "inputs" else model.graph.output
    found = []
    for value in values:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown"
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
        found.append(TensorSignature(value.name, dtype, shape))
    return found


def check_pairing(dense, sparse, dense_file: str, sparse_file: str) -> None:
    """The same inputs and outputs: a mismatch is one error naming both sides."""
    for kind in ("inputs", "outputs"):
        a, b = signature(dense, kind), signature(sparse, kind)
        if len(a) != len(b) or not all(x.matches(y) for x, y in zip(a, b)):
            raise PipelineError(
                f"{kind} differ: {dense_file} has {', '.join(map(str, a)) or 'none'}; {sparse_file} "
                f"has {', '.join(map(str, b)) or 'none'}; export both with the same {kind}"
            )


def classifier_io(model, path: str, input_size: list[int] | None) -> tuple[list[int], int]:
    """(C, H, W) of the one image input and the number of classes of the one [N, classes] output."""
    inputs, outputs = signature(model, "inputs"), signature(model, "outputs")
    if len(inputs) != 1 or len(outputs) != 1:
        raise PipelineError(
            f"{path} has {len(inputs)} input(s) and {len(outputs)} output(s); verify checks image "
            "classifiers with one input [N, C, H, W] and one output [N, classes]"
        )
    image, logits = inputs[0], outputs[0]
    if len(image.shape) != 4 or image.dtype != "float32":
        raise PipelineError(
            f"{path} input {image} is not a float32 image batch [N, C, H, W]; verify feeds float32 "
            "images (export FP16 models with float32 inputs and outputs, as the pipeline's FP16 "
            "graphs do)"
        )
    shape = list(image.shape[1:])
    if input_size is not None:
        fixed = [(a, b) for a, b in zip(shape, input_size) if isinstance(a, int)]
        if any(a != b for a, b in fixed):
            raise PipelineError(
                f"--input-size {','.join(map(str, input_size))} does not fit {path} input {image}; "
                "drop --input-size (the ONNX fixes it) or pass the matching size"
            )
        shape = list(input_size)
    if not all(isinstance(d, int) for d in shape):
        raise PipelineError(f"{path} input {image} has dynamic image axes; pass --input-size C,H,W")
    if len(logits.shape) != 2 or not isinstance(logits.shape[1], int):
        raise PipelineError(f"{path} output {logits} is not [N, classes] with a fixed number of classes")
    return shape, int(logits.shape[1])
