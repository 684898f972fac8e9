"""build + verify on ONNX Runtime: report schema, plots, JUnit, gates and their exit codes, interleaved timing."""

import json
import xml.etree.ElementTree as ET

import pytest
from nm_fixtures import MODEL, dense_weights_file, make_artifacts

from pipeline.backends.build_report import BuildReport
from pipeline.cli import main
from pipeline.verify.engines import sparse_kernel_coverage
from pipeline.verify.measure import measure_latency
from pipeline.verify.report import VerificationReport, latency_stats, speedup_stats


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    weights = dense_weights_file(root)
    out = root / "engines"
    paths = make_artifacts(out, weights)
    common = ["--model", MODEL, "--out", str(out), "--weights", str(weights)]
    assert main(["export", *common, "--no-fp16"]) == 0
    assert main(["build", *common, "--backend", "auto"]) == 0
    return paths, common, root


def test_build_report_names_backend_and_reason(built):
    paths, _, _ = built
    build = json.loads(paths.build_report.read_text())
    assert build["backend"] == "onnxruntime" and build["reason"].startswith("auto: onnxruntime")
    assert build["has_sparse_kernels"] is False and "no sparse kernels" in build["note"]
    for variant in ("dense", "sparse"):
        assert build["engines"][variant]["engine"] == f"onnxruntime/{variant}.ort.onnx"


