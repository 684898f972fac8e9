"""Preprocessing that fits the user's images, said out loud.

The evaluation transform is: resize (`preprocess.resize`, 0: none; the shorter side, or with `resize_shape =
"square"` the whole image to resize x resize; `interpolation` bilinear or bicubic), centre-crop `preprocess.crop`
(zero padding when smaller), normalise. With `preprocess.resize_mode = "auto"` (the default) and the user's own
weights (a weights file) on an image folder, no rule decides it: the first stage that loads the dense model
measures its top-1 under each candidate transform and uses the best (pipeline/data/preprocess_choice.py).
Recipe resolution stays free of model and data loading: it only reads the image headers for the notes below.

`--resize none|N|auto` (`preprocess.resize_mode = "fixed"` with `preprocess.resize`) states it instead (the
measurement still prints how it compares). Inputs that are valid but probably wrong (a 64x64 folder while a
stated transform resizes 256 and crops 224, a folder too small for the validation split) get one `warning:` line
naming the flag to change, before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.recipe.config import Recipe

SAMPLE_IMAGES = 64  # image headers read per split to learn the folder's sizes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FolderSizes:
    """Sizes of a sample of a folder's images (width, height), from their headers only."""

    smallest: tuple[int, int]
    largest: tuple[int, int]
    sampled: int

    def describe(self) -> str:
        low, high = self.smallest, self.largest
        shown = f"{low[0]}x{low[1]}" if low == high else f"{low[0]}x{low[1]} to {high[0]}x{high[1]}"
        return f"{shown} ({self.sampled} sampled)"


def image_files(folder: Path, limit: int = 0) -> list[Path]:
    """Image files under FOLDER (by suffix, as ImageFolder finds them), sorted; at most LIMIT when given."""
    found: list[Path] = []
    for base, dirs, files in os.walk(folder):
        dirs.sort()
        found += [Path(base) / name for name in sorted(files) if name.lower().endswith(IMAGE_SUFFIXES)]
        if limit and len(found) >= limit:
            return found[:limit]
    return found


def probe_sizes(root: str, splits: tuple[str, ...]) -> FolderSizes | None:
    """The sizes of up to SAMPLE_IMAGES images of each split; None when no header could be read."""
    from PIL import Image

    sizes = []
    for split in splits:
        for path in image_files(Path(root) / split, SAMPLE_IMAGES):
            try:
                with Image.open(path) as image:  # reads the header only
                    sizes.append(image.size)
            except (OSError, ValueError, Image.DecompressionBombError):
                continue  # damaged images are named by the data step's scan
    if not sizes:
        return None
    return FolderSizes(min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1]), len(sizes))


def describe(recipe: Recipe) -> str:
    """The evaluation transform in words."""
    pre = recipe.preprocess
    crop = f"{pre.crop}x{pre.crop}"
    resized = (
        f"resize the whole image to {pre.resize}x{pre.resize}"
        if pre.resize_shape == "square"
        else f"resize the shorter side to {pre.resize}"
    )
    steps = [
        f"{resized} ({pre.interpolation})" if pre.resize else "no resize",
        f"centre crop {crop}"
        if pre.resize
        else f"centre crop/pad to {crop} (whole images of that size pass unchanged)",
        f"{pre.color}, mean {pre.mean}, std {pre.std}",
    ]
    return ", ".join(steps)


def fit_to_folder(recipe: Recipe, own_weights: bool, ratio: tuple[int, int] | None) -> tuple[str, list[str]]:
    """Set preprocess.resize from the image folder when resize_mode is auto; (why, warnings).

    RATIO: the source's resize/crop before --input-size changed it (None: no resize)."""
    pre, data = recipe.preprocess, recipe.data
    if data.kind != "imagefolder" or not data.root:
        return (
            f"{data.kind} data: the recipe's transform"
            if data.kind != "imagefolder"
            else "no image folder given (--data DIR): the recipe's transform",
            [],
        )
    sizes = probe_sizes(data.root, (data.train_split, data.eval_split))
    if sizes is None:
        return ("the recipe's transform (no image header of the folder could be read)", [])
    seen = f"the images of {data.root} are {sizes.describe()}"
    if pre.resize_mode == "fixed":
        return (f"fixed by the recipe or --resize ({seen})", _too_small_warning(recipe, sizes, seen))
    if own_weights:  # pipeline/data/preprocess_choice.py measures the candidates on the dense model
        return (
            f"{seen}; for your own weights the first stage that loads the model measures the dense top-1 under "
            "each candidate transform and uses the best (--resize N|none states one)",
            [],
        )
    why = f"{seen}; the recipe's " + (f"resize/crop ratio {ratio[0]}/{ratio[1]}" if ratio else "transform")
    return (
        why + ("" if own_weights else " (published or demo weights keep their own transform)"),
        _too_small_warning(recipe, sizes, seen),
    )


def _too_small_warning(recipe: Recipe, sizes: FolderSizes, seen: str) -> list[str]:
    pre = recipe.preprocess
    if not pre.resize or max(sizes.largest) >= pre.crop:
        return []
    return [
        f"{seen}, but the preprocessing resizes them to {pre.resize} and crops {pre.crop} (scaling them up "
        f"{pre.resize / min(sizes.smallest):.1f}x): if the model was trained on whole images of that size, pass "
        f"--input-size {max(sizes.largest)} --resize none"
    ]


def validation_warning(recipe: Recipe, share_limit: int = 5) -> list[str]:
    """A folder too small for the validation split the recipe asks for (at most 1/SHARE_LIMIT is held out)."""
    data, cfg = recipe.data, recipe.masks
    if data.kind != "imagefolder" or not data.root or not cfg.validation_images:
        return []
    wanted = cfg.validation_images * share_limit
    count = len(image_files(Path(data.root) / data.train_split, wanted))
    if count >= wanted:
        return []
    return [
        f"{Path(data.root) / data.train_split} has {count} images, too few for masks.validation_images = "
        f"{cfg.validation_images} (at most a fifth, {count // share_limit}, is held out): pass "
        f"--set masks.validation_images={count // share_limit} to say so, or use a larger folder"
    ]


def parse_resize(text: str) -> tuple[str, int]:
    """`--resize auto | none | N`: (resize_mode, resize)."""
    lowered = text.strip().lower()
    if lowered == "auto":
        return "auto", -1
    if lowered in ("none", "0", "no"):
        return "fixed", 0
    try:
        value = int(lowered)
    except ValueError:
        value = -1
    if value < 1:
        raise PipelineError(
            f"--resize {text}: not valid; valid: auto (fit the image folder), none (no resize, "
            "whole images) or the shorter side in pixels, e.g. 256"
        )
    return "fixed", value
