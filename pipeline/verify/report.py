"""Verification report: latency statistics, report.md, PNG plots (matplotlib Agg) and JUnit XML.

The JSON schema of report.json is documented in docs/export-build-verify.md; `VerificationReport` is how
other stages (package) read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io import atomic_path, read_json, write_json, write_text
from pipeline.records import to_json, typed_from_json

SCHEMA = "sparse-pipeline/report/v2"  # v2: typed sections, two coverage gates (masked and accelerable)
NOT_VERIFIED = "not verified"
REFRESH = "re-run `python -m pipeline verify`"


# --------------------------------------------------------------------------- the typed report (report.json)
@dataclass
class Gate:
    """One gate: VALUE against THRESHOLD; passed is None when the gate is skipped (SKIPPED says why)."""

    name: str
    value: float | None
    threshold: float
    comparison: str  # "<=" | ">="
    passed: bool | None
    skipped: str

    @classmethod
    def check(cls, name: str, value: float | None, threshold: float, comparison: str, skipped: str = "") -> Gate:
        if skipped or value is None:
            passed = None
        else:
            passed = bool(value <= threshold) if comparison == "<=" else bool(value >= threshold)
        return cls(name, value, threshold, comparison, passed, skipped or ("" if value is not None else "not measured"))


@dataclass
class Gates:
    passed: bool  # no gate failed (skipped gates do not fail)
    checks: list[Gate]

    @classmethod
    def of(cls, checks: list[Gate]) -> Gates:
        return cls(all(check.passed is not False for check in checks), checks)

    @property
    def failed(self) -> list[Gate]:
        return [check for check in self.checks if check.passed is False]


@dataclass
class TopK:
    top1: float  # %
    top5: float  # %


@dataclass
class Int8Accuracy:
    """Top-1 of the INT8 Q/DQ graphs (build.precision=int8) through ONNX Runtime, recipe path only."""

    dense_graph: str
    sparse_graph: str
    dense_top1: float
    sparse_top1: float
    sparse_drop_vs_fp32_dense: float
    runtime: str


@dataclass
class Accuracy:
    dense: TopK
    sparse: TopK
    samples: int
    agreement: float  # share of images on which both predict the same class
    top1_drop: float  # points, dense - sparse
    max_abs_logit_diff: float
    int8: Int8Accuracy | None = None


@dataclass
class DataInfo:
    kind: str
    description: str
    samples: int
    accuracy_meaningful: bool
    batch_size: int
    preprocess: dict[str, Any] = field(default_factory=dict)  # the recipe's preprocess section used


@dataclass
class LatencyStats:
    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    images_per_s: float


@dataclass
class SpeedupStats:
    ratio: float  # median over rounds of dense / sparse round medians
    p50_ratio: float
    rounds: int
    round_ratios: list[float]
    iqr: list[float]
    bootstrap_95: list[float]
    min: float
    max: float


@dataclass
class Latency:
    dense: LatencyStats  # at the serving batch
    sparse: LatencyStats
    serving_batch: int
    speedup_spread: SpeedupStats
    by_batch: dict[str, dict[str, Any]]  # batch -> dense, sparse, speedup, method (, host_ms)
    method: str
    host_ms: dict[str, LatencyStats] | None = None  # host enqueue time where the runner measures it (never gated)


@dataclass
class Coverage:
    """Three shares of the MACs, each of its own layers: masked (carry 2:4 masks), accelerable (weights in the 2:4
    layout TensorRT's sparse kernels take: they can run sparse), sparse-kernel (the backend reports they do)."""

    basis: str  # "masks": layers from layers.json/masks.pt (recipe path); "layout": from the sparse model's weights
    total_macs: int
    masked_mac_fraction: float | None
    accelerable_mac_fraction: float | None
    accelerable_note: str  # where the accelerable share comes from, or why it is unknown
    sparse_kernel_mac_fraction: float | None
    sparse_kernel_note: str
    masked_layers: int
    skipped_layers: int
    exported_nm_layers: str  # "ok/checked" from export.json, or "n/a"
    layers: list[dict[str, Any]]  # name, kind, macs, mac_fraction, masked, reason (, sparse_kernel, in_sparse_block)


@dataclass
class VerificationReport:
    """report.json, typed: the one assembly (pipeline/verify/assemble.py) makes it on both verify paths, verify
    writes it (`save`), package reads its verdict (`load`). Schema: docs/export-build-verify.md."""

    model: str
    backend: str
    backend_reason: str
    has_sparse_kernels: bool
    note: str
    data: DataInfo
    accuracy: Accuracy
    latency: Latency
    speedup: float  # at the serving batch
    coverage: Coverage
    gates: Gates
    engines: dict[str, str]  # variant -> path of what was measured
    engine_sha256: dict[str, str]
    symptoms: list[str] = field(default_factory=list)
    inputs: dict[str, str] | None = None  # --dense/--sparse: kind, dense, sparse
    preprocessing: dict[str, Any] | None = None  # recipe path: the measured evaluation transform (its record)
    layout: dict[str, Any] | None = None  # the sparse ONNX's per-layer 2:4 layout (pipeline/verify/layout.py)
    plan_layers: dict[str, Any] | None = None  # TensorRT plans: per layer tactic and sparse weights
    layer_times_ms: dict[str, Any] = field(default_factory=dict)
    layer_times_batch: int | None = None
    speedup_bound: dict[str, Any] | None = None
    seconds: float = 0.0
    plots: list[str] = field(default_factory=list)
    schema: str = SCHEMA

    def to_json(self) -> dict[str, Any]:
        content = to_json(self)
        return {"schema": content.pop("schema"), **content}

    @classmethod
    def from_json(cls, data: Any, where: str) -> VerificationReport:
        """The typed report from report.json's content; one error naming what is wrong (older schema included)."""
        what = f"{where} is not a verify report of schema {SCHEMA}"
        if isinstance(data, dict) and data.get("schema") != SCHEMA:
            raise PipelineError(f"{what} (its schema is {data.get('schema')!r}); {REFRESH}")
        return typed_from_json(cls, data, what, REFRESH)

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Verdict:
        """What package reads: the gates' verdict and the engines it is about, with the whole typed report ('not
        verified' when verify did not run); a report that is not this schema's is refused in one line."""
        path = Path(path)
        if not path.exists():  # verify did not run: package says "not verified" (or refuses with --require-verified)
            return Verdict(path, None)
        report = cls.from_json(read_json(path, fix=REFRESH), str(path))
        return Verdict(path, report.gates.passed, dict(report.engine_sha256), report)


@dataclass
class Verdict:
    path: Path
    passed: bool | None  # gates.passed; None when there is no report
    engine_sha256: dict[str, str] = field(default_factory=dict)  # variant -> sha256 of the engine verified
    report: VerificationReport | None = None

    @property
    def verdict(self) -> str:
        """'passed' / 'failed' from the gates, else 'not verified'."""
        return NOT_VERIFIED if self.passed is None else ("passed" if self.passed else "failed")

    def check_engines(self, build, model: str) -> None:
        """Refuse a verdict about other engines than the ones build.json lists now (verify is out of date)."""
        for variant, sha256 in self.engine_sha256.items():
            if build.engines.get(variant, {}).get("sha256") != sha256:
                raise PipelineError(
                    f"{self.path} verified another {variant} engine than build.json lists (the "
                    f"engines were rebuilt since); re-run `python -m pipeline verify --model {model}`"
                )


def latency_stats(times_ms: list[float], batch: int) -> dict[str, float]:
    values = np.asarray(times_ms, dtype=np.float64)
    mean = float(values.mean())
    return {
        "batch": batch,
        "iterations": int(values.size),
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": mean,
        "min_ms": float(values.min()),
        "images_per_s": batch * 1e3 / mean,
    }


def speedup_stats(dense_rounds: list[list[float]], sparse_rounds: list[list[float]], seed: int = 0) -> dict[str, Any]:
    """Speed-up = median over rounds of (dense round median / sparse round median), with its spread.

    Each round times dense and sparse back to back, so load from other processes and slow drift
    hit both alike: the paired per-round ratio is steadier than the ratio of the overall p50s
    (also reported, as `p50_ratio`). IQR and a bootstrap 95% interval of the median show the spread.
    """
    ratios = np.asarray([np.median(d) / np.median(s) for d, s in zip(dense_rounds, sparse_rounds)])
    p50_ratio = float(np.median(np.concatenate(dense_rounds)) / np.median(np.concatenate(sparse_rounds)))
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(ratios, size=(1000, ratios.size), replace=True), axis=1)
    return {
        "ratio": float(np.median(ratios)),
        "p50_ratio": p50_ratio,
        "rounds": int(ratios.size),
        "round_ratios": [float(r) for r in ratios],
        "iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
        "bootstrap_95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "min": float(ratios.min()),
        "max": float(ratios.max()),
    }


