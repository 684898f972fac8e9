"""The evaluation transform of a user's own weights, chosen by measuring it (issue 34).

No rule knows how a user trained; the dense model's accuracy on the user's own labelled images does: it is highest
under the transform the model was trained with. For own weights (a weights file) on an image folder, the first
stage that needs the transform evaluates the dense model on a stratified sample of the evaluation split
(SAMPLE_IMAGES, every class alike) under each candidate:

* no resize, centre crop/pad to the input size (whole images of that size pass unchanged);
* the whole image resized to the input size (aspect not kept);
* the shorter side resized to input/crop_pct, then centre-cropped, for crop_pct 1.0, 0.95, 0.9 and 0.875
  (torchvision's references and timm's train.py evaluate at 0.875);
* the recipe's own transform;

each resize bilinear, then the two best resizes bicubic too (the forward passes take the time: 8 sets of them,
not 11). The best top-1 wins, ties going to the simplest (the order above). The table and
the seconds it took are printed before any training. `--resize` or a recipe with `preprocess.resize_mode =
"fixed"` states the transform: it is used, and the table shows how it compares.

The choice and its evidence are an artifact of their own, `preprocess_choice.json` (`ArtifactPaths.preprocess_choice`),
keyed on the weights' sha256, the folder's fingerprint and the settings that shape the candidates: written once by
the first stage that needs it (train-masks) and read by every later one (`ensure_choice`); another key measures again.

A baseline near chance (or below `verify.min_dense_top1`) under the transform used stops the run with exit 2
before training: nothing a later stage measures would mean anything.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io import read_json, sha256_file, write_json
from pipeline.recipe.config import PreprocessConfig, Recipe

SAMPLE_IMAGES = 300  # validation images the candidates are measured on, stratified by class
CROP_FRACTIONS = (1.0, 0.95, 0.9, 0.875)
SCHEMA = 1
NAMED_WEIGHTS = ("random", "pretrain", "torchvision", "hub")  # as pipeline.recipe.weights.NAMED_WEIGHTS


@dataclass(frozen=True)
class Candidate:
    """One evaluation transform: resize (0: none; `square`: the whole image to resize x resize) then centre crop."""

    resize: int
    resize_shape: str = "shorter"
    interpolation: str = "bilinear"

    @classmethod
    def of(cls, pre: PreprocessConfig) -> Candidate:
        if not pre.resize:
            return cls(0)
        return cls(pre.resize, pre.resize_shape, pre.interpolation)

    def apply(self, pre: PreprocessConfig) -> None:
        if (pre.resize, pre.resize_shape, pre.interpolation) == (self.resize, self.resize_shape, self.interpolation):
            return  # already so: a stage's frozen recipe, which run_stage gave the recorded choice (issue 33)
        pre.resize, pre.resize_shape, pre.interpolation = self.resize, self.resize_shape, self.interpolation

    def describe(self, crop: int) -> str:
        if not self.resize:
            return f"no resize, centre crop/pad to {crop}"
        if self.resize_shape == "square":
            shown = f"whole image resized to {self.resize}x{self.resize}"
            return shown + ("" if self.resize == crop else f", centre crop {crop}") + f", {self.interpolation}"
        fraction = next((f for f in CROP_FRACTIONS if round(crop / f) == self.resize), crop / self.resize)
        return f"shorter side to {self.resize} (crop_pct {fraction:.3g}), centre crop {crop}, {self.interpolation}"


def candidates(pre: PreprocessConfig) -> list[Candidate]:
    """The candidates in order of simplicity (ties go to the earlier); the recipe's own last unless among them."""
    crop = pre.crop
    found = [Candidate(0), Candidate(crop, "square")]
    found += [Candidate(round(crop / fraction), "shorter") for fraction in CROP_FRACTIONS]
    return list(dict.fromkeys(found + [Candidate.of(pre)]))


def other_interpolations(rows: list[dict[str, Any]], tried: list[Candidate], keep: int = 2) -> list[Candidate]:
    """The other interpolation of the KEEP best resizing candidates measured so far (bicubic for bilinear ones)."""
    resized = [row for row in rows if row["candidate"]["resize"]]
    ranked = sorted(resized, key=lambda row: (-row["correct"], rows.index(row)))[:keep]
    flipped = [Candidate(**row["candidate"]) for row in ranked]
    swapped = [
        Candidate(c.resize, c.resize_shape, "bicubic" if c.interpolation == "bilinear" else "bilinear") for c in flipped
    ]
    return [candidate for candidate in dict.fromkeys(swapped) if candidate not in tried]


