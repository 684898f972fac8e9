"""Shared pieces of the training loops: device choice, evaluation, signals, and the one training step."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.datasets import make_loader
from pipeline.errors import PipelineError
from pipeline.progress import progress
from pipeline.recipe.config import TRAINING_PRECISIONS


def check_device(requested: str) -> str:
    """A `--device` value, refused (exit 2) unless it names a device kind torch runs here."""
    if requested in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", requested):
        return requested
    raise PipelineError(f"--device {requested}: not valid; valid: auto, cpu, cuda, cuda:N")


def select_device(requested: str = "auto") -> torch.device:
    check_device(requested)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def has_channels_last_convs(model: nn.Module) -> bool:
    """Whether the model's convolutions hold channels_last weights (`StepSettings.prepare_model`), judged on the
    first one whose layout tells (more than one input channel and a kernel larger than 1x1)."""
    for module in model.modules():
        if (
            isinstance(module, nn.Conv2d)
            and module.in_channels // module.groups > 1
            and module.kernel_size[0] * module.kernel_size[1] > 1
        ):
            weight = module.weight
            return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return False


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, batch_size: int, device: torch.device, desc: str = "eval", workers: int = 0
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) of `model` in its current mode on `dataset`. Batches take the memory format
    of the model's convolutions (channels_last images for a channels_last model: the demo's 10,000 test images
    6.7-7.7 s in NCHW, 4.2-4.6 s in channels_last on the EPYC, docs/notebook/time-to-accuracy.md)."""
    loader = make_loader(dataset, batch_size=batch_size, workers=workers)
    layout = StepSettings(channels_last=has_channels_last_convs(model))
    correct1 = correct5 = total = 0
    for images, labels in progress(loader, desc=desc, leave=False):
        images, labels = layout.prepare_images(images, device), labels.to(device, non_blocking=True)
        logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(1).sum())
        total += labels.numel()
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1), "samples": total}


class StopRequested:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits cleanly at the next step."""

    def __init__(self) -> None:
        self.flag = False
        self.signum = 0

    def __bool__(self) -> bool:
        return self.flag

    @property
    def signal_number(self) -> int:
        """The signal that stopped the run (SIGTERM when another rank received it)."""
        return self.signum or int(signal.SIGTERM)


@contextmanager
def stop_on_signals() -> Iterator[StopRequested]:
    stop = StopRequested()
    previous = {}

    def handler(signum, frame):
        stop.flag = True
        stop.signum = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- the training step
def cpu_has_bf16_units(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """True on CPUs with bfloat16 arithmetic: AMX bfloat16 tiles (Intel Sapphire Rapids and newer) or
    AVX512-BF16 (AMD Zen 4 and newer, Intel Cooper Lake), where oneDNN's bfloat16 training step beats float32
    (measured on this project's machines, the demo's step: 2.0x on a Xeon with AMX, 1.5x on an EPYC with
    AVX512-BF16; docs/notebook/time-to-accuracy.md). Elsewhere (AVX2 only) bfloat16 autocast falls back to PyTorch's
    reference convolution, 10x slower than float32."""
    try:
        with open(cpuinfo_path, encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return ("amx_bf16" in flags and "amx_tile" in flags) or "avx512_bf16" in flags


def bfloat16_is_faster(device: torch.device) -> bool:
    """Where precision `auto` trains under bfloat16 autocast: CUDA devices and CPUs with bfloat16 units."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units())


@dataclass(frozen=True)
class StepSettings:
    """How a training step runs: bfloat16 autocast or float32, in channels_last memory format or NCHW.

    Precision `auto` (the recipes' `pretrain.precision` and `masks.precision`) turns them on where they are
    faster: CUDA devices and CPUs with bfloat16 units, AMX or AVX512-BF16 (`bfloat16_is_faster`). Weights, mask
    logits, optimiser state and every evaluation stay float32; autocast only runs the convolutions and matrix
    products in bfloat16. On CPUs the memory format is channels_last in float32 too (oneDNN's preferred layout:
    the demo's float32 step 17% faster on a 2-core AVX2 EPYC, docs/notebook/time-to-accuracy.md). `for_device(device,
    cuda_path=True)` turns both on for any device, so a CPU test runs the code a GPU runs."""

    autocast: bool = False
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: torch.device, cuda_path: bool = False, precision: str = "auto") -> StepSettings:
        if precision not in TRAINING_PRECISIONS:
            raise PipelineError(f"training precision {precision!r}: not valid; valid: {', '.join(TRAINING_PRECISIONS)}")
        on = cuda_path or precision == "bfloat16" or (precision == "auto" and bfloat16_is_faster(device))
        return cls(autocast=on, channels_last=on or device.type == "cpu")

    def describe(self) -> str:
        precision = "bfloat16 autocast" if self.autocast else "float32"
        return f"{precision}, channels_last" if self.channels_last else precision

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Conv weights in channels_last (only they: a masked layer's 5-D pattern logits have no such format)."""
        if self.channels_last:
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        return model

    def prepare_images(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The batch on the device, in channels_last strides when they are on. A one-channel NCHW batch counts
        as channels_last-contiguous too, and convolutions then pick NCHW for the whole network (11% slower on
        Fashion-MNIST here), so it is copied into channels_last strides explicitly."""
        images = images.to(device, non_blocking=True)
        if not self.channels_last or images.dim() != 4 or images.stride(1) == 1:
            return images
        return torch.empty_like(images, memory_format=torch.channels_last).copy_(images)

    def autocast_context(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast)


# loss_fn(model, images, targets) -> (loss, model output)
LossFn = Callable[[nn.Module, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: Any,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    settings: StepSettings = StepSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step, the only one in the pipeline: pretrain, the updatable demo's fine-tuning, mask
    training and bench-train call it. `images` are on the device already (`settings.prepare_images`); the
    loss runs under the settings' autocast. Returns the loss (detached) and the model's output."""
    with settings.autocast_context(images.device):
        loss, output = loss_fn(model, images, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), output.detach()


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    """The dense models' loss: cross-entropy of the output against the labels."""

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        output = model(images)
        return F.cross_entropy(output.float(), labels, label_smoothing=label_smoothing), output

    return loss_fn
