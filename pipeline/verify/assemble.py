"""The one assembly of a verification: measurements, coverage and gates into the typed `VerificationReport`.

Both verify paths end here: the recipe path (pipeline/verify/engines.py: the build stage's engines) and
`verify --dense/--sparse` (pipeline/verify/external.py: files made by any tool). Each says what it verifies
(`Subject`: backend, engines, batch range, and what it knows about the sparse model's layers: `Coverage`);
this module measures accuracy and interleaved latency, times the layers, bounds the speed-up, and applies the
same gates on both paths:

* `top1_drop` <= verify.max_top1_drop (skipped on data whose accuracy means nothing);
* `speedup` >= verify.min_speedup (gated only on backends with sparse kernels);
* `masked_mac_fraction` >= verify.min_masked_coverage: the share of MACs in layers that carry 2:4 masks;
* `accelerable_mac_fraction` >= verify.min_accelerable_coverage: the share of MACs in layers whose weights are in
  the 2:4 layout TensorRT's sparse kernels take (those that can run sparse);
* `agreement` and `sparse_top1_above_dense` (pipeline/verify/gates.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.recipe.config import VerifyConfig
from pipeline.records import typed_from_json
from pipeline.verify.gates import agreement_gates, not_meaningful, symptoms
from pipeline.verify.measure import latency_section, layer_times, measure_accuracy, measure_latency
from pipeline.verify.report import (
    Accuracy,
    Coverage,
    DataInfo,
    Gate,
    Gates,
    Int8Accuracy,
    Latency,
    VerificationReport,
)

BUG = "a bug in verify"
MEASURED = "verify's measurements are not what the report holds"


@dataclass
class Subject:
    """What one verification is about, as its path knows it."""

    model: str
    backend: str
    backend_reason: str
    has_sparse_kernels: bool
    engines: dict[str, str]  # variant -> path
    engine_sha256: dict[str, str]
    input_shape: list[int]  # C, H, W
    batch_range: tuple[int, int]  # the batches both engines take
    random_weights: bool = False  # predictions mean nothing: the agreement gates are skipped
    inputs: dict[str, str] | None = None
    preprocessing: dict[str, Any] | None = None
    plan_layers: dict[str, Any] | None = None
    # per-layer times and the speed-up the layers allow -> report.json's speedup_bound
    bound: Callable[[dict[str, Any], float], dict[str, Any] | None] | None = None
    int8: Callable[[float], dict[str, Any]] | None = None  # FP32 dense top-1 -> the INT8 graphs' accuracy


@dataclass
class Settings:
    """The narrow configuration a verification takes (the recipe's verify section and two data settings)."""

    verify: VerifyConfig
    eval_batch_size: int
    preprocess: dict[str, Any]


def clamp(value: int, batch_range: tuple[int, int]) -> int:
    low, high = batch_range
    return max(low, min(value, high))


def verify_runners(
    subject: Subject, runners: dict[str, Any], settings: Settings, data, coverage: Coverage, layout: Any = None
) -> tuple[VerificationReport, dict]:
    """Measure RUNNERS (dense, sparse) on DATA, gate, and return the typed report and the raw latencies."""
    started = time.time()
    cfg = settings.verify
    eval_batch = clamp(settings.eval_batch_size, subject.batch_range)
    serving = clamp(cfg.serving_batch, subject.batch_range)
    accuracy = typed_from_json(Accuracy, measure_accuracy(runners, data.eval, eval_batch), MEASURED, BUG, "accuracy")
    if subject.int8 is not None:
        accuracy.int8 = typed_from_json(Int8Accuracy, subject.int8(accuracy.dense.top1), MEASURED, BUG, "accuracy.int8")
    batches = sorted({max(subject.batch_range[0], 1), serving})
    by_batch, raw = measure_latency(runners, subject.input_shape, batches, cfg.latency_iters, cfg.warmup_iters)
    latency = typed_from_json(Latency, latency_section(by_batch, serving), MEASURED, BUG, "latency")
    speedup = latency.speedup_spread.ratio
    times, times_batch = layer_times(runners, serving)
    info = DataInfo(data.kind, data.description, accuracy.samples, data.accuracy_meaningful, eval_batch)
    info.preprocess = dict(settings.preprocess)
    meaningless = not_meaningful(None, data.kind, data.accuracy_meaningful) or (
        "random weights: predictions mean nothing" if subject.random_weights else ""
    )
    report = VerificationReport(
        model=subject.model,
        backend=subject.backend,
        backend_reason=subject.backend_reason,
        has_sparse_kernels=subject.has_sparse_kernels,
        note=""
        if subject.has_sparse_kernels
        else f"{subject.backend} has no sparse kernels: this run verifies correctness, accuracy and coverage, "
        "not speed-up",
        data=info,
        accuracy=accuracy,
        latency=latency,
        speedup=speedup,
        coverage=coverage,
        gates=Gates.of(checks(subject, accuracy, info, speedup, coverage, cfg, meaningless)),
        engines=dict(subject.engines),
        engine_sha256=dict(subject.engine_sha256),
        symptoms=symptoms(_figures(accuracy), cfg, meaningless),
        inputs=subject.inputs,
        preprocessing=subject.preprocessing,
        layout=layout,
        plan_layers=subject.plan_layers,
        layer_times_ms=times,
        layer_times_batch=times_batch,
        speedup_bound=subject.bound(times, speedup) if subject.bound else None,
    )
    report.seconds = round(time.time() - started, 2)
    return report, raw


def _figures(accuracy: Accuracy) -> dict[str, Any]:
    """measure_accuracy's figures, as the gates of pipeline/verify/gates.py read them."""
    return {
        "dense": {"top1": accuracy.dense.top1},
        "sparse": {"top1": accuracy.sparse.top1},
        "agreement": accuracy.agreement,
        "top1_drop": accuracy.top1_drop,
        "samples": accuracy.samples,
    }


def checks(
    subject: Subject,
    accuracy: Accuracy,
    data: DataInfo,
    speedup: float,
    coverage: Coverage,
    cfg: VerifyConfig,
    meaningless: str,
) -> list[Gate]:
    """The gates, in report order (the module docstring says what each means)."""
    no_accuracy = "" if data.accuracy_meaningful else f"{data.kind} data: accuracy means nothing"
    no_kernels = f"{subject.backend} has no sparse kernels: speed-up is reported, not gated"
    return [
        Gate.check("top1_drop", accuracy.top1_drop, cfg.max_top1_drop, "<=", no_accuracy),
        Gate.check("speedup", speedup, cfg.min_speedup, ">=", "" if subject.has_sparse_kernels else no_kernels),
        Gate.check("masked_mac_fraction", coverage.masked_mac_fraction, cfg.min_masked_coverage, ">="),
        Gate.check(
            "accelerable_mac_fraction",
            coverage.accelerable_mac_fraction,
            cfg.min_accelerable_coverage,
            ">=",
            "" if coverage.accelerable_mac_fraction is not None else coverage.accelerable_note,
        ),
        *agreement_gates(_figures(accuracy), cfg, meaningless),
    ]
