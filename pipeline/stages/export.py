"""`export`: dense.onnx and sparse.onnx (plus FP16 variants), checked before anything is written.

Checks: onnx.checker (full), N:M in TensorRT layout for every masked layer of the sparse
graphs, kept weights equal to the dense graph's, ONNX Runtime output against PyTorch.
Results go to export.json; the ONNX files are written only when every check passes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from pipeline.declaration import MODEL, PREPROCESS_CHOICE, StageDeclaration, fp16_exported, int8, record, when
from pipeline.errors import PipelineError
from pipeline.export.onnx import (
    TOLERANCES,
    check_model,
    check_sparse_layers,
    compare_with_torch,
    effective_opset,
    graph_for,
    other_initializers_differ,
)
from pipeline.export.report import ExportReport
from pipeline.io import atomic_path
from pipeline.masks.artifact import MaskArtifact
from pipeline.masks.bake_report import BakeReport
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import InputSpec, Recipe
from pipeline.recipe.weight_files import read_state_dict
from pipeline.recipe.weights import build_network, dense_state_dict, load_state_dict_strict
from pipeline.records import file_record

DECLARATION = StageDeclaration(
    help="write dense/sparse ONNX (FP32 and FP16)",
    reads=("sparse_weights", "masks", record("bake_report"), when(int8, PREPROCESS_CHOICE)),
    writes=(
        "config",
        "dense_onnx",
        "sparse_onnx",
        when(fp16_exported, "dense_onnx_fp16", "sparse_onnx_fp16"),
        when(int8, "int8_onnx"),
        "export_report",
    ),
    recipe=(*MODEL, "weights", "export", "build.precision", "masks.n", "masks.m", when(int8, "data", "preprocess")),
    data=when(int8),  # the INT8 calibration images
    weights=True,
    in_engine=True,
)


@dataclass
class Options:
    # --no-fp16 stands for export.fp16=false: applied to the recipe before validation, so config.json says so
    fp16: bool | None = field(default=None, metadata={"recipe": "export.fp16", "flag": "--no-fp16"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-fp16",
        dest="fp16",
        action="store_const",
        const=False,
        default=None,
        help="skip the FP16 variants (export.fp16=false)",
    )


def running_statistics_of(state: dict, model) -> dict:
    """The BatchNorm running statistics in `state` (what bake's re-estimation changed)."""
    from pipeline.masks.batchnorm import running_statistics_keys

    return {key: state[key] for key in running_statistics_keys(model) if key in state}


@dataclass
class Inputs:
    """What export reads, each checked where it is loaded (records, sha256, shapes, finite values)."""

    dense_state: dict
    source: str
    dense_model: torch.nn.Module
    sparse_state: dict
    sparse_model: torch.nn.Module
    baked: BakeReport
    masked: list[str]
    n: int
    m: int


def load_inputs(recipe: Recipe, paths: ArtifactPaths) -> Inputs:
    dense_state, source = dense_state_dict(recipe, paths)
    dense_model = build_network(recipe)
    load_state_dict_strict(dense_model, dense_state, source)
    baked = BakeReport.load(paths.bake_report, recipe.name)
    baked.checked(paths.sparse_weights)
    baked.checked(paths.masks)
    sparse_state = read_state_dict(paths.sparse_weights)
    sparse_model = build_network(recipe)
    load_state_dict_strict(sparse_model, sparse_state, f"sparse weights {paths.sparse_weights}")
    artifact = MaskArtifact.load(paths.masks)
    if artifact.meta.get("permutations"):
        from pipeline.masks.methods import dense_for_artifact

        # masks found on channel-permuted weights belong to those (functionally equal) weights: export
        # the dense graph from them too, so dense and sparse graphs differ only in the pruned weights
        dense_model.load_state_dict(dense_for_artifact(dense_state, artifact))
        source += " (channel-permuted as recorded in masks.pt)"
    n, m = (artifact.layers[0].n, artifact.layers[0].m) if artifact.layers else (recipe.masks.n, recipe.masks.m)
    return Inputs(
        dense_state,
        source,
        dense_model.eval(),
        sparse_state,
        sparse_model.eval(),
        baked,
        [layer.name for layer in artifact.layers],
        n,
        m,
    )


def check_references(recipe: Recipe, inputs: Inputs, protos: dict, opset: int) -> dict:
    """What the sparse graphs are checked against: the dense graph, or, when bake re-estimated the BatchNorm
    statistics (folded into the conv weights and biases by the exporter), a dense graph carrying those same
    statistics, written nowhere; so the checks stay bit-exact in both cases."""
    references = {precision: protos[("dense", precision)] for _, precision in protos}
    if inputs.baked.batchnorm_reestimated:
        reference_model = build_network(recipe)
        reference_model.load_state_dict(inputs.dense_model.state_dict())
        reference_model.load_state_dict(running_statistics_of(inputs.sparse_state, reference_model), strict=False)
        reference_model.eval()
        for precision in references:
            references[precision] = graph_for(reference_model, InputSpec.of(recipe), opset, precision)
        print(
            "note: bake re-estimated the BatchNorm statistics (masks.bn_reestimate_images): the sparse graphs are "
            "checked against the dense weights with those statistics"
        )
    return references


def check_graphs(
    recipe: Recipe, inputs: Inputs, protos: dict, variants: list, opset: int
) -> tuple[dict, dict, list[str]]:
    """Every graph against PyTorch, and the sparse ones' N:M and kept weights: (files, layer checks, problems)."""
    cfg = recipe.export
    references_for_check = check_references(recipe, inputs, protos, opset)
    batch = torch.randn(4, *recipe.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        references = {"dense": inputs.dense_model(batch).numpy(), "sparse": inputs.sparse_model(batch).numpy()}
    problems, files, layer_checks = [], {}, {}
    for (kind, precision), proto in protos.items():
        comparison = compare_with_torch(proto, references[kind], batch.numpy(), precision)
        path = next(p for k, pr, _, p in variants if k == kind and pr == precision)
        files[path.name] = {
            "variant": kind,
            "precision": precision,
            "opset": opset,
            "ort_vs_torch": comparison,
            "inputs": [{"name": cfg.input_name, "dtype": "float32", "shape": ["batch", *recipe.input_shape]}],
            "outputs": [{"name": cfg.output_name, "dtype": "float32", "shape": ["batch", recipe.num_classes]}],
        }
        if not comparison["ok"]:
            problems.append(
                f"{path.name}: ONNX Runtime differs from PyTorch by {comparison['max_abs_diff']:.3g} "
                f"(allowed {comparison['allowed']:.3g})"
            )
        if kind == "sparse":
            checks = check_sparse_layers(
                references_for_check[precision], proto, inputs.masked, inputs.sparse_state, inputs.n, inputs.m
            )
            layer_checks[precision] = checks
            masked_inits = {check["initializer"] for check in checks if check.get("initializer") is not None}
            differ = other_initializers_differ(references_for_check[precision], proto, masked_inits)
            files[path.name]["unmasked_initializers_differing"] = differ
            problems += [
                f"{path.name} layer {check['layer']}: {check['problem']}" for check in checks if not check["ok"]
            ]
            if differ:
                problems.append(
                    f"{path.name}: {len(differ)} unmasked initializers differ from the dense graph "
                    f"(e.g. {differ[0]}); sparse.pt and the dense weights do not belong together"
                )
    return files, layer_checks, problems


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    cfg = recipe.export
    started = time.time()
    inputs = load_inputs(recipe, paths)
    opset = effective_opset(cfg.opset)
    if opset != cfg.opset:
        print(f"note: export.opset={cfg.opset} raised to {opset} (the torch.export-based exporter starts at {opset})")
    variants = [
        ("dense", "fp32", inputs.dense_model, paths.dense_onnx),
        ("sparse", "fp32", inputs.sparse_model, paths.sparse_onnx),
    ]
    if cfg.fp16:
        variants += [
            ("dense", "fp16", inputs.dense_model, paths.dense_onnx_fp16),
            ("sparse", "fp16", inputs.sparse_model, paths.sparse_onnx_fp16),
        ]
    protos = {}
    for kind, precision, model, path in variants:
        print(f"exporting {path.name} ...", flush=True)
        proto = graph_for(model, InputSpec.of(recipe), opset, precision)
        check_model(proto)
        protos[(kind, precision)] = proto
    files, layer_checks, problems = check_graphs(recipe, inputs, protos, variants, opset)
    if problems:
        raise PipelineError(
            f"export check failed: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            + "; nothing written; re-run bake for these dense weights"
        )
    write_outputs(recipe, paths, inputs, protos, variants, files)
    summary = {
        precision: {"layers": len(checks), "ok": sum(c["ok"] for c in checks)}
        for precision, checks in layer_checks.items()
    }
    ExportReport(
        recipe.name,
        files,
        dense_weights=inputs.source,
        sparse_weights=str(paths.sparse_weights),
        masks=str(paths.masks),
        exporter=f"torch.onnx.export(dynamo=True, optimize=True) torch {torch.__version__}",
        opset=opset,
        opset_requested=cfg.opset,
        n=inputs.n,
        m=inputs.m,
        io={
            "input_name": cfg.input_name,
            "output_name": cfg.output_name,
            "dtype": "float32",
            "note": "FP16 graphs keep FP32 input/output; Cast nodes at the graph edges convert",
        },
        batchnorm="folded into Conv by the exporter's optimiser (per-output-channel scale keeps zeros)",
        tolerances=TOLERANCES,
        nm_check=summary,
        layers=layer_checks,
        seconds=round(time.time() - started, 2),
    ).save(paths.export_report)
    print_summary(summary, files, inputs.n, inputs.m)
    print(f"export report: {paths.export_report}")
    return 0


def write_outputs(
    recipe: Recipe, paths: ArtifactPaths, inputs: Inputs, protos: dict, variants: list, files: dict
) -> None:
    import onnx

    for (kind, precision), proto in protos.items():
        path = next(p for k, pr, _, p in variants if k == kind and pr == precision)
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))
        files[path.name].update(file_record(path))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if recipe.build.precision == "int8":
        files.update(export_int8(recipe, paths, inputs.masked, inputs.n, inputs.m))


