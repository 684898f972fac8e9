"""The one verification report (issue 33): the one assembly of measurements, coverage and gates
(pipeline/verify/assemble.py) into the typed VerificationReport, its JSON round trip and typed reading, and the
two coverage gates that replace --min-coverage's two meanings."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.recipe.config import VerifyConfig
from pipeline.verify.assemble import Settings, Subject, verify_runners
from pipeline.verify.report import SCHEMA, Coverage, VerificationReport


class Linear:
    """A runner: logits = images @ W (the sparse one with some weights zeroed), fixed per-call latency."""

    def __init__(self, weight: np.ndarray, ms: float):
        self.weight, self.ms = weight, ms

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1) @ self.weight

    def time_batch(self, batch, iterations, warmup):
        return [self.ms] * iterations

    def layer_times(self):
        return {"fc (Gemm)": self.ms}


def _data(images: int = 24, meaningful: bool = True):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((images, 1, 2, 2)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, images))
    return types.SimpleNamespace(
        eval=torch.utils.data.TensorDataset(x, y),
        kind="imagefolder",
        description="test",
        accuracy_meaningful=meaningful,
    )


def _coverage(masked: float | None, accelerable: float | None) -> Coverage:
    return Coverage(
        basis="layout",
        total_macs=12,
        masked_mac_fraction=masked,
        accelerable_mac_fraction=accelerable,
        accelerable_note="from the test" if accelerable is not None else "no ONNX for the layout report",
        sparse_kernel_mac_fraction=None,
        sparse_kernel_note="none",
        masked_layers=1,
        skipped_layers=0,
        exported_nm_layers="n/a",
        layers=[{"name": "fc", "kind": "Gemm", "macs": 12, "masked": True, "reason": "", "mac_fraction": 1.0}],
    )


def _verify(cfg: VerifyConfig, coverage: Coverage, has_kernels: bool = False, sparse_ms: float = 1.0):
    weight = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    runners = {"dense": Linear(weight, 2.0), "sparse": Linear(weight, sparse_ms)}  # the same model: agreement 1
    subject = Subject(
        model="m",
        backend="tensorrt" if has_kernels else "onnxruntime",
        backend_reason="test",
        has_sparse_kernels=has_kernels,
        engines={"dense": "d", "sparse": "s"},
        engine_sha256={"dense": "0" * 64, "sparse": "1" * 64},
        input_shape=[1, 2, 2],
        batch_range=(1, 8),
    )
    settings = Settings(cfg, eval_batch_size=8, preprocess={"mean": [0.5]})
    return verify_runners(subject, runners, settings, _data(), coverage)


def _gates(report: VerificationReport) -> dict:
    return {gate.name: gate for gate in report.gates.checks}


def test_one_assembly_gives_the_typed_report_and_it_round_trips(tmp_path):
    cfg = VerifyConfig(latency_iters=4, warmup_iters=0, serving_batch=4)
    report, raw = _verify(cfg, _coverage(0.9, 0.8), has_kernels=True, sparse_ms=1.0)
    assert report.speedup == pytest.approx(2.0) and report.latency.serving_batch == 4 and set(raw) == {"1", "4"}
    assert report.accuracy.agreement == 1.0 and report.accuracy.top1_drop == 0.0 and report.data.batch_size == 8
    assert [gate.name for gate in report.gates.checks] == [
        "top1_drop",
        "speedup",
        "masked_mac_fraction",
        "accelerable_mac_fraction",
        "agreement",
        "sparse_top1_above_dense",
    ]
    assert report.gates.passed and all(gate.passed for gate in report.gates.checks)
    content = report.to_json()
    assert next(iter(content)) == "schema" and content["schema"] == SCHEMA
    assert VerificationReport.from_json(json.loads(json.dumps(content)), "r") == report
    report.save(tmp_path / "report.json")
    verdict = VerificationReport.load(tmp_path / "report.json")
    assert verdict.verdict == "passed" and verdict.engine_sha256 == report.engine_sha256
    assert verdict.report == report


def test_the_two_coverage_gates_gate_their_own_share():
    """A model masked by count (90% of its MACs) whose masks are mostly in another layout (10% accelerable): the
    masked gate passes and the accelerable gate fails, each against its own threshold."""
    cfg = VerifyConfig(latency_iters=2, warmup_iters=0, min_masked_coverage=0.5, min_accelerable_coverage=0.5)
    report, _ = _verify(cfg, _coverage(0.9, 0.1))
    gates = _gates(report)
    assert gates["masked_mac_fraction"].passed is True and gates["masked_mac_fraction"].threshold == 0.5
    assert gates["accelerable_mac_fraction"].passed is False and report.gates.passed is False
    assert [gate.name for gate in report.gates.failed] == ["accelerable_mac_fraction"]
    cfg = VerifyConfig(latency_iters=2, warmup_iters=0, min_masked_coverage=0.95, min_accelerable_coverage=0.05)
    gates = _gates(_verify(cfg, _coverage(0.9, 0.1))[0])
    assert gates["masked_mac_fraction"].passed is False and gates["accelerable_mac_fraction"].passed is True
    # no layout known: the accelerable gate is skipped with the reason, never passed
    gates = _gates(_verify(cfg, _coverage(None, None))[0])
    assert gates["accelerable_mac_fraction"].passed is None
    assert gates["accelerable_mac_fraction"].skipped == "no ONNX for the layout report"
    assert gates["masked_mac_fraction"].passed is None and gates["masked_mac_fraction"].skipped == "not measured"


def test_speedup_is_gated_only_with_sparse_kernels():
    cfg = VerifyConfig(latency_iters=2, warmup_iters=0, min_speedup=3.0)
    assert _gates(_verify(cfg, _coverage(0.9, 0.9), has_kernels=True)[0])["speedup"].passed is False
    skipped = _gates(_verify(cfg, _coverage(0.9, 0.9), has_kernels=False)[0])["speedup"]
    assert skipped.passed is None and "no sparse kernels" in skipped.skipped


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda c: c.update(schema="sparse-pipeline/report/v1"), "schema is 'sparse-pipeline/report/v1'"),
        (lambda c: c["gates"].update(passed="yes"), "'gates.passed' is a string, expected a boolean"),
        (lambda c: c["accuracy"]["dense"].pop("top1"), "(no 'accuracy.dense.top1')"),
        (
            lambda c: c["coverage"].update(masked_mac_fraction="0.9"),
            "'coverage.masked_mac_fraction' is a string, expected a number or null",
        ),
        (lambda c: c.update(engine_sha256={"dense": 1}), "'engine_sha256.dense' is a number, expected a string"),
        (lambda c: c["latency"]["dense"].update(p50_ms=True), "'latency.dense.p50_ms' is a boolean, expected a number"),
    ],
)
def test_reading_checks_every_typed_field(tmp_path, change, named):
    report, _ = _verify(VerifyConfig(latency_iters=2, warmup_iters=0), _coverage(0.9, 0.9))
    content = report.to_json()
    change(content)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(content))
    with pytest.raises(PipelineError) as caught:
        VerificationReport.load(path)
    assert named in str(caught.value) and "re-run `python -m pipeline verify`" in str(caught.value)


def test_missing_report_is_not_verified(tmp_path):
    verdict = VerificationReport.load(tmp_path / "report.json")
    assert verdict.verdict == "not verified" and verdict.report is None


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--min-coverage", "0.5"], "--min-coverage is gone (it meant two things): pass --min-masked-coverage"),
        (["--set", "verify.min_coverage=0.5"], "verify.min_coverage was removed; use verify.min_masked_coverage"),
    ],
)
def test_the_old_coverage_flag_and_field_are_refused_with_their_replacements(tmp_path, capsys, argv, expected):
    try:
        code = main(["verify", "--model", "tiny_resnet", "--out", str(tmp_path), *argv])
    except SystemExit as exc:  # a flag mistake: the parser's one error line
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "min_accelerable_coverage" in err.replace("-", "_")
    assert len(err.strip().splitlines()) == 1 and not any(tmp_path.iterdir())
