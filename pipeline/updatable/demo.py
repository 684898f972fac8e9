"""The updatable-model demo: fine-tune the dense weights briefly, re-apply the old masks to the updated
weights, and compare with masks learned afresh on them (engines/<model>/updatable.json, updatable.md,
dense_updated.pt), with the stability certificate of the reused masks.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from pipeline.compare.models import learned_result, masked_model
from pipeline.data.datasets import DataBundle, ResumableBatchSampler, build_datasets, dataset_size, make_loader
from pipeline.errors import PipelineError
from pipeline.io import ensure_dir, write_json, write_text
from pipeline.masks.artifact import MaskArtifact
from pipeline.masks.eligibility import EligibilityReport, eligible_layers
from pipeline.masks.methods import MethodContext, compute_masks, dense_for_artifact
from pipeline.paths import ArtifactPaths
from pipeline.pretrain.artifacts import DenseWeights
from pipeline.progress import progress
from pipeline.recipe.config import Recipe
from pipeline.recipe.weights import build_network, load_dense_model
from pipeline.training import StepSettings, cross_entropy_loss, evaluate, train_step
from pipeline.verify.certify import certify_masks


def finetune(
    model: torch.nn.Module,
    data: DataBundle,
    steps: int,
    lr: float,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    workers: int = 0,
) -> torch.nn.Module:
    """A short update of all dense weights (SGD, momentum 0.9, `train_step`), standing in for a model update.
    Augmentation draws from a fork of torch's RNG seeded with `seed`; the caller's RNG is left as it was."""
    settings = StepSettings.for_device(device)
    model = settings.prepare_model(model.to(device)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    train_images = dataset_size(data.train)
    sampler = ResumableBatchSampler(train_images, batch_size, shuffle=True, seed=seed + 7)
    if len(sampler) == 0:
        raise PipelineError(f"training set has {train_images} images, fewer than one batch of {batch_size}")
    loader, loss_fn = make_loader(data.train, sampler, workers=workers), cross_entropy_loss()
    step, epoch = 0, 0
    bar = progress(total=steps, desc="fine-tune dense")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while step < steps:
            sampler.set_epoch(epoch)
            for images, labels in loader:
                train_step(
                    model,
                    settings.prepare_images(images, device),
                    labels.to(device),
                    loss_fn,
                    optimizer,
                    settings=settings,
                )
                step += 1
                bar.update(1)
                if step >= steps:
                    break
            epoch += 1
    bar.close()
    return model.eval()


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def old_masks_for(
    recipe: Recipe, paths: ArtifactPaths, ctx: MethodContext, masks_path: str | None, learned_mode: str
) -> tuple[MaskArtifact, str]:
    """The masks to re-apply: --masks, else engines/<model>/masks.pt, else learned now."""
    if masks_path or paths.masks.is_file():
        source = Path(masks_path) if masks_path else paths.masks
        return MaskArtifact.load(source), str(source)
    masks = learned_result(ctx, paths, learned_mode).artifact
    ensure_dir(paths.compare_masks)
    source = paths.compare_masks / "masks.learned-original.pt"
    masks.save(source)
    return masks, str(source)


def compared_models(
    recipe: Recipe,
    paths: ArtifactPaths,
    report: EligibilityReport,
    data: DataBundle,
    device: torch.device,
    states: tuple[dict, dict],
    old_masks: MaskArtifact,
    log,
) -> tuple[dict[str, dict], float]:
    """Top-1/top-5 of the six models of the demo, and the seconds masks took to learn afresh."""
    old_state, new_state = states
    batch = recipe.data.eval_batch_size

    def dense_metrics(state):
        net = build_network(recipe)
        net.load_state_dict(state)
        return evaluate(net.to(device).eval(), data.eval, batch, device)

    def masked_metrics(state, masks):
        return evaluate(masked_model(recipe, state, masks, device), data.eval, batch, device)

    rows = {
        "dense_original": dense_metrics(old_state),
        "dense_updated": dense_metrics(new_state),
        "old_masks_on_original": masked_metrics(old_state, old_masks),
        "old_masks_on_updated": masked_metrics(new_state, old_masks),
    }
    updated_dense = build_network(recipe)
    updated_dense.load_state_dict(new_state)
    ctx = MethodContext(recipe, updated_dense.eval(), report, data=data, device=device, log=log)
    rows["magnitude_on_updated"] = masked_metrics(new_state, compute_masks("magnitude", ctx).artifact)
    fresh = compute_masks("learned", ctx)
    ensure_dir(paths.compare_masks)
    fresh.artifact.save(paths.compare_masks / "masks.learned-updated.pt")
    rows["learned_afresh_on_updated"] = masked_metrics(new_state, fresh.artifact)
    return rows, fresh.seconds


def updatable_demo(
    recipe: Recipe,
    paths: ArtifactPaths,
    device: torch.device,
    masks_path: str | None,
    steps: int,
    lr: float,
    learned_mode: str = "auto",
    log=print,
) -> dict:
    model, source = load_dense_model(recipe, paths)
    cfg = recipe.masks
    report = eligible_layers(model, recipe)
    data = build_datasets(recipe, augment_train=cfg.augment)
    old_state = state_copy(model)
    old_masks, masks_source = old_masks_for(
        recipe, paths, MethodContext(recipe, model, report, data=data, device=device, log=log), masks_path, learned_mode
    )
    started = time.perf_counter()
    updated = finetune(copy.deepcopy(model), data, steps, lr, cfg.batch_size, device, cfg.seed, recipe.data.workers)
    finetune_seconds = time.perf_counter() - started
    new_state = state_copy(updated)
    DenseWeights(new_state).save(paths.updated_weights)
    rows, fresh_seconds = compared_models(recipe, paths, report, data, device, (old_state, new_state), old_masks, log)
    certificate = certify_masks(
        lambda: build_network(recipe),
        dense_for_artifact(old_state, old_masks),
        old_masks,
        data.eval,
        recipe.data.eval_batch_size,
        device,
        updated_state=dense_for_artifact(new_state, old_masks),
    )
    certificate.pop("per_sample", None)
    parameters = [name for name, _ in model.named_parameters()]  # BatchNorm statistics excluded
    change = sum(float((new_state[k] - old_state[k]).norm() ** 2) for k in parameters) ** 0.5
    scale = sum(float(old_state[k].norm() ** 2) for k in parameters) ** 0.5
    summary = {
        "model": recipe.name,
        "weights": source,
        "data": data.description,
        "accuracy_meaningful": data.accuracy_meaningful,
        "old_masks": masks_source,
        "old_method": old_masks.method,
        "finetune": {
            "steps": steps,
            "lr": lr,
            "seconds": round(finetune_seconds, 1),
            "relative_weight_change": change / max(scale, 1e-12),
            "weights": str(paths.updated_weights),
        },
        "results": {name: {"top1": r["top1"], "top5": r["top5"]} for name, r in rows.items()},
        "learned_afresh_seconds": round(fresh_seconds, 1),
        "certify_reused_masks": certificate,
        "rebake": f"python -m pipeline bake --model {recipe.name} --masks {masks_source} --weights {paths.updated_weights}",
    }
    write_json(paths.updatable_json, summary)
    write_text(paths.updatable_md, updatable_markdown(summary))
    return summary


def updatable_markdown(summary: dict) -> str:
    labels = {
        "dense_original": "dense, original weights",
        "dense_updated": "dense, updated weights",
        "old_masks_on_original": "old masks on original weights",
        "old_masks_on_updated": "old masks re-applied to updated weights",
        "magnitude_on_updated": "magnitude masks of the updated weights",
        "learned_afresh_on_updated": "masks learned afresh on updated weights",
    }
    ft = summary["finetune"]
    lines = [
        f"# Updatable model: {summary['model']}",
        "",
        f"The dense weights were fine-tuned for {ft['steps']} steps (SGD, lr {ft['lr']}, all weights; relative "
        f"weight change {100 * ft['relative_weight_change']:.2f}%). The old masks ({summary['old_method']}, "
        f"{summary['old_masks']}) were re-applied without retraining.",
        "",
    ]
    if not summary["accuracy_meaningful"]:
        lines += ["**Synthetic data: the accuracies below mean nothing.**", ""]
    lines += ["| model | top-1 % | top-5 % |", "| --- | ---: | ---: |"]
    for key, label in labels.items():
        r = summary["results"][key]
        lines.append(f"| {label} | {r['top1']:.2f} | {r['top5']:.2f} |")
    cert = summary.get("certify_reused_masks")
    if cert and "updated" in cert:
        up = cert["updated"]
        lines += [
            "",
            f"Certified stable on the updated model (worst-case bounds, docs/notebook/baselines.md): "
            f"Lemma 3.4 {100 * up['lemma_3_4']['certified_share']:.1f}%, Lemma 3.6 (reuse) "
            f"{100 * up['lemma_3_6']['certified_share']:.1f}% of samples; predictions actually unchanged "
            f"by the masks: {100 * up['prediction_unchanged_share']:.1f}%.",
        ]
    lines += ["", f"Re-bake for deployment: `{summary['rebake']}`"]
    return "\n".join(lines) + "\n"
