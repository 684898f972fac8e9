"""A real tritonserver (nvidia-pytriton's, Python backend) on the CPU repository of tiny_resnet.

Skipped, with the reason, where the Triton environment of `make serve-env` is absent.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from nm_fixtures import MODEL, export_tiny_onnx, record_export

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.package.ensembles import ensemble_name, preprocess_name
from pipeline.package.python_models.preprocess import preprocess_image
from pipeline.serve.serve_check import infer_images
from pipeline.serve.server import SHM_DIR, Ports, TritonServer
from pipeline.serve.triton_runtime import find_environment, prepare_runtime


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    try:
        environment = find_environment()
    except PipelineError as exc:
        pytest.skip(f"no Triton environment: {exc}")
    return prepare_runtime(environment, tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    """--out root with tiny_resnet's ONNX pair (random weights) packaged; returns the root."""
    out = tmp_path_factory.mktemp("engines")
    folder = out / MODEL
    folder.mkdir()
    export_tiny_onnx(folder / "dense.onnx", seed=0)
    export_tiny_onnx(folder / "sparse.onnx", seed=1)
    record_export(folder)
    assert main(["package", "--model", MODEL, "--out", str(out)]) == 0
    return out


def png(seed: int, size=(28, 28)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def onnx_logits(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": batch})[0]


def no_shared_memory_left(server: TritonServer) -> bool:
    return not list(SHM_DIR.glob(server.shm_prefix + "*"))


@pytest.mark.slow
@pytest.mark.triton
def test_ensembles_serve_raw_images_over_http_and_grpc(runtime, packaged, tmp_path):
    repository = packaged / MODEL / "triton_cpu"
    spec = json.loads((repository / preprocess_name(MODEL) / "preprocessing.json").read_text())
    images = [png(seed) for seed in range(5)]
    batch = np.stack([preprocess_image(image, spec) for image in images])
    with TritonServer(runtime, repository, tmp_path / "server.log") as server:
        assert server.wait_ready(300) > 0
        for variant in ("dense", "sparse"):
            expected = onnx_logits(packaged / MODEL / f"{variant}.onnx", batch)
            for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
                logits = infer_images(protocol, url, ensemble_name(MODEL, variant), images, "logits")
                np.testing.assert_allclose(logits, expected, atol=1e-5)
                top = infer_images(protocol, url, ensemble_name(MODEL, variant), images[:1], "logits", top=1)
                assert top[0][0].decode().split(":")[1:] == [str(expected[0].argmax()), f"class_{expected[0].argmax()}"]
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="not a decodable image"):
            infer_images("http", server.http_url, ensemble_name(MODEL, "dense"), [b"not an image"], "logits")
        assert server.is_ready()  # still answering after the bad request
        assert infer_images("grpc", server.grpc_url, ensemble_name(MODEL, "dense"), images[:1], "logits").shape == (
            1,
            10,
        )
    assert not server.group_alive() and server.process.returncode is not None
    assert no_shared_memory_left(server)


@pytest.mark.slow
@pytest.mark.triton
def test_server_is_stopped_when_the_caller_fails(runtime, packaged, tmp_path):
    with pytest.raises(RuntimeError, match="a check blew up"):
        with TritonServer(runtime, packaged / MODEL / "triton_cpu", tmp_path / "server.log") as server:
            server.wait_ready(300)
            raise RuntimeError("a check blew up")
    assert not server.group_alive() and no_shared_memory_left(server)


@pytest.mark.slow
@pytest.mark.triton
def test_server_that_cannot_load_a_model_is_reported_and_reaped(runtime, packaged, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(packaged / MODEL / "triton_cpu", repository)
    (repository / preprocess_name(MODEL) / "1" / "model.py").write_text("this is not python\n")
    server = TritonServer(runtime, repository, tmp_path / "server.log", Ports.pick())
    try:
        server.start()
        with pytest.raises(PipelineError, match="exited with code"):
            server.wait_ready(300)
    finally:
        server.stop()
    assert not server.group_alive()


@pytest.mark.slow
@pytest.mark.triton
def test_serve_check_passes_and_writes_its_report(runtime, packaged, capsys):
    code = main(
        [
            "serve-check",
            "--model",
            MODEL,
            "--out",
            str(packaged),
            "--triton-env",
            str(runtime.environment.prefix),
            "--images",
            "20",
            "--concurrency",
            "1",
            "--window-ms",
            "300",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((packaged / MODEL / "serve_check.json").read_text())
    assert report["passed"] and not report["processes_left"]
    checks = {check["name"]: check for check in report["checks"]}
    assert set(checks) == {"predictions", "bad_requests", "load_test", "crash"}
    assert all(result["same_top1"] == 20 for result in checks["predictions"]["results"].values())
    assert {key.split("/")[0] for key in checks["bad_requests"]["results"]} == {
        "wrong_shape",
        "wrong_dtype",
        "corrupt_image",
        "batch_above_max",
        "unknown_model",
    }
    [row] = checks["load_test"]["rows"]
    assert row["dense"]["throughput_infer_per_s"] > 0 and row["sparse"]["p99_ms"] >= row["sparse"]["p50_ms"] > 0
    assert checks["crash"]["clients_saw_the_crash"] and checks["crash"]["serving_after_restart"]


def test_serve_check_without_a_package_is_bad_input(tmp_path, capsys):
    assert main(["serve-check", "--model", MODEL, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "triton_cpu" in err and "pipeline package" in err
    assert not (tmp_path / MODEL / "serve_check.json").exists()


def test_missing_triton_environment_is_bad_input(packaged, tmp_path, capsys):
    assert main(["serve-check", "--model", MODEL, "--out", str(packaged), "--triton-env", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no bin/python" in err and "make serve-env" in err


@pytest.mark.slow
@pytest.mark.triton
def test_serve_check_fails_when_the_server_answers_wrongly(runtime, packaged, tmp_path, capsys):
    """The sparse repository model swapped for the dense ONNX: the predictions check fails, exit 1, nothing left."""
    out = tmp_path / "engines"
    shutil.copytree(packaged, out)
    served = out / MODEL / "triton_cpu" / f"{MODEL}_sparse" / "1" / "model.onnx"
    shutil.copyfile(out / MODEL / "dense.onnx", served)
    code = main(
        [
            "serve-check",
            "--model",
            MODEL,
            "--out",
            str(out),
            "--triton-env",
            str(runtime.environment.prefix),
            "--images",
            "20",
            "--no-load-test",
            "--no-crash-test",
        ]
    )
    assert code == 1
    assert "gate failed: serve-check failed: predictions" in capsys.readouterr().err
    report = json.loads((out / MODEL / "serve_check.json").read_text())
    results = report["checks"][0]["results"]
    assert results["dense/http"]["passed"] and not results["sparse/http"]["passed"]
    assert not report["passed"] and not report["processes_left"]


def test_a_window_perf_analyzer_rejects_as_unstable_is_retried_doubled(tmp_path):
    """perf_analyzer gives up on a window with too few requests (busy machine): the run is repeated with the
    window doubled, at most `window_retries` times, and the result names the window used; other failures are
    not retried."""
    import os
    import stat
    from types import SimpleNamespace

    from pipeline.serve.perf import LoadTest, run_perf_analyzer

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "perf_analyzer"
    fake.write_text(f"""#!/usr/bin/env bash
interval=""; csv=""
while [ $# -gt 0 ]; do
  case "$1" in --measurement-interval=*) interval="${{1#*=}}";; -f) shift; csv="$1";; esac; shift
done
echo "$interval" >> {calls}
if [ "$interval" -lt "$NEEDS_MS" ]; then echo "Failed to obtain stable measurement within 3 measurement windows"; exit 2; fi
printf 'Concurrency,Inferences/Second,p50 latency,p99 latency\\n1,12.5,4000,9000\\n' > "$csv"
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    runtime = SimpleNamespace(process_env=lambda: {**os.environ})
    for needs, expected_ok, tried in (("1200", True, ["300", "600", "1200"]), ("5000", False, ["300", "600", "1200"])):
        os.environ["NEEDS_MS"] = needs
        calls.unlink(missing_ok=True)
        try:
            result = run_perf_analyzer(
                runtime,
                fake,
                "m",
                "localhost:1",
                tmp_path / "in.json",
                1,
                LoadTest(measurement_interval_ms=300),
                tmp_path,
            )
        finally:
            del os.environ["NEEDS_MS"]
        assert result["ok"] is expected_ok and calls.read_text().split() == tried
        assert result["measurement_interval_ms"] == 1200
    assert result["error"].startswith("perf_analyzer exited 2") and "stable" in result["error"]
    fake.write_text("#!/usr/bin/env bash\necho refused; exit 1\n")
    calls.unlink(missing_ok=True)
    result = run_perf_analyzer(runtime, fake, "m", "localhost:1", tmp_path / "in.json", 1, LoadTest(), tmp_path)
    assert not result["ok"] and "refused" in result["error"] and not calls.exists()
