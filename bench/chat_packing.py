"""Packing instruction data (`data.packing`): rows, padding and the time of one training
epoch, packed beside unpacked (one example per row, padded), measured in one run.

    .venv/bin/python bench/chat_packing.py                       # pydoc-qa, block 256
    .venv/bin/python bench/chat_packing.py --block-size 128 --max-chars 200

The set is `lmforge data-examples pydoc-qa` (chat records, nothing downloaded); both
entries come from the data stage's own code (`stage.run_stage`) with a BPE tokenizer,
each file packed in this process rather than on Ray Data (what is measured is the packing,
not Ray). The epoch runs `train_step` (the training loop's step, no Ray) over every
training row, micro batch 8, on a 2-layer GPT-2, so the two differ only in how many rows
(and padded positions) the same examples take. It also prints the held-out loss per
assistant token of the same (untrained) model on both entries: they must agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import DataConfig, ModelConfig, TokenizerConfig, TrainConfig
from lmforge.data import stage
from lmforge.data.blocks import BlockShard, ValidationSet
from lmforge.data.examples import pydoc_qa, write_jsonl
from lmforge.model import build_model
from lmforge.train.parallel import Parallel
from lmforge.train.step import evaluate, make_optimizer, train_step

MICRO_BATCH = 8


def measure(records: Path, cache: Path, packing: bool, block: int) -> dict[str, float]:
    data_cfg = DataConfig(path=str(records), format="chat", packing=packing,
                          cache_dir=str(cache))
    result = stage.run_stage(data_cfg, TokenizerConfig(kind="bpe", vocab_size=2048),
                             run_blocks=stage.local_blocks, block_size=block, log=lambda m: None)
    data = stage.PreparedData(result.fingerprint, result.entry, result.manifest)
    m = result.manifest
    rows = sum(s.rows for s in m.train)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_embd=128, n_head=4, block_size=block),
                        data.vocab_size, data.eos_id)
    cfg = TrainConfig(workers=1, steps=10**6, micro_batch_size=MICRO_BATCH, warmup_steps=0)
    par = Parallel(cfg, torch.device("cpu"))
    val = evaluate(model.eval(), ValidationSet(data, block, 0, 1, 64, 100),
                   torch.device("cpu"))
    model.train()
    optimizer = make_optimizer(model, cfg)
    shard = BlockShard(data, block, 0, 1, seed=0, batch_size=MICRO_BATCH, prefetch=0)
    steps = rows // MICRO_BATCH
    start = time.perf_counter()
    for i in range(steps):
        train_step(model, par, optimizer, [shard.read(i)], cfg.lr)
    epoch_s = time.perf_counter() - start
    return {"examples": m.stats["examples"], "train_rows": rows,
            "fill": m.tokens("train") / (rows * (block + 1)),
            "loss_tokens": m.stats["loss_tokens"], "steps": steps, "epoch_s": epoch_s,
            "val_loss_untrained": val}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--max-chars", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp, "qa.jsonl")
        write_jsonl(pydoc_qa(max_chars=args.max_chars, fmt="chat"), records)
        figures = {name: measure(records, Path(tmp, name), packing, args.block_size)
                   for name, packing in (("unpacked", False), ("packed", True))}
    print(f"pydoc-qa chat records, block {args.block_size}, micro batch {MICRO_BATCH}, "
          "2-layer GPT-2, 1 thread")
    keys = list(figures["packed"])
    print(f"{'':>20}" + "".join(f"{k:>16}" for k in figures))
    for k in keys:
        print(f"{k:>20}" + "".join(f"{figures[n][k]:>16.3f}" if isinstance(figures[n][k], float)
                                   else f"{figures[n][k]:>16}" for n in figures))
    speedup = figures["unpacked"]["epoch_s"] / figures["packed"]["epoch_s"]
    print(f"packed epoch {speedup:.2f}x faster than unpacked; untrained held-out loss "
          f"{figures['packed']['val_loss_untrained']:.4f} packed vs "
          f"{figures['unpacked']['val_loss_untrained']:.4f} unpacked (must agree)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
