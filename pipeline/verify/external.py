"""`verify --dense DENSE --sparse SPARSE --data DIR`: a sparse model made by any tool, checked against its dense model.

No recipe, no training: the input shape and the number of classes come from the ONNX files (or the TensorRT
plans), preprocessing from --input-size/--mean/--std or --model NAME|RECIPE.toml, the data from --data. Before
anything runs or is written every input is checked (pipeline/verify/onnx_files.py): a problem is one error line,
exit 2. Then the sparse model's per-layer 2:4 layout (pipeline/verify/layout.py), accuracy of both models on the
data, paired latency, and the gates of pipeline/verify/assemble.py (the one assembly both verify paths share):
top-1 drop, speed-up (only where the runtime has sparse kernels), the share of MACs in layers that carry 2:4 masks
(--min-masked-coverage) and in layers whose weights are in the layout TensorRT's sparse kernels take
(--min-accelerable-coverage). ONNX files run on ONNX Runtime (no sparse kernels: the speed-up is measured, never
gated); TensorRT plans on TensorRT (pipeline/verify/plans.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import PreprocessConfig, Recipe, apply_override, set_field, validate
from pipeline.verify import layout as layouts
from pipeline.verify.assemble import Settings, Subject, verify_runners
from pipeline.verify.measure import close_runners
from pipeline.verify.onnx_files import check_pairing, classifier_io, load_onnx
from pipeline.verify.pair import Pair
from pipeline.verify.report import Coverage, VerificationReport

PLAN_SUFFIXES = (".plan", ".engine", ".trt")


@dataclass
class FileOptions:
    """What `verify --dense/--sparse` takes (the stage fills it from its flags and the shared model flags)."""

    dense: str
    sparse: str
    sparse_onnx: str | None = None  # with plans: the sparse ONNX for the layout report
    model: str | None = None  # preprocessing (and data, verify settings) from a registered recipe or a .toml
    data: str | None = None
    input_size: str | None = None
    mean: str | None = None
    std: str | None = None
    out: str | None = None
    overrides: list[str] = field(default_factory=list)
    max_top1_drop: float | None = None
    min_speedup: float | None = None
    min_masked_coverage: float | None = None
    min_accelerable_coverage: float | None = None
    iters: int | None = None


# --------------------------------------------------------------------------- checking the inputs
def load_pair(options: FileOptions) -> Pair:
    dense, sparse = Path(options.dense), Path(options.sparse)
    plans = [path.suffix.lower() in PLAN_SUFFIXES for path in (dense, sparse)]
    if plans[0] != plans[1]:
        raise PipelineError(
            f"--dense {dense} and --sparse {sparse} must both be ONNX files or both TensorRT plans "
            f"({', '.join(PLAN_SUFFIXES)})"
        )
    if plans[0]:
        from pipeline.verify.plans import load_plan_pair

        return load_plan_pair(dense, sparse, options)
    if options.sparse_onnx:
        raise PipelineError("--sparse-onnx is for TensorRT plans; with ONNX files the layout comes from --sparse")
    return _load_onnx_pair(dense, sparse, options.input_size)


def input_size_for(model, text: str | None) -> list[int] | None:
    """--input-size as C,H,W; a single size takes the model's channels (3 when its channel axis is dynamic)."""
    if text is None:
        return None
    from pipeline.recipe.resolve import parse_input_size
    from pipeline.verify.onnx_files import signature

    inputs = signature(model, "inputs")
    shape = inputs[0].shape if len(inputs) == 1 else ()
    return parse_input_size(text, shape[1] if len(shape) == 4 and isinstance(shape[1], int) else 3)


def _load_onnx_pair(dense_path: Path, sparse_path: Path, input_size: str | None) -> Pair:
    dense, sparse = load_onnx(dense_path, "--dense"), load_onnx(sparse_path, "--sparse")
    for path, model in ((dense_path, dense), (sparse_path, sparse)):
        if not layouts.has_constant_weights(model):
            raise PipelineError(
                f"{path} has no Conv/Gemm/MatMul with constant weights (they are graph inputs or "
                "computed, not initializers): export with the weights stored in the file "
                "(torch.onnx.export(..., export_params=True))"
            )
    check_pairing(dense, sparse, str(dense_path), str(sparse_path))
    shape, classes = classifier_io(sparse, str(sparse_path), input_size_for(sparse, input_size))
    layout = sparse_layout(dense, sparse, str(dense_path), str(sparse_path), shape)
    return Pair("onnx", dense_path, sparse_path, shape, classes, layout)


