"""Writing and printing a verification: report.json (through VerificationReport), report.md, plots, JUnit,
the console summary, and the exit status (GateFailed when a gate failed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import GateFailed
from pipeline.io import write_text
from pipeline.paths import ArtifactPaths
from pipeline.records import to_json
from pipeline.verify.report import (
    VerificationReport,
    plot_accuracy,
    plot_coverage,
    plot_latency,
    plot_layout,
    render_markdown,
    write_junit,
)


def write_report(report: VerificationReport, raw: dict, paths: ArtifactPaths, junit: str | None, plots: bool) -> None:
    """Plots, report.md, JUnit, then report.json last: every file atomically, so a verdict names finished files."""
    report.plots = [str(path) for path in paths.verify_plots] if plots else []
    if plots:
        title = f"{report.model} on {report.backend}"
        plot_latency(raw, Path(report.plots[0]), f"{title}: latency per iteration")
        plot_accuracy(to_json(report.accuracy), Path(report.plots[1]), f"{title}: accuracy ({report.data.kind})")
        if report.coverage.basis == "layout" and report.layout:
            plot_layout(report.layout["layers"], Path(report.plots[2]), f"{report.model}: MACs per layer")
        else:
            plot_coverage(report.coverage.layers, Path(report.plots[2]), f"{report.model}: MACs per layer")
    content = report.to_json()
    write_text(paths.report_md, render_markdown(content))
    if junit:
        write_junit(Path(junit), content)
    report.save(paths.report_json)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def print_summary(report: VerificationReport, paths: ArtifactPaths) -> None:
    accuracy = report.accuracy
    print(
        f"backend {report.backend}" + ("" if report.has_sparse_kernels else " (no sparse kernels: accuracy check only)")
    )
    print(
        f"top1 dense {accuracy.dense.top1:.2f}% sparse {accuracy.sparse.top1:.2f}% "
        f"(agreement {100 * accuracy.agreement:.1f}%, {accuracy.samples} images)"
    )
    if accuracy.int8 is not None:
        int8 = accuracy.int8
        print(
            f"INT8 Q/DQ through ONNX Runtime: dense {int8.dense_top1:.2f}% sparse {int8.sparse_top1:.2f}% "
            f"(sparse vs FP32 dense: drop {int8.sparse_drop_vs_fp32_dense:.2f} pt)"
        )
    for batch, entry in report.latency.by_batch.items():
        print(
            f"batch {batch}: p50 dense {entry['dense']['p50_ms']:.3f} ms, sparse {entry['sparse']['p50_ms']:.3f} ms, "
            f"speed-up {entry['speedup']['ratio']:.3f}x (IQR {entry['speedup']['iqr'][0]:.3f}-"
            f"{entry['speedup']['iqr'][1]:.3f})"
        )
    coverage = report.coverage
    print(
        f"MACs in masked layers {_share(coverage.masked_mac_fraction)}, in layers TensorRT 2:4 can accelerate "
        f"{_share(coverage.accelerable_mac_fraction)}"
        + (
            f", in sparse kernels {_share(coverage.sparse_kernel_mac_fraction)}"
            if coverage.sparse_kernel_mac_fraction is not None
            else ""
        )
    )
    if report.layout and coverage.basis == "layout":
        print_layout(report.layout)
    for check in report.gates.checks:
        state = "pass" if check.passed else ("skip" if check.passed is None else "FAIL")
        print(f"gate {check.name}: {state}" + (f" ({check.skipped})" if check.passed is None else ""))
    print(f"report: {paths.report_json}, {paths.report_md}")


def print_layout(layout: dict[str, Any]) -> None:
    for layer in layout["layers"]:
        axis = f" along {layer['axis']}" if layer["axis"] and layer["layout"] != "tensorrt 2:4" else ""
        kept = f", kept weights: {layer['kept']}" if layer["kept"] else ""
        print(
            f"layer {layer['name']} ({layer['op']} {layer['weight']} {layer['shape']}): {layer['layout']}{axis}{kept}"
        )
    for layer in layout["skipped"]:
        print(f"layer {layer['name']} ({layer['op']}): skipped, {layer['reason']}")
    total = max(layout["total_macs"], 1)
    print(
        "MACs by layout: "
        + ", ".join(f"{name} {100 * macs / total:.1f}%" for name, macs in layout["macs_by_class"].items() if macs)
    )


def raise_if_failed(report: VerificationReport) -> int:
    failed = report.gates.failed
    if failed:
        raise GateFailed("; ".join(f"{c.name} = {c.value:.4g}, needs {c.comparison} {c.threshold}" for c in failed))
    return 0
