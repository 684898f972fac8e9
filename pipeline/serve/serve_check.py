"""serve-check: start tritonserver on the CPU repository, prove it serves correctly, stop it.

Checks (each a dict with `passed` in serve_check.json):
  predictions  raw test-set images (PNG-encoded from the evaluation set verify used) through
               <model>_<variant>_e2e over HTTP and gRPC give the top-1 class that ONNX Runtime
               gives on the evaluation tensors of the same images (with the served ONNX, and with
               verify's ONNX Runtime engines from build.json when there are), for dense and
               sparse, and the class name of labels.txt (Triton's classification extension)
  bad_requests wrong shape, wrong dtype, corrupt image bytes, a batch above max_batch_size and
               an unknown model each get an error response, and a good request still works after
  load_test    perf_analyzer, concurrency 1..4, dense and sparse interleaved (pipeline.serve.perf)
  crash        kill -9 of the server while clients send requests, restart, ready and serving again

The server runs in its own process group and is stopped in `finally`, failures included.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.datasets import dataset_size
from pipeline.errors import PipelineError
from pipeline.io import write_json, write_text
from pipeline.package.ensembles import IMAGE_INPUT, ensemble_name
from pipeline.package.model_config import LABELS_FILENAME
from pipeline.package.repository import repository_dir
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.serve.perf import VARIANTS, LoadTest, load_test
from pipeline.serve.server import Ports, TritonServer
from pipeline.serve.triton_runtime import find_environment, prepare_runtime

SCHEMA = 1
MAX_LOGIT_DIFF = 1e-3  # served logits against ONNX Runtime's on the same image (float32 rounding only)


def serve_check_path(paths: ArtifactPaths) -> Path:
    return paths.serve_check


@dataclass
class ServeCheckSettings:
    images: int = 64
    ready_timeout_s: float = 120.0
    load: LoadTest | None = field(default_factory=LoadTest)  # None: skip the load test
    crash: bool = True


# --------------------------------------------------------------------------- inputs
def encode_png(image: np.ndarray) -> bytes:
    """A uint8 C,H,W (or H,W) image as PNG bytes (lossless, so decoding gives the same pixels)."""
    from PIL import Image

    array = image[0] if image.ndim == 3 and image.shape[0] == 1 else image
    if array.ndim == 3:
        array = array.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def evaluation_images(recipe: Recipe, count: int) -> tuple[list[bytes], np.ndarray]:
    """The first `count` images of the evaluation set verify used: encoded bytes and the tensors verify fed."""
    import torch

    from pipeline.data.datasets import TensorImageDataset, build_datasets

    dataset = build_datasets(recipe).eval
    indices = list(range(min(count, dataset_size(dataset))))
    if not indices:
        raise PipelineError("the evaluation set is empty; check --data and data.eval_limit")
    base = dataset
    while isinstance(base, torch.utils.data.Subset):
        indices = [base.indices[i] for i in indices]
        base = base.dataset
    if isinstance(base, TensorImageDataset):
        encoded = [encode_png(base.images[i].numpy()) for i in indices]
    elif hasattr(base, "samples"):  # torchvision ImageFolder: the image files themselves
        encoded = [Path(base.samples[i][0]).read_bytes() for i in indices]
    else:
        raise PipelineError(f"serve-check cannot get the raw images of a {type(base).__name__} evaluation set")
    tensors = np.stack([np.asarray(base[i][0], dtype=np.float32) for i in indices])
    return encoded, tensors


def verify_engine_logits(
    recipe: Recipe, paths: ArtifactPaths, tensors: np.ndarray
) -> tuple[dict[str, np.ndarray] | None, str]:
    """Logits of the engines verify ran (read through build.json's owner, each engine checked against its
    recorded sha256), when they are ONNX Runtime engines; else None and why."""
    from pipeline.backends import get_backend
    from pipeline.backends.build_report import BuildReport

    if not paths.build_report.is_file():
        return None, f"no {paths.build_report.name}: the build stage did not run"
    build = BuildReport.load(paths.build_report, recipe.name)
    if build.backend != "onnxruntime":
        return None, f"verify ran {build.backend} engines, which this CPU machine cannot run"
    backend = get_backend("onnxruntime")
    logits = {}
    for variant in VARIANTS:
        runner = backend.load(build.checked_engine(variant, paths.root), recipe)
        logits[variant] = np.asarray(runner.infer(tensors), dtype=np.float32)
    return logits, "ONNX Runtime engines of build.json, as verify runs them"


def onnx_logits(onnx_path: Path, tensors: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    if not onnx_path.is_file():
        raise PipelineError(f"{onnx_path} does not exist; run `python -m pipeline export` first")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: tensors})[0], dtype=np.float32)


# --------------------------------------------------------------------------- clients
def _client_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def infer_images(protocol: str, url: str, model: str, images: list[bytes], output: str, top: int = 0) -> np.ndarray:
    """Logits (or, with top > 0, b"score:index:label" entries) for a batch of encoded images."""
    module = _client_module(protocol)
    client = module.InferenceServerClient(url)
    request = module.InferInput(IMAGE_INPUT, [len(images), 1], "BYTES")
    request.set_data_from_numpy(np.array([[image] for image in images], dtype=np.object_))
    wanted = module.InferRequestedOutput(output, class_count=top) if top else module.InferRequestedOutput(output)
    return client.infer(model, inputs=[request], outputs=[wanted]).as_numpy(output)


def _batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# --------------------------------------------------------------------------- checks
def check_predictions(
    server: TritonServer,
    recipe: Recipe,
    models: dict[str, str],
    images: list[bytes],
    reference: dict[str, np.ndarray],
    labels: list[str],
    output: str,
    verify_logits: dict[str, np.ndarray] | None,
    verify_note: str,
) -> dict[str, Any]:
    results = {}
    for variant in VARIANTS:
        expected = reference[variant].argmax(1)
        verify_expected = None if verify_logits is None else verify_logits[variant].argmax(1)
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            logits, named = [], []
            for batch in _batches(images, recipe.serve.max_batch_size):
                logits.append(infer_images(protocol, url, models[variant], batch, output))
                named += [
                    entry[0].decode().split(":", 2)
                    for entry in infer_images(protocol, url, models[variant], batch, output, top=1)
                ]
            served = np.concatenate(logits)
            same_class = int((served.argmax(1) == expected).sum())
            label_ok = sum(
                int(index) == expected[i] and label == labels[expected[i]] for i, (_, index, label) in enumerate(named)
            )
            diff = float(np.abs(served - reference[variant]).max())
            same_as_verify = None if verify_expected is None else int((served.argmax(1) == verify_expected).sum())
            results[f"{variant}/{protocol}"] = {
                "images": len(images),
                "same_top1": same_class,
                "same_top1_as_verify_engine": same_as_verify,
                "labels_match": label_ok,
                "max_abs_logit_diff": diff,
                "passed": same_class == len(images)
                and label_ok == len(images)
                and diff <= MAX_LOGIT_DIFF
                and same_as_verify in (None, len(images)),
            }
    return {
        "name": "predictions",
        "passed": all(r["passed"] for r in results.values()),
        "results": results,
        "reference": "ONNX Runtime (CPU) on dense.onnx / sparse.onnx, the files the repository serves, with the "
        "evaluation tensors verify feeds for the same images",
        "verify_engines": verify_note,
        "max_abs_logit_diff_allowed": MAX_LOGIT_DIFF,
    }


def _raw_request(protocol: str, url: str, model: str, shape: list[int], datatype: str, data: np.ndarray) -> None:
    module = _client_module(protocol)
    request = module.InferInput(IMAGE_INPUT, shape, datatype)
    request.set_data_from_numpy(data)
    module.InferenceServerClient(url).infer(model, inputs=[request])


def bad_request_cases(recipe: Recipe, model: str, image: bytes) -> dict[str, Callable[[str, str], object]]:
    too_many = recipe.serve.max_batch_size + 1
    return {
        "wrong_shape": lambda protocol, url: _raw_request(
            protocol, url, model, [1, 2], "BYTES", np.array([[image, image]], dtype=np.object_)
        ),
        "wrong_dtype": lambda protocol, url: _raw_request(
            protocol, url, model, [1, 1], "FP32", np.zeros((1, 1), dtype=np.float32)
        ),
        "corrupt_image": lambda protocol, url: infer_images(
            protocol, url, model, [b"\x89PNG\r\n\x1a\n broken"], recipe.export.output_name
        ),
        "batch_above_max": lambda protocol, url: infer_images(
            protocol, url, model, [image] * too_many, recipe.export.output_name
        ),
        "unknown_model": lambda protocol, url: infer_images(
            protocol, url, f"{model}_missing", [image], recipe.export.output_name
        ),
    }


def check_bad_requests(
    server: TritonServer, recipe: Recipe, model: str, image: bytes, expected_class: int
) -> dict[str, Any]:
    from tritonclient.utils import InferenceServerException

    results = {}
    for name, send in bad_request_cases(recipe, model, image).items():
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            try:
                send(protocol, url)
                error = None
            except InferenceServerException as exc:
                error = str(exc.message() if callable(getattr(exc, "message", None)) else exc)[:300]
            still_serving = (
                int(infer_images(protocol, url, model, [image], recipe.export.output_name).argmax(1)[0])
                == expected_class
            )
            results[f"{name}/{protocol}"] = {
                "error_response": error,
                "still_serving": still_serving,
                "passed": error is not None and still_serving,
            }
    return {"name": "bad_requests", "passed": all(r["passed"] for r in results.values()), "results": results}


class _Load:
    """Clients sending requests in a loop until stopped; counts successes and errors."""

    def __init__(self, url: str, model: str, image: bytes, output: str, threads: int = 2) -> None:
        self.url, self.model, self.image, self.output = url, model, image, output
        self.stop_event = threading.Event()
        self.ok = 0
        self.errors = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                infer_images("http", self.url, self.model, [self.image], self.output)
                with self.lock:
                    self.ok += 1
            except Exception:  # any failure counts: the server is being killed under this load
                with self.lock:
                    self.errors += 1
                time.sleep(0.01)

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if self.ok + self.errors >= count:
                    return True
            time.sleep(0.02)
        return False

    def __enter__(self) -> _Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=30)


def check_crash_restart(
    server: TritonServer,
    make_server: Callable[[], TritonServer],
    recipe: Recipe,
    model: str,
    image: bytes,
    expected_class: int,
    ready_timeout_s: float,
) -> dict[str, Any]:
    """kill -9 under load, then a fresh server on the same repository (stopped with the others at the end)."""
    output = recipe.export.output_name
    with _Load(server.http_url, model, image, output) as load:
        served_before = load.wait_for(20, timeout_s=300)
        server.kill_hard()
        errors_before = load.errors
        load.wait_for(load.ok + load.errors + 5, timeout_s=60)
        saw_errors = load.errors > errors_before
    server.stop()  # the stubs of the killed server: gone with its process group
    leftovers = server.group_alive()
    restarted = make_server()
    restarted.start()
    restart_s = restarted.wait_ready(ready_timeout_s)
    serving = int(infer_images("grpc", restarted.grpc_url, model, [image], output).argmax(1)[0]) == expected_class
    check = {
        "name": "crash",
        "passed": served_before and saw_errors and not leftovers and serving,
        "served_under_load_before_kill": served_before,
        "requests_ok": load.ok,
        "requests_failed": load.errors,
        "clients_saw_the_crash": saw_errors,
        "processes_left_after_kill": leftovers,
        "restart_ready_s": round(restart_s, 2),
        "serving_after_restart": serving,
    }
    return check


# --------------------------------------------------------------------------- the whole run
def _guarded(name: str, run_check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A check that raises (a client error where none was expected, a server that did not come back)
    is a failed check with the error recorded, so the remaining checks and the cleanup still run."""
    try:
        return run_check()
    except PipelineError as exc:
        return {"name": name, "passed": False, "error": str(exc)}
    except Exception as exc:  # tritonclient, socket and perf_analyzer failures alike
        return {"name": name, "passed": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}


