"""LoRA against full fine-tuning, side by side, in one run: the same base model, data,
steps, batch and thread count; only `train.method` (and the learning rate that suits it)
differ.

    .venv/bin/python bench/finetune.py                      # pretrain a base, then both
    .venv/bin/python bench/finetune.py --base DIR --steps 150

1. The base: a 4-layer GPT-2 (width 256, byte-level BPE vocabulary 2048, context 128)
   pretrained on Python's bundled documentation for `--pretrain-steps` steps, unless
   `--base DIR` names a Hugging Face directory (model and tokenizer).
2. The data: lmforge's offline pydoc Q&A set as chat records (`lmforge data-examples
   pydoc-qa --format chat`), rendered with lmforge's default chat template and packed;
   training loss and held-out loss on the assistant's tokens only (labels -100 elsewhere).
3. Full and LoRA fine-tuning of that base, each `--steps` steps in its own process.

Both sides run the code every Ray Train worker runs (`train_step`, `evaluate`,
`Parallel`, `make_optimizer`, the LR schedule, `BlockShard`/`ValidationSet`, and for LoRA
`apply_lora`) in one process with `--threads` threads, without Ray around it: the figures
are the method's, not the cluster's, and the bench needs no Ray cluster. The data stage
runs in-process too.

Reported per method: trainable parameters, median step time, peak RSS of the process
(ru_maxrss: model, optimizer state, activations and the Python/torch runtime), and the
held-out assistant-token loss before training, at the end and at its best. Targets: LoRA's
trainable parameters <= 2 % of full's; LoRA's held-out loss within 5 % of full's at equal
steps. It also prints the LoRA fraction at the same rank on GPT-2 124M and a 1B Llama
shape (parameters counted on the meta device; nothing is trained). One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

BLOCK = 128
BASE: dict[str, Any] = {
    "tokenizer": {"kind": "bpe", "vocab_size": 2048},
    "model": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": BLOCK},
    "train": {"workers": 1, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 20,
              "eval_batches": 8, "weight_decay": 0.1},
}


def in_process(source: Any, data: Any, job: Any) -> list[dict[str, Any]]:
    """The data stage's blocks packed here instead of on Ray Data: pydoc text, or .jsonl
    records with their file's path (as Ray Data's reader adds it)."""
    import pyarrow as pa
    import pyarrow.json as pa_json

    from lmforge.data import stage

    if source.kind == "pydoc":
        tables = [pa.table({"text": stage._pydoc_texts()})]
    else:
        tables = []
        for f in source.files:
            t = pa_json.read_json(f.path)
            tables.append(t.append_column("path", [[f.path] * len(t)]))
    return [json.loads(stage.pack_block(t, job).column("part")[0].as_py()) for t in tables]


def load_spec(tree: dict[str, Any], work: Path) -> Any:
    from lmforge.config import JobSpec

    tree = json.loads(json.dumps(tree))
    tree.setdefault("data", {})["cache_dir"] = str(work / "cache")
    return JobSpec.model_validate(tree)


def train(spec: Any, data: Any, steps: int, threads: int, eval_every: int,
          out: Path | None = None) -> dict[str, Any]:
    """`steps` optimizer steps of one rank, as a Ray Train worker runs them."""
    import torch

    from lmforge.data import BlockShard, ValidationSet
    from lmforge.model import build_model
    from lmforge.train.lora import apply_lora, is_lora, trainable_parameters
    from lmforge.train.parallel import Parallel
    from lmforge.train.step import evaluate, lr_at, make_optimizer, train_step

    torch.set_num_threads(threads)
    cfg = spec.train
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(spec.model, data.vocab_size, data.eos_id)
    if is_lora(cfg):
        model = apply_lora(model, cfg, spec.model.pretrained)
    par = Parallel(cfg, device)
    model = par.wrap(model)
    optimizer = make_optimizer(model, cfg, device)
    shard = BlockShard(data, BLOCK, 0, 1, cfg.seed, cfg.micro_batch_size)
    val = ValidationSet(data, BLOCK, 0, 1, cfg.micro_batch_size, cfg.eval_batches)
    curve = [(0, evaluate(model, val, device, par))]
    step_s = []
    for step in range(steps):
        t0 = time.perf_counter()
        batches = (shard.batch(step * cfg.grad_accum + m) for m in range(cfg.grad_accum))
        loss, _ = train_step(model, par, optimizer, batches, lr_at(step, cfg))
        loss.item()  # the step is done
        step_s.append(time.perf_counter() - t0)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate(model, val, device, par)))
    if out is not None:
        model.save_pretrained(out)
    total = sum(p.numel() for p in model.parameters())
    return {"method": cfg.method, "lr": cfg.lr, "trainable_parameters":
            trainable_parameters(model), "parameters": total,
            "step_ms": round(1000 * statistics.median(step_s[2:]), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "val_loss_before": round(curve[0][1], 4), "val_loss": round(curve[-1][1], 4),
            "best_val_loss": round(min(v for _, v in curve[1:]), 4), "curve": curve}


def pretrain(work: Path, steps: int, threads: int) -> str:
    from lmforge.data import prepare_data

    spec = load_spec(BASE | {"train": BASE["train"] | {"steps": steps,
                                                       "warmup_steps": min(20, steps // 2)}},
                     work)
    data = prepare_data(spec.data, spec.tokenizer, BLOCK, run_blocks=in_process)
    out = work / "base"
    shutil.rmtree(out, ignore_errors=True)
    result = train(spec, data, steps, threads, eval_every=max(1, steps // 4), out=out)
    shutil.copytree(data.tokenizer_dir, out, dirs_exist_ok=True)
    print(f"[bench] base: {steps} steps, held-out loss {result['val_loss']:.3f} -> {out}",
          flush=True)
    return str(out)


def finetune_spec(base: str, chats: Path, method: str, steps: int, lr: float, rank: int,
                  work: Path) -> Any:
    return load_spec({
        "data": {"path": str(chats), "format": "chat", "val_fraction": 0.1},
        "tokenizer": {"kind": "pretrained", "path": base},
        "model": {"pretrained": base, "block_size": BLOCK},
        "train": BASE["train"] | {"method": method, "lr": lr, "steps": steps,
                                  "warmup_steps": min(10, steps // 2), "weight_decay": 0.0,
                                  "lora": {"r": rank, "alpha": 2 * rank}},
    }, work)


def run_one(args: argparse.Namespace) -> None:
    """One side, in this (fresh) process: its peak RSS is its own."""
    from lmforge.data import prepare_data

    spec = finetune_spec(args.base, args.chats, args.method, args.steps, args.lr, args.rank,
                         args.work)
    data = prepare_data(spec.data, spec.tokenizer, BLOCK, run_blocks=in_process)
    print(json.dumps(train(spec, data, args.steps, args.threads,
                           eval_every=max(1, args.steps // 5))))


def side(args: argparse.Namespace, base: str, chats: Path, method: str, lr: float
         ) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", method, "--base", base, "--chats", str(chats),
           "--steps", str(args.steps), "--lr", str(lr), "--rank", str(args.rank),
           "--threads", str(args.threads), "--work", str(args.work)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def lora_fraction_at_scale(rank: int) -> dict[str, float]:
    """Trainable % with lmforge's default targets on real model shapes (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from lmforge.config import TrainConfig
    from lmforge.train.lora import apply_lora

    shapes = {"gpt2-124M": GPT2Config(),
              "llama-1B": LlamaConfig(hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=16, num_attention_heads=32,
                                      num_key_value_heads=8, vocab_size=128256)}
    out = {}
    for name, config in shapes.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        lora = apply_lora(model, TrainConfig(method="lora", lora={"r": rank, "alpha": 2 * rank}),
                          name)
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        out[name] = round(100 * trainable / total, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-finetune")
    p.add_argument("--base", help="a Hugging Face directory to fine-tune (default: pretrain)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--full-lr", type=float, default=5e-4)
    p.add_argument("--lora-lr", type=float, default=5e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one side
    p.add_argument("--chats", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.method = args.one
        return run_one(args)

    from lmforge.data.examples import pydoc_qa, write_jsonl

    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = args.base or pretrain(args.work, args.pretrain_steps, args.threads)
    chats = args.work / "pydoc_qa_chat.jsonl"
    write_jsonl(pydoc_qa(fmt="chat"), chats)
    full = side(args, base, chats, "full", args.full_lr)
    lora = side(args, base, chats, "lora", args.lora_lr)
    fraction = lora["trainable_parameters"] / full["trainable_parameters"]
    loss_ratio = lora["val_loss"] / full["val_loss"]
    print(f"\n{'':22}{'full (baseline)':>17}{'LoRA r=' + str(args.rank) + ' (ours)':>18}")
    for key in ("lr", "trainable_parameters", "step_ms", "peak_rss_mb", "val_loss_before",
                "val_loss", "best_val_loss"):
        print(f"{key:22}{full[key]:>17}{lora[key]:>18}")
    print(f"LoRA trainable / full: {fraction:.2%} (target <= 2%: "
          f"{'met' if fraction <= 0.02 else 'missed'})")
    print(f"LoRA / full held-out assistant-token loss after {args.steps} steps: "
          f"{loss_ratio:.3f} (target <= 1.05: {'met' if loss_ratio <= 1.05 else 'missed'})")
    scale = lora_fraction_at_scale(args.rank)
    print(f"LoRA r={args.rank} trainable % of the model at scale: {scale}")
    print(json.dumps({"bench": "finetune", "steps": args.steps, "base": base,
                      "threads": args.threads, "full": full, "lora": lora,
                      "trainable_fraction": round(fraction, 5),
                      "loss_ratio": round(loss_ratio, 4), "fraction_at_scale_pct": scale,
                      "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
