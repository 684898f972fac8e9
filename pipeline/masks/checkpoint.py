"""The one owner of the mask-training checkpoint format (masks.ckpt): a dataclass, load and save.

Written by train-masks every N steps, each epoch and on SIGTERM; `final` marks a finished run. bake,
compare and the resume path of train-masks read it only through `MaskCheckpoint.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io import load_versioned, torch_save
from pipeline.masks.artifact import MaskArtifact, layer_from
from pipeline.records import StageReport

FORMAT = "mask-training-checkpoint"
VERSION = 3  # 3: the stop rule reads the evaluation history; rng holds the noise generator too


class TrainingRecord(StageReport):
    """train_masks.json: the summary of a mask-training run; its `files` hold the sha256 of the final masks.ckpt."""

    STAGE = "train-masks"


@dataclass
class MaskCheckpoint:
    recipe_key: str  # digest of the recipe's mask settings, arch and num_classes
    final: bool
    n: int
    m: int
    logits: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]  # argmax pattern per block (int16)
    shapes: dict[str, list[int]]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: dict[str, Any]  # LoopState.to_dict(): step, epoch, batch, history, seconds, best, stop_reason
    rng: list[torch.Tensor]  # per rank: CPU RNG state + Gumbel offset generator state

    def save(self, path: Path) -> None:
        torch_save(
            {"format": FORMAT, "version": VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}, path
        )

    @classmethod
    def load(cls, path: Path, fix: str = "run train-masks first") -> MaskCheckpoint:
        checkpoint = load_versioned(cls, path, "mask-training checkpoint", FORMAT, VERSION, fix)
        checkpoint.check(path, fix)
        return checkpoint

    def check(self, path: Path, fix: str) -> None:
        """Refuse a checkpoint whose tables are not what train-masks writes (wrong types, non-finite logits)."""
        tables = ("logits", "indices", "shapes", "state")
        if not all(isinstance(getattr(self, name), dict) for name in tables) or "step" not in self.state:
            raise PipelineError(
                f"{path} is a damaged mask-training checkpoint (a table is missing or of the wrong type); {fix}"
            )
        for name, tensor in {**self.logits, **self.indices}.items():
            if not isinstance(tensor, torch.Tensor) or name not in self.shapes:
                raise PipelineError(f"{path} is a damaged mask-training checkpoint (layer {name}); {fix}")
        for name, tensor in self.indices.items():
            if tensor.is_floating_point() or tensor.dtype == torch.bool:
                raise PipelineError(
                    f"{path}: the masks of layer {name} are {tensor.dtype}, not integers; the "
                    f"checkpoint is damaged; {fix}"
                )
        for name, tensor in self.logits.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise PipelineError(
                    f"{path}: the logits of layer {name} hold NaN or Inf; the checkpoint is damaged "
                    f"or the run diverged; {fix}"
                )

    def to_artifact(self, path: Path, model: str, arch: str, prior: str) -> MaskArtifact:
        """The learned masks (those masks.keep kept) of a finished run as a mask artifact (what bake writes to masks.pt)."""
        if not self.final:
            raise PipelineError(
                f"{path} is from an unfinished run (step {self.state['step']}); finish it with `train-masks --resume`"
            )
        layers = [
            layer_from({"name": name, "shape": self.shapes[name], "n": self.n, "m": self.m, "indices": indices}, path)
            for name, indices in self.indices.items()
        ]
        best = self.state.get("best") or {}
        kept = self.state.get("kept") or {"step": best.get("step"), "score": best.get("score"), "why": "best"}
        return MaskArtifact(
            model,
            arch,
            "learned",
            layers,
            {
                "prior": prior,
                "steps": self.state["step"],
                "kept": kept["why"],
                "kept_step": kept["step"],
                "validation_top1": kept["score"],
                "best_step": best.get("step"),
                "best_validation_top1": best.get("score"),
            },
        )