def test_verify_writes_report_plots_and_junit(built):
    paths, common, root = built
    junit = root / "verify.xml"
    assert main(["verify", *common, "--junit", str(junit), "--iters", "6"]) == 0
    report = json.loads(paths.report_json.read_text())
    assert report["schema"] == "sparse-pipeline/report/v2" and report["backend"] == "onnxruntime"
    for variant in ("dense", "sparse"):
        assert 0 <= report["accuracy"][variant]["top1"] <= report["accuracy"][variant]["top5"] <= 100
        assert report["latency"][variant]["p50_ms"] > 0
        assert report["latency"][variant]["p50_ms"] <= report["latency"][variant]["p99_ms"]
    assert report["accuracy"]["samples"] == 32 and 0 <= report["accuracy"]["agreement"] <= 1
    assert set(report["latency"]["by_batch"]) == {"1", "8"}
    spread = report["latency"]["speedup_spread"]
    assert report["speedup"] > 0 and spread["iqr"][0] <= spread["iqr"][1] and spread["rounds"] == 6
    assert report["coverage"]["masked_mac_fraction"] == pytest.approx(0.9776, abs=1e-3)
    assert report["coverage"]["sparse_kernel_mac_fraction"] is None  # ONNX Runtime has no sparse kernels
    assert report["gates"]["passed"] is True
    gates = {gate["name"]: gate for gate in report["gates"]["checks"]}
    assert gates["top1_drop"]["passed"] is None and "accuracy means nothing" in gates["top1_drop"]["skipped"]
    assert gates["speedup"]["passed"] is None and "no sparse kernels" in gates["speedup"]["skipped"]
    assert gates["masked_mac_fraction"]["passed"] is True and gates["masked_mac_fraction"]["threshold"] == 0.5
    # the second coverage gate: the sparse graph's weights in TensorRT's 2:4 layout (tiny_resnet's masks are)
    accelerable = report["coverage"]["accelerable_mac_fraction"]
    assert accelerable == pytest.approx(report["layout"]["accelerable_mac_fraction"]) and accelerable > 0.5
    assert gates["accelerable_mac_fraction"]["passed"] is True and report["coverage"]["basis"] == "masks"
    assert VerificationReport.from_json(report, "report.json").to_json() == report  # the one typed report
    markdown = paths.report_md.read_text()
    assert "has no sparse kernels" in markdown and "| dense |" in markdown and "`conv1`" in markdown
    for plot in report["plots"]:
        with open(plot, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    suite = ET.parse(junit).getroot().find("testsuite")
    # top1_drop, speedup, masked_mac_fraction, accelerable_mac_fraction, agreement, sparse_top1_above_dense (the
    # last two skipped: random weights)
    assert suite.get("tests") == "6" and suite.get("skipped") == "4" and suite.get("failures") == "0"


def test_failed_gate_exits_1_and_flags_override_set(built, capsys):
    paths, common, root = built
    junit = root / "failed.xml"
    code = main(
        [
            "verify",
            *common,
            "--set",
            "verify.min_masked_coverage=0.99",
            "--iters",
            "2",
            "--no-plots",
            "--junit",
            str(junit),
        ]
    )
    assert code == 1
    assert "gate failed: masked_mac_fraction" in capsys.readouterr().err
    assert json.loads(paths.report_json.read_text())["gates"]["passed"] is False
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "1"
    # the flag beats --set
    assert (
        main(
            [
                "verify",
                *common,
                "--set",
                "verify.min_masked_coverage=0.99",
                "--min-masked-coverage",
                "0.5",
                "--iters",
                "2",
                "--no-plots",
            ]
        )
        == 0
    )


def test_accelerable_gate_on_the_recipe_path(built, capsys):
    """The recipe path gates the share in TensorRT's 2:4 layout too (from the sparse graph the engine was built
    from), under its own field; a sparse graph changed since build is refused, not measured."""
    paths, common, _ = built
    code = main(["verify", *common, "--min-accelerable-coverage", "0.99", "--iters", "2", "--no-plots"])
    assert code == 1 and "gate failed: accelerable_mac_fraction" in capsys.readouterr().err
    report = json.loads(paths.report_json.read_text())
    gates = {gate["name"]: gate for gate in report["gates"]["checks"]}
    assert gates["masked_mac_fraction"]["passed"] is True and gates["accelerable_mac_fraction"]["threshold"] == 0.99
    original = paths.sparse_onnx.read_bytes()
    try:
        paths.sparse_onnx.write_bytes(original + b"\0")
        assert main(["verify", *common, "--iters", "2", "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert f"{paths.sparse_onnx} changed since build wrote it" in err and len(err.strip().splitlines()) == 1
        assert json.loads(paths.report_json.read_text()) == report  # the failed stage changed no artifact
    finally:
        paths.sparse_onnx.write_bytes(original)


def test_top1_gate_applies_when_accuracy_is_meaningful(built, monkeypatch):
    _, common, _ = built
    import pipeline.data.datasets

    real = pipeline.data.datasets.build_datasets

    def meaningful(recipe, **kwargs):
        bundle = real(recipe, **kwargs)
        bundle.accuracy_meaningful = True
        return bundle

    monkeypatch.setattr(pipeline.data.datasets, "build_datasets", meaningful)
    assert main(["verify", *common, "--max-top1-drop", "-1", "--iters", "2", "--no-plots"]) == 1
    assert main(["verify", *common, "--max-top1-drop", "100", "--iters", "2", "--no-plots"]) == 0


class FakeRunner:
    def __init__(self, name, log, ms):
        self.name, self.log, self.ms = name, log, ms

    def time_batch(self, batch, iterations, warmup):
        if iterations:
            self.log.append(self.name)
        return [self.ms] * iterations


def test_latency_rounds_interleave_dense_and_sparse():
    log = []
    runners = {"dense": FakeRunner("dense", log, 2.0), "sparse": FakeRunner("sparse", log, 1.0)}
    by_batch, raw = measure_latency(runners, [1, 4, 4], [1, 8], iterations=8, warmup=1)
    assert log[:4] == ["dense", "sparse", "sparse", "dense"] and len(log) == 2 * 2 * 8
    assert by_batch["8"]["speedup"]["ratio"] == pytest.approx(2.0)
    assert len(raw["1"]["dense"]) == 8 and by_batch["1"]["dense"]["images_per_s"] == pytest.approx(500.0)


def test_statistics():
    stats = latency_stats([1.0, 2.0, 3.0, 4.0], batch=2)
    assert stats["p50_ms"] == 2.5 and stats["images_per_s"] == pytest.approx(800.0)
    speed = speedup_stats([[2.0, 2.2], [2.0, 2.0], [4.0, 4.0]], [[1.0, 1.1], [1.0, 1.0], [1.0, 1.0]])
    assert speed["rounds"] == 3 and speed["min"] == pytest.approx(2.0) and speed["max"] == pytest.approx(4.0)
    assert speed["ratio"] == pytest.approx(2.0) and speed["p50_ratio"] == pytest.approx(2.1)
    assert speed["iqr"][0] <= 2.0 <= speed["iqr"][1] and speed["bootstrap_95"][0] >= 2.0


def test_sparse_kernel_coverage_from_a_tensorrt_build_report():
    layers = [
        {"name": "a", "macs": 60, "masked": True},
        {"name": "b", "macs": 30, "masked": True},
        {"name": "c", "macs": 10, "masked": False},
    ]

    def report(backend: str, has_sparse_kernels: bool, engines: dict) -> BuildReport:
        return BuildReport(
            model="m",
            backend=backend,
            requested="auto",
            reason="",
            has_sparse_kernels=has_sparse_kernels,
            inputs="",
            batch_range=[1, 1, 1],
            note="",
            engines=engines,
        )

    build = report(
        "tensorrt",
        True,
        {
            "sparse": {
                "sparse_layers": {"eligible": ["a", "b"], "picked_sparse": ["a"], "raw": {"source": "builder log"}}
            }
        },
    )
    share, note = sparse_kernel_coverage(build, layers, 100)
    assert share == pytest.approx(0.6) and "builder log" in note and layers[0]["sparse_kernel"]
    share, note = sparse_kernel_coverage(report("onnxruntime", False, {}), layers, 100)
    assert share is None and "no sparse kernels" in note
