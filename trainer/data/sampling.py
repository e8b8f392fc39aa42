"""Which samples each process sees: the resumable global sampler, evaluation shards and the
hold-out rule behind `data.val_count`."""
from __future__ import annotations

import os

import torch

from ..rng import derive_seed, micro_rows
from .report import DataError


def split_holdout(n: int, count: int, seed: int, what: str = "samples") -> tuple[list[int], list[int]]:
    """The one hold-out rule of every stage: `count` of the `n` items of a source (a choice seeded by
    the run seed) are held out for validation -> (train indices, held-out indices), both ascending."""
    if count <= 0:
        return list(range(n)), []
    if count >= n:
        raise DataError(f"data.val_count={count} leaves no training {what} (the source has {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "holdout")))
    held = set(order[:count].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


class GlobalBatchSampler:
    """Infinite micro-batches of this process, cut from one seeded global order per epoch (an incomplete
    last step dropped); resuming at step s is `start_step=s` whatever split of the global batch wrote the
    checkpoint (docs/TRAINER.md "Exact resume and checkpoints")."""

    def __init__(self, num_items: int, batch_size: int, world_size: int, rank: int, seed: int,
                 accum: int = 1, start_step: int = 0):
        self.step_batch = batch_size * world_size * accum
        self.per_epoch = num_items // self.step_batch
        if self.per_epoch == 0:
            raise DataError(f"the dataset has {num_items} usable images, fewer than one optimiser step's batch "
                            f"({batch_size} per process x {world_size} processes x {accum} accumulation = "
                            f"{self.step_batch}); add images, or lower train.batch_size or train.grad_accum")
        self.num_items, self.batch_size, self.world_size, self.rank = num_items, batch_size, world_size, rank
        self.seed, self.accum, self.start_step = seed, accum, start_step

    def __iter__(self):
        step, epoch, order = self.start_step, None, None
        while True:
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(derive_seed(self.seed, "data-order", e))
                epoch, order = e, torch.randperm(self.num_items, generator=g)
            step_order = order[k * self.step_batch:(k + 1) * self.step_batch]
            for micro in range(self.accum):
                yield step_order[micro_rows(self.batch_size, self.rank, self.world_size, micro)].tolist()
            step += 1

    def __len__(self):  # DataLoader asks; the stream is infinite, report one epoch
        return self.per_epoch * self.accum


def shard_indices(n: int, world_size: int, rank: int) -> list[int]:
    """Contiguous, possibly uneven shard of range(n) for evaluation passes."""
    per = -(-n // world_size)
    return list(range(rank * per, min(n, (rank + 1) * per)))


def launcher_rank() -> tuple[int, int]:
    """(rank, world size): torch.distributed's once initialised, else $RANK / $WORLD_SIZE (torchrun,
    accelerate), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
