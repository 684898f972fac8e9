"""Mask methods side by side (the `compare` stage) and the updatable-model demo (the `updatable` stage).

`compare`: every mask method against the dense model on the recipe's evaluation set, weights frozen.
Writes engines/<model>/compare.json (`methods`: method, top1, top5, seconds, diversity_bits, ...),
compare.md and compare.png, and each method's masks as compare/masks.<method>.pt (bake-able with
`bake --masks`; permuted masks carry their channel permutations).

`updatable` runs the updatable-model demo (paper, sec. 3.2): fine-tune the dense
weights briefly, re-apply the old masks to the updated weights, and compare with masks learned
afresh on them (engines/<model>/updatable.json, updatable.md, dense_updated.pt).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.recipe.config import Recipe
from pipeline.data.datasets import DataBundle, ResumableBatchSampler, build_datasets, make_loader
from pipeline.errors import PipelineError
from pipeline.io import ensure_dir, torch_save, write_json, write_text
from pipeline.masks.checkpoint import MaskCheckpoint
from pipeline.paths import ArtifactPaths
from pipeline.masks.artifact import MaskArtifact, apply_masks
from pipeline.masks.diversity import diversity_bits
from pipeline.masks.eligibility import EligibilityReport, find_layers
from pipeline.masks.methods import (CHANGES_WEIGHTS, CONSTRAINT, METHODS, MaskResult, MethodContext, compute_masks,
                                       dense_for_artifact, kept_share)
from pipeline.training import evaluate
from pipeline.recipe.weights import build_network, load_dense_model, load_state_dict_strict
from pipeline.progress import progress

DEFAULT_METHODS = "magnitude,permuted,transposable,transposable-greedy,wanda,sparsegpt,adaprune,learned"
# The learned masks are judged against the heuristics that, like them, keep the weights frozen.
FROZEN_HEURISTICS = ("magnitude", "permuted", "transposable", "transposable-greedy", "wanda", "sparsegpt")


# --------------------------------------------------------------------------- helpers
def method_model(recipe: Recipe, original: dict[str, torch.Tensor], result: MaskResult, device: torch.device):
    """The model a method's masks define. `masked_model` applies the artifact's recorded channel
    permutations itself, so it takes the original weights, never `result.dense_state_dict`
    (already permuted: permuting twice computes another function), except for the methods that
    change weights (adaprune), whose masks apply to their own weights."""
    weights = result.dense_state_dict if result.artifact.method in CHANGES_WEIGHTS else original
    return masked_model(recipe, weights, result.artifact, device)


def masked_model(recipe: Recipe, dense: dict[str, torch.Tensor], artifact: MaskArtifact, device: torch.device):
    model = build_network(recipe)
    load_state_dict_strict(model, apply_masks(dense_for_artifact(dense, artifact), artifact), "masked weights")
    return model.to(device).eval()


def reuse_learned(recipe: Recipe, paths: ArtifactPaths) -> tuple[MaskArtifact, float] | str:
    """The finished mask-training run in masks.ckpt, when its mask settings match the recipe's;
    otherwise the reason it cannot be reused."""
    path = paths.mask_checkpoint
    if not path.is_file():
        return f"no {path}"
    try:
        saved = MaskCheckpoint.load(path)
    except PipelineError:
        return f"{path} is not a mask-training checkpoint"
    if not saved.final:
        return f"{path} is an unfinished run"
    if saved.recipe_key != recipe.digest("masks", "arch", "num_classes"):
        return f"{path} was trained with other mask settings"
    artifact = saved.to_artifact(path, recipe.name, recipe.arch, recipe.masks.prior)
    artifact.meta["reused_from"] = str(path)
    return artifact, float(saved.state.get("seconds", 0.0))


def _learned_result(ctx: MethodContext, paths: ArtifactPaths, mode: str) -> MaskResult:
    if mode != "train" and ctx.initial is None:
        found = reuse_learned(ctx.recipe, paths)
        if not isinstance(found, str):
            artifact, seconds = found
            state = {k: v.detach().cpu().clone() for k, v in ctx.model.state_dict().items()}
            ctx.log(f"learned: reusing {paths.mask_checkpoint} (same mask settings; trained in {seconds:.0f}s)")
            return MaskResult(artifact, state, seconds, {"reused": True})
        if mode == "reuse":
            raise PipelineError(f"--learned reuse: {found}; run `python -m pipeline train-masks --model "
                                f"{ctx.recipe.name}` first or use --learned train")
        ctx.log(f"learned: training afresh ({found})")
    return compute_masks("learned", ctx)


def _diversity(result: MaskResult, method: str) -> tuple[float, float]:
    artifact = result.artifact
    if not artifact.layers:
        return 0.0, 0.0
    n, m = artifact.layers[0].n, artifact.layers[0].m
    shapes = {layer.name: layer.shape for layer in artifact.layers}
    overrides = {name: "nm" for name in artifact.meta.get("fallback", {})}
    return (diversity_bits(shapes, n, m, CONSTRAINT.get(method, "nm"), overrides),
            diversity_bits(shapes, n, m, "unstructured"))


def parse_methods(text: str) -> list[str]:
    methods = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        raise PipelineError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(METHODS)}")
    return methods


# --------------------------------------------------------------------------- compare
def compare(recipe: Recipe, paths: ArtifactPaths, methods: list[str], device: torch.device,
            learned_mode: str = "auto", learned_init_from: str | None = None, log=print) -> dict:
    model, source = load_dense_model(recipe, paths)
    cfg = recipe.masks
    report = find_layers(model, recipe.input_shape, cfg.m, cfg.include, cfg.exclude, recipe.classifier,
                         cfg.include_classifier)
    if not report.masked:
        raise PipelineError(f"model {recipe.name} has no eligible layers to mask; check masks.include/exclude")
    if learned_init_from and learned_init_from not in methods:
        raise PipelineError(f"--learned-init-from {learned_init_from}: that method is not among --methods")
    if learned_init_from and methods.index(learned_init_from) > methods.index("learned"):
        methods = [name for name in methods if name != "learned"] + ["learned"]
    data = build_datasets(recipe, augment_train=recipe.masks.augment)
    dense = evaluate(model.to(device), data.eval, recipe.data.eval_batch_size, device, desc="eval dense")
    log(f"dense: top1 {dense['top1']:.2f}% top5 {dense['top5']:.2f}% ({data.description})")
    model = model.cpu().eval()
    ensure_dir(paths.compare_masks)
    rows, artifacts = [], {}
    original = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for method in methods:
        initial = artifacts.get(learned_init_from) if method == "learned" else None
        ctx = MethodContext(recipe, model, report, data=data, device=device, initial=initial, log=log)
        result = _learned_result(ctx, paths, learned_mode) if method == "learned" else compute_masks(method, ctx)
        artifacts[method] = result.artifact
        result.artifact.save(paths.compare_masks / f"masks.{method}.pt")
        evaluated = evaluate(method_model(recipe, original, result, device), data.eval,
                             recipe.data.eval_batch_size, device, desc=f"eval {method}")
        bits, unstructured = _diversity(result, method)
        row = {"method": method, "top1": evaluated["top1"], "top5": evaluated["top5"],
               "top1_drop": dense["top1"] - evaluated["top1"], "seconds": round(result.seconds, 3),
               "diversity_bits": bits, "unstructured_diversity_bits": unstructured,
               "kept_magnitude": kept_share(result.dense_state_dict, result.artifact),
               "layers": len(result.artifact.layers), "reused": bool(result.info.get("reused", False)),
               "changes_weights": method in CHANGES_WEIGHTS,
               "masks": str(paths.compare_masks / f"masks.{method}.pt")}
        if method == "learned":
            row["prior"] = result.artifact.meta.get("prior", cfg.prior)
            row["init_from"] = learned_init_from
            row["best_step"] = result.artifact.meta.get("best_step")
            row["beat_prior"] = result.artifact.meta.get("beat_prior")
        if method == "permuted":
            row["layers_not_permuted"] = result.artifact.meta.get("permutation_skipped", {})
            row["permuted_output_max_abs_difference"] = result.artifact.meta.get("permuted_output_max_abs_difference")
        if method.startswith("transposable"):
            row["layers_plain_nm"] = result.artifact.meta.get("fallback", {})
        rows.append(row)
        log(f"{method}: top1 {row['top1']:.2f}% top5 {row['top5']:.2f}% in {row['seconds']:.1f}s, "
            f"kept |w| {100 * row['kept_magnitude']:.1f}%, diversity {row['diversity_bits']:.0f} bits")
    heuristics = [row for row in rows if row["method"] in FROZEN_HEURISTICS]
    best = max(heuristics, key=lambda row: row["top1"]) if heuristics else None
    learned = next((row for row in rows if row["method"] == "learned"), None)
    summary = {
        "model": recipe.name, "weights": source, "data": data.description,
        "accuracy_meaningful": data.accuracy_meaningful, "samples": dense["samples"], "n": cfg.n, "m": cfg.m,
        "masked_layers": len(report.masked), "masked_mac_fraction": report.masked_mac_fraction,
        "skipped_layers": {layer.name: layer.reason for layer in report.skipped},
        "dense": {"top1": dense["top1"], "top5": dense["top5"]},
        "methods": rows,
        "best_heuristic": best["method"] if best else None,
        "learned_beats_best_heuristic": (learned["top1"] > best["top1"]) if learned and best else None,
    }
    write_json(paths.compare_json, summary)
    write_text(paths.compare_md, _markdown(summary))
    _chart(summary, paths.compare_png)
    return summary


def _markdown(summary: dict) -> str:
    lines = [f"# Mask methods on {summary['model']}", "",
             f"Weights: {summary['weights']}. Evaluation: {summary['data']}, {summary['samples']} images, "
             f"weights frozen. {summary['n']}:{summary['m']} masks on {summary['masked_layers']} layers "
             f"({100 * summary['masked_mac_fraction']:.1f}% of the MACs).", ""]
    if not summary["accuracy_meaningful"]:
        lines += ["**Synthetic data: the accuracies below mean nothing.**", ""]
    lines += ["| method | changes weights | top-1 % | top-5 % | top-1 drop (pt) | seconds | kept \\|w\\| % "
              "| diversity (bits) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
              f"| dense | - | {summary['dense']['top1']:.2f} | {summary['dense']['top5']:.2f} | 0.00 | - | 100.0 | - |"]
    for row in summary["methods"]:
        seconds = f"{row['seconds']:.1f}" + (" (reused)" if row.get("reused") else "")
        changes = "**yes**" if row["changes_weights"] else "no"
        lines.append(f"| {row['method']} | {changes} | {row['top1']:.2f} | {row['top5']:.2f} | {row['top1_drop']:.2f} | {seconds} "
                     f"| {100 * row['kept_magnitude']:.1f} | {row['diversity_bits']:.0f} |")
    lines += ["", f"Unstructured 50% sparsity on the same layers would admit "
                  f"{summary['methods'][0]['unstructured_diversity_bits']:.0f} bits of masks.", ""]
    if summary["best_heuristic"]:
        verdict = {True: "beats", False: "does not beat", None: "was not compared with"}[
            summary["learned_beats_best_heuristic"]]
        lines.append(f"Best heuristic with frozen weights: {summary['best_heuristic']}; the learned mask {verdict} "
                     "it on top-1. Methods that change weights are not part of this verdict.")
    for row in summary["methods"]:
        for key in ("layers_not_permuted", "layers_plain_nm"):
            for name, reason in (row.get(key) or {}).items():
                lines.append(f"- {row['method']}: {name}: {reason}")
    return "\n".join(lines) + "\n"


def _chart(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    rows = summary["methods"]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2.5, 4.0))
    names = [row["method"] for row in rows]
    bars = ax.bar(names, [row["top1"] for row in rows], color="tab:blue")
    ax.axhline(summary["dense"]["top1"], color="black", ls="--", lw=1, label=f"dense {summary['dense']['top1']:.2f}%")
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row['top1']:.2f}%\n{row['seconds']:.1f}s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    low = min([row["top1"] for row in rows] + [summary["dense"]["top1"]])
    ax.set_ylim(max(0.0, low - 10.0), 100.0 if summary["accuracy_meaningful"] else max(low + 20, 30))
    ax.set_ylabel("top-1 (%), frozen weights")
    title = f"{summary['model']}: {summary['n']}:{summary['m']} mask methods"
    ax.set_title(title + ("" if summary["accuracy_meaningful"] else " (synthetic data)"))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=15)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- updatable-model demo
def finetune(model: torch.nn.Module, data: DataBundle, steps: int, lr: float, batch_size: int,
             device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A short update of all dense weights (SGD, momentum 0.9), standing in for a model update."""
    torch.manual_seed(seed)
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sampler = ResumableBatchSampler(len(data.train), batch_size, shuffle=True, seed=seed + 7)
    if len(sampler) == 0:
        raise PipelineError(f"training set has {len(data.train)} images, fewer than one batch of {batch_size}")
    step, epoch = 0, 0
    bar = progress(total=steps, desc="fine-tune dense")
    while step < steps:
        sampler.set_epoch(epoch)
        for images, labels in make_loader(data.train, sampler):
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            if step >= steps:
                break
        epoch += 1
    bar.close()
    return model.eval()


