"""`bench-masks`: time to accuracy of mask training, today's full budget against the plateau rule, in one run.

One `train-masks` run over the whole budget (masks.stop_patience = 0), with the test top-1 of the masks the run
would return if it ended there (masks.keep: the final masks by default, or the best so far) recorded at every
evaluation (outside the clock). The plateau rule without a cooldown (`PlateauRule`,
masks.stop_patience / stop_changed) reads the evaluation history only, so where it would have stopped this run is
read off the same run (`first_stop`). The recipe's rule with its cooldown (masks.cooldown) changes the schedules
after the plateau, so it is a second run from the same start (identical to the first up to the cooldown: checked
and recorded as `prefix_matches`).

Writes OUT/<model>/bench_masks.json and adds the model to OUT/bench-masks.json, bench-masks.md (table) and
bench-masks.png (validation and test top-1 of the kept masks against seconds, the rule's stop marked).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.args import add_device_argument
from pipeline.data.datasets import DataBundle, build_datasets
from pipeline.declaration import StageDeclaration
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, read_json, write_json, write_text
from pipeline.masks.eligibility import eligible_layers
from pipeline.masks.gumbel import load_mask_logits, mask_logits, use_argmax_masks
from pipeline.masks.learning import LearnResult, MaskLearning, MaskTraining, indices_checksum, learn_masks
from pipeline.masks.schedules import PlateauRule
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.recipe.weights import load_dense_model
from pipeline.training import check_device, evaluate, select_device

DECLARATION = StageDeclaration(
    help="time to accuracy of mask training: full budget against the plateau rule, read off one run",
    kind="lab",
    reads=("bench_masks_table",),
    writes=("config", "bench_masks", "bench_masks_table", "bench_masks_md", "bench_masks_png"),
    recipe=("*",),
    data=True,
    weights=True,
)


@dataclass
class Options:
    steps: int | None = None  # the ceiling of the full-budget run (default masks.steps)
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.steps is not None and self.steps < 2:
            raise PipelineError(f"--steps {self.steps}: not valid; valid: at least 2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("time to accuracy")
    group.add_argument("--steps", type=int, default=None, help="budget of the full run (default masks.steps)")
    add_device_argument(group)


class KeptMasksOnTest:
    """Evaluation hook: the test top-1 of the masks the run would return if it ended at this evaluation
    (`MaskTraining.kept`, masks.keep), recomputed only when they change."""

    def __init__(self, data: DataBundle, batch_size: int, device: torch.device) -> None:
        self.data, self.batch_size, self.device = data, batch_size, device
        self.top1: float | None = None
        self.checksum = ""

    def __call__(self, training: MaskTraining, point: dict) -> None:
        kept = training.kept()
        checksum = indices_checksum(kept.indices)
        if checksum != self.checksum:
            model = training.model
            logits = mask_logits(model)
            use_argmax_masks(model, kept.indices)
            self.top1 = evaluate(model.eval(), self.data.eval, self.batch_size, self.device, desc="test (kept)")["top1"]
            load_mask_logits(model, logits)
            self.checksum = checksum
        point["kept"] = kept.why
        point["kept_validation_top1"] = kept.score
        point["kept_test_top1"] = self.top1


def at(point: dict) -> dict:
    return {
        "step": point["step"],
        "seconds": point["seconds"],
        "validation_top1": point["kept_validation_top1"],
        "test_top1": point["kept_test_top1"],
        "kept": point["kept"],
    }


def compared(point: dict, full: dict) -> dict:
    return {
        **point,
        "time_ratio": point["seconds"] / full["seconds"] if full["seconds"] else None,
        "validation_difference": point["validation_top1"] - full["validation_top1"],
        "test_difference": point["test_top1"] - full["test_top1"],
    }


def read_off(full_history: list[dict], rule: PlateauRule, rule_run: LearnResult | None) -> dict:
    """The whole budget (today's rule: the last evaluation of the full run), the plateau rule without a cooldown
    (where it would have stopped the full run: `first_stop`) and the recipe's rule (the run made with it; without
    a cooldown, that read-off again)."""
    full = at(full_history[-1])
    stop = rule.first_stop(full_history)
    settled = at(full_history[stop] if stop is not None else full_history[-1])
    settled["reason"] = rule.reason(full_history[: stop + 1]) if stop is not None else "never: ran the whole budget"
    entry = {"full_budget": full, "settled": compared(settled, full), "resolution": rule.resolution}
    if rule_run is None:
        entry["plateau"] = entry["settled"]
        return entry
    plateau = at(rule_run.history[-1])
    plateau["reason"] = rule_run.stop_reason or "never: ran the whole budget"
    plateau["cooldown_start"] = rule_run.cooldown_start
    entry["plateau"] = compared(plateau, full)
    entry["plateau_history"] = rule_run.history
    entry["prefix_matches"] = same_prefix(full_history, rule_run.history, rule_run.cooldown_start)
    return entry


def same_prefix(full: list[dict], ruled: list[dict], until: int | None) -> bool:
    """Whether the rule's run evaluated exactly as the full run up to the start of its cooldown."""
    keys = ("step", "top1", "changed")
    common = [point for point in ruled if until is None or point["step"] <= until]
    return len(full) >= len(common) and all(all(a[k] == b[k] for k in keys) for a, b in zip(full, common))


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    cfg = recipe.masks
    if not cfg.stop_patience or not cfg.validation_images:
        raise PipelineError(
            "bench-masks needs the plateau rule and a validation split: set masks.stop_patience "
            "and masks.validation_images above 0"
        )
    device = select_device(options.device)
    model, source = load_dense_model(recipe, paths)
    report = eligible_layers(model, recipe)
    data = build_datasets(recipe, augment_train=cfg.augment)
    dense = evaluate(model, data.eval, recipe.data.eval_batch_size, device, desc="eval dense")
    budget = dataclasses.replace(cfg, steps=options.steps or cfg.steps)
    started = time.time()
    print(f"bench-masks: the whole budget ({budget.steps} steps, rule off)")
    full = learn_masks(
        copy.deepcopy(model),
        report,
        MaskLearning.of(recipe, masks=dataclasses.replace(budget, stop_patience=0)),
        data,
        device,
        on_evaluation=KeptMasksOnTest(data, recipe.data.eval_batch_size, device),
    )
    ruled = None
    if cfg.cooldown:  # the cooldown changes the run after the plateau: it is measured, not read off
        print(f"bench-masks: the plateau rule with its cooldown (masks.cooldown = {cfg.cooldown})")
        ruled = learn_masks(
            copy.deepcopy(model),
            report,
            MaskLearning.of(recipe, masks=budget),
            data,
            device,
            on_evaluation=KeptMasksOnTest(data, recipe.data.eval_batch_size, device),
        )
    rule = PlateauRule(cfg.stop_patience, cfg.stop_changed, full.validation_images)
    entry = {
        "model": recipe.name,
        "weights": source,
        "data": data.description,
        "dense_test_top1": dense["top1"],
        "budget_steps": budget.steps,
        "loss": full.loss,
        "stop_patience": cfg.stop_patience,
        "stop_changed": cfg.stop_changed,
        "cooldown": cfg.cooldown,
        "keep": cfg.keep,
        "validation_images": full.validation_images,
        "wall_seconds": round(time.time() - started, 1),
        **read_off(full.history, rule, ruled),
        "history": full.history,
        "command": "python -m pipeline " + " ".join(sys.argv[1:]),
    }
    write_json(paths.bench_masks, entry)
    combined = record(paths.bench_masks_table, entry)
    write_text(paths.bench_masks_md, table(combined))
    plot(combined, paths.bench_masks_png)
    print(table({recipe.name: entry}), end="")
    print(f"wrote {paths.bench_masks}, {paths.bench_masks_md} and .png")
    return 0