def read_labels(repository: Path, model: str) -> list[str]:
    path = repository / model / LABELS_FILENAME
    if not path.is_file():
        raise PipelineError(f"{path} is missing; rerun `python -m pipeline package`")
    return path.read_text().splitlines()


def run_serve_check(
    recipe: Recipe, paths: ArtifactPaths, env_dir: Path | None, settings: ServeCheckSettings
) -> dict[str, Any]:
    """Run every check, write serve_check.json atomically, return the report (report["passed"])."""
    repository = repository_dir(paths, "cpu")
    models = _packaged_models(recipe, repository)
    environment = find_environment(env_dir)
    images, tensors = evaluation_images(recipe, settings.images)
    reference = {"dense": onnx_logits(paths.dense_onnx, tensors), "sparse": onnx_logits(paths.sparse_onnx, tensors)}
    inputs = _CheckInputs(
        recipe,
        models,
        images,
        reference,
        read_labels(repository, models["dense"]),
        *verify_engine_logits(recipe, paths, tensors),
    )
    started = time.time()
    session = _ServerSession(repository, Path(tempfile.mkdtemp(prefix="serve-check-")))
    try:
        runtime = prepare_runtime(environment, session.work / "runtime")
        server = session.new_server(runtime)
        server.start()
        ready_s = server.wait_ready(settings.ready_timeout_s)
        checks = _run_checks(server, session, runtime, inputs, settings)
        report = _report(recipe, repository, environment, ready_s, len(images), checks, started)
    finally:
        log_text = session.close()
    report["processes_left"] = any(server.group_alive() for server in session.servers)
    report["passed"] = report["passed"] and not report["processes_left"]
    write_text(paths.serve_check_log, log_text)
    write_json(serve_check_path(paths), report)
    return report


