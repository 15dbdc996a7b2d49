"""The workers' reader (data/blocks.py): order, worker-count invariance, resume, shards,
prefetch, validation. Entries hold the stream 0, 1, 2, ... so a token is its position."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lmforge.data import BlockShard, PreparedData, ValidationSet
from lmforge.data.blocks import Permutation
from lmforge.data.manifest import write_manifest

BLOCK = 8


def starts(x: torch.Tensor) -> list[int]:
    """A block's first token is its start position in the stream."""
    return [int(s) for s in x[:, 0]]


def global_batch(data, index: int, world: int, batch: int, seed: int = 7) -> list[int]:
    """Micro-batch `index` of every rank, concatenated in rank order."""
    return [s for rank in range(world)
            for s in starts(BlockShard(data, BLOCK, rank, world, seed, batch).batch(index)[0])]


# --- the permutation -----------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000, 4097])
def test_permutation_is_a_bijection(n):
    for epoch in range(3):
        values = Permutation(n, 7, epoch)(np.arange(n))
        assert sorted(values.tolist()) == list(range(n))


def test_permutation_depends_on_seed_and_epoch_only():
    n = 1000
    base = Permutation(n, 7, 0)(np.arange(n))
    assert np.array_equal(Permutation(n, 7, 0)(np.arange(n)), base)
    assert not np.array_equal(Permutation(n, 8, 0)(np.arange(n)), base)
    assert not np.array_equal(Permutation(n, 7, 1)(np.arange(n)), base)
    assert not np.array_equal(base, np.arange(n))  # it does shuffle


def test_permutation_of_a_huge_range_costs_only_the_indices_asked():
    # 2^40 blocks: an O(corpus) permutation would need 8 TB; this one evaluates 64 points.
    n = 1 << 40
    values = Permutation(n, 0, 0)(np.arange(10**9, 10**9 + 64))
    assert len(set(values.tolist())) == 64 and values.min() >= 0 and values.max() < n


# --- training batches ------------------------------------------------------------------


def test_targets_are_inputs_shifted_by_one_and_windows_stay_in_one_shard(write_entry):
    data = write_entry(train=[BLOCK * 5 + 3, BLOCK * 7 + 1, BLOCK * 4 + 1])
    bounds = np.cumsum([0] + [s.tokens for s in data.manifest.train])
    shard = BlockShard(data, BLOCK, 0, 1, 7, 4)
    assert shard.n_blocks == 5 + 7 + 4
    seen = set()
    for index in range(shard.batches_per_epoch):
        x, y = shard.batch(index)
        assert x.shape == y.shape == (4, BLOCK) and x.dtype == torch.int64
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            assert row_x == list(range(row_x[0], row_x[0] + BLOCK))
            assert row_y == [t + 1 for t in row_x]
            shard_no = int(np.searchsorted(bounds, row_x[0], side="right")) - 1
            assert row_y[-1] < bounds[shard_no + 1]  # the window does not cross a shard
            assert (row_x[0] - bounds[shard_no]) % BLOCK == 0
            seen.add(row_x[0])
    assert len(seen) == 16  # one epoch: every block exactly once


def test_ranks_get_disjoint_blocks_within_an_epoch(write_entry):
    data = write_entry(train=[BLOCK * 40 + 1])
    seen = []
    for rank in (0, 1):
        s = BlockShard(data, BLOCK, rank, 2, 7, 3)
        blocks = [b for i in range(s.batches_per_epoch) for b in starts(s.batch(i)[0])]
        assert len(set(blocks)) == len(blocks) == s.batches_per_epoch * 3
        seen.append(set(blocks))
    assert seen[0].isdisjoint(seen[1])


@pytest.mark.parametrize(("world", "batch"), [(2, 6), (3, 4), (4, 3), (6, 2), (12, 1)])
def test_global_batches_are_the_same_for_any_number_of_workers(write_entry, world, batch):
    data = write_entry(train=[BLOCK * 30 + 1, BLOCK * 25 + 1])  # 55 blocks: epochs straddle
    for index in range(12):
        assert global_batch(data, index, world, batch) == global_batch(data, index, 1, 12)


