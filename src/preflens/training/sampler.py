"""The order in which the trainer sees pairs: global batches that are a pure function of (seed, epoch).

Why a pure function: a resumed run and every process of a multi-process run must draw exactly the same
batches, so resume is exact and each process gets an equal shard of the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from preflens.data.collate import EpochCounter, LengthGroupedBatchSampler

__all__ = ["PairBatchSampler"]


class PairBatchSampler:
    """Global batches of pair indices: a pure function of (seed, epoch), so resume and every process
    see the same order. Only whole batches (the few pairs left over change with each epoch's shuffle),
    so every process gets an equal shard. `skip` drops the first batches of the next pass (resume)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = False):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.drop_last = True
        self.seed = seed
        self.group_by_length = group_by_length
        self.sampler = EpochCounter()  # where accelerate's BatchSamplerShard looks for `set_epoch`
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        if self.group_by_length:
            inner = LengthGroupedBatchSampler(
                self.lengths, self.batch_size, shuffle=True, seed=self.seed, drop_last=True
            )
            inner.set_epoch(epoch)
            return [list(b) for b in inner]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        n = len(order) // self.batch_size
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n)]

    def __iter__(self) -> Iterator[list[int]]:
        out = self.batches(self.sampler.epoch)[self.skip :]
        self.skip = 0
        return iter(out)

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size
