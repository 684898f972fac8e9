"""`verify`: accuracy, latency and coverage of the dense and sparse engines; CI gates.

Accuracy runs the evaluation set through the engines (not PyTorch). Latency interleaves
dense and sparse rounds in the same process so drift hits both. Exit 0 when every gate
passes, 1 when one fails (GateFailed), 2 on bad input (PipelineError).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends import get_backend
from pipeline.backends.build_report import BuildReport
from pipeline.errors import GateFailed, PipelineError
from pipeline.export.report import ExportReport
from pipeline.io import write_json, write_text
from pipeline.verify.report import (SCHEMA, latency_stats, plot_accuracy, plot_coverage, plot_latency, render_markdown,
                             speedup_stats, write_junit)
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.recipe.resolve import write_config
from pipeline.progress import progress
from pipeline.records import load_layer_table


@dataclass
class Options:
    max_top1_drop: float | None = field(default=None, metadata={"recipe": "verify.max_top1_drop"})
    min_speedup: float | None = field(default=None, metadata={"recipe": "verify.min_speedup"})
    min_coverage: float | None = field(default=None, metadata={"recipe": "verify.min_coverage"})
    iters: int | None = field(default=None, metadata={"recipe": "verify.latency_iters"})
    junit: str | None = None
    no_plots: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gates (default: the recipe's verify section)")
    group.add_argument("--max-top1-drop", type=float, default=None, help="points of top-1 the sparse engine may lose")
    group.add_argument("--min-speedup", type=float, default=None,
                       help="dense/sparse latency ratio at the serving batch, median of paired rounds "
                            "(gated only on backends with sparse kernels)")
    group.add_argument("--min-coverage", type=float, default=None, help="share of MACs in masked layers (0-1)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per engine and batch "
                                                                "(verify.latency_iters)")
    parser.add_argument("--junit", default=None, metavar="FILE", help="also write the gates as JUnit XML")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# --------------------------------------------------------------------------- inputs
def load_engines(paths, recipe):
    build = BuildReport.load(paths.build_report, recipe.name)
    backend = get_backend(build.backend)
    runners = {variant: backend.load(build.checked_engine(variant, paths.root), recipe) for variant in ("dense", "sparse")}
    return build, backend, runners


def layer_table(paths, recipe) -> tuple[list[dict[str, Any]], int]:
    """Every Conv/Linear with MACs, masked or skipped (reason); from layers.json, else recomputed."""
    if paths.layers.exists():
        info = load_layer_table(paths.layers, recipe.name)
    else:
        from pipeline.masks.eligibility import find_layers
        from pipeline.recipe.weights import build_network

        cfg = recipe.masks
        info = find_layers(build_network(recipe), recipe.input_shape, cfg.m, cfg.include, cfg.exclude,
                           recipe.classifier, cfg.include_classifier).to_dict()
    masked_names = None
    if paths.masks.exists():
        from pipeline.masks.artifact import MaskArtifact

        from pipeline.masks.bake_report import BakeReport

        masks = BakeReport.load(paths.bake_report, recipe.name).checked(paths.masks)
        masked_names = {layer.name for layer in MaskArtifact.load(masks).layers}
    layers = []
    for entry in info.get("masked", []) + info.get("skipped", []):
        masked = entry["eligible"] if masked_names is None else entry["name"] in masked_names
        reason = entry.get("reason") or ("" if masked else "not in masks.pt")
        layers.append({"name": entry["name"], "kind": entry["kind"], "macs": int(entry["macs"]), "masked": masked,
                       "reason": reason})
    return layers, int(info.get("total_macs") or sum(layer["macs"] for layer in layers))


# --------------------------------------------------------------------------- measurements
def measure_accuracy(runners, dataset, batch_size: int) -> dict[str, Any]:
    from pipeline.data.datasets import make_loader

    counts = {variant: {"top1": 0, "top5": 0} for variant in runners}
    agree = total = 0
    max_diff = 0.0
    for images, labels in progress(make_loader(dataset, batch_size=batch_size), desc="accuracy (engines)"):
        batch = images.numpy().astype(np.float32)
        labels = labels.numpy()
        predictions = {}
        logits_by = {}
        for variant, runner in runners.items():
            logits = np.asarray(runner.infer(batch), dtype=np.float32)
            k = min(5, logits.shape[1])
            top = np.argsort(-logits, axis=1)[:, :k]
            counts[variant]["top1"] += int((top[:, 0] == labels).sum())
            counts[variant]["top5"] += int((top == labels[:, None]).any(1).sum())
            predictions[variant] = top[:, 0]
            logits_by[variant] = logits
        agree += int((predictions["dense"] == predictions["sparse"]).sum())
        max_diff = max(max_diff, float(np.abs(logits_by["dense"] - logits_by["sparse"]).max()))
        total += labels.size
    if not total:
        raise PipelineError("the evaluation set is empty; check --data and data.eval_limit")
    result = {variant: {"top1": 100.0 * c["top1"] / total, "top5": 100.0 * c["top5"] / total}
              for variant, c in counts.items()}
    result.update(samples=total, agreement=agree / total, top1_drop=result["dense"]["top1"] - result["sparse"]["top1"],
                  max_abs_logit_diff=max_diff)
    return result


def measure_latency(runners, input_shape, batches: list[int], iterations: int, warmup: int):
    """Interleaved rounds (dense, sparse / sparse, dense alternating); per-iteration times in ms."""
    rounds = max(1, min(10, iterations))
    per_round = max(1, math.ceil(iterations / rounds))
    raw: dict[str, dict[str, list[float]]] = {}
    by_batch: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    bar = progress(total=len(batches) * rounds, desc="latency (interleaved)")
    for batch in batches:
        data = rng.standard_normal((batch, *input_shape)).astype(np.float32)
        for runner in runners.values():
            runner.time_batch(data, 0, warmup)
        per_variant: dict[str, list[list[float]]] = {"dense": [], "sparse": []}
        for index in range(rounds):
            order = ("dense", "sparse") if index % 2 == 0 else ("sparse", "dense")
            for variant in order:
                per_variant[variant].append(runners[variant].time_batch(data, per_round, 0))
            bar.update(1)
        raw[str(batch)] = {variant: [t for chunk in chunks for t in chunk] for variant, chunks in per_variant.items()}
        by_batch[str(batch)] = {"dense": latency_stats(raw[str(batch)]["dense"], batch),
                                "sparse": latency_stats(raw[str(batch)]["sparse"], batch),
                                "speedup": speedup_stats(per_variant["dense"], per_variant["sparse"])}
    bar.close()
    return by_batch, raw


def sparse_kernel_coverage(build: BuildReport, layers: list[dict[str, Any]], total_macs: int):
    """MAC share of masked layers that the backend reports as running sparse kernels (None if unknown)."""
    if not build.has_sparse_kernels:
        return None, f"{build.backend} has no sparse kernels"
    reported = build.engines["sparse"].get("sparse_layers") or {}
    picked = reported.get("picked_sparse", reported.get("picked"))
    if picked is None:
        return None, "the backend did not report which layers picked sparse kernels"
    picked = set(picked)
    for layer in layers:
        layer["sparse_kernel"] = layer["name"] in picked
    share = sum(layer["macs"] for layer in layers if layer["sparse_kernel"]) / max(total_macs, 1)
    return share, f"from build.json ({reported.get('raw', {}).get('source', 'backend report')})"


def int8_accuracy(paths: ArtifactPaths, dataset, fp32_dense_top1: float) -> dict[str, Any]:
    """Top-1 of the INT8 Q/DQ graphs (export writes them for build.precision=int8) through ONNX Runtime."""
    from pipeline.export.int8 import onnxruntime_top1

    graphs = {variant: paths.int8_onnx(variant) for variant in ("dense", "sparse")}
    for path in graphs.values():
        if not path.is_file():
            raise PipelineError(f"{path} does not exist; build.precision=int8 needs the Q/DQ graphs: run "
                                "`python -m pipeline export` with --set build.precision=int8")
    top1 = {variant: 100.0 * onnxruntime_top1(path, dataset) for variant, path in graphs.items()}  # a share -> %
    return {"dense_graph": graphs["dense"].name, "sparse_graph": graphs["sparse"].name,
            "dense_top1": top1["dense"], "sparse_top1": top1["sparse"],
            "sparse_drop_vs_fp32_dense": fp32_dense_top1 - top1["sparse"],
            "runtime": "onnxruntime CPUExecutionProvider"}


# --------------------------------------------------------------------------- gates
def gate(name: str, value, threshold: float, comparison: str, skipped: str = "") -> dict[str, Any]:
    if skipped or value is None:
        passed = None
    else:
        passed = bool(value <= threshold) if comparison == "<=" else bool(value >= threshold)
    return {"name": name, "value": value, "threshold": threshold, "comparison": comparison, "passed": passed,
            "skipped": skipped or ("" if value is not None else "not measured")}


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    cfg = recipe.verify
    started = time.time()
    build, backend, runners = load_engines(paths, recipe)
    # every record verify reads is checked before any measurement
    layers, total_macs = layer_table(paths, recipe)
    export_info = ExportReport.load(paths.export_report, recipe.name).details if paths.export_report.exists() else {}
    from pipeline.data.datasets import build_datasets

    data = build_datasets(recipe)
    low, high = recipe.build.min_batch, recipe.build.max_batch
    eval_batch = max(low, min(recipe.data.eval_batch_size, high))
    accuracy = measure_accuracy(runners, data.eval, eval_batch)
    if recipe.build.precision == "int8":
        accuracy["int8"] = int8_accuracy(paths, data.eval, accuracy["dense"]["top1"])
    serving = max(low, min(cfg.serving_batch, high))
    batches = sorted({max(low, 1), serving})
    by_batch, raw = measure_latency(runners, recipe.input_shape, batches, cfg.latency_iters, cfg.warmup_iters)
    serving_entry = by_batch[str(serving)]
    layer_times = {variant: runner.layer_times() for variant, runner in runners.items()}
    masked_fraction = sum(layer["macs"] for layer in layers if layer["masked"]) / max(total_macs, 1)
    kernel_fraction, kernel_note = sparse_kernel_coverage(build, layers, total_macs)
    export_checks = export_info.get("layers", {}).get("fp32", [])
    exported_ok = f"{sum(c['ok'] for c in export_checks)}/{len(export_checks)}" if export_checks else "n/a"
    for layer in layers:
        layer["mac_fraction"] = layer["macs"] / max(total_macs, 1)

    no_sparse = f"{backend.name} has no sparse kernels: speed-up is reported, not gated"
    checks = [
        gate("top1_drop", accuracy["top1_drop"], cfg.max_top1_drop, "<=",
             "" if data.accuracy_meaningful else f"{data.kind} data: accuracy means nothing"),
        gate("speedup", serving_entry["speedup"]["ratio"], cfg.min_speedup, ">=",
             "" if backend.has_sparse_kernels else no_sparse),
        gate("masked_mac_fraction", masked_fraction, cfg.min_coverage, ">="),
    ]
    passed = all(check["passed"] is not False for check in checks)
    plots = [] if options.no_plots else [str(paths.root / name) for name in
                                      ("verify_latency.png", "verify_accuracy.png", "verify_coverage.png")]
    report = {
        "schema": SCHEMA, "model": recipe.name, "backend": backend.name, "backend_reason": build.reason,
        "has_sparse_kernels": backend.has_sparse_kernels,
        "note": "" if backend.has_sparse_kernels else
        f"{backend.name} has no sparse kernels: this run verifies correctness and accuracy, not speed-up",
        "data": {"kind": data.kind, "description": data.description, "samples": accuracy["samples"],
                 "accuracy_meaningful": data.accuracy_meaningful, "batch_size": eval_batch},
        "accuracy": accuracy,
        "latency": {"dense": serving_entry["dense"], "sparse": serving_entry["sparse"], "serving_batch": serving,
                    "speedup_spread": serving_entry["speedup"], "by_batch": by_batch,
                    "method": "dense and sparse interleaved per round (order alternating), perf_counter, after warm-up"},
        "speedup": serving_entry["speedup"]["ratio"],
        "layer_times_ms": layer_times,
        "coverage": {"masked_mac_fraction": masked_fraction, "total_macs": total_macs,
                     "masked_layers": sum(layer["masked"] for layer in layers),
                     "skipped_layers": sum(not layer["masked"] for layer in layers),
                     "exported_nm_layers": exported_ok,
                     "sparse_kernel_mac_fraction": kernel_fraction, "sparse_kernel_note": kernel_note,
                     "layers": layers},
        "gates": {"passed": passed, "checks": checks},
        "engines": {variant: str(build.engine_path(variant, paths.root)) for variant in ("dense", "sparse")},
        "engine_sha256": {variant: build.engines[variant]["sha256"] for variant in ("dense", "sparse")},
        "plots": plots, "seconds": round(time.time() - started, 2),
    }
    write_config(recipe, paths)
    if plots:
        title = f"{recipe.name} on {backend.name}"
        plot_latency(raw, Path(plots[0]), f"{title}: latency per iteration")
        plot_accuracy(accuracy, Path(plots[1]), f"{title}: accuracy ({data.kind})")
        plot_coverage(layers, Path(plots[2]), f"{recipe.name}: MACs per layer")
    write_json(paths.report_json, report)
    write_text(paths.report_md, render_markdown(report))
    if options.junit:
        write_junit(Path(options.junit), report)

    print(f"backend {backend.name}" + ("" if backend.has_sparse_kernels else " (no sparse kernels: accuracy check only)"))
    print(f"top1 dense {accuracy['dense']['top1']:.2f}% sparse {accuracy['sparse']['top1']:.2f}% "
          f"(agreement {100 * accuracy['agreement']:.1f}%, {accuracy['samples']} images)")
    if "int8" in accuracy:
        int8 = accuracy["int8"]
        print(f"INT8 Q/DQ through ONNX Runtime: dense {int8['dense_top1']:.2f}% sparse {int8['sparse_top1']:.2f}% "
              f"(sparse vs FP32 dense: drop {int8['sparse_drop_vs_fp32_dense']:.2f} pt)")
    for batch, entry in by_batch.items():
        print(f"batch {batch}: p50 dense {entry['dense']['p50_ms']:.3f} ms, sparse {entry['sparse']['p50_ms']:.3f} ms, "
              f"speed-up {entry['speedup']['ratio']:.3f}x (IQR {entry['speedup']['iqr'][0]:.3f}-"
              f"{entry['speedup']['iqr'][1]:.3f})")
    print(f"masked MACs {100 * masked_fraction:.1f}%" +
          (f", in sparse kernels {100 * kernel_fraction:.1f}%" if kernel_fraction is not None else ""))
    for check in checks:
        state = "pass" if check["passed"] else ("skip" if check["passed"] is None else "FAIL")
        print(f"gate {check['name']}: {state}" + (f" ({check['skipped']})" if check["passed"] is None else ""))
    print(f"report: {paths.report_json}, {paths.report_md}")
    if not passed:
        failed = [c for c in checks if c["passed"] is False]
        raise GateFailed("; ".join(f"{c['name']} = {c['value']:.4g}, needs {c['comparison']} {c['threshold']}"
                                   for c in failed))
    return 0