def applies(recipe: Recipe) -> bool:
    """Whether the transform is measured: own weights (a weights file) on an image folder."""
    return recipe.weights not in NAMED_WEIGHTS and recipe.data.kind == "imagefolder" and bool(recipe.data.root)


def stated(recipe: Recipe) -> bool:
    return recipe.preprocess.resize_mode == "fixed"


def stratified_sample(targets: list[int], limit: int) -> list[int]:
    """Up to LIMIT indices, the same number from every class (round robin in file order): deterministic."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(items) for items in by_class.values()):
        for target in sorted(by_class):
            if depth < len(by_class[target]) and len(chosen) < limit:
                chosen.append(by_class[target][depth])
        depth += 1
    return sorted(chosen)


# --------------------------------------------------------------------------- the artifact
@dataclass
class Choice:
    key: dict[str, Any]
    chosen: dict[str, Any]  # Candidate fields
    stated: bool  # the transform was stated (--resize, preprocess.resize_mode = "fixed"), not chosen
    table: list[dict[str, Any]]  # {"transform", "candidate", "correct", "top1"} in candidate order
    images: int
    classes: int
    seconds: float
    schema: int = SCHEMA

    @property
    def candidate(self) -> Candidate:
        return Candidate(**self.chosen)

    def row(self, candidate: Candidate) -> dict[str, Any]:
        return next(row for row in self.table if Candidate(**row["candidate"]) == candidate)

    @classmethod
    def load(cls, path: Path) -> Choice | None:
        """The recorded choice; None when there is none or it cannot be read (it is measured again then)."""
        if not path.is_file():
            return None
        try:
            data = read_json(path, what="preprocessing choice")
            choice = cls(**{name: data[name] for name in cls.__dataclass_fields__})
            choice.candidate.describe(1)
            choice.row(choice.candidate)
        except (PipelineError, KeyError, TypeError, StopIteration, AttributeError):
            return None
        return choice if choice.schema == SCHEMA else None


def choice_key(recipe: Recipe) -> dict[str, Any]:
    from pipeline.data.datasets import dataset_fingerprint

    pre = recipe.preprocess
    return {
        "weights_sha256": sha256_file(Path(recipe.weights)),
        "data_fingerprint": dataset_fingerprint(recipe),
        "eval_split": recipe.data.eval_split,
        "crop": pre.crop,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "color": pre.color,
        "stated": asdict(Candidate.of(pre)) if stated(recipe) else None,
        "recipe_transform": asdict(Candidate.of(pre)),
        "sample_images": SAMPLE_IMAGES,
    }


# --------------------------------------------------------------------------- measuring
@torch.no_grad()
def measure(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> tuple[list[dict[str, Any]], int, int]:
    """(table rows, images measured, classes) of every candidate on a stratified sample of the evaluation split."""
    from torchvision import transforms

    from pipeline.data.datasets import _image_folder
    from pipeline.data.images import checked_loader

    pre = recipe.preprocess
    check_training_images(recipe)
    folder: Any = _image_folder(recipe, recipe.data.eval_split, train=False)  # an ImageFolder, its images checked
    picked = stratified_sample([target for _, target in folder.samples], SAMPLE_IMAGES)
    images = [checked_loader(folder.samples[index][0]) for index in picked]
    labels = torch.tensor([folder.samples[index][1] for index in picked])
    tail = [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
    head = [transforms.Grayscale(1)] if pre.color == "L" else []
    rows: list[dict[str, Any]] = []
    seen: list[tuple[torch.Tensor, int]] = []
    model.eval()
    channels_last = device.type == "cpu"  # oneDNN's layout: the forward passes, which take the time, 13% faster
    tried = candidates(pre)
    for candidate in tried:
        rows.append(_score(model, candidate, pre, (head, tail), images, labels, device, seen, channels_last))
    for candidate in other_interpolations(rows, tried):  # the interpolation, for the two best resizes
        rows.append(_score(model, candidate, pre, (head, tail), images, labels, device, seen, channels_last))
    return rows, len(picked), len(folder.classes)


def check_training_images(recipe: Recipe) -> None:
    """The training split's images decode (the scan every stage reading the folder makes, cached per process), so a
    damaged image is named before the measurement's verdict on the baseline; with data.skip_bad_images they are left
    to the stage's own dataset, which skips and counts them."""
    from torchvision.datasets import ImageFolder

    from pipeline.data.images import drop_bad_images

    folder = Path(recipe.data.root) / recipe.data.train_split
    try:
        listed = ImageFolder(str(folder))
    except (
        FileNotFoundError,
        RuntimeError,
    ):  # no training split, or no class folders: the stage says so if it reads it
        return
    drop_bad_images(listed, folder, skip=bool(recipe.data.skip_bad_images))


