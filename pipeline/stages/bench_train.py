"""`bench-train`: cost of a mask-training step next to an ordinary dense training step.

Both steps run on the same model (random weights: speed does not depend on values) and
the same batch, interleaved (dense, masked, masked, dense, ...) so that machine noise
hits both alike. The mask step samples Gumbel noise, builds every mask, runs forward and
backward and updates the logits with AdamW (with the recipe's kept-magnitude regulariser when it has
one, as train-masks); the dense step updates every weight with SGD.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import GateFailed, PipelineError
from pipeline.io import write_json
from pipeline.masks.learning import mask_loss, mask_optimizer
from pipeline.recipe.registry import get_recipe, list_models
from pipeline.masks.eligibility import find_layers
from pipeline.masks.gumbel import (attach_masks, mask_training_mode, masked_modules, prepare_step,
                                   set_kept_magnitude_weight)
from pipeline.recipe.weights import build_network
from pipeline.progress import progress

DEFAULT_MODELS = ["resnet18", "resnet50", "convnext_t", "fmnist_resnet"]
NEEDS_RECIPE = False  # its own --models list


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

    def __post_init__(self) -> None:
        for flag, value, low in (("--size", self.size, 1), ("--batch", self.batch, 1), ("--reps", self.reps, 1),
                                 ("--warmup", self.warmup, 0), ("--demo-batch", self.demo_batch or 1, 1)):
            if value < low:
                raise PipelineError(f"{flag} {value}: not valid; valid: at least {low}")
        for flag, value in (("--max-ratio", self.max_ratio), ("--max-distill-ratio", self.max_distill_ratio)):
            if value <= 0:
                raise PipelineError(f"{flag} {value}: not valid; valid: greater than 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registered models")
    parser.add_argument("--size", type=int, default=224, help="input size for the ImageNet models (default 224)")
    parser.add_argument("--batch", type=int, default=16, help="batch for the ImageNet models (default 16)")
    parser.add_argument("--demo-batch", type=int, default=None,
                        help="batch for small-input recipes (default: the recipe's masks.batch_size)")
    parser.add_argument("--reps", type=int, default=6, help="timed steps of each kind per model (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first (default 2)")
    parser.add_argument("--max-ratio", type=float, default=1.15, help="gate: mask step / dense step (default 1.15)")
    parser.add_argument("--max-distill-ratio", type=float, default=1.5,
                        help="gate: distillation mask step (dense teacher forward included) / dense step (default 1.5)")
    parser.add_argument("--out", default="engines", help="writes OUT/bench-train.json")


def bench_model(name: str, size: int, batch: int, reps: int, warmup: int) -> dict:
    recipe = get_recipe(name)
    shape = list(recipe.input_shape)
    if shape[1] >= 64:
        shape = [shape[0], size, size]
    torch.manual_seed(0)
    dense = build_network(recipe)
    masked = copy.deepcopy(dense)
    report = find_layers(masked, shape, recipe.masks.m, recipe.masks.include, recipe.masks.exclude,
                         recipe.classifier, recipe.masks.include_classifier)
    attach_masks(masked, report, recipe.masks.n, recipe.masks.m, "magnitude", recipe.masks.prior_strength)
    dense_optimizer = torch.optim.SGD(dense.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    logits = [module.sparse_mask.logits for module in masked_modules(masked).values()]
    optimizer = mask_optimizer(logits, 1e-3, recipe.masks.weight_decay)
    images = torch.randn(batch, *shape)
    labels = torch.randint(0, recipe.num_classes, (batch,))

    def dense_step() -> None:
        dense.train()
        loss = F.cross_entropy(dense(images), labels)
        dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dense_optimizer.step()

    steps = itertools.count()
    set_kept_magnitude_weight(masked, recipe.masks.kept_magnitude_weight)  # as train-masks

    def mask_step() -> None:
        mask_training_mode(masked)
        prepare_step(masked, next(steps), 0.5)
        loss = F.cross_entropy(masked(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    teacher = copy.deepcopy(dense).eval()

    def distill_step() -> None:
        mask_training_mode(masked)
        prepare_step(masked, next(steps), 0.5)
        with torch.no_grad():
            teacher_logits = teacher(images)
        loss = mask_loss(masked(images), labels, teacher_logits, "ce+distill", 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(step) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    kinds = {"dense": dense_step, "mask": mask_step, "distill": distill_step}
    for _ in range(warmup):
        for step in kinds.values():
            step()
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for rep in progress(range(reps), desc=f"bench {name}", leave=False):
        order = list(kinds) if rep % 2 == 0 else list(reversed(kinds))
        for kind in order:
            times[kind].append(timed(kinds[kind]))
    dense_median, mask_median, distill_median = (statistics.median(times[kind]) for kind in kinds)
    return {"input": shape, "batch": batch, "masked_layers": len(report.masked),
            "mask_logits": sum(p.numel() for p in logits), "dense_params": sum(p.numel() for p in dense.parameters()),
            "dense_median_s": dense_median, "mask_median_s": mask_median, "ratio": mask_median / dense_median,
            "distill_median_s": distill_median, "distill_ratio": distill_median / dense_median,
            "dense_s": times["dense"], "mask_s": times["mask"], "distill_s": times["distill"]}


def run(options: Options) -> int:
    names = [name.strip() for name in options.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in list_models()]
    if unknown:
        raise PipelineError(f"unknown model(s) {', '.join(unknown)}; valid models: {', '.join(list_models())}")
    results = {}
    for name in names:
        recipe = get_recipe(name)
        batch = (options.demo_batch or recipe.masks.batch_size) if recipe.input_shape[1] < 64 else options.batch
        results[name] = bench_model(name, options.size, batch, options.reps, options.warmup)
        r = results[name]
        print(f"{name:14s} batch {batch:4d}  dense {r['dense_median_s'] * 1000:8.1f} ms  "
              f"mask {r['mask_median_s'] * 1000:8.1f} ms  ratio {r['ratio']:.3f}  "
              f"distill {r['distill_median_s'] * 1000:8.1f} ms  ratio {r['distill_ratio']:.3f}", flush=True)
    passed = all(r["ratio"] <= options.max_ratio and r["distill_ratio"] <= options.max_distill_ratio
                 for r in results.values())
    print("\n| model | input | batch | dense step (median s) | mask step (median s) | ratio "
          "| distillation step (median s) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {'x'.join(map(str, r['input']))} | {r['batch']} | {r['dense_median_s']:.3f} | "
              f"{r['mask_median_s']:.3f} | {r['ratio']:.3f} | {r['distill_median_s']:.3f} | {r['distill_ratio']:.3f} |")
    out = Path(options.out) / "bench-train.json"
    write_json(out, {"command": "python -m pipeline bench-train " + " ".join(sys.argv[2:]),
                     "device": "cpu", "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                     "cores": os.cpu_count(), "torch": torch.__version__, "max_ratio": options.max_ratio, "max_distill_ratio": options.max_distill_ratio,
                     "passed": passed, "models": results})
    print(f"wrote {out}")
    if not passed:
        for kind, key, limit in (("mask", "ratio", options.max_ratio),
                                 ("distillation", "distill_ratio", options.max_distill_ratio)):
            worst = max(results, key=lambda n: results[n][key])
            if results[worst][key] > limit:
                raise GateFailed(f"{kind} step costs {results[worst][key]:.3f}x a dense step on {worst} "
                                 f"(limit {limit})")
    return 0
