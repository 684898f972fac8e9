"""Assemble the Triton model repositories of a model (dense and sparse side by side).

Two flavours, both written by `package`:

    triton/       production: TensorRT plans (tensorrt_plan) or ONNX (onnxruntime backend)
    triton_cpu/   CPU: each model a Python-backend model.py running the ONNX through ONNX Runtime,
                  for the tritonserver of the nvidia-pytriton wheel (Python backend only)

and in each:

    <model>_dense/config.pbtxt, labels.txt, preprocessing.json, 1/model.onnx | 1/model.sm<cc>.plan | 1/model.py
    <model>_sparse/...
    <model>_preprocess/       encoded images (BYTES) -> input tensor (pipeline/package/ensembles.py)
    <model>_dense_e2e/        ensemble: preprocess -> dense, so clients send raw image files
    <model>_sparse_e2e/

The repository is built in a hidden staging folder of the stage's transaction, every config is checked, and only
then is it swapped in; the previous one is removed only once the stage (manifest.json included) has succeeded, so a
failed package run leaves the previous repositories intact.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import transaction
from pipeline.errors import PipelineError
from pipeline.io import sha256_file, write_json, write_text
from pipeline.package.ensembles import write_preprocess_and_ensembles
from pipeline.package.model_config import (
    LABELS_FILENAME,
    ONNX_FILENAME,
    PLAN_METADATA_SUFFIX,
    PYTHON_MODEL_FILENAME,
    VERSION,
    ServedModel,
    check_model_dir,
    check_repository,
    render_config,
)
from pipeline.package.plans import VARIANTS, PlanEngine, find_plans, plan_filename, served_filenames
from pipeline.package.serving import labels_text, preprocessing
from pipeline.package.tensors import TensorSpec, onnx_external_files, specs_from_onnx
from pipeline.paths import ArtifactPaths, relative_to_root
from pipeline.recipe.config import Recipe

FORMATS = ("auto", "plan", "onnx")
FLAVOURS = ("production", "cpu")
PYTHON_ONNX_TEMPLATE = Path(__file__).parent / "python_models" / "onnx_model.py"


def repository_dir(paths: ArtifactPaths, flavour: str) -> Path:
    """engines/<model>/triton (production) or engines/<model>/triton_cpu (CPU Python backend)."""
    if flavour not in FLAVOURS:
        raise PipelineError(f"flavour {flavour!r}: expected one of {', '.join(FLAVOURS)}")
    return paths.triton if flavour == "production" else paths.triton_cpu


@dataclass
class RepositoryPlan:
    """Which model files go into the repository, and why."""

    kind: str  # plan | onnx
    reason: str
    onnx: dict[str, Path] = field(default_factory=dict)
    plans: dict[str, list[PlanEngine]] = field(default_factory=dict)


def choose_sources(recipe: Recipe, paths: ArtifactPaths, fmt: str) -> RepositoryPlan:
    """Plans when both variants have one (an A/B of a plan against ONNX would compare backends), else ONNX."""
    if fmt not in FORMATS:
        raise PipelineError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    onnx = {"dense": paths.dense_onnx, "sparse": paths.sparse_onnx}
    plans = (
        find_plans(
            paths.root, paths.build_report, recipe.build.precision, triton_release=recipe.serve.triton_release or None
        )
        if fmt != "onnx"
        else {}
    )
    have = [variant for variant in VARIANTS if plans.get(variant)]
    if fmt == "plan" or (fmt == "auto" and len(have) == len(VARIANTS)):
        missing = [variant for variant in VARIANTS if variant not in have]
        if missing:
            raise PipelineError(
                f"--format plan: no TensorRT plan for {', '.join(missing)} in {paths.root}; run "
                f"`python -m pipeline build --model {recipe.name}` on a GPU machine or use --format onnx"
            )
        ccs = sorted({engine.compute_capability for variant in VARIANTS for engine in plans[variant]})
        return RepositoryPlan("plan", f"TensorRT plans for compute capability {', '.join(ccs)}", plans=plans)
    if fmt == "onnx":
        reason = "--format onnx"
    elif have:
        reason = f"ONNX: only {have[0]} has a TensorRT plan, and an A/B pair should run on one backend"
    else:
        reason = "ONNX: no TensorRT plan found (the build stage writes them on a GPU machine with TensorRT)"
    for path in onnx.values():
        if not path.is_file():
            raise PipelineError(f"{path} does not exist; run `python -m pipeline export --model {recipe.name}` first")
    return RepositoryPlan("onnx", reason, onnx=onnx)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _label_output(recipe: Recipe, outputs: list[TensorSpec], source: str) -> TensorSpec:
    named = [spec for spec in outputs if spec.name == recipe.export.output_name]
    output = named[0] if named else (outputs[0] if len(outputs) == 1 else None)
    if output is None:
        raise PipelineError(
            f"{source} has outputs {[s.name for s in outputs]} and none is "
            f"{recipe.export.output_name!r} (export.output_name); re-export the model"
        )
    if not output.dims or output.dims[-1] != recipe.num_classes:
        raise PipelineError(
            f"{source}: output {output.name!r} has shape {list(output.dims)}, expected "
            f"[-1, {recipe.num_classes}] for {recipe.num_classes} classes; re-export the model"
        )
    return output


def _write_onnx_model(model_dir: Path, source: Path) -> tuple[list[TensorSpec], list[TensorSpec], list[str]]:
    inputs, outputs = specs_from_onnx(source)
    version_dir = model_dir / VERSION
    _copy(source, version_dir / ONNX_FILENAME)
    files = [ONNX_FILENAME]
    for location in onnx_external_files(source):
        data = source.parent / location
        if not data.is_file():
            raise PipelineError(f"{source} keeps weights in {data}, which is missing; rerun the export stage")
        _copy(data, version_dir / location)
        files.append(location)
    return inputs, outputs, files


def _write_plans(
    model_dir: Path, engines: list[PlanEngine], root: Path, recipe: Recipe
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    version_dir = model_dir / VERSION
    specs = None
    for engine in engines:
        inputs, outputs = engine.tensor_specs(root)
        if specs is not None and specs != (inputs, outputs):
            raise PipelineError(
                f"{engine.path}: its inputs/outputs differ from the other {engine.variant} plans; "
                "rebuild all plans from the same ONNX"
            )
        specs = (inputs, outputs)
        limit = engine.max_batch() or recipe.build.max_batch
        if recipe.serve.max_batch_size > limit:
            raise PipelineError(
                f"serve.max_batch_size {recipe.serve.max_batch_size} exceeds the batch range of "
                f"{engine.path} (max {limit}); rebuild with build.max_batch >= it or lower "
                "serve.max_batch_size"
            )
        if (engine.min_batch() or 1) > 1:
            raise PipelineError(
                f"{engine.path} accepts batches from {engine.min_batch()}, but Triton's dynamic "
                "batcher also sends single requests; rebuild with build.min_batch=1"
            )
        filename = plan_filename(engine.compute_capability)
        _copy(engine.path, version_dir / filename)
        metadata = {
            **engine.metadata,
            "source": relative_to_root(engine.path, root),
            "source_sha256": sha256_file(engine.path),
            "compute_capability": engine.compute_capability,
            "inputs": [{"name": s.name, "dtype": s.data_type, "shape": list(s.dims)} for s in inputs],
            "outputs": [{"name": s.name, "dtype": s.data_type, "shape": list(s.dims)} for s in outputs],
        }
        write_json(version_dir / (filename + PLAN_METADATA_SUFFIX), metadata)
    if specs is None:
        raise RuntimeError("no plans to write")  # find_plans never returns an empty list
    return specs[0], specs[1]


def write_repositories(
    recipe: Recipe, paths: ArtifactPaths, fmt: str = "auto", onnx_device: str = "cpu"
) -> dict[str, dict[str, Any]]:
    """Write both flavours (FLAVOURS); returns flavour -> summary for the manifest.

    Both are assembled and checked in hidden staging folders of the stage's transaction first, then swapped in
    (pipeline/transaction.py: the previous folders stay until the stage commits), so a failure at any point of the
    stage, the manifest's write included, leaves the previous repositories as they were.
    """
    from pipeline.data.preprocess_choice import ensure_choice

    ensure_choice(recipe, paths)  # preprocessing.json follows the transform train-masks measured
    current = transaction.active()
    if current is None:  # called outside a stage: a set of its own
        with transaction.Transaction(paths.root) as own:
            return _write_and_swap(own, recipe, paths, fmt, onnx_device)
    return _write_and_swap(current, recipe, paths, fmt, onnx_device)


def _write_and_swap(
    current: transaction.Transaction, recipe: Recipe, paths: ArtifactPaths, fmt: str, onnx_device: str
) -> dict[str, dict[str, Any]]:
    summaries = {
        flavour: _stage_repository(
            recipe, paths, fmt, onnx_device, flavour, current.new_folder(repository_dir(paths, flavour))
        )
        for flavour in FLAVOURS
    }
    for flavour in FLAVOURS:
        current.swap_folder(repository_dir(paths, flavour))
    return summaries


def _stage_repository(
    recipe: Recipe, paths: ArtifactPaths, fmt: str, onnx_device: str, flavour: str, staging: Path
) -> dict[str, Any]:
    """One flavour's repository in STAGING (a staging folder of the transaction), checked; returns its summary.

    The CPU flavour always serves the ONNX files, through the Python backend on KIND_CPU.
    """
    if onnx_device not in ("cpu", "gpu"):
        raise PipelineError(f"--onnx-device {onnx_device}: expected cpu or gpu")
    sources = choose_sources(recipe, paths, fmt if flavour == "production" else "onnx")
    kind = sources.kind if flavour == "production" else "python"
    summary: dict[str, Any] = {
        "format": kind,
        "reason": sources.reason
        if flavour == "production"
        else "CPU flavour: Python-backend models running the ONNX through ONNX Runtime",
        "models": {},
    }
    served_models: dict[str, ServedModel] = {}
    for variant in VARIANTS:
        name = f"{recipe.name}_{variant}"
        model_dir = staging / name
        if sources.kind == "plan":
            engines = sources.plans[variant]
            inputs, outputs = _write_plans(model_dir, engines, paths.root, recipe)
            cc_files, default_file = served_filenames(engines)
            files = sorted(set(cc_files.values()))
            source = ", ".join(relative_to_root(engine.path, paths.root) for engine in engines)
            instance_kind = "KIND_GPU"
        else:
            source_path = sources.onnx[variant]
            inputs, outputs, files = _write_onnx_model(model_dir, source_path)
            cc_files, default_file = {}, ""
            source = relative_to_root(source_path, paths.root)
            instance_kind = "KIND_GPU" if onnx_device == "gpu" and kind == "onnx" else "KIND_CPU"
        if kind == "python":
            _copy(PYTHON_ONNX_TEMPLATE, model_dir / VERSION / PYTHON_MODEL_FILENAME)
            files.append(PYTHON_MODEL_FILENAME)
        if len(inputs) != 1:
            raise PipelineError(f"{source} has inputs {[s.name for s in inputs]}; an image classifier has one")
        output = _label_output(recipe, outputs, source)
        served = ServedModel(
            name=name,
            kind=kind,
            inputs=inputs,
            outputs=outputs,
            max_batch_size=recipe.serve.max_batch_size,
            preferred_batch_sizes=list(recipe.serve.preferred_batch_sizes),
            max_queue_delay_us=recipe.serve.max_queue_delay_us,
            instance_count=recipe.serve.instance_count,
            instance_kind=instance_kind,
            cc_model_filenames=cc_files,
            default_model_filename=default_file,
            label_output=output.name,
            comment=f"{variant} {recipe.name}, from {source}.\n"
            "Written by `python -m pipeline package`; rerun it instead of editing this file.",
        )
        write_text(model_dir / "config.pbtxt", render_config(served))
        write_text(model_dir / LABELS_FILENAME, labels_text(recipe))
        write_json(model_dir / "preprocessing.json", preprocessing(recipe, inputs[0], output))
        check_model_dir(model_dir)
        served_models[variant] = served
        summary["models"][name] = {
            "variant": variant,
            "kind": kind,
            "source": source,
            "files": [f"{VERSION}/{f}" for f in files],
            "instance_kind": instance_kind,
            "compute_capabilities": sorted(cc_files),
            "built_on": sorted({_gpu_name(e.metadata) for e in sources.plans.get(variant, [])} - {""}),
        }
    summary["models"].update(write_preprocess_and_ensembles(staging, recipe, served_models))
    check_repository(staging)
    return summary


def _gpu_name(meta: dict[str, Any]) -> str:
    for key in ("gpu_name", "device_name"):
        if isinstance(meta.get(key), str):
            return meta[key]
    for key in ("gpu", "device"):
        value = meta.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return value["name"]
    return ""
