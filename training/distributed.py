"""torchrun support: the same trainer runs as one process or as N data-parallel ranks.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a world of one and nothing
here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(use_cuda: bool) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # A bounded timeout: if one rank dies mid-collective the others fail instead of hanging forever
    # (torchrun then stops the job with the failing rank's error).
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=5))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank,
                int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def sync_buffers(model: torch.nn.Module, dd: Dist) -> None:
    """Give every rank rank 0's batch-norm statistics, so all ranks evaluate the model rank 0 saves."""
    if dd.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def cleanup(dd: Dist) -> None:
    if dd.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
