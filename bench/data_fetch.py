"""Time to fetch one training micro-batch from a 10M-block stream: the workers' reader
(`lmforge.data.blocks.BlockShard`) against the reader it replaced, in one run.

    .venv/bin/python bench/data_fetch.py [--blocks 10000000] [--block-size 1024]

8 ranks, micro batch 16 (issue 14's setting). The stream is a sparse .npy file (holes read
as zeros from the page cache), so the figures are the reader's own cost, computing the
order and gathering the windows, not the disk's: cold reads are what prefetch hides.
Prints per-call medians over several runs, and the last line as JSON. Target: <= 1 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.data.blocks import BlockShard
from lmforge.data.manifest import Manifest, PreparedData, Shard, write_manifest

RANKS, MICRO_BATCH = 8, 16


class BaselineBlockShard:
    """BASELINE: the reader before issue 14 (data/blocks.py at 27e59d2), copied unchanged
    but for the stream passed in: every call draws a permutation of all N blocks."""

    def __init__(self, stream: np.ndarray, block_size: int, rank: int, world_size: int,
                 seed: int, batch_size: int) -> None:
        self.stream = stream
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        n_blocks = (len(self.stream) - 1) // block_size
        self.per_rank = n_blocks // world_size
        self.n_blocks = n_blocks
        self.batches_per_epoch = self.per_rank // batch_size

    def _order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return perm[self.rank :: self.world_size][: self.per_rank]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.batches_per_epoch)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        starts = idx * self.block_size
        rows = np.stack([self.stream[s : s + self.block_size + 1] for s in starts])
        t = torch.from_numpy(rows.astype(np.int64))
        return t[:, :-1], t[:, 1:]


def make_entry(directory: Path, n_blocks: int, block_size: int) -> PreparedData:
    """An entry whose one training shard is a sparse file of n_blocks blocks."""
    tokens = n_blocks * block_size + 1
    (directory / "train").mkdir(parents=True)
    (directory / "validation").mkdir()
    np.lib.format.open_memmap(directory / "train/00000.npy", mode="w+", dtype=np.uint16,
                              shape=(tokens,)).flush()  # never written: holes, no disk
    np.save(directory / "validation/00000.npy", np.zeros(block_size + 1, dtype=np.uint16))
    manifest = Manifest(fingerprint="bench", dtype="uint16", vocab_size=50304, eos_id=0,
                        train=(Shard("train/00000.npy", tokens),),
                        validation=(Shard("validation/00000.npy", block_size + 1),))
    write_manifest(str(directory), manifest)
    return PreparedData("bench", str(directory), manifest)


def per_call_ms(fetch, calls: int, step_s: float = 0.0) -> list[float]:
    """Milliseconds each fetch(i) took; step_s of simulated training work after each."""
    out = []
    for i in range(calls):
        t0 = time.perf_counter()
        fetch(i)
        out.append(1000 * (time.perf_counter() - t0))
        if step_s:
            time.sleep(step_s)  # stands for the model's step, during which prefetch runs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=10_000_000)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5, help="runs per reader (median of medians)")
    ap.add_argument("--baseline-calls", type=int, default=3)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--step-ms", type=float, default=39.0,
                    help="simulated step between prefetched fetches (GPT-2 small on an H200)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        data = make_entry(Path(tmp) / "entry", args.blocks, args.block_size)
        stream = np.load(data.local_path("train/00000.npy"), mmap_mode="r")
        results: dict[str, list[float]] = {"baseline": [], "read": [], "prefetched": []}
        for run in range(args.runs):
            rank = run % RANKS  # each run as a different one of the 8 ranks
            old = BaselineBlockShard(stream, args.block_size, rank, RANKS, run, MICRO_BATCH)
            results["baseline"].append(statistics.median(
                per_call_ms(old.batch, args.baseline_calls)))
            new = BlockShard(data, args.block_size, rank, RANKS, run, MICRO_BATCH, prefetch=0)
            results["read"].append(statistics.median(per_call_ms(new.batch, args.calls)))
            ahead = BlockShard(data, args.block_size, rank, RANKS, run, MICRO_BATCH)
            # The first call has nothing prefetched yet (a step right after start or resume).
            results["prefetched"].append(statistics.median(
                per_call_ms(ahead.batch, args.calls, args.step_ms / 1000)[1:]))
            ahead.close()

    figures = {k: statistics.median(v) for k, v in results.items()}
    print(f"{args.blocks:,} blocks of {args.block_size} tokens, {RANKS} ranks, micro batch "
          f"{MICRO_BATCH}; median over {args.runs} runs of the per-call median")
    print(f"  baseline (whole-corpus permutation per call): {figures['baseline']:10.3f} ms")
    print(f"  lmforge BlockShard, read now (no prefetch):   {figures['read']:10.3f} ms")
    print(f"  lmforge BlockShard, prefetched ({args.step_ms:g} ms step): "
          f"{figures['prefetched']:8.3f} ms")
    print(f"  speed-up (baseline / read now): {figures['baseline'] / figures['read']:,.0f}x; "
          f"target <= 1 ms: {'met' if figures['prefetched'] <= 1 else 'MISSED'}")
    print(json.dumps({"blocks": args.blocks, "block_size": args.block_size, "ranks": RANKS,
                      "micro_batch": MICRO_BATCH, "runs": args.runs,
                      "baseline_ms": figures["baseline"], "read_ms": figures["read"],
                      "prefetched_ms": figures["prefetched"]}))


if __name__ == "__main__":
    main()
