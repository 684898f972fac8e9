"""Write Triton `config.pbtxt` files and check them offline.

The check parses a config with the ModelConfig protobuf that the `tritonclient` package
ships (the same schema tritonserver reads) and cross-checks it against the model file in
the version folder: tensor names, data types and dims, batch axis, file names, labels.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.package.tensors import TensorSpec, specs_from_metadata, specs_from_onnx

VERSION = "1"
ONNX_FILENAME = "model.onnx"
PYTHON_MODEL_FILENAME = "model.py"
LABELS_FILENAME = "labels.txt"
PLAN_METADATA_SUFFIX = ".json"  # engine metadata copied next to each plan: <plan>.json
_PB2 = "tritonclient.grpc.model_config_pb2"


def model_config_pb2():
    """tritonclient's generated ModelConfig module, imported lazily.

    `tritonclient.grpc/__init__` needs grpcio, which only the client calls need; the
    generated schema module needs protobuf alone, so it is loaded from its file when the
    package import fails for want of grpc.
    """
    if _PB2 in sys.modules:
        return sys.modules[_PB2]
    try:
        from tritonclient.grpc import model_config_pb2 as module  # noqa: PLC0415

        return module
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "tritonclient":
            raise PipelineError(
                "checking config.pbtxt needs the tritonclient package: "
                "pip install 'tritonclient>=2.40' (or pip install -e '.[triton]')"
            ) from None
    except RuntimeError:  # "The installation does not include grpc support"
        pass
    spec = importlib.util.find_spec("tritonclient")  # importable: the import above failed inside it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("internal: tritonclient failed to import from within but is no package to find")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise PipelineError(
            f"tritonclient at {path.parent.parent} has no grpc/model_config_pb2.py; "
            "reinstall it: pip install --force-reinstall 'tritonclient>=2.40'"
        )
    module_spec = importlib.util.spec_from_file_location(_PB2, path)
    if module_spec is None or module_spec.loader is None:
        raise RuntimeError(f"internal: no module spec with a loader for {path}, a .py file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # protobuf runtime/gencode version mismatch
        raise PipelineError(
            f"cannot load Triton's ModelConfig schema from {path} ({str(exc).splitlines()[0][:160]}); "
            "install a protobuf version that matches tritonclient"
        ) from None
    sys.modules[_PB2] = module
    return module


@dataclass
class ServedModel:
    """Everything one config.pbtxt says."""

    name: str
    kind: str  # "plan" | "onnx" | "python" (Python backend: model.py in the version folder)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int
    instance_count: int
    instance_kind: str  # KIND_GPU | KIND_CPU
    cc_model_filenames: dict[str, str] = field(default_factory=dict)  # plans only
    default_model_filename: str = ""  # plans: the file for a GPU not in cc_model_filenames (ampere_plus plans)
    label_output: str | None = None  # output that carries label_filename
    comment: str = ""


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def render_config(model: ServedModel) -> str:
    """Text format of one model's config.pbtxt (written by hand for readability, checked by parsing)."""
    lines = [f"# {line}" for line in model.comment.splitlines()] if model.comment else []
    lines.append(f'name: "{model.name}"')
    if model.kind == "plan":
        lines.append('platform: "tensorrt_plan"')
        if model.default_model_filename:
            lines.append(f'default_model_filename: "{model.default_model_filename}"')
    elif model.kind == "python":
        lines.append('backend: "python"')
    else:
        lines.append('backend: "onnxruntime"')
        lines.append(f'default_model_filename: "{ONNX_FILENAME}"')
    lines.append(f"max_batch_size: {model.max_batch_size}")
    offset = 1 if model.max_batch_size > 0 else 0  # Triton's dims exclude the batch axis

    lines.append("input [")
    for i, spec in enumerate(model.inputs):
        dims = spec.dims[offset:]
        lines += ["  {", f'    name: "{spec.name}"', f"    data_type: {spec.data_type}"]
        if len(dims) == 3:
            lines.append("    format: FORMAT_NCHW")
        lines += [f"    dims: {_dims(dims)}", "  }" + ("," if i < len(model.inputs) - 1 else "")]
    lines.append("]")
    lines.append("output [")
    for i, spec in enumerate(model.outputs):
        lines += [
            "  {",
            f'    name: "{spec.name}"',
            f"    data_type: {spec.data_type}",
            f"    dims: {_dims(spec.dims[offset:])}",
        ]
        if spec.name == model.label_output:
            lines.append(f'    label_filename: "{LABELS_FILENAME}"')
        lines.append("  }" + ("," if i < len(model.outputs) - 1 else ""))
    lines.append("]")
    if model.cc_model_filenames:
        lines.append("cc_model_filenames [")
        items = sorted(model.cc_model_filenames.items())
        for i, (cc, filename) in enumerate(items):
            lines.append(f'  {{ key: "{cc}" value: "{filename}" }}' + ("," if i < len(items) - 1 else ""))
        lines.append("]")
    if model.max_batch_size > 0:
        lines.append("dynamic_batching {")
        if model.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_dims(tuple(model.preferred_batch_sizes))}")
        lines += [f"  max_queue_delay_microseconds: {model.max_queue_delay_us}", "}"]
    lines += ["instance_group [", f"  {{ count: {model.instance_count} kind: {model.instance_kind} }}", "]"]
    return "\n".join(lines) + "\n"


