"""Worker-side reader: each rank's training batches and validation blocks, from the shards.

A cache entry (`data.manifest`) holds token shards; a training example is a window of
block_size + 1 tokens cut from one shard at a stride of block_size, so the split holds N
global blocks, numbered shard by shard (`Manifest.block_offsets`).

The order is a pure function of (seed, global sample index): sample g is block
`perm(g mod N)` of epoch g // N, where `perm` is a keyed bijection of [0, N) (`Permutation`:
a Feistel network with cycle walking, keyed by seed and epoch) computed for the indices
asked for only, so a batch costs O(batch) whatever the corpus size. Micro-batch index i
(the loop asks for `step * grad_accum + m`) is the global samples [i * G, (i + 1) * G) with
G = micro_batch_size * world_size, and rank r takes its slice [i * G + r * B, ... + B).
Hence resuming at step k reads exactly the batches the uninterrupted run would have read,
and the same seed gives the same global batches for any number of workers.

An `instruction`/`chat` entry holds rows of whole examples instead (`data.chat`): global
block b is row b, and a batch is (inputs, labels, position ids), labels -100 off the
assistant's tokens. The order, the prefetch and the resume are the same.

Local shards are memory-mapped (every worker on a node shares the page cache); shards of a
remote entry are downloaded once per host through `storage.local_copy`, each when first
needed. The next few batches are prepared in a background thread, so a step does not wait
on reading them.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from lmforge.data.chat import batch_tensors
from lmforge.data.manifest import PreparedData, Split

Batch = tuple[torch.Tensor, ...]
"""(inputs, targets) for a token stream; (inputs, labels, position ids) for rows."""

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-mixing hash of a 64-bit value."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """A bijection of [0, n) keyed by (seed, epoch), evaluated pointwise in O(1) per index.

    A balanced Feistel network over [0, 4^h) with 4^h >= n is a bijection of that larger
    domain for any round function; cycle walking (apply it again while the value is >= n)
    restricts it to a bijection of [0, n). As 4^h < 4n, an index takes under 4 passes on
    average. Plain Python ints: for a micro-batch of a few dozen indices they beat numpy,
    whose per-call overhead dominates arrays this small.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n <= 0:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # bits per Feistel half
        self.low = (1 << self.half) - 1
        state = np.random.SeedSequence([seed, epoch]).generate_state(self.ROUNDS, np.uint64)
        self.keys = [int(k) for k in state]

    def _feistel(self, x: int) -> int:
        h, low = self.half, self.low
        left, right = x >> h, x & low
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & low)
        return (left << h) | right

    def index(self, i: int) -> int:
        """Where position `i` (0 <= i < n) goes."""
        x = self._feistel(i)
        while x >= self.n:  # cycle walking
            x = self._feistel(x)
        return x

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return np.array([self.index(int(i)) for i in positions], dtype=np.int64)


def open_shard(path: str, random_access: bool) -> np.ndarray:
    """A 1-D .npy shard memory-mapped read-only. With `random_access` the kernel is told
    (MADV_RANDOM) not to read ahead: a training window is a few KB at a random place, and
    the default readahead faults in 128 KB or more around each, which measured 32 ms for a
    micro-batch of 16 cold windows against 0.2 ms without (bench/data_fetch.py)."""
    array = np.load(path, mmap_mode="r")
    if array.ndim not in (1, 3):
        raise ValueError(f"{path}: a shard is 1-D tokens or 3-D rows, this one has shape "
                         f"{array.shape}")
    if random_access and isinstance(array.base, mmap.mmap) and hasattr(mmap, "MADV_RANDOM"):
        array.base.madvise(mmap.MADV_RANDOM)
    return array