def print_summary(summary: dict, files: dict, n: int, m: int) -> None:
    for precision, counts in summary.items():
        print(
            f"sparse {precision}: {counts['ok']}/{counts['layers']} masked layers hold {n}:{m} in TensorRT layout, "
            f"kept weights equal the dense export"
        )
    for name, info in files.items():
        if "ort_vs_torch" not in info:  # the INT8 graphs: their accuracy is measured by verify
            continue
        diff = info["ort_vs_torch"]
        print(f"{name}: ONNX Runtime vs PyTorch max|diff| {diff['max_abs_diff']:.2e} (allowed {diff['allowed']:.2e})")


def export_int8(recipe: Recipe, paths: ArtifactPaths, masked: list[str], n: int, m: int) -> dict[str, dict]:
    """dense.int8.onnx and sparse.int8.onnx: Q/DQ graphs in TensorRT's form, calibrated on training images.

    The sparse graph must keep N:M on every masked layer after quantization, in code and by polygraphy's
    independent check; otherwise neither INT8 file is left behind.
    """
    import onnx

    from pipeline.data.datasets import build_datasets
    from pipeline.export.int8 import calibration_batches, polygraphy_sparsity, quantize_qdq, sparse_weights_survive

    count = recipe.export.int8_calibration_images
    print(f"quantizing to INT8 Q/DQ, calibrated on {count} training images ...", flush=True)
    calibration = calibration_batches(build_datasets(recipe).plain_train, count)
    # a failure leaves neither INT8 file: the stage's transaction removes (or puts back) what was written
    files = {}
    for variant in ("dense", "sparse"):
        path = quantize_qdq(getattr(paths, f"{variant}_onnx"), calibration, paths.int8_onnx(variant))
        files[path.name] = {
            "variant": variant,
            "precision": "int8",
            "calibration_images": count,
            **file_record(path),
        }
    sparse_path = paths.int8_onnx("sparse")
    survive = sparse_weights_survive(onnx.load(str(sparse_path)), n, m)
    polygraphy = polygraphy_sparsity(sparse_path)
    sparse_found = set(polygraphy.get("sparse", []))
    missing = [layer for layer in masked if f"{layer}.weight" not in sparse_found]
    broken = [
        name
        for name, info in survive.items()
        if not info["zeros_kept"] or info["nm_violations_int8"] > info["nm_violations_fp32"]
    ]
    files[sparse_path.name].update(nm_after_quantization=survive, polygraphy_sparse=sorted(sparse_found))
    if missing or broken:
        raise PipelineError(
            f"{sparse_path.name}: the {n}:{m} pattern did not survive INT8 quantization "
            f"({'polygraphy finds dense: ' + ', '.join(missing) if missing else ''}"
            f"{'; zeros lost in ' + ', '.join(broken) if broken else ''}); nothing written"
        )
    print(
        f"{sparse_path.name}: polygraphy inspect sparsity finds {len(masked) - len(missing)}/{len(masked)} "
        f"masked layers sparse"
    )
    return files