# --------------------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def render_markdown(report: dict[str, Any]) -> str:
    sections = (_header, _accuracy, _int8, _latency, _bound, _coverage, _layout, _layer_times, _gates, _plots)
    return "\n".join(line for section in sections for line in section(report))


def _header(report: dict[str, Any]) -> list[str]:
    lines = [
        f"# Verification report: {report['model']}",
        "",
        f"Backend **{report['backend']}** ({report['backend_reason']}).",
        "",
    ]
    if report.get("inputs"):
        lines += [f"Dense model `{report['inputs']['dense']}`, sparse model `{report['inputs']['sparse']}`.", ""]
    if not report["has_sparse_kernels"]:
        lines += [
            f"> **{report['backend']} has no sparse kernels.** The engines here verify correctness and "
            "accuracy; the speed-up below is measured but says nothing about 2:4 sparse kernels.",
            "",
        ]
    return lines


def _accuracy(report: dict[str, Any]) -> list[str]:
    acc, data = report["accuracy"], report["data"]
    return [
        "## Accuracy (through the engines)",
        "",
        f"Data: {data['description']}, {data['samples']} images"
        + ("" if data["accuracy_meaningful"] else " — **accuracy means nothing on this data**"),
        "",
        "| engine | top-1 % | top-5 % |",
        "|---|---|---|",
        f"| dense | {_fmt(acc['dense']['top1'])} | {_fmt(acc['dense']['top5'])} |",
        f"| sparse | {_fmt(acc['sparse']['top1'])} | {_fmt(acc['sparse']['top5'])} |",
        "",
        f"Top-1 drop {_fmt(acc['top1_drop'])} pt; dense/sparse prediction agreement "
        f"{_fmt(acc['agreement'] * 100)} %; largest logit difference {_fmt(acc.get('max_abs_logit_diff'), 4)}.",
        "",
    ]


