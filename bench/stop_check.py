"""The preemption check's cost on the step loop: 2 gloo ranks (no Ray) run a synthetic
step (matmuls and a 60k-float all-reduce, ~10 ms on a 2-core machine), with and without
`StopCheck.should_stop()` at every boundary, interleaved, and print the median ms per step
of each beside the other.

    .venv/bin/python bench/stop_check.py [--steps 300] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.train.preempt import StopCheck


def _rank(rank: int, store: str, steps: int, rounds: int, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    a, grads = torch.randn(256, 256), torch.randn(60_000)
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(rounds):
        for name in times:
            check = StopCheck(threading.Event()) if name == "with" else None
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                for _ in range(12):
                    a @ a
                dist.all_reduce(grads)  # what DDP does once a step
                if check is not None:
                    check.should_stop()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
            if check is not None:
                check.close()
    out[rank] = times
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(tempfile.mktemp(), args.steps, args.rounds, out), nprocs=2)
        times = out[0]
    base, ours = statistics.median(times["without"]), statistics.median(times["with"])
    print(f"ms per step, median of {args.rounds} rounds x {args.steps} steps: "
          f"without the check {base:.2f}, with it {ours:.2f} ({ours / base:.3f}x); "
          f"rounds without {[round(t, 2) for t in times['without']]}, "
          f"with {[round(t, 2) for t in times['with']]}")


if __name__ == "__main__":
    main()