def sparse_layout(dense, sparse, dense_file: str, sparse_file: str, shape: list[int]) -> layouts.LayoutReport:
    """The sparse model's per-layer layout, each layer paired with the dense model's (kept weights compared)."""
    dense_layers, _ = layouts.weighted_layers(dense, shape)
    sparse_layers, skipped = layouts.weighted_layers(sparse, shape)
    layouts.pair_layers(dense_layers, sparse_layers, dense_file, sparse_file)
    report = layouts.layout_report(sparse_layers, skipped)
    layouts.compare_kept(report, dense_layers, sparse_layers)
    return report


# --------------------------------------------------------------------------- preprocessing and data
def preprocessing_recipe(options: FileOptions, pair: Pair) -> Recipe:
    """The recipe whose preprocess, data and verify sections drive this run; its shape and classes are the model's."""
    shape = pair.input_shape
    if options.model:
        recipe = _named_recipe(options.model, shape)
    else:
        recipe = Recipe(
            name=pair.sparse.stem,
            arch=f"onnx:{pair.sparse.name}",
            num_classes=pair.num_classes,
            input_shape=list(shape),
            weights="random",
        )
        recipe.preprocess = PreprocessConfig(
            resize=shape[1] if shape[1] < 64 else round(shape[1] / 0.875),
            crop=shape[1],
            mean=[0.0] * shape[0],
            std=[1.0] * shape[0],
            color="L" if shape[0] == 1 else "RGB",
        )
        if options.data not in (None, "synthetic") and (options.mean is None or options.std is None):
            raise PipelineError(
                "--dense/--sparse without --model: pass --mean and --std (the normalisation the "
                "model was trained with, one value per channel) or --model NAME|RECIPE.toml"
            )
    for flag, key, value in (("--mean", "preprocess.mean", options.mean), ("--std", "preprocess.std", options.std)):
        if value is not None:
            set_field(recipe, key, value, f"{flag} {value}")
    _apply_data(recipe, options)
    for assignment in options.overrides:
        apply_override(recipe, assignment)
    recipe.num_classes = pair.num_classes
    recipe.labels = recipe.labels if len(recipe.labels) == pair.num_classes else []
    flags: dict[str, float | int | None] = {
        "max_top1_drop": options.max_top1_drop,
        "min_speedup": options.min_speedup,
        "min_masked_coverage": options.min_masked_coverage,
        "min_accelerable_coverage": options.min_accelerable_coverage,
        "latency_iters": options.iters,
    }
    for key, number in flags.items():
        if number is not None:
            setattr(recipe.verify, key, number)
    return validate(recipe, origin="verify --dense/--sparse")


def _named_recipe(model: str, shape: list[int]) -> Recipe:
    from pipeline.recipe.registry import get_recipe
    from pipeline.recipe.resolve import apply_input_size
    from pipeline.recipe.sources import is_source_spec

    if is_source_spec(model):
        raise PipelineError(
            f"--model {model}: with --dense/--sparse, --model names a registered recipe or a recipe "
            ".toml (for its preprocessing); a model source needs no network here"
        )
    recipe = get_recipe(model)
    if list(recipe.input_shape) != list(shape):
        apply_input_size(recipe, ",".join(map(str, shape)))
    return recipe


def _apply_data(recipe: Recipe, options: FileOptions) -> None:
    if options.data is None:
        if not options.model:
            raise PipelineError(
                "pass --data DIR (an image folder, one class folder per output, in output order), "
                "--data fashion_mnist, or --data synthetic (accuracy not gated)"
            )
        return
    if options.data in ("synthetic", "fashion_mnist"):
        recipe.data.kind = options.data
        return
    folder = Path(options.data)
    if not folder.is_dir():
        raise PipelineError(f"--data {options.data}: no such folder; pass an image folder, fashion_mnist or synthetic")
    split = "val" if (folder / "val").is_dir() else "."
    recipe.data.kind, recipe.data.root = "imagefolder", str(folder)
    recipe.data.train_split = recipe.data.eval_split = split


def class_folders(recipe: Recipe) -> list[str]:
    folder = Path(recipe.data.root) / recipe.data.eval_split
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def evaluation_data(recipe: Recipe, sparse: Path):
    """The evaluation set, after checking that it has as many classes as the model has outputs."""
    from pipeline.data.datasets import FASHION_MNIST_LABELS, build_datasets

    found = {"imagefolder": lambda: class_folders(recipe), "fashion_mnist": lambda: FASHION_MNIST_LABELS}
    if recipe.data.kind in found:
        classes = found[recipe.data.kind]()
        if len(classes) != recipe.num_classes:
            where = (
                Path(recipe.data.root) / recipe.data.eval_split
                if recipe.data.kind == "imagefolder"
                else "Fashion-MNIST"
            )
            raise PipelineError(
                f"--data {where} has {len(classes)} classes but {sparse} outputs {recipe.num_classes}; "
                "pass data with one class folder per model output (in output order)"
            )
    return build_datasets(recipe)


