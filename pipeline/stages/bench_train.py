"""`bench-train`: cost of a mask-training step next to an ordinary dense training step.

All steps run on the same model (random weights: speed does not depend on values) and the same batch,
interleaved (dense, mask, distill, distill, mask, dense, ...) so that machine noise hits them alike. Every
step is `pipeline.training.train_step`; the mask steps are the ones train-masks runs, built by
`pipeline.masks.mask_step.build_mask_step` (Gumbel noise, every mask, the recipe's kept-magnitude
regulariser, AdamW and its schedules, feature hooks when the loss has them, the step settings train-masks
uses here: the recipe's `masks.precision`, whose `auto` is bfloat16 autocast and channels_last on CPUs with AMX
or AVX512-BF16 and float32 with channels_last on other CPUs; `--cuda-path` forces the bfloat16 settings). The
dense step updates every weight with SGD under the same settings. `--set SECTION.FIELD=VALUE` changes every timed
model's recipe (e.g. `masks.precision=float32`, `masks.batch_size=64`), checked before anything is timed. CPU only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.declaration import StageDeclaration
from pipeline.errors import GateFailed, PipelineError
from pipeline.io import write_json
from pipeline.masks.eligibility import find_layers
from pipeline.masks.fused import status as fused_status
from pipeline.masks.gumbel import masked_modules
from pipeline.masks.mask_step import MaskStep, build_mask_step
from pipeline.progress import progress
from pipeline.recipe.config import Recipe, apply_override, validate
from pipeline.recipe.registry import get_recipe, list_models
from pipeline.recipe.weights import build_network
from pipeline.training import StepSettings, cross_entropy_loss, train_step

DEFAULT_MODELS = ["resnet18", "resnet50", "convnext_t", "fmnist_resnet", "fmnist_resnet18"]


DECLARATION = StageDeclaration(
    help="time a mask-training step against a dense training step",
    kind="lab",
    needs_recipe=False,  # its own --models list; writes OUT/bench-train.json
)


@dataclass
class Options:
    models: str = ",".join(DEFAULT_MODELS)
    size: int = 224
    batch: int = 16
    demo_batch: int | None = None
    reps: int = 6
    warmup: int = 2
    max_ratio: float = 1.15
    max_distill_ratio: float = 1.5
    out: str = "engines"
    cuda_path: bool = False
    clock: str = "wall"
    overrides: list[str] = dataclasses.field(default_factory=list)  # --set, applied to every model's recipe

    def __post_init__(self) -> None:
        for flag, value, low in (
            ("--size", self.size, 1),
            ("--batch", self.batch, 1),
            ("--reps", self.reps, 1),
            ("--warmup", self.warmup, 0),
            ("--demo-batch", self.demo_batch or 1, 1),
        ):
            if value < low:
                raise PipelineError(f"{flag} {value}: not valid; valid: at least {low}")
        if self.clock not in CLOCKS:
            raise PipelineError(f"--clock {self.clock}: not valid; valid: {', '.join(CLOCKS)}")
        for flag, ratio in (("--max-ratio", self.max_ratio), ("--max-distill-ratio", self.max_distill_ratio)):
            if ratio <= 0:
                raise PipelineError(f"{flag} {ratio}: not valid; valid: greater than 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registered models")
    parser.add_argument("--size", type=int, default=224, help="input size for the ImageNet models (default 224)")
    parser.add_argument("--batch", type=int, default=16, help="batch for the ImageNet models (default 16)")
    parser.add_argument(
        "--demo-batch",
        type=int,
        default=None,
        help="batch for small-input recipes (default: the recipe's masks.batch_size)",
    )
    parser.add_argument("--reps", type=int, default=6, help="timed steps of each kind per model (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first (default 2)")
    parser.add_argument("--max-ratio", type=float, default=1.15, help="gate: mask step / dense step (default 1.15)")
    parser.add_argument(
        "--max-distill-ratio",
        type=float,
        default=1.5,
        help="gate: distillation mask step (dense teacher forward included) / dense step (default 1.5)",
    )
    parser.add_argument("--out", default="engines", help="writes OUT/bench-train.json")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall seconds (default), or this process's CPU seconds: on a shared machine run it with "
        "OMP_NUM_THREADS=1 so waiting for a core does not count",
    )
    parser.add_argument(
        "--cuda-path",
        action="store_true",
        help="time the CUDA step settings (bfloat16 autocast, channels_last) on this CPU",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a recipe field of every model timed, e.g. --set masks.precision=float32 (repeatable)",
    )


def model_recipe(name: str, overrides: Sequence[str] = ()) -> Recipe:
    """The registered recipe with the `--set` overrides applied and checked."""
    recipe = get_recipe(name)
    for assignment in overrides:
        apply_override(recipe, assignment)
    return validate(recipe, origin=f"model {name} with --set")


def bench_recipe(recipe: Recipe, loss: str) -> Recipe:
    """The recipe with the given mask loss and the magnitude prior (a prior sets starting values only; wanda
    and sparsegpt would need calibration data, which speed does not depend on)."""
    return dataclasses.replace(recipe, masks=dataclasses.replace(recipe.masks, prior="magnitude", loss=loss))


def bench_steps(
    recipe: Recipe, shape: list[int], batch: int, settings: StepSettings
) -> tuple[dict[str, Callable[[], object]], dict]:
    """The three steps timed, all through `pipeline.training.train_step`: a dense SGD step, and the mask step
    train-masks runs (`build_mask_step`: masks, AdamW, schedules, feature hooks when the loss has them, the
    step settings) with cross-entropy (`mask`) and with cross-entropy + distillation (`distill`)."""
    device = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = build_network(recipe)
        images, labels = torch.randn(batch, *shape), torch.randint(0, recipe.num_classes, (batch,))
    report = find_layers(
        copy.deepcopy(dense),
        shape,
        recipe.masks.m,
        recipe.masks.include,
        recipe.masks.exclude,
        recipe.classifier,
        recipe.masks.include_classifier,
    )
    mask_steps = {
        kind: build_mask_step(copy.deepcopy(dense), report, bench_recipe(recipe, loss).masks, device, loss, settings)
        for kind, loss in (("mask", "ce"), ("distill", "ce+distill"))
    }
    settings.prepare_model(dense)
    dense_optimizer = torch.optim.SGD(dense.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    dense_loss = cross_entropy_loss()
    counter = itertools.count()

    def dense_step() -> None:
        dense.train()
        train_step(
            dense, settings.prepare_images(images, device), labels, dense_loss, dense_optimizer, settings=settings
        )

    def timed(mask_step: MaskStep) -> Callable[[], object]:
        return lambda: mask_step.step(images, labels, next(counter))

    steps: dict[str, Callable[[], object]] = {"dense": dense_step}
    for kind, mask_step in mask_steps.items():
        steps[kind] = timed(mask_step)
    logits = [module.sparse_mask.logits for module in masked_modules(mask_steps["mask"].model).values()]
    info = {
        "input": shape,
        "batch": batch,
        "masked_layers": len(report.masked),
        "mask_logits": sum(p.numel() for p in logits),
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "autocast_bf16": settings.autocast,
        "channels_last": settings.channels_last,
    }
    return steps, info


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_steps(
    steps: dict[str, Callable[[], object]], reps: int, warmup: int, name: str, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds of each step kind, interleaved (dense, mask, distill, then reversed) so load hits all alike.
    `clock` "cpu" counts this process's CPU seconds instead of wall seconds: on a machine shared with other
    work (and with torch.set_num_threads(1), OMP_NUM_THREADS=1) it measures the step's own work, which waiting
    for a core does not inflate."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    for rep in progress(range(reps), desc=f"bench {name}", leave=False):
        for kind in list(steps) if rep % 2 == 0 else list(reversed(steps)):
            start = now()
            steps[kind]()
            times[kind].append(now() - start)
    return times


def bench_model(
    recipe: Recipe,
    size: int,
    batch: int,
    reps: int,
    warmup: int,
    settings: StepSettings | None = None,
    clock: str = "wall",
) -> dict:
    settings = settings or StepSettings()
    shape = list(recipe.input_shape)
    if shape[1] >= 64:
        shape = [shape[0], size, size]
    steps, info = bench_steps(recipe, shape, batch, settings)
    times = time_steps(steps, reps, warmup, recipe.name, clock)
    dense_median, mask_median, distill_median = (
        statistics.median(times[kind]) for kind in ("dense", "mask", "distill")
    )
    return {
        **info,
        "dense_median_s": dense_median,
        "mask_median_s": mask_median,
        "ratio": mask_median / dense_median,
        "distill_median_s": distill_median,
        "distill_ratio": distill_median / dense_median,
        "dense_s": times["dense"],
        "mask_s": times["mask"],
        "distill_s": times["distill"],
    }


def run(options: Options) -> int:
    names = [name.strip() for name in options.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in list_models()]
    if unknown:
        raise PipelineError(f"unknown model(s) {', '.join(unknown)}; valid models: {', '.join(list_models())}")
    recipes = {name: model_recipe(name, options.overrides) for name in names}  # every --set checked first
    results = {}
    for name, recipe in recipes.items():
        batch = (options.demo_batch or recipe.masks.batch_size) if recipe.input_shape[1] < 64 else options.batch
        settings = StepSettings.for_device(torch.device("cpu"), options.cuda_path, recipe.masks.precision)
        results[name] = bench_model(recipe, options.size, batch, options.reps, options.warmup, settings, options.clock)
        r = results[name]
        print(
            f"{name:14s} batch {batch:4d}  dense {r['dense_median_s'] * 1000:8.1f} ms  "
            f"mask {r['mask_median_s'] * 1000:8.1f} ms  ratio {r['ratio']:.3f}  "
            f"distill {r['distill_median_s'] * 1000:8.1f} ms  ratio {r['distill_ratio']:.3f}",
            flush=True,
        )
    kernels = sorted({recipe.masks.kernel for recipe in recipes.values()})
    kernel = fused_status() if kernels == ["auto"] else f"masks.kernel = {', '.join(kernels)}"
    print(f"mask layers' per-block work: {kernel}")
    passed = all(
        r["ratio"] <= options.max_ratio and r["distill_ratio"] <= options.max_distill_ratio for r in results.values()
    )
    print(
        "\n| model | input | batch | dense step (median s) | mask step (median s) | ratio "
        "| distillation step (median s) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {'x'.join(map(str, r['input']))} | {r['batch']} | {r['dense_median_s']:.3f} | "
            f"{r['mask_median_s']:.3f} | {r['ratio']:.3f} | {r['distill_median_s']:.3f} | {r['distill_ratio']:.3f} |"
        )
    out = Path(options.out) / "bench-train.json"
    write_json(
        out,
        {
            "command": "python -m pipeline bench-train " + " ".join(sys.argv[2:]),
            "device": "cpu",
            "clock": options.clock,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "max_ratio": options.max_ratio,
            "max_distill_ratio": options.max_distill_ratio,
            "overrides": options.overrides,
            "mask_kernel": kernel,
            "passed": passed,
            "models": results,
        },
    )
    print(f"wrote {out}")
    if not passed:
        for kind, key, limit in (
            ("mask", "ratio", options.max_ratio),
            ("distillation", "distill_ratio", options.max_distill_ratio),
        ):
            worst = max(results, key=lambda n: results[n][key])
            if results[worst][key] > limit:
                raise GateFailed(
                    f"{kind} step costs {results[worst][key]:.3f}x a dense step on {worst} (limit {limit})"
                )
    return 0
