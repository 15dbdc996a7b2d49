"""GPT-2 124M on one GPU: tokens/s and MFU of lmforge's training step, beside a bare loop.

    python bench/train_gpu.py                 # every row, one subprocess each
    python bench/train_gpu.py --rows lmforge-compile,bare-compile --steps 60

The lmforge rows run `lmforge.train.step.train_step` with `Parallel` (the code every Ray
Train worker runs, without Ray around it: the GPU machine this was measured on has no
Ray), at `train.precision: bf16`, block 1024, fused AdamW, SDPA attention:

- `lmforge-compile`: `train.compile: true` (the configuration to quote; target 400k
  tokens/s on one H100): the model and the loss compile into one graph
- `lmforge-eager`: the same without `torch.compile`
- `lmforge-fsdp`: FSDP2 (`fully_shard` per block, bf16 mixed-precision policy) in a
  1-rank NCCL group, compiled: checks the sharded path on a GPU and what it costs
- `bare-compile`: the baseline, a plain loop (HF model, autocast, fused AdamW,
  `model.compile()`, the loss outside the compiled model), no lmforge code

Inputs are uniform random token ids over GPT-2's vocabulary padded to 50,304 (a multiple
of 64): throughput does not depend on the text, and that machine has no corpus. Tokens/s
counts the steps after `--warmup` (compilation and allocator warm-up excluded), timed
between two CUDA synchronisations. MFU = 6N + attention FLOPs per token (`flops_per_token`)
x tokens/s / the GPU's dense bf16 peak (`GPU_PEAK_FLOPS`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmforge.config import ModelConfig, TrainConfig  # noqa: E402
from lmforge.model import build_model, count_parameters, flops_per_token  # noqa: E402
from lmforge.train.parallel import Parallel  # noqa: E402
from lmforge.train.step import (  # noqa: E402
    lr_at,
    make_optimizer,
    peak_flops,
    peak_memory_mb,
    train_step,
)

ROWS = ("lmforge-compile", "bare-compile", "lmforge-eager", "lmforge-fsdp")
VOCAB = 50_304  # GPT-2's 50,257 padded to a multiple of 64 for the tensor cores
TARGET_TOKENS_PER_S = 400_000  # the target on one H100
GPT2_SMALL = ModelConfig(arch="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024,
                         dropout=0.0)


def run_row(row: str, steps: int, warmup: int, micro_batch: int, model_cfg: ModelConfig,
            device: torch.device) -> dict[str, float | str]:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    strategy = "fsdp" if row == "lmforge-fsdp" else "ddp"
    if strategy == "fsdp":  # fully_shard needs a process group, even of one rank
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             init_method=f"tcp://127.0.0.1:{_port()}",
                                             rank=0, world_size=1)
    cfg = TrainConfig(workers=1, use_gpu=True, strategy=strategy, precision="bf16",
                      compile=row != "lmforge-eager", micro_batch_size=micro_batch,
                      steps=steps, warmup_steps=min(warmup, steps - 1), lr=6e-4)
    torch.manual_seed(0)
    model = build_model(model_cfg, VOCAB, eos_id=0)
    n_params = count_parameters(model)
    flops = flops_per_token(model, model_cfg.block_size)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(VOCAB, (micro_batch, model_cfg.block_size + 1), generator=gen)
               for _ in range(8)]
    if cuda:
        batches = [b.pin_memory() for b in batches]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    if row == "bare-compile":
        step_fn = _bare_step(model.to(device), device, cfg)
    else:
        par = Parallel(cfg, device)
        model = par.wrap(model)
        optimizer = make_optimizer(model, cfg, device)

        def step_fn(step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return train_step(model, par, optimizer, [(x, y)], lr_at(step, cfg))[0]

    for step in range(steps):
        if step == warmup:
            sync()
            start = time.perf_counter()
        block = batches[step % len(batches)]
        loss = step_fn(step, block[:, :-1], block[:, 1:])
    sync()
    seconds = time.perf_counter() - start
    tokens_per_s = (steps - warmup) * micro_batch * model_cfg.block_size / seconds
    peak = peak_flops(cfg, device)
    return {"row": row, "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
            "parameters": n_params,
            "tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / (steps - warmup),
            "mfu": flops * tokens_per_s / peak if peak else float("nan"),
            "peak_memory_mb": peak_memory_mb(device), "final_loss": float(loss)}


def _bare_step(model: torch.nn.Module, device: torch.device, cfg: TrainConfig):
    """The baseline loop a PyTorch user would write, with no lmforge code in it."""
    torch.set_float32_matmul_precision("high")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay, fused=True)
    model.compile()

    def step_fn(step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step_fn


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated, of " +
                        ", ".join(ROWS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15,
                        help="untimed first steps (compilation, allocator)")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer, block-128 model on the CPU: checks this script runs")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one row, in this process
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.row:
        model_cfg, device = GPT2_SMALL, torch.device("cuda", 0)
        if args.smoke:
            model_cfg = GPT2_SMALL.model_copy(update={"n_layer": 2, "n_head": 2, "n_embd": 64,
                                                      "block_size": 128})
            device = torch.device("cpu")
        print(json.dumps(run_row(args.row, args.steps, args.warmup, args.micro_batch,
                                 model_cfg, device)))
        return
    if not (torch.cuda.is_available() or args.smoke):
        sys.exit("bench/train_gpu.py needs a CUDA GPU (--smoke checks it on the CPU)")

    results = []
    for row in args.rows.split(","):
        # One process per row: each compiles from scratch and has its own memory peak.
        out = subprocess.run([sys.executable, __file__, "--row", row, "--steps",
                              str(args.steps), "--warmup", str(args.warmup),
                              "--micro-batch", str(args.micro_batch)]
                             + ["--smoke"] * args.smoke,
                             capture_output=True, text=True, env=os.environ)
        if out.returncode:
            print(f"{row}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)

    if not results:
        sys.exit(1)
    print(f"\nGPT-2 {results[0]['parameters'] / 1e6:.0f}M, bf16, micro batch "
          f"{args.micro_batch}, {results[0]['gpu']}, {args.steps - args.warmup} timed steps")
    print(f"{'row':<18}{'tokens/s':>12}{'step ms':>10}{'MFU':>8}{'peak MiB':>10}")
    for r in results:
        print(f"{r['row']:<18}{r['tokens_per_s']:>12,.0f}{r['step_ms']:>10.1f}"
              f"{r['mfu']:>8.1%}{r['peak_memory_mb']:>10,.0f}")
    by_row = {r["row"]: r for r in results}
    if "lmforge-compile" in by_row:
        ours = by_row["lmforge-compile"]["tokens_per_s"]
        print(f"lmforge-compile / target {TARGET_TOKENS_PER_S:,}: "
              f"{ours / TARGET_TOKENS_PER_S:.2f}x")
        if "bare-compile" in by_row:
            print(f"lmforge-compile / bare-compile: "
                  f"{ours / by_row['bare-compile']['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