# --------------------------------------------------------------------------- the run
def onnx_runners(pair: Pair, recipe: Recipe) -> dict[str, Any]:
    from pipeline.backends import get_backend

    backend = get_backend("onnxruntime")
    return {"dense": backend.load(pair.dense, recipe), "sparse": backend.load(pair.sparse, recipe)}


def output_paths(options: FileOptions, pair: Pair) -> ArtifactPaths:
    root = Path(options.out) if options.out else Path("engines") / pair.sparse.stem
    if root.exists() and not root.is_dir():
        raise PipelineError(f"--out {root} is a file; pass a folder for the report")
    return ArtifactPaths(root)


def verify_files(options: FileOptions) -> tuple[VerificationReport, dict, ArtifactPaths]:
    """Check the inputs, measure, and return the typed report, raw latencies and where to write them."""
    pair = load_pair(options)
    recipe = preprocessing_recipe(options, pair)
    paths = output_paths(options, pair)
    data = evaluation_data(recipe, pair.sparse)
    runners = pair.runners or onnx_runners(pair, recipe)
    try:
        settings = Settings(recipe.verify, recipe.data.eval_batch_size, dict(vars(recipe.preprocess)))
        layout = pair.layout.to_dict() if pair.layout else None
        report, raw = verify_runners(subject(pair, runners), runners, settings, data, coverage(pair), layout)
    finally:
        close_runners(runners)
    return report, raw, paths


def subject(pair: Pair, runners: dict[str, Any]) -> Subject:
    from pipeline.io import sha256_file

    has_kernels = pair.kind == "tensorrt plan"
    low = max(getattr(runner, "min_batch", 1) for runner in runners.values())
    high = min(getattr(runner, "max_batch", 1 << 30) for runner in runners.values())
    files = {"dense": pair.dense, "sparse": pair.sparse}
    return Subject(
        model=pair.sparse.stem,
        backend="tensorrt" if has_kernels else "onnxruntime",
        backend_reason=f"--dense/--sparse are {'TensorRT plans' if has_kernels else 'ONNX files'}",
        has_sparse_kernels=has_kernels,
        engines={variant: str(path) for variant, path in files.items()},
        engine_sha256={variant: sha256_file(path) for variant, path in files.items()},
        input_shape=list(pair.input_shape),
        batch_range=(low, high),
        inputs={"kind": pair.kind, "dense": str(pair.dense), "sparse": str(pair.sparse)},
        plan_layers=pair.plan_layers,
        bound=plan_bound(runners),
    )


def plan_bound(runners):
    """The speed-up bound of two plans: sparse-kernel evidence from the sparse plan's inspector (tactic names),
    modules from the ONNX node names in its Metadata (pipeline/verify/bound.py)."""
    from pipeline.backends.tensorrt.sparsity import OnnxNameMap, sparse_layer_report
    from pipeline.verify.bound import bound_section

    names = OnnxNameMap()
    sparse = runners["sparse"]
    evidence = sparse_layer_report([], sparse.inspector_json(), names) if hasattr(sparse, "inspector_json") else None
    return lambda times, measured: bound_section(runners, times, names, evidence, measured)


def coverage(pair: Pair) -> Coverage:
    """Coverage from the sparse model's weights (its layout report) and, for plans, the inspector's tactics."""
    layout, plan = pair.layout, pair.plan_layers or {}
    total = layout.total_macs if layout else 0
    layers = [layer.to_dict() for layer in layout.layers] if layout else []
    for entry in layers:
        entry["mac_fraction"] = entry["macs"] / max(total, 1)
    return Coverage(
        basis="layout",
        total_macs=total,
        masked_mac_fraction=layout.masked_mac_fraction if layout else None,
        accelerable_mac_fraction=layout.accelerable_mac_fraction if layout else None,
        accelerable_note="from the sparse model's weights (pipeline/verify/layout.py)"
        if layout
        else "no ONNX for the layout report (pass --sparse-onnx with plans)",
        sparse_kernel_mac_fraction=plan.get("sparse_kernel_mac_fraction"),
        sparse_kernel_note=plan.get("note", "ONNX Runtime has no sparse kernels: see the layout report"),
        masked_layers=sum(entry["masked"] for entry in layers),
        skipped_layers=sum(not entry["masked"] for entry in layers),
        exported_nm_layers="n/a",
        layers=layers,
    )
