"""Small ImageFolder datasets written by tests: train/<class>/ and val/<class>/ with PNG images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_imagefolder(
    root: Path, classes: list[str], per_class: int, size: int = 32, val_per_class: int = 2, seed: int = 0
) -> Path:
    """Images whose mean colour depends on the class, so a few training steps can learn something."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(37 * index) % 256, (91 * index) % 256, (151 * index) % 256], dtype=np.float64)
            for image in range(count):
                pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{image}.png")
    return root


STRIPE_PERIODS = (2, 3, 4, 6)  # pixels; the class of a stripe image


def write_stripe_folder(root: Path, size: int, per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """Classes told apart by the period of their stripes (horizontal or vertical, random phase and tint): a
    transform that rescales the image changes the period the model sees, so the wrong preprocessing shows."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for period in STRIPE_PERIODS:
            folder = root / split / f"p{period}"
            folder.mkdir(parents=True, exist_ok=True)
            for image in range(count):
                phase = rng.integers(0, period)
                wave = ((np.arange(size) + phase) % period < period / 2).astype(np.float64)
                plane = np.tile(wave, (size, 1)) if rng.random() < 0.5 else np.tile(wave[:, None], (1, size))
                tint = rng.uniform(0.5, 1.0, 3)
                pixels = 40 + 170 * plane[..., None] * tint + rng.normal(0, 8, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{image}.png")
    return root


def stripe_net(num_classes: int = 4):
    """A tiny CNN for `--model python:tests.image_folders:stripe_net --classifier head` (head: the Linear)."""
    from torch import nn

    class StripeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.head = nn.Linear(32, num_classes)

        def forward(self, x):
            return self.head(self.features(x))

    return StripeNet()
