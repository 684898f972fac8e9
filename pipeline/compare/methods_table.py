"""`compare`: every mask method against the dense model on the recipe's evaluation set, weights frozen.

Writes engines/<model>/compare.json (`methods`: method, top1, top5, seconds, diversity_bits, ...),
compare.md and compare.png, and each method's masks as compare/masks.<method>.pt (bake-able with
`bake --masks`; permuted masks carry their channel permutations).
"""

from __future__ import annotations

import torch

from pipeline.compare.models import learned_result, method_model
from pipeline.compare.report import chart, markdown
from pipeline.data.datasets import DataBundle, build_datasets
from pipeline.errors import PipelineError
from pipeline.io import ensure_dir, write_json, write_text
from pipeline.masks.artifact import MaskArtifact
from pipeline.masks.diversity import diversity_bits
from pipeline.masks.eligibility import EligibilityReport, eligible_layers
from pipeline.masks.methods import (
    CHANGES_WEIGHTS,
    CONSTRAINT,
    METHODS,
    MaskResult,
    MethodContext,
    compute_masks,
    kept_share,
)
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.recipe.weights import load_dense_model
from pipeline.training import evaluate

DEFAULT_METHODS = "magnitude,permuted,transposable,transposable-greedy,wanda,sparsegpt,adaprune,learned"
# The learned masks are judged against the heuristics that, like them, keep the weights frozen.
FROZEN_HEURISTICS = ("magnitude", "permuted", "transposable", "transposable-greedy", "wanda", "sparsegpt")


def _diversity(result: MaskResult, method: str) -> tuple[float, float]:
    artifact = result.artifact
    if not artifact.layers:
        return 0.0, 0.0
    n, m = artifact.layers[0].n, artifact.layers[0].m
    shapes = {layer.name: layer.shape for layer in artifact.layers}
    overrides = {name: "nm" for name in artifact.meta.get("fallback", {})}
    return (
        diversity_bits(shapes, n, m, CONSTRAINT.get(method, "nm"), overrides),
        diversity_bits(shapes, n, m, "unstructured"),
    )


def parse_methods(text: str) -> list[str]:
    methods = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        raise PipelineError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(METHODS)}")
    return methods


def masked_layers(model: torch.nn.Module, recipe: Recipe) -> EligibilityReport:
    """The recipe's masked layers; refused when there are none."""
    report = eligible_layers(model, recipe)
    if not report.masked:
        raise PipelineError(f"model {recipe.name} has no eligible layers to mask; check masks.include/exclude")
    return report


def ordered_methods(methods: list[str], learned_init_from: str | None) -> list[str]:
    """`methods`, with `learned` after the method its logits start from."""
    if learned_init_from and learned_init_from not in methods:
        raise PipelineError(f"--learned-init-from {learned_init_from}: that method is not among --methods")
    if learned_init_from and methods.index(learned_init_from) > methods.index("learned"):
        methods = [name for name in methods if name != "learned"] + ["learned"]
    return methods


def compare(
    recipe: Recipe,
    paths: ArtifactPaths,
    methods: list[str],
    device: torch.device,
    learned_mode: str = "auto",
    learned_init_from: str | None = None,
    log=print,
) -> dict:
    model, source = load_dense_model(recipe, paths)
    report = masked_layers(model, recipe)
    methods = ordered_methods(methods, learned_init_from)
    data = build_datasets(recipe, augment_train=recipe.masks.augment)
    dense = evaluate(model.to(device), data.eval, recipe.data.eval_batch_size, device, desc="eval dense")
    log(f"dense: top1 {dense['top1']:.2f}% top5 {dense['top5']:.2f}% ({data.description})")
    ensure_dir(paths.compare_masks)
    rows = run_methods(
        recipe, paths, model.cpu().eval(), report, data, device, methods, dense, learned_mode, learned_init_from, log
    )
    summary = summarise(recipe, source, data, dense, report, rows)
    write_json(paths.compare_json, summary)
    write_text(paths.compare_md, markdown(summary))
    chart(summary, paths.compare_png)
    return summary


