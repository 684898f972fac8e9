"""`serve-check`: start tritonserver on the CPU repository, check it end to end, stop it.

Writes engines/<model>/serve_check.json (and serve_check.log, the server's log). Exit 0
when every check passes, 1 when one fails, 2 on bad input (no repository, no Triton
environment). All logic is in pipeline.serve.serve_check; see docs/triton.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.args import add_triton_arguments
from pipeline.declaration import StageDeclaration
from pipeline.errors import GateFailed, PipelineError
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.serve.perf import LoadTest
from pipeline.serve.serve_check import ServeCheckSettings, run_serve_check, serve_check_path

DECLARATION = StageDeclaration(
    help="start tritonserver, check predictions, errors, load, crash",
    reads=("triton_cpu", "dense_onnx", "sparse_onnx", "build_report", "engines"),
    writes=("serve_check", "serve_check_log"),  # no config.json: it checks a server, its files are no deliverables
    recipe=("*",),
    data=True,
)


@dataclass
class Options:
    triton_env: str | None = None
    images: int = 64
    ready_timeout: float = 120.0
    concurrency: str = "1,2,3,4"
    window_ms: int = 2000
    no_load_test: bool = False
    no_crash_test: bool = False

    def __post_init__(self) -> None:
        if self.images < 1:
            raise PipelineError(f"--images {self.images}: needs at least 1")
        _concurrency(self.concurrency)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_triton_arguments(parser, "the tritonserver wheel, numpy<2 and perf_analyzer")
    parser.add_argument("--images", type=int, default=64, help="test-set images sent through the server (default 64)")
    parser.add_argument("--concurrency", default="1,2,3,4", help="perf_analyzer concurrency levels (default 1,2,3,4)")
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer measurement window (ms)")
    parser.add_argument("--no-load-test", action="store_true", help="skip the perf_analyzer load test")
    parser.add_argument("--no-crash-test", action="store_true", help="skip the kill -9 and restart check")


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise PipelineError(f"--concurrency {text!r}: expected positive integers separated by commas, e.g. 1,2,3,4")
    return levels


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    load = (
        None
        if options.no_load_test
        else LoadTest(concurrency=_concurrency(options.concurrency), measurement_interval_ms=options.window_ms)
    )
    settings = ServeCheckSettings(
        images=options.images, ready_timeout_s=options.ready_timeout, load=load, crash=not options.no_crash_test
    )
    report = run_serve_check(recipe, paths, Path(options.triton_env) if options.triton_env else None, settings)
    print(f"tritonserver ready in {report['server']['ready_s']} s ({report['note']})")
    for check in report["checks"]:
        print(
            f"check {check['name']}: {'pass' if check['passed'] else 'FAIL'}"
            + (f" ({check['error']})" if "error" in check else "")
        )
        if check["name"] == "load_test" and "rows" in check:
            for row in check["rows"]:
                cells = [
                    f"{variant} "
                    + (
                        f"{row[variant]['throughput_infer_per_s']:.1f} infer/s, p50 "
                        f"{row[variant]['p50_ms']:.2f} ms, p99 {row[variant]['p99_ms']:.2f} ms"
                        if row[variant]["ok"]
                        else row[variant]["error"]
                    )
                    for variant in ("dense", "sparse")
                ]
                print(f"  concurrency {row['concurrency']}: " + "; ".join(cells))
    print(f"report: {serve_check_path(paths)}")
    if not report["passed"]:
        failed = [check["name"] for check in report["checks"] if not check["passed"]]
        raise GateFailed("serve-check failed: " + ", ".join(failed or ["processes were left behind"]))
    return 0
