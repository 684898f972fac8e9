import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PIPELINE_NO_PROGRESS": "1"}


def bench(tmp_path, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "bench-train",
            "--models",
            "tiny_resnet",
            "--reps",
            "2",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
            *extra,
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.slow
def test_bench_train_writes_paired_timings(tmp_path):
    result = bench(tmp_path, "--max-ratio", "100", "--max-distill-ratio", "100")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench-train.json").read_text())
    entry = report["models"]["tiny_resnet"]
    assert len(entry["dense_s"]) == len(entry["mask_s"]) == len(entry["distill_s"]) == 2
    assert entry["ratio"] == entry["mask_median_s"] / entry["dense_median_s"] > 0
    assert entry["distill_ratio"] == entry["distill_median_s"] / entry["dense_median_s"] > 0
    assert entry["batch"] == 32 and report["passed"] is True  # tiny_resnet's masks.batch_size
    assert "| tiny_resnet |" in result.stdout


@pytest.mark.slow
def test_bench_train_gate_fails_with_exit_1(tmp_path):
    result = bench(tmp_path, "--max-ratio", "0.01")
    assert result.returncode == 1
    assert "gate failed" in result.stderr and json.loads((tmp_path / "bench-train.json").read_text())["passed"] is False


@pytest.mark.slow  # a CLI run of 5-12 s: the whole suite keeps it, the fast subset leaves it out
def test_bench_train_distillation_gate_fails_with_exit_1(tmp_path):
    result = bench(tmp_path, "--max-ratio", "100", "--max-distill-ratio", "0.01")
    assert result.returncode == 1 and "distillation step costs" in result.stderr


def test_bench_train_unknown_model_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench-train", "--models", "resnet51", "--out", str(tmp_path)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert (
        result.returncode == 2 and result.stderr.startswith("error: unknown model") and "Traceback" not in result.stderr
    )


def bench_here(tmp_path, *extra):
    """bench-train in this process (no interpreter start): its exit code."""
    from pipeline.cli import main

    return main(
        ["bench-train", "--models", "tiny_resnet", "--reps", "1", "--warmup", "0", "--out", str(tmp_path), *extra]
    )


def test_bench_train_set_reaches_every_recipe_timed(tmp_path, monkeypatch):
    """--set applies to each model's recipe: a batch size and a precision change what is timed."""
    monkeypatch.setenv("PIPELINE_NO_PROGRESS", "1")
    assert (
        bench_here(
            tmp_path,
            "--max-ratio",
            "100",
            "--max-distill-ratio",
            "100",
            "--set",
            "masks.batch_size=8",
            "--set",
            "masks.precision=bfloat16",
        )
        == 0
    )
    report = json.loads((tmp_path / "bench-train.json").read_text())
    entry = report["models"]["tiny_resnet"]
    assert entry["batch"] == 8 and entry["autocast_bf16"] is True and entry["channels_last"] is True
    assert report["overrides"] == ["masks.batch_size=8", "masks.precision=bfloat16"]


@pytest.mark.parametrize(
    "assignment, named",
    [("masks.precision=fp8", "masks.precision"), ("masks.nonsense=1", "masks.nonsense"), ("masks.lr", "masks.lr")],
)
def test_bench_train_bad_set_is_one_line_and_nothing_timed(tmp_path, capsys, assignment, named):
    assert bench_here(tmp_path, "--set", assignment) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0]
    assert not (tmp_path / "bench-train.json").exists()
