"""`verify --dense X.plan --sparse Y.plan [--sparse-onnx Y.onnx]`: TensorRT plans made by any tool.

NOT RUN ON THIS PROJECT'S MACHINES: they have no TensorRT and no GPU. The code path is exercised here only up
to the point where TensorRT must import (a clear error, exit 2); docs/ci-gate.md says so.

The plans are loaded and run through the TensorRT backend's public API (`get_backend("tensorrt").load`, the
backend's runner), and its engine inspector output is parsed with the backend's `parse_inspector_json`; this
module adds no TensorRT code of its own beyond asking the loaded engine for its inspector. Per layer it reports
the tactic TensorRT picked and whether the inspector says the weights are sparse; a layer "picked a sparse
kernel" when its tactic name says sparse (TensorRT names its sparse convolution/GEMM tactics so). With the
sparse ONNX (--sparse-onnx) the layout report is added and the picks are mapped to ONNX nodes to give the
share of MACs that run sparse kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.verify import layout as layouts
from pipeline.verify.onnx_files import check_file, load_onnx
from pipeline.verify.pair import Pair


def load_plan_pair(dense: Path, sparse: Path, options) -> Any:
    from pipeline.backends import get_backend

    for flag, path in (("--dense", dense), ("--sparse", sparse)):
        check_file(path, flag, "TensorRT plan")
    layout = None
    if options.sparse_onnx:
        model = load_onnx(Path(options.sparse_onnx), "--sparse-onnx")
        found, skipped = layouts.weighted_layers(model)
        layout = layouts.layout_report(found, skipped)
    backend = get_backend("tensorrt")  # a PipelineError naming why TensorRT is not usable here
    runners: dict[str, Any] = {"dense": backend.load(dense, None), "sparse": backend.load(sparse, None)}  # TensorRT
    shapes = {variant: list(runner.sample_shape) for variant, runner in runners.items()}
    if shapes["dense"] != shapes["sparse"]:
        raise PipelineError(
            f"inputs differ: {dense} takes [N, {shapes['dense']}], {sparse} takes "
            f"[N, {shapes['sparse']}]; build both plans from models with the same input"
        )
    classes = {variant: _classes(runner) for variant, runner in runners.items()}
    if classes["dense"] != classes["sparse"]:
        raise PipelineError(
            f"outputs differ: {dense} has {classes['dense']} classes, {sparse} has "
            f"{classes['sparse']}; build both plans from the same classifier"
        )
    return Pair(
        "tensorrt plan",
        dense,
        sparse,
        shapes["sparse"],
        classes["sparse"],
        layout,
        runners,
        plan_layers(runners["sparse"], layout),
    )


def _classes(runner) -> int:
    logits = np.asarray(runner.infer(np.zeros((runner.min_batch, *runner.sample_shape), np.float32)))
    if logits.ndim != 2:
        raise PipelineError(f"the plan's output has shape {list(logits.shape)}; verify checks [N, classes] classifiers")
    return int(logits.shape[1])


def plan_layers(runner, layout: layouts.LayoutReport | None) -> dict[str, Any]:
    """Per TensorRT layer of the sparse plan: tactic, HasSparseWeights, ONNX nodes; and the MAC share picked sparse."""
    from pipeline.backends.tensorrt.sparsity import parse_inspector_json

    layers = parse_inspector_json(runner.inspector_json())
    entries = [
        {
            "trt_layer": layer.name,
            "layer_type": layer.layer_type,
            "tactic": layer.tactic,
            "has_sparse_weights": layer.has_sparse_weights,
            "sparse_tactic": "sparse" in layer.tactic.lower(),
            "onnx_nodes": layer.onnx_nodes,
        }
        for layer in layers
        if not layer.is_reformat
    ]
    if not any(entry["tactic"] for entry in entries):
        return {
            "layers": entries,
            "sparse_kernel_mac_fraction": None,
            "note": "the plan was built without ProfilingVerbosity.DETAILED: its inspector names no tactics, so "
            "which layers run sparse kernels is not known (rebuild with detailed profiling verbosity)",
        }
    picked = {node for entry in entries if entry["sparse_tactic"] for node in entry["onnx_nodes"]}
    if layout is None:
        return {
            "layers": entries,
            "sparse_kernel_mac_fraction": None,
            "note": "pass --sparse-onnx to map the plan's sparse tactics to layers and MACs",
        }
    share = layout.share(lambda layer: layer.name in picked)
    return {
        "layers": entries,
        "sparse_kernel_mac_fraction": share,
        "note": "from the engine inspector: layers whose tactic name says sparse, mapped to ONNX nodes",
    }
