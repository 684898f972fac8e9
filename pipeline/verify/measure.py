"""What verify measures on a dense/sparse pair of runners: accuracy, interleaved latency, and the gates.

A runner is anything with `infer(batch)` and `time_batch(batch, iterations, warmup)` (pipeline.backends.Runner):
an engine of the build stage, an ONNX file through ONNX Runtime, or a TensorRT plan.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.progress import progress
from pipeline.verify.report import latency_stats, speedup_stats


def _count(logits: np.ndarray, labels: np.ndarray, counts: dict[str, int]) -> np.ndarray:
    k = min(5, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    counts["top1"] += int((top[:, 0] == labels).sum())
    counts["top5"] += int((top == labels[:, None]).any(1).sum())
    return top[:, 0]


def measure_accuracy(runners, dataset, batch_size: int) -> dict[str, Any]:
    """Top-1/top-5 of each runner, dense/sparse agreement and the largest logit difference, on DATASET."""
    from pipeline.data.datasets import make_loader

    counts = {variant: {"top1": 0, "top5": 0} for variant in runners}
    agree = total = 0
    max_diff = 0.0
    for images, labels in progress(make_loader(dataset, batch_size=batch_size), desc="accuracy (engines)"):
        batch, labels = images.numpy().astype(np.float32), labels.numpy()
        logits = {variant: np.asarray(runner.infer(batch), dtype=np.float32) for variant, runner in runners.items()}
        predictions = {variant: _count(logits[variant], labels, counts[variant]) for variant in runners}
        agree += int((predictions["dense"] == predictions["sparse"]).sum())
        max_diff = max(max_diff, float(np.abs(logits["dense"] - logits["sparse"]).max()))
        total += labels.size
    if not total:
        raise PipelineError("the evaluation set is empty; check --data and data.eval_limit")
    result: dict[str, Any] = {
        variant: {"top1": 100.0 * c["top1"] / total, "top5": 100.0 * c["top5"] / total} for variant, c in counts.items()
    }
    result.update(
        samples=total,
        agreement=agree / total,
        top1_drop=result["dense"]["top1"] - result["sparse"]["top1"],
        max_abs_logit_diff=max_diff,
    )
    return result


HOST_METHOD = "host wall-clock per run (perf_counter around the runtime's run call)"


def timing_method(runner) -> str:
    """How a runner's time_batch figures were taken (a TensorRT runner says: GPU compute time, CUDA events)."""
    return getattr(runner, "timing_method", "") or HOST_METHOD


def measure_latency(runners, input_shape, batches: list[int], iterations: int, warmup: int):
    """Interleaved rounds (dense, sparse / sparse, dense alternating); per-iteration times in ms.

    Each figure is what the runner's time_batch returns (a TensorRT runner: GPU compute time per inference);
    a runner that also measures host (enqueue) time keeps it in `last_host_ms`, reported beside, never gated."""
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
        host: dict[str, list[float]] = {"dense": [], "sparse": []}
        for index in range(rounds):
            order = ("dense", "sparse") if index % 2 == 0 else ("sparse", "dense")
            for variant in order:
                per_variant[variant].append(runners[variant].time_batch(data, per_round, 0))
                host[variant].extend(getattr(runners[variant], "last_host_ms", None) or [])
            bar.update(1)
        raw[str(batch)] = {variant: [t for chunk in chunks for t in chunk] for variant, chunks in per_variant.items()}
        by_batch[str(batch)] = {
            "dense": latency_stats(raw[str(batch)]["dense"], batch),
            "sparse": latency_stats(raw[str(batch)]["sparse"], batch),
            "speedup": speedup_stats(per_variant["dense"], per_variant["sparse"]),
            "method": {variant: timing_method(runner) for variant, runner in runners.items()},
        }
        if host["dense"] and host["sparse"]:
            by_batch[str(batch)]["host_ms"] = {v: latency_stats(times, batch) for v, times in host.items()}
    bar.close()
    return by_batch, raw


def latency_section(by_batch: dict[str, Any], serving: int) -> dict[str, Any]:
    """report.json's `latency` from measure_latency's figures."""
    entry = by_batch[str(serving)]
    methods = sorted(set(entry.get("method", {}).values())) or [HOST_METHOD]
    return {
        "dense": entry["dense"],
        "sparse": entry["sparse"],
        "serving_batch": serving,
        "speedup_spread": entry["speedup"],
        "by_batch": by_batch,
        "method": "dense and sparse interleaved per round (order alternating), after warm-up; each figure: "
        + " / ".join(methods),
        "host_ms": entry.get("host_ms"),
    }


def layer_times(runners, batch: int) -> tuple[dict[str, Any], int | None]:
    """Per-layer times of each runner at `batch` where the runner takes a batch (TensorRT; else its own), and the
    batch they ran at (None when a runner chooses its own)."""
    import inspect

    times, asked = {}, True
    for variant, runner in runners.items():
        if "batch" in inspect.signature(runner.layer_times).parameters:
            times[variant] = runner.layer_times(batch=batch)
        else:
            times[variant], asked = runner.layer_times(), False
    return times, batch if asked else None


def close_runners(runners) -> None:
    """Release each runner that holds a device context (TensorRT runners are deactivated)."""
    for runner in runners.values():
        close = getattr(runner, "close", None)
        if close is not None:
            close()