def _score(model, candidate: Candidate, pre, steps: tuple, images, labels, device, seen, channels_last: bool):
    """CANDIDATE's table row: the top-1 of MODEL on IMAGES under it (reused when its tensors equal an earlier's)."""
    from torchvision import transforms

    from pipeline.data.datasets import eval_geometry

    trial = PreprocessConfig(**{**asdict(pre), **asdict(candidate)})
    head, tail = steps  # colour conversion; to tensor and normalise
    transform = transforms.Compose(head + eval_geometry(trial) + tail)
    batch = torch.stack([transform(image) for image in images])
    correct = next((count for earlier, count in seen if torch.equal(earlier, batch)), None)
    if correct is None:  # the same tensors as an earlier candidate (e.g. images already the input size)
        memory = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=memory)
        correct = sum(
            int((model(chunk.to(device).contiguous(memory_format=memory)).argmax(1).cpu() == truth).sum())
            for chunk, truth in zip(batch.split(64), labels.split(64), strict=True)
        )
        seen.append((batch, correct))
    return {
        "transform": candidate.describe(pre.crop),
        "candidate": asdict(candidate),
        "correct": correct,
        "top1": 100.0 * correct / len(images),
    }


def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest top-1; among equals the first (the simplest)."""
    return max(rows, key=lambda row: (row["correct"], -rows.index(row)))


def near_chance(top1: float, classes: int, images: int) -> float:
    """The top-1 a model guessing at random stays below in all but 1 of ~700 runs (chance + 3 standard errors)."""
    chance = 100.0 / max(classes, 1)
    return chance + 300.0 * math.sqrt(chance / 100 * (1 - chance / 100) / max(images, 1))


# --------------------------------------------------------------------------- the stage entry point
def ensure_choice(
    recipe: Recipe, paths, model: torch.nn.Module | None = None, device: torch.device | None = None
) -> Choice | None:
    """Apply the measured (or stated) evaluation transform to RECIPE; measure and record it when no record of the
    same weights, folder and settings exists. None (the recipe's transform as it is) where nothing is measured."""
    if not applies(recipe):
        return None
    key = choice_key(recipe)
    path = paths.preprocess_choice
    choice = apply_recorded(recipe, paths, key)
    if choice is not None:
        return choice
    if model is None:
        from pipeline.recipe.weights import load_dense_model

        model, _ = load_dense_model(recipe, paths)
    choice = choose(recipe, model, key, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, asdict(choice))
    return choice


def choose(
    recipe: Recipe, model: torch.nn.Module, key: dict[str, Any] | None = None, device: torch.device | None = None
) -> Choice:
    """Measure the candidates, print the table, refuse a broken baseline and apply the choice to RECIPE (no record:
    init-recipe writes it into the recipe file; ensure_choice records it)."""
    device = device or next(model.parameters()).device
    started = time.perf_counter()
    rows, images, classes = measure(model, recipe, device)
    choice = Choice(key or {}, {}, stated(recipe), rows, images, classes, round(time.perf_counter() - started, 2))
    used = Candidate.of(recipe.preprocess) if choice.stated else Candidate(**best(rows)["candidate"])
    choice.chosen = asdict(used)
    print_table(choice, recipe)
    check_baseline(choice, recipe)
    used.apply(recipe.preprocess)
    return choice


def apply_recorded(recipe: Recipe, paths, key: dict[str, Any] | None = None) -> Choice | None:
    """Apply the recorded choice when it was made for these weights, folder and settings (reads only, measures
    nothing: for every stage after the one that measured, before it writes config.json or builds datasets)."""
    if not applies(recipe):
        return None
    choice = Choice.load(paths.preprocess_choice)
    if choice is None or choice.key != (key or choice_key(recipe)):
        return None
    choice.candidate.apply(recipe.preprocess)
    print(
        f"note: preprocessing: {choice.candidate.describe(recipe.preprocess.crop)} "
        f"({'stated' if choice.stated else 'chosen by measurement'}, recorded in {paths.preprocess_choice.name}: "
        f"top-1 {choice.row(choice.candidate)['top1']:.2f}% on {choice.images} validation images)",
        flush=True,
    )
    return choice


def print_table(choice: Choice, recipe: Recipe) -> None:
    crop, used = recipe.preprocess.crop, choice.candidate
    print(
        f"preprocessing candidates: dense top-1 on {choice.images} validation images ({recipe.data.eval_split}, "
        f"stratified over {choice.classes} classes), {choice.seconds:.1f}s:",
        flush=True,
    )
    for row in choice.table:
        mark = ""
        if Candidate(**row["candidate"]) == used:
            mark = "  <- stated (--resize / preprocess)" if choice.stated else "  <- chosen"
        print(f"  {row['top1']:6.2f}%  {row['transform']}{mark}", flush=True)
    top = best(choice.table)
    why = (
        "stated by --resize or the recipe's preprocess (resize_mode fixed); the best candidate scores "
        f"{top['top1']:.2f}% ({top['transform']})"
        if choice.stated
        else "the highest top-1 of the candidates (ties go to the simplest); --resize N|none states another"
    )
    print(f"note: preprocessing: {used.describe(crop)} ({why})", flush=True)


def check_baseline(choice: Choice, recipe: Recipe) -> None:
    """Refuse (exit 2) a dense baseline near chance or below verify.min_dense_top1 under the transform used."""
    used, top = choice.row(choice.candidate), best(choice.table)
    floor = near_chance(used["top1"], choice.classes, choice.images)
    threshold = recipe.verify.min_dense_top1
    if floor >= 100.0:  # too few images to tell any accuracy from guessing: say so, refuse nothing
        print(
            f"note: {choice.images} validation images cannot tell the dense model from guessing among "
            f"{choice.classes} classes; the baseline is not checked",
            flush=True,
        )
        floor = -1.0
    if used["top1"] > floor and used["top1"] >= threshold:
        return
    if used["top1"] >= threshold and not recipe.verify.refuse_chance_baseline:
        print(
            f"warning: the dense model scores {used['top1']:.2f}% top-1 under {used['transform']}, near chance "
            f"(at most {floor:.1f}% on {choice.images} images is no better); going on as "
            "verify.refuse_chance_baseline = false says",
            file=sys.stderr,
            flush=True,
        )
        return
    limit = (
        f"below verify.min_dense_top1 = {threshold:g}%"
        if used["top1"] < threshold and (used["top1"] > floor or not recipe.verify.refuse_chance_baseline)
        else f"near chance ({100.0 / max(choice.classes, 1):.1f}% for {choice.classes} classes; at most "
        f"{floor:.1f}% on {choice.images} images is no better)"
    )
    better = (
        ""
        if top is used or top["correct"] == used["correct"]
        else f"; the best candidate, {top['transform']}, scores {top['top1']:.2f}%: drop --resize to use it"
    )
    raise PipelineError(
        f"the dense model scores {used['top1']:.2f}% top-1 under {used['transform']} on {choice.images} validation "
        f"images of {recipe.data.root}, {limit} (best of {len(choice.table)} transforms tried: {top['top1']:.2f}%, "
        f"{top['transform']}){better}; nothing trained on this baseline would mean anything. Usual causes: wrong "
        "preprocessing (state it with --input-size, --resize N|none, --mean/--std), wrong class order (the class "
        "folders, sorted, must be the head's outputs in order) or wrong weights (--weights, --classifier); "
        "--set verify.min_dense_top1=0 keeps only the chance check, --set verify.refuse_chance_baseline=false "
        "only warns near chance"
    )


def choice_summary(recipe: Recipe, paths) -> dict[str, Any]:
    """The transform used and its evidence, for the stages' reports (train_masks.json, report.json)."""
    from pipeline.recipe.preprocessing import describe

    summary: dict[str, Any] = {"transform": describe(recipe)}
    choice = Choice.load(paths.preprocess_choice) if applies(recipe) else None
    if choice is None:
        summary["how"] = "the recipe's transform (measured only for your own weights on an image folder)"
        return summary
    summary.update(
        how="stated (--resize / preprocess.resize_mode fixed)" if choice.stated else "chosen by measurement",
        record=paths.preprocess_choice.name,
        images=choice.images,
        seconds=choice.seconds,
        top1=choice.row(choice.candidate)["top1"],
        candidates={row["transform"]: round(row["top1"], 2) for row in choice.table},
    )
    return summary
