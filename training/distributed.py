"""torchrun support: the same trainer runs as one process or as N data-parallel ranks.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a world of one and nothing
here does anything.
"""

from __future__ import annotations

import hashlib
import math
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


def derived_seed(seed: int, epoch: int, rank: int, stream: str) -> int:
    """A seed of its own for each (run seed, epoch, rank, stream of draws).

    Each epoch reseeds its augmentation and dropout draws from this, so they depend on nothing but
    these four values: a resumed epoch draws exactly what it would have uninterrupted, on every rank,
    and `last.pt` needs no generator state (which would also tie it to the device that saved it).
    """
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{rank}/{stream}".encode()).digest()[:8], "little")


def steps_per_epoch(images: int, world: int, batch_size: int) -> int:
    """Steps every rank takes per epoch: each rank's shard holds ceil(images / world) (see epoch_shard)."""
    return max(1, math.ceil(images / world) // batch_size)


def epoch_shard(images: int, seed: int, epoch: int, dd: Dist) -> torch.Tensor:
    """This rank's share of the epoch's permutation, the same length on every rank.

    All ranks draw the same permutation (same seed, same epoch); it is padded with its own first
    indices to a multiple of the world size, as DistributedSampler does, so that every rank takes the
    same number of steps and meets the others at every all-reduce (uneven shards hang otherwise).
    """
    perm = torch.randperm(images, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    total = math.ceil(images / dd.world) * dd.world
    return perm.repeat(math.ceil(total / images))[:total][dd.rank :: dd.world]


def leave_together(dd: Dist) -> None:
    """After a run that ended well, every rank waits here for the others (rank 0 writes the outputs
    while the rest are done), so that all of them tear down the process group at the same point
    rather than one closing its connections while a peer still runs."""
    if dd.world > 1 and dist.is_initialized():
        dist.barrier()


def cleanup(dd: Dist) -> None:
    if dd.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