def run_methods(
    recipe: Recipe,
    paths: ArtifactPaths,
    model: torch.nn.Module,
    report: EligibilityReport,
    data: DataBundle,
    device: torch.device,
    methods: list[str],
    dense: dict,
    learned_mode: str,
    learned_init_from: str | None,
    log,
) -> list[dict]:
    """Each method's masks, saved and evaluated: one row per method."""
    rows: list[dict] = []
    artifacts: dict[str, MaskArtifact] = {}
    original = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for method in methods:
        initial = artifacts.get(learned_init_from) if method == "learned" and learned_init_from is not None else None
        ctx = MethodContext(recipe, model, report, data=data, device=device, initial=initial, log=log)
        result = learned_result(ctx, paths, learned_mode) if method == "learned" else compute_masks(method, ctx)
        artifacts[method] = result.artifact
        result.artifact.save(paths.compare_masks / f"masks.{method}.pt")
        evaluated = evaluate(
            method_model(recipe, original, result, device),
            data.eval,
            recipe.data.eval_batch_size,
            device,
            desc=f"eval {method}",
        )
        row = method_row(method, result, evaluated, dense, paths)
        if method == "learned":
            row["init_from"] = learned_init_from
            row.setdefault("prior", recipe.masks.prior)
        rows.append(row)
        log(
            f"{method}: top1 {row['top1']:.2f}% top5 {row['top5']:.2f}% in {row['seconds']:.1f}s, "
            f"kept |w| {100 * row['kept_magnitude']:.1f}%, diversity {row['diversity_bits']:.0f} bits"
        )
    return rows


def method_row(method: str, result: MaskResult, evaluated: dict, dense: dict, paths: ArtifactPaths) -> dict:
    bits, unstructured = _diversity(result, method)
    meta = result.artifact.meta
    row = {
        "method": method,
        "top1": evaluated["top1"],
        "top5": evaluated["top5"],
        "top1_drop": dense["top1"] - evaluated["top1"],
        "seconds": round(result.seconds, 3),
        "diversity_bits": bits,
        "unstructured_diversity_bits": unstructured,
        "kept_magnitude": kept_share(result.dense_state_dict, result.artifact),
        "layers": len(result.artifact.layers),
        "reused": bool(result.info.get("reused", False)),
        "changes_weights": method in CHANGES_WEIGHTS,
        "masks": str(paths.compare_masks / f"masks.{method}.pt"),
    }
    if method == "learned":
        row.update(
            {
                "kept": meta.get("kept"),
                "kept_step": meta.get("kept_step"),
                "best_step": meta.get("best_step"),
                "beat_prior": meta.get("beat_prior"),
            }
        )
        if meta.get("prior"):
            row["prior"] = meta["prior"]
    if method == "permuted":
        row["layers_not_permuted"] = meta.get("permutation_skipped", {})
        row["permuted_output_max_abs_difference"] = meta.get("permuted_output_max_abs_difference")
    if method.startswith("transposable"):
        row["layers_plain_nm"] = meta.get("fallback", {})
    return row


def summarise(
    recipe: Recipe, source: str, data: DataBundle, dense: dict, report: EligibilityReport, rows: list[dict]
) -> dict:
    cfg = recipe.masks
    heuristics = [row for row in rows if row["method"] in FROZEN_HEURISTICS]
    best = max(heuristics, key=lambda row: row["top1"]) if heuristics else None
    learned = next((row for row in rows if row["method"] == "learned"), None)
    return {
        "model": recipe.name,
        "weights": source,
        "data": data.description,
        "accuracy_meaningful": data.accuracy_meaningful,
        "samples": dense["samples"],
        "n": cfg.n,
        "m": cfg.m,
        "masked_layers": len(report.masked),
        "masked_mac_fraction": report.masked_mac_fraction,
        "skipped_layers": {layer.name: layer.reason for layer in report.skipped},
        "dense": {"top1": dense["top1"], "top5": dense["top5"]},
        "methods": rows,
        "best_heuristic": best["method"] if best else None,
        "learned_beats_best_heuristic": (learned["top1"] > best["top1"]) if learned and best else None,
    }
