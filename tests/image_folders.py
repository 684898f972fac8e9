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
