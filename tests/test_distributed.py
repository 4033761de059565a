"""training.distributed without torchrun: equal shards for every rank, seeds per rank and epoch, and a
rank that has no GPU refused. The real multi-process runs are tests/test_ddp.py.
"""

from __future__ import annotations

import pytest
import torch

from training.config import ConfigError
from training.distributed import Dist, derived_seed, epoch_shard, steps_per_epoch
from training.loop import pick_device


@pytest.mark.parametrize(("images", "world"), [(511, 2), (512, 2), (10, 3), (1, 2), (7, 8)])
def test_every_rank_gets_a_shard_of_the_same_length_and_together_they_cover_every_image(images, world):
    shards = [epoch_shard(images, seed=0, epoch=1, dd=Dist(rank, world)) for rank in range(world)]
    per_rank = -(-images // world)  # ceil
    assert [len(s) for s in shards] == [per_rank] * world
    assert set(torch.cat(shards).tolist()) == set(range(images))
    assert len(torch.cat(shards)) - images == per_rank * world - images  # the padding, and no more


def test_one_process_takes_the_whole_permutation_unpadded():
    (shard,) = [epoch_shard(511, seed=0, epoch=1, dd=Dist())]
    assert sorted(shard.tolist()) == list(range(511))


@pytest.mark.parametrize(("images", "world", "batch", "steps"), [
    (511, 2, 128, 2),  # 256 per rank (padded): 2 full batches on both ranks
    (511, 1, 128, 3),
    (8000, 2, 32, 125),
    (100, 2, 128, 1),  # fewer images than a batch: one short step
])
def test_steps_per_epoch_counts_full_batches_of_a_ranks_shard(images, world, batch, steps):
    assert steps_per_epoch(images, world, batch) == steps


def test_seeds_differ_by_rank_epoch_and_stream_and_stay_put():
    seeds = {derived_seed(0, epoch, rank, stream) for epoch in (1, 2) for rank in (0, 1)
             for stream in ("augment", "dropout")}
    assert len(seeds) == 8
    assert derived_seed(0, 1, 0, "augment") == derived_seed(0, 1, 0, "augment") < 2**64
    # Pinned: a last.pt resumes with the draws of the code that wrote it, so a change must be deliberate.
    assert derived_seed(0, 1, 0, "augment") == 7_605_068_838_477_914_670


def test_a_local_rank_without_a_gpu_is_refused(monkeypatch):
    # `make train-ddp NPROC=2` on a one-GPU host: rank 1 would get cuda:1, "invalid device ordinal".
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda", 0) == torch.device("cuda", 0)
    for name in ("cuda", "auto"):
        with pytest.raises(ConfigError, match=r"^local rank 1 has no GPU: this host has 1 CUDA device\(s\); run at "
                                              r"most 1 process\(es\) per node, or pass --device cpu$"):
            pick_device(name, 1)
