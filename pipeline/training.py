"""Shared pieces of the training loops: device choice, evaluation, seeding, signals."""
from __future__ import annotations

import re
import signal
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from pipeline.data.datasets import make_loader
from pipeline.errors import PipelineError
from pipeline.progress import progress


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


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device, desc: str = "eval",
             workers: int = 0) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) of `model` in its current mode on `dataset`."""
    loader = make_loader(dataset, batch_size=batch_size, workers=workers)
    correct1 = correct5 = total = 0
    for images, labels in progress(loader, desc=desc, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
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
