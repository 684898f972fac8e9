"""Issue 35 on CPU: GPU-time latency of TensorRT plans, bare plans from any tool, set-up failures by cause.

TensorRT, Polygraphy's TrtRunner and CUDA events are faked (tests/trt_fakes.py): a fake plan is JSON naming its
I/O, batch range and GPU time; the fake runner charges Polygraphy's host overhead per `infer`, as the real
`last_inference_time()` includes it. Nothing here has run on a GPU.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from tests.trt_fakes import Clock, FakeCuda, FakeTensorRT, write_plan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_trt(monkeypatch):
    return FakeTensorRT(monkeypatch, host_overhead_ms=0.2)


def _verify(*argv: str) -> int:
    """`python -m pipeline verify ARGV`, in this process so the fakes apply: the CLI's own main (exit code)."""
    from pipeline.cli import main

    return main(["verify", *map(str, argv)])


# ----------------------------------------------------------------------------- must-show 2: GPU compute time
def test_gpu_time_gives_the_true_ratio_where_host_time_gives_about_1_2(fake_trt, tmp_path, capsys):
    """Host overhead 0.2 ms a call, GPU 0.10 ms dense / 0.05 ms sparse: verify reports 2.0x (Polygraphy's
    last_inference_time would give 0.30/0.25 = 1.2x) and names the method; host time is reported, not gated."""
    dense = write_plan(tmp_path / "a.plan", gpu_ms=0.10)
    sparse = write_plan(tmp_path / "b.plan", gpu_ms=0.05)
    out = tmp_path / "out"
    code = _verify("--dense", dense, "--sparse", sparse, "--data", "synthetic", "--out", out, "--min-speedup", "1.9")
    assert code == 0, capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["speedup"] == pytest.approx(2.0, rel=1e-6)
    latency = report["latency"]
    assert latency["dense"]["p50_ms"] == pytest.approx(0.10) and latency["sparse"]["p50_ms"] == pytest.approx(0.05)
    assert "GPU compute time: CUDA events" in latency["method"] and "CUDA graph" in latency["method"]
    assert latency["host_ms"]["dense"]["p50_ms"] == pytest.approx(fake_trt.enqueue_ms)
    gate = next(check for check in report["gates"]["checks"] if check["name"] == "speedup")
    assert gate["value"] == report["speedup"] and "host" not in json.dumps(gate)
    md = (out / "report.md").read_text()
    assert "GPU compute time: CUDA events" in md and "host enqueue" in md.lower()
    host_ratio = fake_trt.runners[0].last_inference_time() / fake_trt.runners[1].last_inference_time()
    assert host_ratio == pytest.approx(0.30 / 0.25)  # what time_batch returned before issue 35


def test_dense_and_sparse_rounds_interleave_and_each_sample_is_many_calls(fake_trt, tmp_path):
    from pipeline.backends import get_backend
    from pipeline.verify.measure import measure_latency

    backend = get_backend("tensorrt")
    runners = {
        "dense": backend.load(write_plan(tmp_path / "a.plan", gpu_ms=0.10), None),
        "sparse": backend.load(write_plan(tmp_path / "b.plan", gpu_ms=0.05), None),
    }
    order = []
    for variant, runner in runners.items():
        timer_of = runner.time_batch

        def wrapped(batch, iterations, warmup, variant=variant, timer_of=timer_of):
            order.append((variant, iterations))
            return timer_of(batch, iterations, warmup)

        runner.time_batch = wrapped
    by_batch, raw = measure_latency(runners, [1, 8, 8], [4], iterations=6, warmup=3)
    timed = [variant for variant, iterations in order if iterations]
    assert timed[:4] == ["dense", "sparse", "sparse", "dense"]
    assert len(raw["4"]["dense"]) == 6 and by_batch["4"]["speedup"]["ratio"] == pytest.approx(2.0)
    # 1 ms of GPU time a sample at 0.05 ms a call: 20 back-to-back calls between one event pair
    assert "around 20 back-to-back graph launches" in by_batch["4"]["method"]["sparse"]


def test_without_cuda_graph_capture_it_times_plain_enqueues_and_says_so(monkeypatch, tmp_path):
    fake = FakeTensorRT(monkeypatch, capture_ok=False)
    from pipeline.backends import get_backend

    runner = get_backend("tensorrt").load(write_plan(tmp_path / "a.plan", gpu_ms=0.25), None)
    times = runner.time_batch(np.zeros((2, 1, 8, 8), np.float32), iterations=3, warmup=2)
    assert times == pytest.approx([0.25] * 3)
    assert "execute_async_v3 calls" in runner.timing_method and "capture failed: RuntimeError" in runner.timing_method
    assert runner.last_host_ms == pytest.approx([fake.enqueue_ms] * 3)