def _packaged_models(recipe: Recipe, repository: Path) -> dict[str, str]:
    """variant -> its ensemble's name, refused unless package wrote it."""
    models = {variant: ensemble_name(recipe.name, variant) for variant in VARIANTS}
    for model in models.values():
        if not (repository / model / "config.pbtxt").is_file():
            raise PipelineError(
                f"{repository / model} is missing; run `python -m pipeline package --model {recipe.name}` first"
            )
    return models


@dataclass
class _CheckInputs:
    """What the checks compare the server's answers with."""

    recipe: Recipe
    models: dict[str, str]
    images: list[bytes]
    reference: dict[str, np.ndarray]
    labels: list[str]
    verify_logits: dict[str, np.ndarray] | None
    verify_note: str


class _ServerSession:
    """The servers one serve-check starts (a second one after the crash check), their logs and work folder."""

    def __init__(self, repository: Path, work: Path) -> None:
        self.repository, self.work = repository, work
        self.servers: list[TritonServer] = []

    def new_server(self, runtime) -> TritonServer:
        server = TritonServer(
            runtime, self.repository, self.work / f"tritonserver.{len(self.servers)}.log", Ports.pick()
        )
        self.servers.append(server)
        return server

    def close(self) -> str:
        """Stop every server, drop the work folder; the servers' logs, joined."""
        for server in self.servers:
            server.stop()
        log_text = "".join(s.log_path.read_text(errors="replace") for s in self.servers if s.log_path.is_file())
        shutil.rmtree(self.work, ignore_errors=True)
        return log_text