def parse_config(path: Path) -> Any:
    """config.pbtxt -> inference.ModelConfig message; a syntax or schema error is a PipelineError."""
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    from pipeline.io import readable_file

    path = readable_file(path, "Triton config", "rerun `python -m pipeline package`")
    try:
        config = text_format.Parse(path.read_bytes().decode("utf-8"), pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0][:160]
        raise PipelineError(
            f"{path} is not a valid Triton ModelConfig ({reason}); rerun `python -m pipeline package`"
        ) from None
    if not config.name or not (config.platform or config.backend):
        raise PipelineError(
            f"{path} is not a complete Triton ModelConfig (no name, platform or backend); rerun "
            "`python -m pipeline package`"
        )
    return config


def _type_name(value: int) -> str:
    return model_config_pb2().DataType.Name(value)


def model_file_specs(version_dir: Path, config: Any) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
    """filename -> (inputs, outputs) of every model file config.pbtxt points at."""
    where = version_dir.parent / "config.pbtxt"
    found: dict[str, tuple[list[TensorSpec], list[TensorSpec]]] = {}
    if config.platform == "tensorrt_plan":
        filenames = sorted(set(config.cc_model_filenames.values())) or [config.default_model_filename or "model.plan"]
        for filename in filenames:
            plan = version_dir / filename
            meta_path = version_dir / (filename + PLAN_METADATA_SUFFIX)
            if not plan.is_file():
                raise PipelineError(f"{where} names {filename}, but {plan} does not exist; rerun package")
            if not meta_path.is_file():
                raise PipelineError(
                    f"{meta_path} (engine metadata) is missing, so {plan.name} cannot be cross-checked; rerun package"
                )
            from pipeline.io import read_json

            found[filename] = specs_from_metadata(read_json(meta_path), str(meta_path))
    elif config.backend == "onnxruntime" or config.platform == "onnxruntime_onnx":
        filename = config.default_model_filename or ONNX_FILENAME
        found[filename] = specs_from_onnx(version_dir / filename)
    elif config.backend == "python":
        if not (version_dir / PYTHON_MODEL_FILENAME).is_file():
            raise PipelineError(
                f"{where}: Python-backend model without {version_dir / PYTHON_MODEL_FILENAME}; rerun package"
            )
        if (version_dir / ONNX_FILENAME).is_file():  # a model.py that runs this ONNX through ONNX Runtime
            found[ONNX_FILENAME] = specs_from_onnx(version_dir / ONNX_FILENAME)
    elif config.platform == "ensemble":
        pass  # checked against its composing models by check_ensemble
    else:
        raise PipelineError(
            f"{where}: platform {config.platform!r} / backend {config.backend!r} is not one this "
            "pipeline writes (tensorrt_plan, onnxruntime, python or ensemble)"
        )
    return found


def _check_tensors(
    kind: str, declared: list[Any], actual: list[TensorSpec], batched: bool, where: Path, filename: str
) -> None:
    names = [t.name for t in declared]
    actual_by_name = {t.name: t for t in actual}
    if sorted(names) != sorted(actual_by_name):
        raise PipelineError(
            f"{where}: {kind} names {names} do not match {filename} ({sorted(actual_by_name)}); "
            "rerun package instead of editing config.pbtxt"
        )
    for tensor in declared:
        spec = actual_by_name[tensor.name]
        if _type_name(tensor.data_type) != spec.data_type:
            raise PipelineError(
                f"{where}: {kind} {tensor.name!r} is {_type_name(tensor.data_type)}, {filename} has "
                f"{spec.data_type}; rerun package"
            )
        expected = spec.dims
        if batched:
            if not expected or expected[0] != -1:
                raise PipelineError(
                    f"{where}: max_batch_size > 0 needs a dynamic batch axis, but {kind} "
                    f"{tensor.name!r} of {filename} has shape {list(expected)}; export with a "
                    "dynamic batch axis (the export stage does)"
                )
            expected = expected[1:]
        dims = tuple(tensor.dims)
        if dims != tuple(expected):
            raise PipelineError(
                f"{where}: {kind} {tensor.name!r} has dims {list(dims)}, {filename} has "
                f"{list(expected)}{' (batch axis dropped)' if batched else ''}; rerun package"
            )