def updatable_demo(recipe: Recipe, paths: ArtifactPaths, device: torch.device, masks_path: str | None,
                   steps: int, lr: float, learned_mode: str = "auto", log=print) -> dict:
    from pipeline.verify.certify import certify_masks

    model, source = load_dense_model(recipe, paths)
    cfg = recipe.masks
    report: EligibilityReport = find_layers(model, recipe.input_shape, cfg.m, cfg.include, cfg.exclude,
                                            recipe.classifier, cfg.include_classifier)
    data = build_datasets(recipe, augment_train=recipe.masks.augment)
    old_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    default = paths.masks
    if masks_path or default.is_file():
        old_masks = MaskArtifact.load(Path(masks_path) if masks_path else default)
        masks_source = str(masks_path or default)
    else:
        ctx = MethodContext(recipe, model, report, data=data, device=device, log=log)
        old_masks = _learned_result(ctx, paths, learned_mode).artifact
        ensure_dir(paths.compare_masks)
        masks_source = str(paths.compare_masks / "masks.learned-original.pt")
        old_masks.save(Path(masks_source))
    started = time.perf_counter()
    updated_model = finetune(copy.deepcopy(model), data, steps, lr, cfg.batch_size, device, cfg.seed)
    finetune_seconds = time.perf_counter() - started
    new_state = {k: v.detach().cpu().clone() for k, v in updated_model.state_dict().items()}
    torch_save(new_state, paths.updated_weights)
    batch = recipe.data.eval_batch_size

    def dense_metrics(state):
        net = build_network(recipe)
        net.load_state_dict(state)
        return evaluate(net.to(device).eval(), data.eval, batch, device)

    rows = {"dense_original": dense_metrics(old_state), "dense_updated": dense_metrics(new_state)}
    rows["old_masks_on_original"] = evaluate(masked_model(recipe, old_state, old_masks, device), data.eval, batch, device)
    rows["old_masks_on_updated"] = evaluate(masked_model(recipe, new_state, old_masks, device), data.eval, batch, device)
    updated_dense = build_network(recipe)
    updated_dense.load_state_dict(new_state)
    updated_dense.eval()
    ctx = MethodContext(recipe, updated_dense, report, data=data, device=device, log=log)
    fresh_magnitude = compute_masks("magnitude", ctx)
    rows["magnitude_on_updated"] = evaluate(masked_model(recipe, new_state, fresh_magnitude.artifact, device),
                                            data.eval, batch, device)
    fresh = compute_masks("learned", ctx)
    ensure_dir(paths.compare_masks)
    fresh.artifact.save(paths.compare_masks / "masks.learned-updated.pt")
    rows["learned_afresh_on_updated"] = evaluate(masked_model(recipe, new_state, fresh.artifact, device),
                                                 data.eval, batch, device)
    certificate = certify_masks(lambda: build_network(recipe), dense_for_artifact(old_state, old_masks), old_masks,
                                data.eval, batch, device, updated_state=dense_for_artifact(new_state, old_masks))
    certificate.pop("per_sample", None)
    parameters = [name for name, _ in model.named_parameters()]  # BatchNorm statistics excluded
    change = sum(float((new_state[k] - old_state[k]).norm() ** 2) for k in parameters) ** 0.5
    scale = sum(float(old_state[k].norm() ** 2) for k in parameters) ** 0.5
    summary = {
        "model": recipe.name, "weights": source, "data": data.description,
        "accuracy_meaningful": data.accuracy_meaningful, "old_masks": masks_source, "old_method": old_masks.method,
        "finetune": {"steps": steps, "lr": lr, "seconds": round(finetune_seconds, 1),
                     "relative_weight_change": change / max(scale, 1e-12), "weights": str(paths.updated_weights)},
        "results": {name: {"top1": r["top1"], "top5": r["top5"]} for name, r in rows.items()},
        "learned_afresh_seconds": round(fresh.seconds, 1),
        "certify_reused_masks": certificate,
        "rebake": f"python -m pipeline bake --model {recipe.name} --masks {masks_source} --weights {paths.updated_weights}",
    }
    write_json(paths.updatable_json, summary)
    write_text(paths.updatable_md, _updatable_markdown(summary))
    return summary