def record(path: Path, entry: dict) -> dict:
    """bench-masks.json, the table of every model measured so far, with ENTRY's model (re)placed."""
    combined = read_json(path) if path.exists() else {}
    if not isinstance(combined, dict) or not all(isinstance(row, dict) for row in combined.values()):
        raise PipelineError(
            f"{path} is not a bench-masks table (a JSON object of one entry per model); delete it "
            "and run bench-masks again for every model it should list"
        )
    combined[entry["model"]] = entry
    write_json(path, combined)
    return combined


ROWS = ("full_budget", "settled", "plateau")


def row_label(key: str, point: dict) -> str:
    """The table's name for a run; the rule's own run may have stopped without a cooldown (the argmax settled)."""
    if key == "full_budget":
        return "full budget"
    if key == "settled":
        return "plateau, no cooldown (read off)"
    cooled = point.get("cooldown_start") is not None
    return "plateau + cooldown (the recipe's rule)" if cooled else "plateau, settled (the recipe's rule)"


def table(entries: dict) -> str:
    lines = [
        "| model | budget | rule | steps | seconds | validation top-1 % (kept masks) | test top-1 % | time vs full |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in entries.items():
        for key in ROWS:
            if key not in entry or (key == "plateau" and "plateau_history" not in entry):
                continue  # without a cooldown the recipe's rule is the read-off row
            point = entry[key]
            ratio = "1.00" if key == "full_budget" else f"{point['time_ratio']:.2f}"
            lines.append(
                f"| {name} | {entry['budget_steps']} | {row_label(key, point)} | {point['step']} | "
                f"{point['seconds']:.1f} | {point['validation_top1']:.2f} | {point['test_top1']:.2f} | "
                f"{ratio} |"
            )
    return "\n".join(lines) + "\n"


def kept_top1(point: dict, split: str) -> float | None:
    """A history point's top-1 of the kept masks (entries written before masks.keep held the best masks'); None
    where the point has neither (the plot leaves a gap)."""
    return point.get(f"kept_{split}_top1", point.get(f"best_{split}_top1"))


def plot(entries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(entries), figsize=(4.6 * len(entries), 3.8), squeeze=False)
    for ax, (name, entry) in zip(axes[0], entries.items()):
        history = entry["history"]
        seconds = [point["seconds"] for point in history]
        ax.plot(
            seconds,
            [kept_top1(point, "validation") for point in history],
            marker="o",
            ms=3,
            label="validation (kept masks)",
        )
        ax.plot(seconds, [kept_top1(point, "test") for point in history], marker="s", ms=3, label="test (kept masks)")
        ruled = entry.get("plateau_history")
        if ruled:
            ax.plot(
                [point["seconds"] for point in ruled],
                [kept_top1(point, "test") for point in ruled],
                ls=":",
                marker="^",
                ms=3,
                label="test (kept masks), rule's run",
            )
        stop = entry["plateau"]
        ax.axvline(stop["seconds"], color="black", ls="--", lw=1, label=f"plateau rule: step {stop['step']}")
        ax.set_title(f"{name} ({entry['budget_steps']} steps)", fontsize=9)
        ax.set_xlabel("mask-training seconds")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
