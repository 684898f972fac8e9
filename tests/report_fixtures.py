"""A small but complete report.json (schema v2) for tests of the stages that read verify's verdict (package,
check-manifest): built from the typed VerificationReport itself, so it is exactly what verify writes."""

from __future__ import annotations

from pathlib import Path

from pipeline.verify.report import (
    Accuracy,
    Coverage,
    DataInfo,
    Gate,
    Gates,
    Latency,
    LatencyStats,
    SpeedupStats,
    TopK,
    VerificationReport,
)


def _stats(batch: int, ms: float) -> LatencyStats:
    return LatencyStats(batch, 3, ms, ms, ms, ms, ms, batch * 1000.0 / ms)


def verify_report(model: str, passed: bool, engine_sha256: dict[str, str] | None = None) -> VerificationReport:
    """A report whose one gate (top1_drop) passed or failed, about the engines ENGINE_SHA256 names."""
    drop = 0.1 if passed else 3.0
    gate = Gate("top1_drop", drop, 0.5, "<=", passed, "")
    spread = SpeedupStats(1.0, 1.0, 1, [1.0], [1.0, 1.0], [1.0, 1.0], 1.0, 1.0)
    return VerificationReport(
        model=model,
        backend="onnxruntime",
        backend_reason="test",
        has_sparse_kernels=False,
        note="written by tests/report_fixtures.py",
        data=DataInfo("synthetic", "test images", 10, True, 4),
        accuracy=Accuracy(TopK(90.0, 99.0), TopK(90.0 - drop, 99.0), 10, 1.0, drop, 0.01),
        latency=Latency(_stats(4, 1.0), _stats(4, 1.0), 4, spread, {}, "test"),
        speedup=1.0,
        coverage=Coverage("masks", 100, 0.9, None, "test", None, "test", 1, 0, "n/a", []),
        gates=Gates(passed, [gate]),
        engines={},
        engine_sha256=dict(engine_sha256 or {}),
    )


def write_verify_report(folder: Path, model: str, passed: bool) -> Path:
    path = Path(folder) / "report.json"
    verify_report(model, passed).save(path)
    return path