def _updatable_markdown(summary: dict) -> str:
    labels = {"dense_original": "dense, original weights", "dense_updated": "dense, updated weights",
              "old_masks_on_original": "old masks on original weights",
              "old_masks_on_updated": "old masks re-applied to updated weights",
              "magnitude_on_updated": "magnitude masks of the updated weights",
              "learned_afresh_on_updated": "masks learned afresh on updated weights"}
    ft = summary["finetune"]
    lines = [f"# Updatable model: {summary['model']}", "",
             f"The dense weights were fine-tuned for {ft['steps']} steps (SGD, lr {ft['lr']}, all weights; relative "
             f"weight change {100 * ft['relative_weight_change']:.2f}%). The old masks ({summary['old_method']}, "
             f"{summary['old_masks']}) were re-applied without retraining.", ""]
    if not summary["accuracy_meaningful"]:
        lines += ["**Synthetic data: the accuracies below mean nothing.**", ""]
    lines += ["| model | top-1 % | top-5 % |", "| --- | ---: | ---: |"]
    for key, label in labels.items():
        r = summary["results"][key]
        lines.append(f"| {label} | {r['top1']:.2f} | {r['top5']:.2f} |")
    cert = summary.get("certify_reused_masks")
    if cert and "updated" in cert:
        up = cert["updated"]
        lines += ["", f"Certified stable on the updated model (worst-case bounds, docs/baselines.md): "
                      f"Lemma 3.4 {100 * up['lemma_3_4']['certified_share']:.1f}%, Lemma 3.6 (reuse) "
                      f"{100 * up['lemma_3_6']['certified_share']:.1f}% of samples; predictions actually unchanged "
                      f"by the masks: {100 * up['prediction_unchanged_share']:.1f}%."]
    lines += ["", f"Re-bake for deployment: `{summary['rebake']}`"]
    return "\n".join(lines) + "\n"