def _int8(report: dict[str, Any]) -> list[str]:
    int8 = report["accuracy"].get("int8")
    if not int8:
        return []
    return [
        "INT8 Q/DQ graphs through ONNX Runtime (CPU), same images:",
        "",
        "| graph | top-1 % |",
        "|---|---|",
        f"| {int8['dense_graph']} | {_fmt(int8['dense_top1'])} |",
        f"| {int8['sparse_graph']} | {_fmt(int8['sparse_top1'])} |",
        "",
        f"INT8 sparse vs FP32 dense engine: drop {_fmt(int8['sparse_drop_vs_fp32_dense'])} pt.",
        "",
    ]


def _latency(report: dict[str, Any]) -> list[str]:
    lat = report["latency"]
    lines = [
        "## Latency (dense and sparse interleaved in the same run)",
        "",
        "| batch | engine | p50 ms | p90 ms | p99 ms | images/s | speed-up (paired) | per-round IQR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, entry in lat["by_batch"].items():
        speed = entry["speedup"]
        for variant in ("dense", "sparse"):
            stats = entry[variant]
            extra = (
                f"{speed['ratio']:.3f}x | {speed['iqr'][0]:.3f}-{speed['iqr'][1]:.3f}" if variant == "sparse" else " | "
            )
            lines.append(
                f"| {batch} | {variant} | {stats['p50_ms']:.3f} | {stats['p90_ms']:.3f} | "
                f"{stats['p99_ms']:.3f} | {stats['images_per_s']:.1f} | {extra} |"
            )
    spread = lat["speedup_spread"]["bootstrap_95"]
    lines += [
        "",
        f"Speed-up at the serving batch ({lat['serving_batch']}): **{report['speedup']:.3f}x** "
        f"(bootstrap 95% of the per-round median: {spread[0]:.3f}-{spread[1]:.3f}).",
        "",
        f"Method: {lat.get('method', 'not recorded')}.",
        "",
    ]
    host = lat.get("host_ms")
    if host:
        lines += [
            f"Host enqueue time per inference (not gated): dense {host['dense']['p50_ms']:.4f} ms, sparse "
            f"{host['sparse']['p50_ms']:.4f} ms (p50).",
            "",
        ]
    return lines


def _min_speedup(report: dict[str, Any]) -> Any:
    gate = next((g for g in report["gates"]["checks"] if g["name"] == "speedup"), None)
    return None if gate is None else gate["threshold"]


def _bound(report: dict[str, Any]) -> list[str]:
    """The best speed-up 2:4 can give (from the dense engine's per-layer GPU times) beside the measured one."""
    bound = report.get("speedup_bound")
    if not bound:
        return []
    lines = [
        "## Speed-up bound and measured speed-up",
        "",
        "| | speed-up |",
        "|---|---|",
        f"| bound: best end to end 2:4 can give this engine | {_fmt(bound['bound'], 3, 'x')} |",
        f"| measured (serving batch {report['latency']['serving_batch']}) | {_fmt(bound['measured'], 3, 'x')} |",
        f"| gate min_speedup | {_fmt(_min_speedup(report), 3, 'x')} |",
        "",
        f"Bound: {bound['note']}"
        + (
            f"; {100 * bound['sparse_time_share']:.1f} % of the dense engine's time is in layers with sparse kernels."
            if bound.get("sparse_time_share") is not None
            else "."
        ),
        "",
    ]
    if bound["layers"]:
        lines += [
            f"Per layer (batch {report.get('layer_times_batch') or 'the engine profile opt'}):",
            "",
            "| layer or fused block | dense ms | share % | sparse kernels | bound | sparse ms | measured |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in bound["layers"][:20]:
            kernels = {True: "yes", False: "no", None: "unknown"}[row["sparse_kernels"]]
            lines.append(
                f"| `{row['unit']}` | {row['dense_ms']:.4f} | {100 * row['share']:.1f} | {kernels} | "
                f"{row['bound']:.1f}x | {_fmt(row['sparse_ms'], 4)} | {_fmt(row['measured'], 3, 'x')} |"
            )
        lines.append("")
    return lines


def _coverage(report: dict[str, Any]) -> list[str]:
    cov = report["coverage"]
    kernels, masked, accelerable = (
        cov["sparse_kernel_mac_fraction"],
        cov["masked_mac_fraction"],
        cov["accelerable_mac_fraction"],
    )
    lines = [
        "## Coverage",
        "",
        f"Masked layers (carry 2:4 masks): {cov['masked_layers']} of {cov['masked_layers'] + cov['skipped_layers']}, "
        f"holding {_fmt(None if masked is None else masked * 100)} % of the MACs (gate masked_mac_fraction).",
        "Share of MACs in layers whose weights are in the 2:4 layout TensorRT's sparse kernels take: "
        + (
            f"{_fmt(accelerable * 100)} % ({cov['accelerable_note']}; gate accelerable_mac_fraction)."
            if accelerable is not None
            else f"n/a ({cov['accelerable_note']})."
        ),
        f"Masked layers whose exported ONNX weights passed the N:M check: {cov['exported_nm_layers']}.",
        "Share of MACs in layers that picked sparse kernels (reported, not gated): "
        + (f"{_fmt(kernels * 100)} %" if kernels is not None else f"n/a ({cov['sparse_kernel_note']})"),
        "",
    ]
    skipped = [layer for layer in cov["layers"] if not layer["masked"]]
    if skipped and cov["basis"] == "masks":
        lines += ["Skipped layers:", ""] + [f"- `{layer['name']}`: {layer['reason']}" for layer in skipped] + [""]
    return lines


def _layout(report: dict[str, Any]) -> list[str]:
    layout = report.get("layout")
    if not layout:
        return []
    total = max(layout["total_macs"], 1)
    lines = [
        "## 2:4 layout of the sparse model (per layer)",
        "",
        f"Rule: {layout['rule']}.",
        "",
        "| class | MACs % |",
        "|---|---|",
    ]
    lines += [f"| {name} | {100 * macs / total:.1f} |" for name, macs in layout["macs_by_class"].items()]
    lines += [
        "",
        f"Accelerable (tensorrt 2:4): **{100 * layout['accelerable_mac_fraction']:.1f} %** of the MACs.",
        "",
        "| layer | weight | op | shape | MACs % | layout | axis | kept weights | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layer in layout["layers"]:
        lines.append(
            f"| `{layer['name']}` | `{layer['weight']}` | {layer['op']} | {layer['shape']} | "
            f"{100 * layer['macs'] / total:.2f} | "
            f"{layer['layout']} | {layer['axis']} | {layer['kept']} | {layer['note']} |"
        )
    lines += [""] + [f"- skipped `{layer['name']}` ({layer['op']}): {layer['reason']}" for layer in layout["skipped"]]
    return lines + [""]


def _layer_times(report: dict[str, Any]) -> list[str]:
    times = report.get("layer_times_ms") or {}
    if not (times.get("dense") and times.get("sparse")):
        return []
    slowest = sorted(times["dense"].items(), key=lambda item: -item[1])[:10]
    batch = report.get("layer_times_batch")
    lines = [
        "Slowest nodes of the dense engine (backend profiler, "
        + (f"batch {batch}):" if batch else "at the batch the backend's profiler chose):"),
        "",
        "| node | dense ms | sparse ms |",
        "|---|---|---|",
    ]
    return lines + [f"| `{node}` | {ms:.3f} | {_fmt(times['sparse'].get(node), 3)} |" for node, ms in slowest] + [""]


def _gates(report: dict[str, Any]) -> list[str]:
    gates = report["gates"]
    lines = ["## Gates", "", "| gate | value | threshold | result |", "|---|---|---|---|"]
    for gate in gates["checks"]:
        result = "pass" if gate["passed"] else ("skipped: " + gate["skipped"] if gate["passed"] is None else "FAIL")
        lines.append(
            f"| {gate['name']} | {_fmt(gate['value'], 3)} | {gate['comparison']} {gate['threshold']} | {result} |"
        )
    return lines + ["", f"**{'PASSED' if gates['passed'] else 'FAILED'}**", ""]


def _plots(report: dict[str, Any]) -> list[str]:
    if not report.get("plots"):
        return []
    return ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]] + [""]


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_latency(raw: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """Box plots of per-iteration latency, dense vs sparse, one panel per batch size."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(raw), figsize=(4.0 * len(raw), 3.6), squeeze=False)
    for ax, (batch, times) in zip(axes[0], raw.items()):
        ax.boxplot([times["dense"], times["sparse"]], showfliers=True)
        ax.set_xticks([1, 2], ["dense", "sparse"])
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("latency (ms)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_accuracy(accuracy: dict[str, Any], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    x = np.arange(2)
    for offset, variant in ((-0.2, "dense"), (0.2, "sparse")):
        values = [accuracy[variant]["top1"], accuracy[variant]["top5"]]
        bars = ax.bar(x + offset, values, width=0.4, label=variant)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, ["top-1", "top-5"])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_coverage(layers: list[dict[str, Any]], path: Path, title: str) -> None:
    """MACs per Conv/Linear layer, coloured by masked / sparse kernel / skipped."""
    plt = _pyplot()
    height = max(3.0, 0.18 * len(layers) + 1.0)
    fig, ax = plt.subplots(figsize=(7.0, height))
    colours = {"sparse kernel": "tab:green", "masked": "tab:blue", "skipped": "tab:grey"}
    for index, layer in enumerate(layers):
        state = "skipped" if not layer["masked"] else ("sparse kernel" if layer.get("sparse_kernel") else "masked")
        ax.barh(index, layer["macs"] / 1e6, color=colours[state])
    ax.set_yticks(range(len(layers)), [layer["name"] for layer in layers], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("MMACs per image")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_layout(layers: list[dict[str, Any]], path: Path, title: str) -> None:
    """MACs per Conv/Gemm/MatMul of the sparse model, coloured by its 2:4 layout class."""
    plt = _pyplot()
    colours = {
        "tensorrt 2:4": "tab:green",
        "2:4 in another layout": "tab:red",
        "dense": "tab:grey",
        "grouped/depthwise (never sparse)": "tab:purple",
        "too small to matter": "tab:olive",
    }
    fig, ax = plt.subplots(figsize=(7.0, max(3.0, 0.18 * len(layers) + 1.0)))
    for index, layer in enumerate(layers):
        ax.barh(index, layer["macs"] / 1e6, color=colours.get(layer["layout"], "black"))
    ax.set_yticks(range(len(layers)), [layer["name"] for layer in layers], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("MMACs per image")
    present = [name for name in colours if any(layer["layout"] == name for layer in layers)]
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in present], present, fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


# --------------------------------------------------------------------------- JUnit
def junit_xml(report: dict[str, Any]) -> str:
    checks = report["gates"]["checks"]
    failures = sum(1 for gate in checks if gate["passed"] is False)
    skipped = sum(1 for gate in checks if gate["passed"] is None)
    suite = f"verify.{report['model']}"
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<testsuites><testsuite name={quoteattr(suite)} tests="{len(checks)}" failures="{failures}" '
        f'errors="0" skipped="{skipped}">',
    ]
    for gate in checks:
        message = f"{gate['name']} = {_fmt(gate['value'], 4)} (needs {gate['comparison']} {gate['threshold']})"
        lines.append(f"  <testcase classname={quoteattr(suite)} name={quoteattr(gate['name'])}>")
        if gate["passed"] is False:
            lines.append(f"    <failure message={quoteattr(message)}/>")
        elif gate["passed"] is None:
            lines.append(f"    <skipped message={quoteattr(gate['skipped'])}/>")
        lines.append(f"    <system-out>{_escape(message)}</system-out>")
        lines.append("  </testcase>")
    lines.append("</testsuite></testsuites>")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_junit(path: Path, report: dict[str, Any]) -> None:
    write_text(path, junit_xml(report))
