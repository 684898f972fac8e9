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
        by_batch[str(batch)] = {
            "dense": latency_stats(raw[str(batch)]["dense"], batch),
            "sparse": latency_stats(raw[str(batch)]["sparse"], batch),
            "speedup": speedup_stats(per_variant["dense"], per_variant["sparse"]),
        }
    bar.close()
    return by_batch, raw


def latency_section(by_batch: dict[str, Any], serving: int) -> dict[str, Any]:
    """report.json's `latency` from measure_latency's figures."""
    entry = by_batch[str(serving)]
    return {
        "dense": entry["dense"],
        "sparse": entry["sparse"],
        "serving_batch": serving,
        "speedup_spread": entry["speedup"],
        "by_batch": by_batch,
        "method": "dense and sparse interleaved per round (order alternating), perf_counter, after warm-up",
    }


# --------------------------------------------------------------------------- gates
def gate(name: str, value, threshold: float, comparison: str, skipped: str = "") -> dict[str, Any]:
    if skipped or value is None:
        passed = None
    else:
        passed = bool(value <= threshold) if comparison == "<=" else bool(value >= threshold)
    return {
        "name": name,
        "value": value,
        "threshold": threshold,
        "comparison": comparison,
        "passed": passed,
        "skipped": skipped or ("" if value is not None else "not measured"),
    }


def gates_section(checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"passed": all(check["passed"] is not False for check in checks), "checks": checks}