class ShardSet:
    """The shards of one split, opened lazily: local files memory-mapped, remote ones
    downloaded through the host's read-through cache on first use."""

    def __init__(self, data: PreparedData, split: Split, block_size: int,
                 random_access: bool = False) -> None:
        self.data, self.split, self.block_size = data, split, block_size
        self.random_access = random_access
        self.shards = data.manifest.shards(split)
        self.offsets = data.manifest.block_offsets(split, block_size)
        self.n_blocks = int(self.offsets[-1])
        self.rows = data.manifest.rows
        self._arrays: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the prefetch thread and the loop both open shards

    def array(self, i: int) -> np.ndarray:
        with self._lock:
            if i not in self._arrays:
                path = self.data.local_path(self.shards[i].file)
                self._arrays[i] = open_shard(path, self.random_access)
            return self._arrays[i]

    def windows(self, blocks: np.ndarray) -> Batch:
        """Inputs and next-token targets (len(blocks), block_size) of global `blocks`; for
        rows, inputs, labels and position ids."""
        shard = np.searchsorted(self.offsets, blocks, side="right") - 1
        if self.rows:
            return batch_tensors(np.stack([self.array(int(s))[b - self.offsets[s]]
                                           for s, b in zip(shard, blocks, strict=True)]))
        starts = (blocks - self.offsets[shard]) * self.block_size
        rows = np.stack([self.array(int(s))[b : b + self.block_size + 1]
                         for s, b in zip(shard, starts, strict=True)]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def head(self, n: int) -> np.ndarray:
        """The split's first `n` tokens (fewer if it is shorter), across shards."""
        if self.rows:
            raise ValueError("a split of example rows has no token stream head")
        parts, left = [], n
        for i in range(len(self.shards)):
            if left <= 0:
                break
            part = self.array(i)[:left]
            parts.append(np.asarray(part))
            left -= len(part)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class BlockShard:
    """This rank's training micro-batches; `batch(i)` is micro-batch index i (see above)."""

    def __init__(self, data: PreparedData, block_size: int, rank: int, world_size: int,
                 seed: int, batch_size: int, prefetch: int = 4) -> None:
        self.shards = ShardSet(data, "train", block_size, random_access=True)
        self.n_blocks = self.shards.n_blocks
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * world_size
        if self.n_blocks < self.global_batch:
            raise ValueError(
                f"train.micro_batch_size: {batch_size} per worker times {world_size} workers "
                f"exceeds the {self.n_blocks} training blocks of {block_size + 1} tokens; use "
                "a larger corpus or a smaller batch")
        # Micro-batches wholly inside epoch 0 (later ones may straddle two epochs).
        self.batches_per_epoch = self.n_blocks // self.global_batch
        self.prefetch = prefetch
        self._perms: dict[int, Permutation] = {}
        self._pool: ThreadPoolExecutor | None = None  # started on first use, not at init
        self._pending: dict[int, Future[Batch]] = {}

    def _perm(self, epoch: int) -> Permutation:
        perm = self._perms.get(epoch)  # called from the loop and the prefetch thread
        if perm is None:
            if len(self._perms) > 4:  # only the current and next epoch are ever in use
                self._perms = {}
            perm = self._perms[epoch] = Permutation(self.n_blocks, self.seed, epoch)
        return perm

    def blocks(self, index: int) -> np.ndarray:
        """Global block ids of this rank's micro-batch `index`: O(batch_size)."""
        first = index * self.global_batch + self.rank * self.batch_size
        g = np.arange(first, first + self.batch_size, dtype=np.int64)
        epochs, pos = np.divmod(g, self.n_blocks)
        out = np.empty_like(g)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))(pos[sel])
        return out

    def read(self, index: int) -> Batch:
        """Micro-batch `index`, read now (no prefetch)."""
        return self.shards.windows(self.blocks(index))

    def batch(self, index: int) -> Batch:
        """Inputs and targets (micro_batch_size, block_size) for this rank's micro-batch
        `index`; the next `prefetch` ones are read in the background meanwhile. Asking out
        of order (a resume) is correct, only not prefetched."""
        if self.prefetch <= 0:
            return self.read(index)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lmforge-prefetch")
        future = self._pending.pop(index, None)
        for stale in [i for i in self._pending if not index < i <= index + self.prefetch]:
            self._pending.pop(stale).cancel()
        for i in range(index + 1, index + 1 + self.prefetch):
            if i not in self._pending:
                self._pending[i] = self._pool.submit(self.read, i)
        return future.result() if future is not None else self.read(index)

    def close(self) -> None:
        """Stop prefetching (pending reads are dropped)."""
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=False)
            self._pool = None


class ValidationSet:
    """A fixed list of validation batches for this rank (same every evaluation): the
    split's blocks in order, dealt round-robin to the ranks."""

    def __init__(self, data: PreparedData, block_size: int, rank: int, world_size: int,
                 batch_size: int, max_batches: int) -> None:
        self.shards = ShardSet(data, "validation", block_size)
        blocks = np.arange(self.shards.n_blocks)[rank::world_size][: batch_size * max_batches]
        if len(blocks) == 0:  # a tiny validation split and many ranks: share its first block
            blocks = np.zeros(1, dtype=np.int64)
        self.batches = [blocks[i : i + batch_size] for i in range(0, len(blocks), batch_size)]

    def __iter__(self) -> Iterator[Batch]:
        for blocks in self.batches:
            yield self.shards.windows(blocks)