def test_grad_accum_micro_batches_make_the_same_global_batch(write_entry):
    # The loop asks for micro-batch step * grad_accum + m: 1 worker accumulating 2
    # micro-batches of 3 sees the global batch that 2 workers with 3 each see.
    data = write_entry(train=[BLOCK * 40 + 1])
    one = BlockShard(data, BLOCK, 0, 1, 7, 3)
    for step in range(8):
        accumulated = starts(one.batch(2 * step)[0]) + starts(one.batch(2 * step + 1)[0])
        assert accumulated == global_batch(data, step, 2, 3)


def test_batches_are_a_function_of_seed_and_index(write_entry):
    data = write_entry(train=[BLOCK * 40 + 1])
    run = BlockShard(data, BLOCK, 1, 2, 7, 3)
    uninterrupted = [run.batch(i) for i in range(30)]  # past the end of epoch 0
    resumed = BlockShard(data, BLOCK, 1, 2, 7, 3)  # a fresh process resuming at index 17
    for i in range(17, 30):
        x, y = resumed.batch(i)
        assert torch.equal(x, uninterrupted[i][0]) and torch.equal(y, uninterrupted[i][1])
    other_seed = BlockShard(data, BLOCK, 1, 2, 8, 3)
    assert any(not torch.equal(other_seed.batch(i)[0], uninterrupted[i][0]) for i in range(6))


def test_each_epoch_is_a_new_shuffle_of_every_block(write_entry):
    data = write_entry(train=[BLOCK * 24 + 1])  # 24 blocks, global batch 6: 4 per epoch
    s = [BlockShard(data, BLOCK, r, 2, 7, 3) for r in (0, 1)]
    epochs = [[b for i in range(4 * e, 4 * e + 4) for r in (0, 1) for b in starts(s[r].batch(i)[0])]
              for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == [BLOCK * b for b in range(24)]
    assert epochs[0] != epochs[1]


def test_global_batch_larger_than_the_corpus_is_refused(write_entry):
    data = write_entry(train=[BLOCK * 10 + 1])  # 10 blocks
    with pytest.raises(ValueError, match="train.micro_batch_size"):
        BlockShard(data, BLOCK, 0, 2, 7, 6)
    BlockShard(data, BLOCK, 0, 2, 7, 5)  # exactly one global batch fits


# --- prefetch ----------------------------------------------------------------------------


class Recording(BlockShard):
    """Notes which thread read each micro-batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int, str]] = []

    def read(self, index: int):
        self.reads.append((index, threading.current_thread().name))
        return super().read(index)


def test_next_batches_are_read_in_the_background(write_entry):
    data = write_entry(train=[BLOCK * 200 + 1])
    plain = BlockShard(data, BLOCK, 1, 2, 7, 3, prefetch=0)
    s = Recording(data, BLOCK, 1, 2, 7, 3, prefetch=4)
    for i in range(10):
        assert torch.equal(s.batch(i)[0], plain.batch(i)[0])
    s.close()
    main = threading.current_thread().name
    by_main = [i for i, thread in s.reads if thread == main]
    assert by_main == [0]  # every later batch was ready, read by the prefetch thread
    assert sorted(i for i, _ in s.reads if i < 10) == list(range(10))  # each read once
    assert len(s.reads) <= 10 + 4  # the queue is bounded: at most 4 ahead


def test_out_of_order_requests_get_the_right_batches(write_entry):
    data = write_entry(train=[BLOCK * 200 + 1])
    plain = BlockShard(data, BLOCK, 0, 2, 7, 3, prefetch=0)
    s = BlockShard(data, BLOCK, 0, 2, 7, 3, prefetch=3)
    for i in [0, 1, 2, 40, 41, 5, 5, 6, 100, 99, 101]:  # resumes, a repeat, a step back
        x, y = s.batch(i)
        assert torch.equal(x, plain.batch(i)[0]) and torch.equal(y, plain.batch(i)[1])
    assert sorted(s._pending) == [102, 103, 104]  # prefetched after the last request only
    s.close()


# --- validation --------------------------------------------------------------------------


def test_validation_set_is_the_same_every_pass_and_disjoint_across_ranks(write_entry):
    data = write_entry(train=[BLOCK * 10 + 1], validation=[BLOCK * 14 + 1, BLOCK * 16 + 1])
    val = ValidationSet(data, BLOCK, rank=1, world_size=2, batch_size=4, max_batches=3)
    first, second = list(val), list(val)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(y1[:, :-1], x1[:, 1:])
    other = ValidationSet(data, BLOCK, rank=0, world_size=2, batch_size=4, max_batches=3)
    rank0 = {s for x, _ in other for s in starts(x)}
    rank1 = {s for x, _ in first for s in starts(x)}
    assert rank0.isdisjoint(rank1) and len(rank0) == len(rank1) == 12
    val_start = BLOCK * 10 + 1  # validation tokens follow the training ones
    assert min(rank0 | rank1) >= val_start
    # 24 blocks asked for, 14 in the first shard: the rest come from the second one.
    assert max(rank0 | rank1) >= val_start + BLOCK * 14 + 1


def test_tiny_validation_split_is_shared_by_many_ranks(write_entry):
    data = write_entry(train=[BLOCK * 10 + 1], validation=[BLOCK + 1])  # one block
    val = ValidationSet(data, BLOCK, rank=3, world_size=4, batch_size=2, max_batches=5)
    batches = list(val)
    assert len(batches) == 1
    first = BLOCK * 10 + 1
    assert batches[0][0].tolist() == [list(range(first, first + BLOCK))]


# --- a remote entry ----------------------------------------------------------------------


@pytest.fixture
def s3(s3_env, monkeypatch, tmp_path):
    """A new bucket on the session's moto S3 server (`s3_env`, tests/ray_fixtures.py: a
    subprocess, no Ray), pyarrow pointed at it, and a private read-through cache; yields
    the bucket's URI."""
    monkeypatch.setenv("LMFORGE_REMOTE_CACHE", str(tmp_path / "remote-cache"))
    return s3_env.bucket()