def _run_checks(
    server: TritonServer, session: _ServerSession, runtime, inputs: _CheckInputs, settings: ServeCheckSettings
) -> list[dict[str, Any]]:
    recipe, models, images = inputs.recipe, inputs.models, inputs.images
    expected_first = int(inputs.reference["sparse"][0].argmax())
    checks = [
        _guarded(
            "predictions",
            lambda: check_predictions(
                server,
                recipe,
                models,
                images,
                inputs.reference,
                inputs.labels,
                recipe.export.output_name,
                inputs.verify_logits,
                inputs.verify_note,
            ),
        ),
        _guarded(
            "bad_requests", lambda: check_bad_requests(server, recipe, models["sparse"], images[0], expected_first)
        ),
    ]
    load = settings.load
    if load is not None:

        def run_load() -> dict[str, Any]:
            result = load_test(runtime, models, server.grpc_url, images, load, session.work)
            return {"name": "load_test", "passed": result["ok"], **result}

        checks.append(_guarded("load_test", run_load))
    if settings.crash:
        checks.append(
            _guarded(
                "crash",
                lambda: check_crash_restart(
                    server,
                    lambda: session.new_server(runtime),
                    recipe,
                    models["sparse"],
                    images[0],
                    expected_first,
                    settings.ready_timeout_s,
                ),
            )
        )
    return checks


def _report(
    recipe: Recipe,
    repository: Path,
    environment,
    ready_s: float,
    images: int,
    checks: list[dict[str, Any]],
    started: float,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "model": recipe.name,
        "repository": str(repository),
        "server": {
            "tritonserver": str(environment.tritonserver),
            "python_env": str(environment.prefix),
            "python": environment.python_version,
            "ready_s": round(ready_s, 2),
            "backend": "python (model.py running ONNX Runtime on the CPU)",
        },
        "note": "CPU Python-backend figures (tritonserver 2.51 from nvidia-pytriton, ONNX Runtime CPU inside "
        "Python-backend models); they say nothing about TensorRT on a GPU",
        "images": images,
        "checks": checks,
        "passed": all(check["passed"] for check in checks),
        "seconds": round(time.time() - started, 1),
    }
