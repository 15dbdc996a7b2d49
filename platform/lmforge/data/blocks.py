"""Worker-side view of the packed stream: a disjoint shard of training blocks per rank.

The order is a pure function of (seed, step), so resuming at step k reads exactly the
batches the uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class BlockShard:
    def __init__(self, path: str, block_size: int, rank: int, world_size: int, seed: int,
                 batch_size: int) -> None:
        # mmap: every worker on a node shares the page cache instead of a private copy.
        self.stream = np.load(path, mmap_mode="r")
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        n_blocks = (len(self.stream) - 1) // block_size
        # Every rank gets the same number of blocks, so all ranks step in lockstep.
        self.per_rank = n_blocks // world_size
        if self.per_rank < batch_size:
            raise ValueError(
                f"train.micro_batch_size: {batch_size} exceeds the {self.per_rank} training "
                f"blocks each of {world_size} workers has; use a larger corpus or smaller batch"
            )
        self.n_blocks = n_blocks
        self.batches_per_epoch = self.per_rank // batch_size

    def _order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return perm[self.rank :: self.world_size][: self.per_rank]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (micro_batch_size, block_size) for this rank at `step`."""
        epoch, i = divmod(step, self.batches_per_epoch)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return windows(self.stream, idx * self.block_size, self.block_size)


class ValidationSet:
    """A fixed list of validation batches for this rank (same every evaluation)."""

    def __init__(self, path: str, block_size: int, rank: int, world_size: int,
                 batch_size: int, max_batches: int) -> None:
        self.stream = np.load(path, mmap_mode="r")
        n_blocks = (len(self.stream) - 1) // block_size
        starts = np.arange(n_blocks)[rank::world_size][: batch_size * max_batches] * block_size
        if len(starts) == 0:  # a tiny validation split and many ranks: share its first block
            starts = np.zeros(1, dtype=np.int64)
        self.block_size = block_size
        self.batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for starts in self.batches:
            yield windows(self.stream, starts, self.block_size)


def windows(stream: np.ndarray, starts: np.ndarray, block_size: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the blocks starting at `starts`."""
    rows = np.stack([stream[s : s + block_size + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]
