"""Dense training of the demo network (recipes whose weights are `pretrain`), cached.

A plain loop in the spirit of torchvision's references: SGD with Nesterov momentum,
one-cycle learning rate, random crop + flip; a checkpoint every epoch and on SIGTERM.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.data.datasets import ResumableBatchSampler, build_datasets, make_loader
from pipeline.errors import Interrupted, PipelineError
from pipeline.io import torch_load, torch_save, write_json
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.training import check_device, evaluate, select_device, stop_on_signals
from pipeline.recipe.weights import build_network
from pipeline.progress import progress


@dataclass
class Options:
    epochs: int | None = field(default=None, metadata={"recipe": "pretrain.epochs"})
    resume: bool = False
    force: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="override pretrain.epochs")
    parser.add_argument("--resume", action="store_true", help="continue from pretrain.ckpt")
    parser.add_argument("--force", action="store_true", help="retrain even when dense.pt exists")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    if recipe.weights != "pretrain":
        raise PipelineError(f"model {recipe.name} takes weights from {recipe.weights!r}; pretrain only applies to "
                            "recipes with weights=pretrain (the demo)")
    cfg = recipe.pretrain
    if options.resume and not paths.pretrain_checkpoint.is_file():
        raise PipelineError(f"--resume: there is no checkpoint {paths.pretrain_checkpoint} to continue; drop "
                            "--resume to start a new run")
    if paths.dense_weights.is_file() and not options.force and not options.resume:
        print(f"dense weights exist: {paths.dense_weights} (use --force to retrain)")
        return 0
    device = select_device(options.device)
    torch.manual_seed(cfg.seed)
    data = build_datasets(recipe, augment_train=True)
    model = build_network(recipe).to(device)
    sampler = ResumableBatchSampler(len(data.train), cfg.batch_size, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                    pct_start=0.25)
    state = {"epoch": 0, "batch": 0, "history": []}
    if options.resume and paths.pretrain_checkpoint.is_file():
        ckpt = torch_load(paths.pretrain_checkpoint, "pretrain checkpoint")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        torch.set_rng_state(ckpt["rng"])
        print(f"resumed pretraining at epoch {state['epoch']} batch {state['batch']}")

    def save_checkpoint() -> None:
        torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "state": state, "rng": torch.get_rng_state()},
                   paths.pretrain_checkpoint)

    started = time.time()
    with stop_on_signals() as stop:
        while state["epoch"] < cfg.epochs:
            model.train()
            sampler.set_epoch(state["epoch"], state["batch"])
            bar = progress(make_loader(data.train, sampler), total=steps_per_epoch, initial=state["batch"],
                           desc=f"pretrain epoch {state['epoch'] + 1}/{cfg.epochs}")
            correct = seen = 0
            for images, labels in bar:
                images, labels = images.to(device), labels.to(device)
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                state["batch"] += 1
                correct += int((logits.argmax(1) == labels).sum())
                seen += labels.numel()
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct / seen:.1f}")
                if stop:
                    save_checkpoint()
                    raise Interrupted(stop.signal_number, f"checkpoint {paths.pretrain_checkpoint} at epoch "
                                      f"{state['epoch']} batch {state['batch']} saved; continue with --resume")
            model.eval()
            metrics = evaluate(model, data.eval, recipe.data.eval_batch_size, device, desc="test")
            state["history"].append({"epoch": state["epoch"] + 1, **metrics})
            print(f"epoch {state['epoch'] + 1}: test top1 {metrics['top1']:.2f}% top5 {metrics['top5']:.2f}%")
            state["epoch"] += 1
            state["batch"] = 0
            save_checkpoint()
    model = model.cpu().eval()
    torch_save(model.state_dict(), paths.dense_weights)
    final = state["history"][-1] if state["history"] else {}
    write_json(paths.pretrain_log, {"model": recipe.name, "epochs": cfg.epochs, "seconds": time.time() - started,
                                    "test": final, "history": state["history"], "data": data.description})
    paths.pretrain_checkpoint.unlink(missing_ok=True)
    print(f"dense weights: {paths.dense_weights} (test top1 {final.get('top1', float('nan')):.2f}%)")
    return 0
