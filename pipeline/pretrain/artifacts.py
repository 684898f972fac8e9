"""Owners of the files the pretrain stage writes: dense.pt and pretrain.ckpt (dataclass, save, load).

Both are read with `weights_only=True` (pipeline.io.torch_load). The updatable demo's dense_updated.pt is
a `DenseWeights` file too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io import load_versioned, torch_load, torch_save

CHECKPOINT_FORMAT = "pretrain-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class DenseWeights:
    """dense.pt: the state dict of a dense network trained here."""

    state_dict: dict[str, torch.Tensor]

    def save(self, path: Path) -> None:
        torch_save(self.state_dict, path)

    @classmethod
    def load(cls, path: Path) -> DenseWeights:
        saved = torch_load(path, "dense weights")
        if not isinstance(saved, dict) or not all(isinstance(value, torch.Tensor) for value in saved.values()):
            raise PipelineError(
                f"{path} is not a state dict of tensors; delete it and run `python -m pipeline pretrain` again"
            )
        return cls(saved)


@dataclass
class PretrainCheckpoint:
    """pretrain.ckpt: where an interrupted pretraining run stands (written every epoch and on SIGTERM)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: dict[str, Any]  # epoch, batch, history
    rng: torch.Tensor  # torch's CPU RNG state (augmentation)

    def save(self, path: Path) -> None:
        torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                **{item.name: getattr(self, item.name) for item in fields(self)},
            },
            path,
        )

    @classmethod
    def load(cls, path: Path) -> PretrainCheckpoint:
        return load_versioned(
            cls, path, "pretrain checkpoint", CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "delete it or drop --resume"
        )
