"""Training throughput: lmforge (Ray Train, 1 worker) beside a bare PyTorch loop, in one run.

Both train the same transformers GPT-2 on the same packed tinyshakespeare blocks, in the
same order, with the same optimizer, schedule and thread count; the bare loop has no Ray,
no DDP wrapper, no MLflow and no checkpoints. tokens/s counts training steps only
(evaluation excluded) on both sides. Other rows: bf16 autocast and torch.compile on the
1-worker run, and 2 workers (1 thread each) with DDP and with FSDP2.

    .venv/bin/python bench/train.py                 # bare and lmforge, 2000 steps, 3 repeats
    .venv/bin/python bench/train.py --rows all --repeats 1   # every row once
    .venv/bin/python bench/train.py --steps 300 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.config import load
from lmforge.data import BlockShard, ValidationSet, prepare_data
from lmforge.model import build_model
from lmforge.train.step import evaluate, lr_at, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "jobs" / "bench" / "shakespeare_char.yaml"
REFERENCE_TOKENS_PER_S = 14_000  # ../shared/data/README.md, same config on 2 cores
REFERENCE_VAL_LOSS = 1.88


def bare_pytorch(steps: int, threads: int) -> dict[str, float]:
    """The baseline: one process, a plain loop over the same data and model."""
    spec = load(SPEC, [f"train.steps={steps}"])
    cfg = spec.train
    data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = build_model(spec.model, data.vocab_size, data.eos_id)
    optimizer = make_optimizer(model, cfg)
    shard = BlockShard(data, spec.model.block_size, 0, 1, cfg.seed,
                       cfg.micro_batch_size)
    val = ValidationSet(data, spec.model.block_size, 0, 1, cfg.micro_batch_size,
                        cfg.eval_batches)
    train_time = 0.0
    model.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = shard.batch(step)
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
    tokens = cfg.steps * cfg.micro_batch_size * spec.model.block_size
    return {"tokens_per_s": tokens / train_time, "val_loss": evaluate(model, val,
                                                                       torch.device("cpu"))}


def lmforge_train(steps: int, *overrides: str) -> dict[str, float]:
    """`lmforge train` as a user runs it; its summary is the last stdout line."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", str(SPEC), f"train.steps={steps}",
         f"train.eval_every={steps}", *overrides],
        cwd=ROOT, capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": summary["tokens_per_s"], "val_loss": summary["val_loss"],
            "wall_s": time.perf_counter() - start}


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# lmforge rows: `lmforge train jobs/bench/shakespeare_char.yaml` with these overrides.
VARIANTS = {
    "lmforge": ("train.workers=1",),
    "lmforge-bf16": ("train.workers=1", "train.precision=bf16"),
    "lmforge-compile": ("train.workers=1", "train.compile=true"),
    "ddp-x2": ("train.workers=2", "train.cpus_per_worker=1"),
    "fsdp-x2": ("train.workers=2", "train.cpus_per_worker=1", "train.strategy=fsdp"),
}
ROWS = ("bare", *VARIANTS)
LABELS = {"bare": "bare PyTorch loop, 1 process", "lmforge": "lmforge train, 1 worker",
          "lmforge-bf16": "lmforge, 1 worker, bf16",
          "lmforge-compile": "lmforge, 1 worker, compile",
          "ddp-x2": "lmforge, 2 workers, DDP", "fsdp-x2": "lmforge, 2 workers, FSDP"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default="bare,lmforge",
                        help=f"comma-separated, or 'all': {', '.join(ROWS)}")
    args = parser.parse_args()
    rows = ROWS if args.rows == "all" else tuple(args.rows.split(","))
    if unknown := set(rows) - set(ROWS):
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    threads = load(SPEC).train.threads

    runs: dict[str, list[dict[str, float]]] = {row: [] for row in rows}
    for i in range(args.repeats):  # interleaved, so drift in the machine hits every row
        for row in rows:
            runs[row].append(bare_pytorch(args.steps, threads) if row == "bare"
                             else lmforge_train(args.steps, *VARIANTS[row]))
        print(f"repeat {i + 1}: " + ", ".join(
            f"{row} {r[-1]['tokens_per_s']:,.0f} tok/s val_loss {r[-1]['val_loss']:.3f}"
            for row, r in runs.items()), flush=True)

    print(f"\n{args.steps} steps, median of {args.repeats}, {threads} threads per process "
          f"(2-worker rows: 1 thread per worker)")
    print(f"{'':32} {'tokens/s':>10} {'val_loss':>9} {'wall_s':>8}")
    for row, r in runs.items():
        wall = "" if row == "bare" else f"{median(r, 'wall_s'):8.1f}"
        print(f"{LABELS[row]:32} {median(r, 'tokens_per_s'):>10,.0f} "
              f"{median(r, 'val_loss'):>9.3f} {wall:>8}")
    if "lmforge" not in runs:
        return
    ours_tps = median(runs["lmforge"], "tokens_per_s")
    if "bare" in runs:
        print(f"\nlmforge / bare PyTorch tokens/s: "
              f"{ours_tps / median(runs['bare'], 'tokens_per_s'):.3f} (target >= 0.97)")
    print(f"lmforge / reference {REFERENCE_TOKENS_PER_S:,} tokens/s: "
          f"{ours_tps / REFERENCE_TOKENS_PER_S:.2f}x (target >= 1.0)")
    for row in ("lmforge-bf16", "lmforge-compile", "ddp-x2", "fsdp-x2"):
        if row in runs:
            print(f"{row} / lmforge 1 worker: "
                  f"{median(runs[row], 'tokens_per_s') / ours_tps:.2f}x")
    if args.steps == 2000:
        vl = median(runs["lmforge"], "val_loss")
        print(f"lmforge val_loss after 2000 steps: {vl:.3f} (target <= 1.89; reference "
              f"{REFERENCE_VAL_LOSS}) {'ok' if vl <= 1.89 and math.isfinite(vl) else 'MISSED'}")


if __name__ == "__main__":
    main()
