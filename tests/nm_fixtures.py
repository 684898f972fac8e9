"""Shared by the export/build/verify tests: tiny_resnet artifacts made without mask training.

Random dense weights (as the recipe's `weights: random`) with BatchNorm statistics made
non-trivial, so the exporter's BatchNorm folding really rescales channels; magnitude 2:4 masks.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from pipeline.export.report import ExportReport
from pipeline.io import torch_save, write_json
from pipeline.masks.artifact import LayerMask, MaskArtifact, apply_masks
from pipeline.masks.bake_report import BakeReport
from pipeline.masks.eligibility import find_layers
from pipeline.masks.patterns import magnitude_indices
from pipeline.paths import ArtifactPaths
from pipeline.recipe.registry import get_recipe
from pipeline.recipe.weights import build_network
from pipeline.records import file_record

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny_resnet"


def dense_weights_file(folder: Path) -> Path:
    """A dense state_dict with non-trivial BatchNorm statistics, saved as a .pth."""
    recipe = get_recipe(MODEL)
    torch.manual_seed(0)
    model = build_network(recipe)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)
    path = Path(folder) / "tiny_dense.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def make_artifacts(out: Path, weights: Path) -> ArtifactPaths:
    """masks.pt, sparse.pt, layers.json for tiny_resnet in OUT/tiny_resnet/ (what train-masks + bake write)."""
    recipe = get_recipe(MODEL)
    state = torch.load(weights, weights_only=True)
    model = build_network(recipe)
    model.load_state_dict(state)
    report = find_layers(model, recipe.input_shape, 4, classifier=recipe.classifier)
    layers = [
        LayerMask(layer.name, layer.weight_shape, 2, 4, magnitude_indices(state[f"{layer.name}.weight"], 2, 4))
        for layer in report.masked
    ]
    artifact = MaskArtifact(recipe.name, recipe.arch, "magnitude", layers)
    paths = ArtifactPaths.for_model(out, MODEL)
    artifact.save(paths.masks)
    torch_save(apply_masks(state, artifact), paths.sparse_weights)
    BakeReport(MODEL, {path.name: file_record(path) for path in (paths.masks, paths.sparse_weights)}).save(
        paths.bake_report
    )
    write_json(paths.layers, report.to_dict())
    return paths


def record_export(folder: Path) -> None:
    """export.json for the ONNX files in FOLDER, as export records them (for tests that write their own ONNX)."""
    files = {path.name: file_record(path) for path in sorted(Path(folder).glob("*.onnx"))}
    ExportReport(MODEL, files).save(Path(folder) / "export.json")


PIPELINE_ENV = {**os.environ, "PIPELINE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*argv: str, check: bool = False, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ...` as a user would (the one CLI runner of the tests). CHECK: fail the test,
    with the run's output, unless it exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, argv)],
        cwd=REPO,
        env=PIPELINE_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def assert_one_error_line(result, *fragments):
    """RESULT (a finished run) refused bad input as the README promises: exit 2, one `error:` line, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def stage_lines(output: str) -> dict[str, str]:
    """`engine`'s `== STAGE: ...` lines by stage name."""
    return {line.split(":")[0].removeprefix("== "): line for line in output.splitlines() if line.startswith("== ")}


# A process that holds a model folder's lock until killed (it prints "holding" once it has it).
HOLDER = """
import sys
from pipeline.lock import model_folder_lock
with model_folder_lock(sys.argv[1]):
    print("holding", flush=True)
    sys.stdin.read()
"""


class BackgroundRun:
    """A command running in the background (`python -m pipeline ARGS` by default); its output lines are read as
    they come, and its standard input is a pipe the test may write to or close."""

    def __init__(self, args: list[str], command: list[str] | None = None) -> None:
        command = [sys.executable, "-m", "pipeline"] if command is None else command
        self.process = subprocess.Popen(
            [*command, *args],
            cwd=REPO,
            env=PIPELINE_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_for_line(self, fragment: str, timeout: float = 600) -> None:
        """Block until a line containing FRAGMENT is printed; fail if the run ends or TIMEOUT passes first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                raise AssertionError(f"no line with {fragment!r} within {timeout}s:\n{''.join(self.output)}") from None
            if line is None:
                raise AssertionError(
                    f"the run ended ({self.process.wait()}) before printing {fragment!r}:\n{''.join(self.output)}"
                )
            if fragment in line:
                return

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        """Wait for the run to end; its exit code and everything it printed."""
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code, "".join(self.output)


def kill_at_first_checkpoint(args: list[str], checkpoint: Path, timeout: float = 600) -> dict:
    """Start `python -m pipeline ARGS`, SIGKILL it as soon as `checkpoint` exists, return that checkpoint."""
    run = BackgroundRun(args)
    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and run.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # polling for the file: the readiness signal is the checkpoint itself
    run.process.kill()
    code, output = run.finish()
    assert checkpoint.exists(), f"no checkpoint {checkpoint} within {timeout}s (exit {code}):\n{output}"
    saved = torch.load(checkpoint, weights_only=True)
    assert not saved["final"], "the run finished before it could be killed; the test proves nothing"
    return saved


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under FOLDER -> (sha256, mtime_ns), dot-files aside (the run lock, atomic-write temporaries):
    equal snapshots before and after a run mean the run changed no artifact."""
    from pipeline.io import sha256_file

    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        path.relative_to(folder).as_posix(): (sha256_file(path), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }


def tiny_magnitude_pair(seed: int = 0):
    """tiny_resnet's random dense network and a copy with one-shot magnitude 2:4 masks on every eligible
    layer: (recipe, dense, sparse, names of the masked layers)."""
    import copy

    from pipeline.masks.patterns import mask_from_indices

    recipe = get_recipe("tiny_resnet")
    torch.manual_seed(seed)
    dense = build_network(recipe).eval()
    masked = [layer.name for layer in find_layers(dense, recipe.input_shape, m=4, classifier=recipe.classifier).masked]
    sparse = copy.deepcopy(dense)
    modules = dict(sparse.named_modules())
    with torch.no_grad():
        for name in masked:
            weight = modules[name].weight
            weight.mul_(mask_from_indices(magnitude_indices(weight, 2, 4), 2, 4).to(weight.dtype))
    return recipe, dense, sparse, masked


def export_tiny_onnx(path: Path, seed: int) -> None:
    """tiny_resnet with random weights, dynamic batch, opset 17, input 'input', output 'logits'."""
    torch.manual_seed(seed)
    model = build_network(get_recipe(MODEL)).eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 1, 28, 28),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
