"""verify on the engines the build stage made from a recipe: inputs (build.json, layers.json, masks) and the report.

`verify_built_engines` measures and returns report.json's content; the stage (pipeline/stages/verify.py)
writes it. Verify on ONNX files or plans made by any tool: pipeline/verify/external.py.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.backends import get_backend
from pipeline.backends.build_report import BuildReport
from pipeline.errors import PipelineError
from pipeline.export.report import ExportReport
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.verify.gates import agreement_gates, not_meaningful, symptoms
from pipeline.verify.measure import (
    close_runners,
    gate,
    gates_section,
    latency_section,
    layer_times,
    measure_accuracy,
    measure_latency,
)
from pipeline.verify.report import SCHEMA


def load_engines(paths, recipe):
    build = BuildReport.load(paths.build_report, recipe.name)
    backend = get_backend(build.backend)
    runners = {
        variant: backend.load(build.checked_engine(variant, paths.root), recipe) for variant in ("dense", "sparse")
    }
    return build, backend, runners


def _eligibility(paths: ArtifactPaths, recipe: Recipe):
    from pipeline.masks.eligibility import EligibilityReport

    if paths.layers.exists():  # a folder in its place is refused by the owner, not skipped
        return EligibilityReport.load(paths.layers, recipe.name)
    from pipeline.masks.eligibility import find_layers
    from pipeline.recipe.weights import build_network

    cfg = recipe.masks
    return find_layers(
        build_network(recipe),
        recipe.input_shape,
        cfg.m,
        cfg.include,
        cfg.exclude,
        recipe.classifier,
        cfg.include_classifier,
    )


def layer_table(paths, recipe) -> tuple[list[dict[str, Any]], int]:
    """Every Conv/Linear with MACs, masked or skipped (reason); from layers.json, else recomputed."""
    info = _eligibility(paths, recipe)
    masked_names = None
    if paths.masks.exists():
        from pipeline.masks.artifact import MaskArtifact
        from pipeline.masks.bake_report import BakeReport

        masks = BakeReport.load(paths.bake_report, recipe.name).checked(paths.masks)
        masked_names = {layer.name for layer in MaskArtifact.load(masks).layers}
    layers = []
    for entry in info.masked + info.skipped:
        masked = entry.eligible if masked_names is None else entry.name in masked_names
        reason = entry.reason or ("" if masked else "not in masks.pt")
        layers.append(
            {"name": entry.name, "kind": entry.kind, "macs": int(entry.macs), "masked": masked, "reason": reason}
        )
    return layers, int(info.total_macs or sum(layer["macs"] for layer in layers))


def sparse_kernel_coverage(build: BuildReport, layers: list[dict[str, Any]], total_macs: int):
    """MAC share of masked layers that the backend reports as running sparse kernels (None if unknown)."""
    if not build.has_sparse_kernels:
        return None, f"{build.backend} has no sparse kernels"
    reported = build.engines["sparse"].get("sparse_layers") or {}
    picked = reported.get("picked_sparse", reported.get("picked"))
    if picked is None:
        return None, "the backend did not report which layers picked sparse kernels"
    picked = set(picked)
    blocks = {m: block["trt_layer"] for block in reported.get("sparse_blocks") or [] for m in block["modules"]}
    for layer in layers:
        layer["sparse_kernel"] = layer["name"] in picked
        if layer["name"] in blocks and not layer["sparse_kernel"]:
            layer["in_sparse_block"] = blocks[layer["name"]]  # the block runs sparse tactics; this module: unknown
    share = sum(layer["macs"] for layer in layers if layer["sparse_kernel"]) / max(total_macs, 1)
    note = f"from build.json ({reported.get('raw', {}).get('source', 'backend report')})"
    in_blocks = sum(layer["macs"] for layer in layers if layer.get("in_sparse_block")) / max(total_macs, 1)
    if in_blocks:
        note += (
            f"; a further {100 * in_blocks:.1f} % of the MACs is in fused blocks that run sparse tactics as a whole "
            "(not credited: which of their modules run sparse is not known)"
        )
    return share, note


def int8_accuracy(paths: ArtifactPaths, dataset, fp32_dense_top1: float) -> dict[str, Any]:
    """Top-1 of the INT8 Q/DQ graphs (export writes them for build.precision=int8) through ONNX Runtime."""
    from pipeline.export.int8 import onnxruntime_top1

    graphs = {variant: paths.int8_onnx(variant) for variant in ("dense", "sparse")}
    for path in graphs.values():
        if not path.is_file():
            raise PipelineError(
                f"{path} does not exist; build.precision=int8 needs the Q/DQ graphs: run "
                "`python -m pipeline export` with --set build.precision=int8"
            )
    top1 = {variant: 100.0 * onnxruntime_top1(path, dataset) for variant, path in graphs.items()}  # a share -> %
    return {
        "dense_graph": graphs["dense"].name,
        "sparse_graph": graphs["sparse"].name,
        "dense_top1": top1["dense"],
        "sparse_top1": top1["sparse"],
        "sparse_drop_vs_fp32_dense": fp32_dense_top1 - top1["sparse"],
        "runtime": "onnxruntime CPUExecutionProvider",
    }


def coverage_section(paths: ArtifactPaths, recipe: Recipe, build: BuildReport) -> dict[str, Any]:
    layers, total_macs = layer_table(paths, recipe)
    masked_fraction = sum(layer["macs"] for layer in layers if layer["masked"]) / max(total_macs, 1)
    kernel_fraction, kernel_note = sparse_kernel_coverage(build, layers, total_macs)
    export_info = ExportReport.load(paths.export_report, recipe.name).details if paths.export_report.exists() else {}
    export_checks = export_info.get("layers", {}).get("fp32", [])
    for layer in layers:
        layer["mac_fraction"] = layer["macs"] / max(total_macs, 1)
    return {
        "masked_mac_fraction": masked_fraction,
        "total_macs": total_macs,
        "masked_layers": sum(layer["masked"] for layer in layers),
        "skipped_layers": sum(not layer["masked"] for layer in layers),
        "exported_nm_layers": f"{sum(c['ok'] for c in export_checks)}/{len(export_checks)}" if export_checks else "n/a",
        "sparse_kernel_mac_fraction": kernel_fraction,
        "sparse_kernel_note": kernel_note,
        "layers": layers,
    }


def _measure(recipe: Recipe, paths: ArtifactPaths, runners, data) -> tuple[dict[str, Any], dict[str, Any], dict]:
    low, high = recipe.build.min_batch, recipe.build.max_batch
    eval_batch = max(low, min(recipe.data.eval_batch_size, high))
    accuracy = measure_accuracy(runners, data.eval, eval_batch)
    if recipe.build.precision == "int8":
        accuracy["int8"] = int8_accuracy(paths, data.eval, accuracy["dense"]["top1"])
    serving = max(low, min(recipe.verify.serving_batch, high))
    by_batch, raw = measure_latency(
        runners,
        recipe.input_shape,
        sorted({max(low, 1), serving}),
        recipe.verify.latency_iters,
        recipe.verify.warmup_iters,
    )
    data_info = {
        "kind": data.kind,
        "description": data.description,
        "samples": accuracy["samples"],
        "accuracy_meaningful": data.accuracy_meaningful,
        "batch_size": eval_batch,
    }
    return accuracy, {"data": data_info, "latency": latency_section(by_batch, serving)}, raw


def per_layer_section(build: BuildReport, paths: ArtifactPaths, runners, serving: int, speedup) -> dict[str, Any]:
    """Per-layer times of both engines at the serving batch, and the speed-up bound they give (TensorRT)."""
    from pipeline.backends.tensorrt.sparsity import OnnxNameMap
    from pipeline.verify.bound import bound_section

    times, batch = layer_times(runners, serving)
    onnx = paths.root / str(build.engines["sparse"].get("onnx", ""))
    names = OnnxNameMap.from_onnx(onnx) if build.engines["sparse"].get("onnx") and onnx.is_file() else OnnxNameMap()
    evidence = build.engines["sparse"].get("sparse_layers") or None
    return {
        "layer_times_ms": times,
        "layer_times_batch": batch,
        "speedup_bound": bound_section(runners, times, names, evidence, speedup),
    }


def verify_built_engines(recipe: Recipe, paths: ArtifactPaths) -> tuple[dict[str, Any], dict]:
    """report.json's content for the build stage's engines, and the raw per-iteration latencies (for the plot)."""
    from pipeline.data.datasets import build_datasets
    from pipeline.data.preprocess_choice import choice_summary, ensure_choice

    started = time.time()
    build, backend, runners = load_engines(paths, recipe)
    coverage = coverage_section(paths, recipe, build)  # every record verify reads is checked before measuring
    ensure_choice(recipe, paths)  # the evaluation transform train-masks measured (preprocess_choice.json)
    data = build_datasets(recipe)
    accuracy, sections, raw = _measure(recipe, paths, runners, data)
    cfg, speedup = recipe.verify, sections["latency"]["speedup_spread"]["ratio"]
    checks = [
        gate(
            "top1_drop",
            accuracy["top1_drop"],
            cfg.max_top1_drop,
            "<=",
            "" if data.accuracy_meaningful else f"{data.kind} data: accuracy means nothing",
        ),
        gate(
            "speedup",
            speedup,
            cfg.min_speedup,
            ">=",
            ""
            if backend.has_sparse_kernels
            else f"{backend.name} has no sparse kernels: speed-up is reported, not gated",
        ),
        gate("masked_mac_fraction", coverage["masked_mac_fraction"], cfg.min_coverage, ">="),
        *agreement_gates(accuracy, cfg, not_meaningful(recipe, data.kind, data.accuracy_meaningful)),
    ]
    report = {
        "schema": SCHEMA,
        "model": recipe.name,
        "backend": backend.name,
        "backend_reason": build.reason,
        "has_sparse_kernels": backend.has_sparse_kernels,
        "note": ""
        if backend.has_sparse_kernels
        else f"{backend.name} has no sparse kernels: this run verifies correctness and accuracy, not speed-up",
        **sections,
        "accuracy": accuracy,
        "symptoms": symptoms(accuracy, cfg, not_meaningful(recipe, data.kind, data.accuracy_meaningful)),
        "preprocessing": choice_summary(recipe, paths),
        "speedup": speedup,
        **per_layer_section(build, paths, runners, sections["latency"]["serving_batch"], speedup),
        "coverage": coverage,
        "gates": gates_section(checks),
        "engines": {variant: str(build.engine_path(variant, paths.root)) for variant in ("dense", "sparse")},
        "engine_sha256": {variant: build.engines[variant]["sha256"] for variant in ("dense", "sparse")},
    }
    close_runners(runners)
    report["seconds"] = round(time.time() - started, 2)
    return report, raw
