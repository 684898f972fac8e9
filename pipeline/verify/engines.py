"""verify on the engines the build stage made from a recipe: inputs (build.json, layers.json, masks) and the report.

`verify_built_engines` says what these engines are (pipeline/verify/assemble.py's Subject and Coverage: masks from
layers.json/masks.pt, sparse kernels from build.json, the 2:4 layout of the sparse graph) and returns the typed
report the one assembly makes; the stage (pipeline/stages/verify.py) writes it. Verify on ONNX files or plans made
by any tool: pipeline/verify/external.py.
"""

from __future__ import annotations

from typing import Any

from pipeline.backends import get_backend
from pipeline.backends.build_report import BuildReport
from pipeline.errors import PipelineError
from pipeline.export.report import ExportReport
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.records import verify_recorded
from pipeline.verify.assemble import Settings, Subject, verify_runners
from pipeline.verify.measure import close_runners
from pipeline.verify.report import Coverage, VerificationReport


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


def sparse_layout(recipe: Recipe, paths: ArtifactPaths, build: BuildReport):
    """The 2:4 layout of the sparse graph the sparse engine was built from (None, and why, when it is gone)."""
    from pipeline.verify import layout as layouts
    from pipeline.verify.onnx_files import load_onnx

    recorded = build.engines["sparse"].get("onnx")
    onnx = paths.root / recorded if isinstance(recorded, str) and recorded else paths.sparse_onnx
    if not onnx.is_file():
        return None, f"{onnx} does not exist: no layout report (re-run export and build)"
    if "onnx_sha256" in build.engines["sparse"]:  # the graph the engine was built from, not a later export
        verify_recorded(onnx, {"sha256": build.engines["sparse"]["onnx_sha256"]}, "build", recipe.name)
    found, skipped = layouts.weighted_layers(load_onnx(onnx, "the sparse graph"), list(recipe.input_shape))
    return layouts.layout_report(found, skipped), f"from the weights of {onnx.name} (pipeline/verify/layout.py)"


def coverage_section(paths: ArtifactPaths, recipe: Recipe, build: BuildReport) -> tuple[Coverage, Any]:
    """Coverage from the masks (layers.json, masks.pt), the build's sparse-kernel report and the sparse graph's
    layout; and the layout report itself."""
    layers, total_macs = layer_table(paths, recipe)
    kernel_fraction, kernel_note = sparse_kernel_coverage(build, layers, total_macs)
    exported = ExportReport.load(paths.export_report, recipe.name) if paths.export_report.exists() else None
    export_checks = exported.layers.get("fp32", []) if exported else []
    for layer in layers:
        layer["mac_fraction"] = layer["macs"] / max(total_macs, 1)
    layout, layout_note = sparse_layout(recipe, paths, build)
    coverage = Coverage(
        basis="masks",
        total_macs=total_macs,
        masked_mac_fraction=sum(layer["macs"] for layer in layers if layer["masked"]) / max(total_macs, 1),
        accelerable_mac_fraction=layout.accelerable_mac_fraction if layout else None,
        accelerable_note=layout_note,
        sparse_kernel_mac_fraction=kernel_fraction,
        sparse_kernel_note=kernel_note,
        masked_layers=sum(layer["masked"] for layer in layers),
        skipped_layers=sum(not layer["masked"] for layer in layers),
        exported_nm_layers=f"{sum(c['ok'] for c in export_checks)}/{len(export_checks)}" if export_checks else "n/a",
        layers=layers,
    )
    return coverage, layout


def speedup_bound(build: BuildReport, paths: ArtifactPaths, runners):
    """The speed-up bound of the build's engines (TensorRT: the build's sparse-kernel evidence, ONNX node names)."""
    from pipeline.backends.tensorrt.sparsity import OnnxNameMap
    from pipeline.verify.bound import bound_section

    onnx = paths.root / str(build.engines["sparse"].get("onnx", ""))
    names = OnnxNameMap.from_onnx(onnx) if build.engines["sparse"].get("onnx") and onnx.is_file() else OnnxNameMap()
    evidence = build.engines["sparse"].get("sparse_layers") or None
    return lambda times, speedup: bound_section(runners, times, names, evidence, speedup)


def verify_built_engines(recipe: Recipe, paths: ArtifactPaths) -> tuple[VerificationReport, dict]:
    """The typed report for the build stage's engines, and the raw per-iteration latencies (for the plot)."""
    from pipeline.data.datasets import build_datasets
    from pipeline.data.preprocess_choice import choice_summary, ensure_choice

    build, backend, runners = load_engines(paths, recipe)
    try:
        coverage, layout = coverage_section(paths, recipe, build)  # every record verify reads is checked first
        ensure_choice(recipe, paths)  # the evaluation transform train-masks measured (preprocess_choice.json)
        data = build_datasets(recipe)
        subject = Subject(
            model=recipe.name,
            backend=backend.name,
            backend_reason=build.reason,
            has_sparse_kernels=backend.has_sparse_kernels,
            engines={variant: str(build.engine_path(variant, paths.root)) for variant in ("dense", "sparse")},
            engine_sha256={variant: build.engines[variant]["sha256"] for variant in ("dense", "sparse")},
            input_shape=list(recipe.input_shape),
            batch_range=(recipe.build.min_batch, recipe.build.max_batch),
            random_weights=recipe.weights == "random",
            preprocessing=choice_summary(recipe, paths),
            bound=speedup_bound(build, paths, runners),
            int8=(lambda top1: int8_accuracy(paths, data.eval, top1)) if recipe.build.precision == "int8" else None,
        )
        settings = Settings(recipe.verify, recipe.data.eval_batch_size, dict(vars(recipe.preprocess)))
        return verify_runners(subject, runners, settings, data, coverage, layout.to_dict() if layout else None)
    finally:
        close_runners(runners)
