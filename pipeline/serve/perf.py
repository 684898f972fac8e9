"""A bounded perf_analyzer load test of the end-to-end ensembles, dense and sparse interleaved.

For each concurrency level both variants run back to back, in alternating order, so drift
of a shared machine hits both. Each run is bounded: three measurement windows, reported
merged; the stability criterion is set so wide that it always accepts them (on a shared
CPU machine perf_analyzer's default one would retry, then give up without a result), plus a
subprocess timeout. perf_analyzer's CSV gives throughput and p50/p99 latency (client side,
microseconds). The request is one encoded image sent as raw image file bytes.
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.backends.build_report import VARIANTS
from pipeline.errors import PipelineError
from pipeline.package.ensembles import IMAGE_INPUT
from pipeline.serve.triton_runtime import Runtime


@dataclass(frozen=True)
class LoadTest:
    concurrency: tuple[int, ...] = (1, 2, 3, 4)
    measurement_interval_ms: int = 2000
    max_trials: int = 3  # perf_analyzer's minimum: it compares the last three windows
    stability_percentage: int = 1000
    timeout_s: float = 120.0
    window_retries: int = 2  # a window perf_analyzer rejects as unstable is doubled, at most this many times


def write_input_data(path: Path, images: list[bytes]) -> Path:
    """perf_analyzer's --input-data JSON: one request per image, each image's bytes as one BYTES element.

    perf_analyzer sends "b64" content as the serialized tensor, and a serialized BYTES element
    is its length (4 bytes, little-endian) followed by the bytes.
    """
    data = [
        {IMAGE_INPUT: {"b64": base64.b64encode(len(image).to_bytes(4, "little") + image).decode("ascii")}}
        for image in images
    ]
    path.write_text(json.dumps({"data": data}))
    return path


UNSTABLE = "Failed to obtain stable measurement"  # perf_analyzer's words when a window held too few requests


def run_perf_analyzer(
    runtime: Runtime,
    perf_analyzer: Path,
    model: str,
    url: str,
    input_data: Path,
    concurrency: int,
    settings: LoadTest,
    work_dir: Path,
) -> dict[str, Any]:
    """One perf_analyzer run over gRPC at one concurrency; returns throughput and latency percentiles.

    On a busy machine a short window can complete too few requests for perf_analyzer to accept it (it then
    exits with UNSTABLE whatever the stability percentage); the run is repeated with the window doubled, at
    most `settings.window_retries` times, and the result names the window it was measured with."""
    interval = settings.measurement_interval_ms
    for attempt in range(settings.window_retries + 1):
        result = _perf_once(runtime, perf_analyzer, model, url, input_data, concurrency, settings, interval, work_dir)
        if result["ok"] or UNSTABLE not in result["error"] or attempt == settings.window_retries:
            return {**result, "measurement_interval_ms": interval}
        interval *= 2
    raise RuntimeError(f"LoadTest.window_retries = {settings.window_retries}: no perf_analyzer run (needs >= 0)")


def _perf_once(
    runtime: Runtime,
    perf_analyzer: Path,
    model: str,
    url: str,
    input_data: Path,
    concurrency: int,
    settings: LoadTest,
    interval_ms: int,
    work_dir: Path,
) -> dict[str, Any]:
    csv_path = work_dir / f"{model}.c{concurrency}.csv"
    csv_path.unlink(missing_ok=True)
    command = [
        str(perf_analyzer),
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "-b",
        "1",
        f"--concurrency-range={concurrency}:{concurrency}",
        f"--input-data={input_data}",
        f"--shape={IMAGE_INPUT}:1",
        "--measurement-mode=time_windows",
        f"--measurement-interval={interval_ms}",
        f"--max-trials={settings.max_trials}",
        f"--stability-percentage={settings.stability_percentage}",
        "--percentile=99",
        "-f",
        str(csv_path),
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=settings.timeout_s, env=runtime.process_env()
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"perf_analyzer ran past {settings.timeout_s:.0f} s", "command": command}
    if result.returncode != 0 or not csv_path.is_file():
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        return {"ok": False, "error": f"perf_analyzer exited {result.returncode}: {tail}", "command": command}
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {"ok": False, "error": f"perf_analyzer wrote no rows to {csv_path.name}", "command": command}
    row = rows[0]
    return {
        "ok": True,
        "throughput_infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000.0,
        "p99_ms": float(row["p99 latency"]) / 1000.0,
        "command": command,
    }


def load_test(
    runtime: Runtime, models: dict[str, str], url: str, images: list[bytes], settings: LoadTest, work_dir: Path
) -> dict[str, Any]:
    """models: variant -> model name. Returns rows per concurrency with both variants, and `ok`."""
    perf_analyzer = runtime.environment.perf_analyzer
    if perf_analyzer is None:
        raise PipelineError(
            f"perf_analyzer not found in {runtime.environment.prefix}/bin or on PATH; it comes with "
            "tritonclient 2.51's wheel: run `make serve-env`"
        )
    input_data = write_input_data(work_dir / "perf_input.json", images)
    rows = []
    for index, concurrency in enumerate(settings.concurrency):
        order = VARIANTS if index % 2 == 0 else tuple(reversed(VARIANTS))
        row: dict[str, Any] = {"concurrency": concurrency, "order": list(order)}
        for variant in order:
            row[variant] = run_perf_analyzer(
                runtime, perf_analyzer, models[variant], url, input_data, concurrency, settings, work_dir
            )
        rows.append(row)
    return {
        "ok": all(row[variant]["ok"] for row in rows for variant in VARIANTS),
        "rows": rows,
        "protocol": "grpc",
        "batch_per_request": 1,
        "settings": {
            "measurement_interval_ms": settings.measurement_interval_ms,
            "window_retries": settings.window_retries,
            "max_trials": settings.max_trials,
            "stability_percentage": settings.stability_percentage,
        },
        "perf_analyzer": str(perf_analyzer),
    }
