"""torchrun support: gloo on CPU, nccl on GPU; rank 0 writes the artifacts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return DistContext(dist.get_rank(), world_size, device)


def shutdown(context: DistContext) -> None:
    if context.world_size > 1 and dist.is_initialized():
        # Tearing down gloo while a peer is still working (rank 0 writes the artifacts) can abort the
        # other process ("terminate called without an active exception"): leave together.
        dist.barrier()
        dist.destroy_process_group()