def downloaded(tmp_path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path / "remote-cache")).split("/", 1)[1]
                  for p in (tmp_path / "remote-cache").rglob("*.npy")
                  if not p.parent.name.startswith(".part-"))


def test_a_remote_entry_reads_the_same_batches_fetching_each_shard_when_needed(
        write_entry, s3, tmp_path):
    import pyarrow.fs

    local = write_entry(train=[BLOCK * 12 + 1, BLOCK * 10 + 1, BLOCK * 14 + 1],
                        validation=[BLOCK * 3 + 1, BLOCK * 4 + 1])
    uri = f"{s3}/cache/{local.fingerprint}"
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    for shard in local.manifest.train + local.manifest.validation:
        pyarrow.fs.copy_files(local.path(shard.file), f"{root}/{shard.file}",
                              destination_filesystem=fs)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        PreparedData.open(uri)  # shards without a manifest are not an entry yet
    write_manifest(uri, local.manifest)  # last, in one put

    remote = PreparedData.open(uri)
    assert remote.manifest == local.manifest and remote.entry.startswith("s3://")
    shard = BlockShard(remote, BLOCK, 1, 2, 7, 3, prefetch=2)
    val = ValidationSet(remote, BLOCK, 1, 2, batch_size=2, max_batches=2)
    assert not (tmp_path / "remote-cache").exists()  # opening reads the manifest only

    for (x, y), (lx, ly) in zip(val, ValidationSet(local, BLOCK, 1, 2, 2, 2), strict=True):
        assert torch.equal(x, lx) and torch.equal(y, ly)
    # Rank 1 of 2 validates on blocks 1, 3, 5 of 7 (shard 0 holds 0-2, shard 1 holds 3-6):
    # both validation shards, and no training shard yet.
    assert downloaded(tmp_path) == ["00000.npy", "00001.npy"]

    plain = BlockShard(local, BLOCK, 1, 2, 7, 3, prefetch=0)
    for i in range(2 * shard.batches_per_epoch):
        x, y = shard.batch(i)
        assert torch.equal(x, plain.batch(i)[0]) and torch.equal(y, plain.batch(i)[1])
    shard.close()
    assert len(downloaded(tmp_path)) == 5  # every shard once, however often it was read


def test_an_entry_without_manifest_is_named(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="half has no manifest.json"):
        PreparedData.open(str(tmp_path / "half"))