def test_time_calls_counts_per_call_and_calls_per_sample_reaches_the_target():
    from pipeline.backends.tensorrt import timing

    clock = Clock()

    def enqueue():
        clock.gpu_ms += 0.2
        clock.host_ms += 0.01

    cuda = FakeCuda(clock)
    samples = timing.time_calls(cuda, enqueue, calls=5, samples=2)
    assert samples.gpu_ms == pytest.approx([0.2, 0.2]) and samples.host_ms == pytest.approx([0.01, 0.01])
    assert timing.calls_per_sample(cuda, enqueue, target_ms=1.0) == 5
    assert timing.calls_per_sample(cuda, enqueue, target_ms=1000.0) == timing.MAX_CALLS


# ----------------------------------------------------------------------------- must-show 4: bare plans
def test_bare_plans_verify_with_io_and_batch_range_read_from_the_engine(fake_trt, tmp_path, capsys):
    """Two plans with no sidecar, I/O names not the pipeline's ("images"/"scores"), a batch range of 2..6 and
    FP16 input: the runner reads all of it from the engine; the report is written."""
    spec = {"input": "x0", "output": "probs", "batch": [2, 4, 6], "dtype": "float16", "sample_shape": [1, 8, 8]}
    dense = write_plan(tmp_path / "a.plan", gpu_ms=0.3, **spec)
    sparse = write_plan(tmp_path / "b.plan", gpu_ms=0.2, **spec)
    assert not dense.with_suffix(".json").exists()
    out = tmp_path / "out"
    code = _verify(
        "--dense",
        dense,
        "--sparse",
        sparse,
        "--data",
        "synthetic",
        "--out",
        out,
        "--iters",
        "4",
        "--min-speedup",
        "1.4",
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["latency"]["serving_batch"] == 6 and sorted(report["latency"]["by_batch"]) == ["2", "6"]
    assert report["data"]["batch_size"] <= 6 and (out / "report.md").is_file()
    runner_inputs = {r.engine.spec["input"] for r in fake_trt.runners}
    assert runner_inputs == {"x0"} and all(not r.is_active for r in fake_trt.runners)  # deactivated after


def test_the_pipelines_own_plans_take_the_same_path(fake_trt, tmp_path):
    """A sidecar that names another output tensor does not override the engine: the engine's I/O is used."""
    from pipeline.backends import get_backend

    plan = write_plan(tmp_path / "sparse.engine", gpu_ms=0.1)
    (tmp_path / "sparse.json").write_text("{}")  # a sidecar is read only for what the pipeline adds
    with pytest.raises(PipelineError, match="not a TensorRT engine sidecar"):
        get_backend("tensorrt").load(plan, None)
    (tmp_path / "sparse.json").unlink()
    runner = get_backend("tensorrt").load(plan, None)
    assert (runner.input_name, runner.output_name, runner.batch) == ("images", "scores", {"min": 1, "opt": 4, "max": 8})
    assert runner.infer(np.ones((3, 1, 8, 8), np.float32)).shape == (3, 3)
    assert runner.engine is fake_trt.runners[0].engine  # plans.py reads the inspector from here


def test_a_plan_with_two_outputs_is_refused_in_one_line(fake_trt, tmp_path):
    from pipeline.backends import get_backend
    from tests.trt_fakes import FakeEngine

    plan = write_plan(tmp_path / "a.plan", gpu_ms=0.1)
    original = FakeEngine.__init__

    def two_outputs(self, trt, spec):
        original(self, trt, spec)
        self.names.append("aux")

    FakeEngine.__init__ = two_outputs
    try:
        with pytest.raises(PipelineError, match="has outputs scores, aux; verify checks classifiers"):
            get_backend("tensorrt").load(plan, None)
    finally:
        FakeEngine.__init__ = original


# ----------------------------------------------------------------------------- layer times, profiler, batch label
def test_layer_times_run_at_the_batch_asked_and_detach_the_profiler(fake_trt, tmp_path):
    from pipeline.backends import get_backend

    plan = write_plan(tmp_path / "a.plan", gpu_ms=0.1, layer_ms={"conv": 0.25})
    runner = get_backend("tensorrt").load(plan, None)
    seen = []
    infer = fake_trt.runners[0].infer
    fake_trt.runners[0].infer = lambda feed, copy_outputs_to_host=True: (
        seen.append(next(iter(feed.values())).shape[0]),
        infer(feed, copy_outputs_to_host),
    )[1]
    assert runner.layer_times(runs=4, batch=6) == {"conv": 0.25}
    assert set(seen) == {6} and fake_trt.runners[0].context.profiler is None
    runner.close()
    runner.close()
    assert not fake_trt.runners[0].is_active


# ----------------------------------------------------------------------------- set-up (Why 6)
def test_startup_failures_are_reported_by_cause(monkeypatch, tmp_path):
    import polygraphy.backend.trt as ptrt
    from polygraphy.logger import G_LOGGER

    from pipeline.backends import get_backend

    FakeTensorRT(monkeypatch)
    plan = write_plan(tmp_path / "a.plan", gpu_ms=0.1)
    causes = {
        "Could not find the CUDA runtime library. libcudart.so*": "library is missing",
        "[runtime.cpp::allocate] Error Code 1: Cuda Runtime (out of memory)": "out of memory",
        "Serialization assertion stdVersionRead == kSERIALIZATION_VERSION failed. Version tag does not match": (
            "rebuild it with the build stage"
        ),
        "something else entirely": "cannot start",
    }
    for said, cause in causes.items():

        def refuse(loader, said=said):
            G_LOGGER.error(said)
            G_LOGGER.critical("Could not deserialize engine")

        monkeypatch.setattr(ptrt, "TrtRunner", refuse)
        with pytest.raises(PipelineError) as error:
            get_backend("tensorrt").load(plan, None)
        assert cause in str(error.value) and "\n" not in str(error.value), said
        if cause != "rebuild it with the build stage":
            assert "rebuild" not in str(error.value)


def test_cuda_runtime_is_found_where_pytorchs_cuda13_wheels_put_it(tmp_path, monkeypatch):
    """A venv without /usr/local/cuda: libcudart under site-packages/nvidia/cu13/lib (where the CUDA 13 wheels put
    it; Polygraphy 0.53.6 looks only in nvidia/cuda_runtime/lib) is put on LD_LIBRARY_PATH before Polygraphy starts."""
    from pipeline.backends.tensorrt import runner as trt_runner

    monkeypatch.setattr(trt_runner, "POLYGRAPHY_CUDA_DIRS", ())
    site = tmp_path / "site-packages"
    (site / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    (site / "nvidia" / "cu13" / "lib" / "libcudart.so.13").write_bytes(b"")
    environ = {"LD_LIBRARY_PATH": "/opt/other"}
    found = trt_runner.ensure_cudart(environ, [str(site)], loader_finds=False)
    assert found == str(site / "nvidia" / "cu13" / "lib")
    assert environ["LD_LIBRARY_PATH"].split(":") == [found, "/opt/other"]
    assert trt_runner.ensure_cudart(environ, [str(site)], loader_finds=False) is None  # now Polygraphy finds it
    with pytest.raises(PipelineError, match="add the folder holding libcudart.so to LD_LIBRARY_PATH"):
        trt_runner.ensure_cudart({}, [str(tmp_path / "empty")], loader_finds=False)


def _extras_floor() -> set[str]:
    text = (REPO / "pyproject.toml").read_text()
    return set(re.findall(r'"polygraphy>=([0-9.]+)"', text))


def test_the_polygraphy_floor_in_pyproject_is_the_codes_and_has_every_attribute():
    """Why 6: polygraphy>=0.49 admitted 0.49.0-0.49.12, whose logger has no use_python_logging_system."""
    from polygraphy.logger import G_LOGGER

    from pipeline.backends.tensorrt.engine import POLYGRAPHY_ATTRIBUTES, POLYGRAPHY_MIN

    assert _extras_floor() == {".".join(map(str, POLYGRAPHY_MIN))}
    assert POLYGRAPHY_MIN > (0, 49, 12)
    assert all(hasattr(G_LOGGER, name) for name in POLYGRAPHY_ATTRIBUTES)


def test_a_polygraphy_without_the_attribute_is_refused_in_one_line(monkeypatch):
    from pipeline.backends.tensorrt.engine import check_polygraphy

    old_logger = types.SimpleNamespace(module_severity=0, colors=False, EXTRA_VERBOSE=5)
    monkeypatch.setitem(sys.modules, "polygraphy.logger", types.SimpleNamespace(G_LOGGER=old_logger))
    with pytest.raises(PipelineError) as error:
        check_polygraphy(types.SimpleNamespace(__version__="0.49.14"))
    assert "no use_python_logging_system" in str(error.value) and "polygraphy>=0.49.14" in str(error.value)
    with pytest.raises(PipelineError, match="polygraphy 0.49.9 is too old"):
        check_polygraphy(types.SimpleNamespace(__version__="0.49.9"))


# ----------------------------------------------------------------------------- must-show 5: the speed-up bound
def _inspector(sparse_tactic: bool) -> dict:
    conv_a = "/layer1/conv/Conv"
    return {
        "Layers": [
            {
                "Name": conv_a + " + /layer1/relu/Relu",
                "LayerType": "CaskConvolution",
                "TacticName": "sm80_xmma_fprop_sparse_conv_f16" if sparse_tactic else "sm80_xmma_fprop_implicit_gemm",
                "Metadata": f"[ONNX Layer: {conv_a}]\x1f[ONNX Layer: /layer1/relu/Relu]",
            },
            {
                "Name": "/layer2/conv/Conv",
                "LayerType": "CaskConvolution",
                "TacticName": "sm80_xmma_fprop_implicit_gemm",
                "Metadata": "[ONNX Layer: /layer2/conv/Conv]",
            },
            {"Name": "/pool/GlobalAveragePool", "LayerType": "Reduce", "TacticName": "reduce", "Metadata": ""},
        ],
        "Bindings": ["images", "scores"],
    }


def test_report_shows_the_bound_beside_the_measured_speedup_per_layer_and_end_to_end(fake_trt, tmp_path):
    """Dense per-layer GPU times 0.6 / 0.3 / 0.1 ms; the sparse plan runs the 0.6 ms conv with a sparse tactic.
    Bound = 1.0 / (1.0 - 0.6 / 2) = 1.43x; measured (engine GPU time 1.0 vs 0.75 ms) 1.33x; both in report.md."""
    dense_ms = {"/layer1/conv/Conv + /layer1/relu/Relu": 0.6, "/layer2/conv/Conv": 0.3, "/pool/GlobalAveragePool": 0.1}
    sparse_ms = {**dense_ms, "/layer1/conv/Conv + /layer1/relu/Relu": 0.35}
    dense = write_plan(tmp_path / "a.plan", gpu_ms=1.0, inspector=_inspector(False), layer_ms=dense_ms)
    sparse = write_plan(tmp_path / "b.plan", gpu_ms=0.75, inspector=_inspector(True), layer_ms=sparse_ms)
    out = tmp_path / "out"
    args = ("--dense", dense, "--sparse", sparse, "--data", "synthetic", "--out", out, "--min-speedup", "1.3")
    assert _verify(*args, "--iters", "4") == 0
    report = json.loads((out / "report.json").read_text())
    bound = report["speedup_bound"]
    assert bound["bound"] == pytest.approx(1.0 / 0.7) and bound["measured"] == pytest.approx(4 / 3)
    assert bound["sparse_time_share"] == pytest.approx(0.6)
    rows = {row["unit"]: row for row in bound["layers"]}
    assert (rows["layer1.conv"]["sparse_kernels"], rows["layer1.conv"]["bound"]) == (True, 2.0)
    assert rows["layer1.conv"]["measured"] == pytest.approx(0.6 / 0.35) and rows["layer2.conv"]["bound"] == 1.0
    md = (out / "report.md").read_text()
    assert "| bound: best end to end 2:4 can give this engine | 1.429x |" in md
    assert "| measured (serving batch 8) | 1.333x |" in md and "| gate min_speedup | 1.300x |" in md
    assert "| `layer1.conv` | 0.6000 | 60.0 | yes | 2.0x | 0.3500 | 1.714x |" in md
    assert report["layer_times_batch"] == 8 and "Per layer (batch 8)" in md


def test_a_blocks_time_counts_whole_in_the_bound():
    from pipeline.verify.bound import speedup_bound

    dense = {
        "modules": {"a": 1.0},
        "blocks": {"{ForeignNode[b...c]}": {"ms": 2.0, "modules": ["b", "c"]}},
        "reformat_ms": 0.5,
        "other_ms": 0.5,
    }
    evidence = {"picked_sparse": [], "sparse_blocks": [{"trt_layer": "{ForeignNode[b...c]}", "modules": ["b", "c"]}]}
    bound = speedup_bound(dense, None, evidence, 1.1)
    assert bound["bound"] == pytest.approx(4.0 / 3.0)  # 4 ms total, 2 ms of it at most twice as fast
    assert [(row["unit"], row["sparse_kernels"]) for row in bound["layers"]] == [("block[b, c]", True), ("a", False)]
    unknown = speedup_bound(dense, None, {"picked_sparse": None}, 1.1)
    assert unknown["bound"] is None and "not known" in unknown["note"]