def check_model_dir(model_dir: Path) -> Any:
    """Parse `model_dir/config.pbtxt` and cross-check it with the model files; returns the config."""
    model_dir = Path(model_dir)
    where = model_dir / "config.pbtxt"
    config = parse_config(where)
    if config.name != model_dir.name:
        raise PipelineError(
            f"{where}: name {config.name!r} differs from its folder {model_dir.name!r}; Triton refuses that"
        )
    if config.max_batch_size < 0:
        raise PipelineError(
            f"{where}: max_batch_size {config.max_batch_size} is negative; set serve.max_batch_size >= 0"
        )
    batched = config.max_batch_size > 0
    version_dir = model_dir / VERSION
    if not version_dir.is_dir():
        raise PipelineError(f"{model_dir} has no version folder {VERSION}/; rerun package")
    for filename, (inputs, outputs) in model_file_specs(version_dir, config).items():
        _check_tensors("input", list(config.input), inputs, batched, where, filename)
        _check_tensors("output", list(config.output), outputs, batched, where, filename)
    pb2 = model_config_pb2()
    if config.platform == "tensorrt_plan":
        kinds = {group.kind for group in config.instance_group}
        if kinds - {pb2.ModelInstanceGroup.KIND_GPU}:
            raise PipelineError(f"{where}: a TensorRT plan runs on GPUs only; instance_group kind must be KIND_GPU")
    if config.HasField("dynamic_batching"):
        too_big = [size for size in config.dynamic_batching.preferred_batch_size if size > config.max_batch_size]
        if too_big:
            raise PipelineError(
                f"{where}: preferred_batch_size {too_big} exceeds max_batch_size "
                f"{config.max_batch_size}; fix serve.preferred_batch_sizes"
            )
    for output in config.output:
        if output.label_filename:
            labels = model_dir / output.label_filename
            if not labels.is_file():
                raise PipelineError(f"{where}: label_filename {output.label_filename!r} does not exist in {model_dir}")
            count = len(labels.read_text().splitlines())
            classes = output.dims[-1] if output.dims else None
            if classes is not None and classes > 0 and count != classes:
                raise PipelineError(
                    f"{labels} has {count} lines, output {output.name!r} has {classes} classes; fix the recipe's labels"
                )
    return config


def check_repository(root: Path) -> dict[str, Any]:
    """Check every model folder (a folder with config.pbtxt) of a Triton repository."""
    root = Path(root)
    models = sorted(p for p in root.iterdir() if (p / "config.pbtxt").is_file()) if root.is_dir() else []
    if not models:
        raise PipelineError(f"{root} holds no model folder with a config.pbtxt; run `python -m pipeline package`")
    configs = {model_dir.name: check_model_dir(model_dir) for model_dir in models}
    for name, config in configs.items():
        if config.platform == "ensemble":
            check_ensemble(root / name / "config.pbtxt", config, configs)
    return configs


def check_ensemble(where: Path, config: Any, configs: dict[str, Any]) -> None:
    """Every step names a model of the repository and tensors it has; every ensemble tensor is wired up,
    and each ensemble output has the data type and dims of the step output that produces it."""
    steps = list(config.ensemble_scheduling.step)
    if not steps:
        raise PipelineError(f"{where}: an ensemble needs ensemble_scheduling steps; rerun package")
    consumed, produced = set(), {}
    for step in steps:
        model = configs.get(step.model_name)
        if model is None:
            raise PipelineError(f"{where}: step model {step.model_name!r} is not in the repository; rerun package")
        model_inputs = {tensor.name for tensor in model.input}
        model_outputs = {tensor.name: tensor for tensor in model.output}
        for key, value in step.input_map.items():
            if key not in model_inputs:
                raise PipelineError(
                    f"{where}: {step.model_name} has no input {key!r} (it has {sorted(model_inputs)}); rerun package"
                )
            consumed.add(value)
        for key, value in step.output_map.items():
            if key not in model_outputs:
                raise PipelineError(
                    f"{where}: {step.model_name} has no output {key!r} (it has {sorted(model_outputs)}); rerun package"
                )
            produced[value] = model_outputs[key]
    for tensor in config.input:
        if tensor.name not in consumed:
            raise PipelineError(f"{where}: ensemble input {tensor.name!r} feeds no step; rerun package")
    for tensor in config.output:
        source = produced.get(tensor.name)
        if source is None:
            raise PipelineError(f"{where}: no step produces ensemble output {tensor.name!r}; rerun package")
        if (source.data_type, list(source.dims)) != (tensor.data_type, list(tensor.dims)):
            raise PipelineError(
                f"{where}: output {tensor.name!r} is {_type_name(tensor.data_type)} "
                f"{list(tensor.dims)}, its step produces {_type_name(source.data_type)} "
                f"{list(source.dims)}; rerun package"
            )
