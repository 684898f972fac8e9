"""Checkpoints written by real training tools go through `engine` with `--weights` only (issue 34, must-show 4).

* pytorch-lightning's `ModelCheckpoint` around a torchvision ResNet-18 held as `self.backbone` (state_dict keys
  `backbone.*`, a loss module's `criterion.weight` beside them, hyper-parameters holding a `pathlib.Path` and loop
  and callback state that `torch.load(weights_only=True)` refuses);
* timm's `CheckpointSaver`, the class timm's train.py saves through (`state_dict`, `state_dict_ema`, `args`).

The tools are installed by the test into a folder of its own (`pip install --no-deps --target`, under
~/.cache/sparse-pipeline/test-extras), or the test is skipped with the reason. The checkpoint is written in a
subprocess that has them; the pipeline that reads it has no Lightning, so nothing of Lightning's can run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from image_folders import write_imagefolder
from nm_fixtures import PIPELINE_ENV, REPO, cli

CLASSES = ["a", "b", "c", "d"]
EXTRAS = {
    "lightning": ["pytorch-lightning", "lightning-utilities", "torchmetrics", "pyyaml"],
    "timm": ["timm", "pyyaml", "safetensors"],
}
FAST = ["--set", "masks.steps=2", "--set", "verify.max_top1_drop=100", "--set", "export.fp16=false"]


def extras(name: str) -> Path:
    """A folder holding EXTRAS[name], installed once (no dependencies beyond them: torch is the venv's)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse-pipeline" / "test-extras"
    target = cache / name
    marker = target / ".installed"
    if not marker.is_file():
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *EXTRAS[name]]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            pytest.skip(f"cannot install {', '.join(EXTRAS[name])} ({run.stderr.strip().splitlines()[-1:]})")
        marker.write_text("\n".join(EXTRAS[name]))
    return target


def write_with(folder: Path, script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


LIGHTNING_SCRIPT = """
    import sys
    from pathlib import Path

    import pytorch_lightning as pl
    import torch
    import torchvision
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torchvision import datasets, transforms

    data, out = sys.argv[1], sys.argv[2]

    class Classifier(pl.LightningModule):
        def __init__(self, data_dir: Path, num_classes: int = 4, lr: float = 1e-3):
            super().__init__()
            self.save_hyperparameters()  # a pathlib.Path among them: weights_only=True refuses the file
            self.backbone = torchvision.models.resnet18(num_classes=num_classes)
            self.criterion = torch.nn.CrossEntropyLoss(weight=torch.ones(num_classes))

        def forward(self, x):
            return self.backbone(x)

        def training_step(self, batch, _):
            images, labels = batch
            loss = self.criterion(self(images), labels)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    normalise = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train = datasets.ImageFolder(data + "/train", transforms.Compose([transforms.ToTensor(), normalise]))
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=out, filename="best", monitor="train_loss", save_top_k=1)],
    )
    trainer.fit(Classifier(Path(data)), torch.utils.data.DataLoader(train, batch_size=16, shuffle=True))
"""

TIMM_SCRIPT = """
    import argparse
    import os
    import sys

    import timm
    import torch
    from timm.utils import CheckpointSaver, ModelEmaV3
    from torchvision import datasets, transforms

    data, out = sys.argv[1], sys.argv[2]
    args = argparse.Namespace(model="resnet18", num_classes=4, lr=1e-3, input_size=(3, 32, 32), model_ema=True)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4)
    ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    normalise = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train = datasets.ImageFolder(data + "/train", transforms.Compose([transforms.ToTensor(), normalise]))
    for _ in range(3):  # epochs
        for images, labels in torch.utils.data.DataLoader(train, batch_size=16, shuffle=True):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(model)
    os.makedirs(out, exist_ok=True)  # train.py makes its output folder first
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=out, recovery_dir=out)
    saver.save_checkpoint(epoch=0, metric=loss.item())  # what timm's train.py calls after each epoch
"""


def engine_ok(run, out: Path, model: str) -> dict:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / model / "report.json").read_text())


@pytest.mark.slow
def test_a_lightning_checkpoint_goes_through_engine_with_weights_only(tmp_path):
    folder = extras("lightning")
    data = write_imagefolder(tmp_path / "data", CLASSES, per_class=24, size=32, val_per_class=8)
    write_with(folder, LIGHTNING_SCRIPT, str(data), str(tmp_path / "ckpt"))
    checkpoint = tmp_path / "ckpt" / "best.ckpt"
    import pickle

    import torch

    with pytest.raises(pickle.UnpicklingError):  # what a weights_only reader meets in it
        torch.load(checkpoint, weights_only=True)
    out = tmp_path / "engines"
    args = ["--model", "resnet18", "--weights", str(checkpoint), "--data", str(data), "--input-size", "32"]
    run = cli("engine", *args, "--out", str(out), *FAST)
    report = engine_ok(run, out, "resnet18")
    assert "(entry 'state_dict')" in run.stdout and "hyper_parameters" in run.stdout
    assert "pickled objects left out, none of their code run (pathlib" in run.stdout, run.stdout[:3000]
    assert "prefix 'backbone.' removed" in run.stdout and "criterion.weight" in run.stdout
    assert report["accuracy"]["dense"]["top1"] >= 50, report["accuracy"]  # chance is 25%: the user's head


@pytest.mark.slow
def test_a_timm_train_checkpoint_goes_through_engine_with_weights_only(tmp_path):
    folder = extras("timm")
    data = write_imagefolder(tmp_path / "data", CLASSES, per_class=24, size=32, val_per_class=8)
    write_with(folder, TIMM_SCRIPT, str(data), str(tmp_path / "ckpt"))
    checkpoint = tmp_path / "ckpt" / "last.pth.tar"
    out = tmp_path / "engines"
    args = ["--model", "timm:resnet18", "--weights", str(checkpoint), "--data", str(data), "--input-size", "32"]
    env = {**PIPELINE_ENV, "PYTHONPATH": str(folder)}  # the timm: source needs timm in the pipeline too
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "engine", *args, "--out", str(out), *FAST],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = engine_ok(run, out, "timm_resnet18")
    assert "(entry 'state_dict'); also holds 'state_dict_ema', not used" in run.stdout, run.stdout[:3000]
    assert "args" in run.stdout and report["accuracy"]["dense"]["top1"] >= 50, report["accuracy"]
