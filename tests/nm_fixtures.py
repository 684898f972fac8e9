"""Shared by the export/build/verify tests: tiny_resnet artifacts made without mask training.

Random dense weights (as the recipe's `weights: random`) with BatchNorm statistics made
non-trivial, so the exporter's BatchNorm folding really rescales channels; magnitude 2:4 masks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.io import torch_save, write_json
from pipeline.paths import ArtifactPaths
from pipeline.recipe.registry import get_recipe
from pipeline.masks.artifact import LayerMask, MaskArtifact, apply_masks
from pipeline.masks.eligibility import find_layers
from pipeline.masks.patterns import magnitude_indices
from pipeline.recipe.weights import build_network

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
    layers = [LayerMask(layer.name, layer.weight_shape, 2, 4, magnitude_indices(state[f"{layer.name}.weight"], 2, 4))
              for layer in report.masked]
    artifact = MaskArtifact(recipe.name, recipe.arch, "magnitude", layers)
    paths = ArtifactPaths.for_model(out, MODEL)
    artifact.save(paths.masks)
    torch_save(apply_masks(state, artifact), paths.sparse_weights)
    write_json(paths.layers, report.to_dict())
    return paths


def cli(*argv: str) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ...` as a user would."""
    env = dict(os.environ, PIPELINE_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def kill_at_first_checkpoint(args: list[str], checkpoint: Path, timeout: float = 120) -> dict:
    """Start `python -m pipeline ARGS`, SIGKILL it as soon as `checkpoint` exists, return that checkpoint."""
    import signal
    import time

    env = {**os.environ, "PIPELINE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(checkpoint, weights_only=True)
    assert not saved["final"], "the run finished before it could be killed; the test proves nothing"
    return saved
