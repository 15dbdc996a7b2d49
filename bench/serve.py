"""Serving: closed-loop HTTP load on the deployed quickstart-sized model, in one run.

The model is the quickstart's (jobs/quickstart.yaml: 2-layer GPT-2, n_embd 96, its
1,024-token BPE tokenizer trained on Python's docs; weights random, which does not change
the cost of decoding) saved as a Hugging Face directory and deployed the way
`lmforge serve DIR` does. Nothing is downloaded. Each request asks for 32 new tokens
(sampled at temperature 0.8, ignoring end-of-text so every request makes all 32).

Prints, per concurrency 1, 8 and 32: p50/p99 latency, requests/s, tokens/s; then
- serve overhead: p50 at concurrency 1 over HTTP / p50 of the same `decode_stream` called
  in-process on one thread (the replica's thread count), target <= 1.10x; beside it the
  p50 of `GET /healthz`, a request through the same proxy and replica with no model work
  (Serve's own floor on this machine), and the overhead left once that is taken off;
- batching: requests/s at concurrency 32 with max_batch_size=32 / with max_batch_size=1
  (target >= 3x), and its p50 / p50 at concurrency 1 (target <= 1.5x);
- time to first token at concurrency 8, streaming;
- the decode loop alone (serve/engine.py in-process, no HTTP): p50 at 32 concurrent
  requests / at 1, the batching target without the HTTP stack;
- CPU milliseconds per request at concurrency 32 by process (HTTP proxy, replica, this
  load generator), which is where the HTTP figures' time goes on a small machine.

    .venv/bin/python bench/serve.py                  # about 2 minutes
    .venv/bin/python bench/serve.py --requests 64    # more requests per level
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import ray
import torch
from ray import serve
from transformers import AutoTokenizer

from lmforge.config import load
from lmforge.data import prepare_data
from lmforge.model import build_model
from lmforge.registry import load_model
from lmforge.serve import build_app, deploy
from lmforge.serve.engine import Engine, Stream
from lmforge.serve.generate import GenerationParams, generate_batch

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 32
PROMPT = "The "
BODY = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0.8}


def quickstart_model(out: Path) -> Path:
    """The quickstart's model shape and tokenizer, saved as a HF directory (safetensors)."""
    spec = load(ROOT / "jobs" / "quickstart.yaml")
    data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
    torch.manual_seed(0)
    model = build_model(spec.model, data.vocab_size, data.eos_id)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(data.tokenizer_dir).save_pretrained(out)
    return out


def no_eos(model_dir: Path):  # noqa: ANN201, ARG001
    """Loader for the benchmark: the real loader, with end-of-text never sampled, so every
    request decodes exactly NEW_TOKENS tokens and runs are comparable."""
    def loader(uri: str):  # noqa: ANN202
        loaded = load_model(uri)
        return type(loaded)(_NoEos(loaded.model, loaded.tokenizer.eos_token_id),
                            loaded.tokenizer, loaded.name)
    return loader


class _NoEos(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, eos: int) -> None:
        super().__init__()
        self.inner, self.eos, self.config = inner, eos, inner.config

    def forward(self, **kwargs):  # noqa: ANN003, ANN201
        out = self.inner(**kwargs)
        out.logits[..., self.eos] = float("-inf")
        return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def closed_loop(url: str, concurrency: int, total: int) -> dict[str, float]:
    """`concurrency` clients, each sending its next request when the last one returns."""
    latencies: list[float] = []
    tokens = 0
    remaining = total

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal remaining, tokens
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            r = await http.post("/v1/completions", json=BODY)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(latencies),
            "p50_s": statistics.median(latencies), "p99_s": pct(latencies, 0.99),
            "req_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall}


async def noop_p50(url: str, total: int) -> float:
    """p50 of `GET /healthz` (no model work) one at a time: what any request through Serve's
    HTTP proxy and a replica costs on this machine before the model runs."""
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for _ in range(total + 10):
            start = time.perf_counter()
            (await http.get("/healthz")).raise_for_status()
            latencies.append(time.perf_counter() - start)
    return statistics.median(latencies[10:])


async def ttft(url: str, concurrency: int, total: int) -> dict[str, float]:
    """Time to the first streamed text chunk, `concurrency` streaming clients."""
    firsts: list[float] = []
    remaining = total

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start, first = time.perf_counter(), None
            async with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        if json.loads(line[6:])["choices"][0]["text"]:
                            first = time.perf_counter() - start
            firsts.append(first)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return {"concurrency": concurrency, "ttft_p50_s": statistics.median(firsts),
            "ttft_p99_s": pct(firsts, 0.99)}


def in_process_request(model_dir: Path):  # noqa: ANN201
    """The served model, loaded in this process on one thread (the replica's count), and
    the benchmark's request as GenerationParams."""
    torch.set_num_threads(1)
    loaded = no_eos(model_dir)(str(model_dir))
    ids = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    return loaded, GenerationParams(prompt_ids=ids, max_tokens=NEW_TOKENS, temperature=0.8)


def in_process_p50(model_dir: Path, runs: int) -> float:
    """The same model and decode loop called directly: one request, one thread."""
    loaded, params = in_process_request(model_dir)
    times = []
    for _ in range(runs + 3):
        start = time.perf_counter()
        out = generate_batch(loaded.model, loaded.tokenizer, [params])[0]
        times.append(time.perf_counter() - start)
        assert len(out.token_ids) == NEW_TOKENS
    return statistics.median(times[3:])


def engine_p50(model_dir: Path, concurrency: int, total: int) -> float:
    """p50 latency of `concurrency` closed-loop requests through the decode loop alone."""
    loaded, params = in_process_request(model_dir)
    latencies: list[float] = []
    remaining = total

    async def client(engine: Engine) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start, stream = time.perf_counter(), Stream(loaded, params, live=False)
            engine.submit([stream])
            async for _ in stream:
                pass
            latencies.append(time.perf_counter() - start)

    async def run() -> None:
        engine = Engine(max_rows=32)
        await asyncio.gather(*(client(engine) for _ in range(concurrency)))
        engine.close()

    asyncio.run(run())
    return statistics.median(latencies[concurrency:])  # after the first round


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of Serve's proxy, the replicas and this process."""
    out: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        name = ("proxy" if "ProxyActor" in cmd else "replica" if "ServeReplica" in cmd
                else "load generator" if proc.pid == psutil.Process().pid else None)
        if name:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                out[name] = out.get(name, 0.0) + times.user + times.system
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per level")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args()

    if not args.port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    model_dir = quickstart_model(Path(tempfile.mkdtemp(prefix="lmforge-bench-")) / "model")
    base = load(ROOT / "jobs" / "quickstart.yaml").serve
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve_cfg = base.model_copy(update={
        "port": args.port, "cpus_per_replica": 1.0, "max_batch_size": 32,
        "max_ongoing_requests": 64, "max_queued_requests": -1, "max_tokens_limit": 64})
    results: dict = {"levels": []}
    try:
        url = deploy(build_app(no_eos(model_dir), serve_cfg, str(model_dir)), serve_cfg,
                     name="bench")
        asyncio.run(closed_loop(url, 4, 16))  # warm up
        results["noop_p50_s"] = asyncio.run(noop_p50(url, 200))
        print(f"GET /healthz (no model work) p50: {results['noop_p50_s'] * 1e3:.1f} ms", flush=True)
        for c in (1, 8, 32):
            before = cpu_seconds()
            level = asyncio.run(closed_loop(url, c, max(args.requests, 2 * c)))
            level["cpu_ms_per_request"] = {
                k: round((v - before.get(k, 0.0)) * 1e3 / level["requests"], 2)
                for k, v in cpu_seconds().items()}
            results["levels"].append(level)
            print(f"c={c:>2}: p50 {level['p50_s'] * 1e3:7.1f} ms  p99 {level['p99_s'] * 1e3:7.1f}"
                  f" ms  {level['req_per_s']:6.1f} req/s  {level['tokens_per_s']:7.0f} tok/s",
                  flush=True)
        results["ttft"] = asyncio.run(ttft(url, 8, max(args.requests, 16)))
        print(f"TTFT c=8 streaming: p50 {results['ttft']['ttft_p50_s'] * 1e3:.1f} ms  "
              f"p99 {results['ttft']['ttft_p99_s'] * 1e3:.1f} ms", flush=True)

        unbatched = serve_cfg.model_copy(update={"max_batch_size": 1})
        url = deploy(build_app(no_eos(model_dir), unbatched, str(model_dir)), unbatched,
                     name="bench")
        asyncio.run(closed_loop(url, 4, 8))
        results["c32_batch1"] = asyncio.run(closed_loop(url, 32, max(args.requests, 64)))
    finally:
        serve.shutdown()
        ray.shutdown()
    results["in_process_p50_s"] = in_process_p50(model_dir, max(args.requests, 30))
    results["engine_p50_s"] = {c: engine_p50(model_dir, c, max(args.requests, 4 * c))
                               for c in (1, 32)}

    c1, c32, b1 = results["levels"][0], results["levels"][2], results["c32_batch1"]
    overhead = c1["p50_s"] / results["in_process_p50_s"]
    speedup = c32["req_per_s"] / b1["req_per_s"]
    p50_ratio = c32["p50_s"] / c1["p50_s"]
    print(f"serve overhead (c=1 HTTP p50 / in-process p50): {c1['p50_s'] * 1e3:.1f} / "
          f"{results['in_process_p50_s'] * 1e3:.1f} ms = {overhead:.2f}x (target <= 1.10x)")
    beyond = (c1["p50_s"] - results["noop_p50_s"]) / results["in_process_p50_s"]
    print(f"  of which Serve's HTTP path with no model work (GET /healthz p50): "
          f"{results['noop_p50_s'] * 1e3:.1f} ms; c=1 p50 less that / in-process p50: "
          f"{beyond:.2f}x")
    print(f"batching (c=32 req/s, max_batch_size 32 / 1): {c32['req_per_s']:.1f} / "
          f"{b1['req_per_s']:.1f} = {speedup:.2f}x (target >= 3x); c=32 p50 / c=1 p50 = "
          f"{p50_ratio:.2f}x (target <= 1.5x)")
    engine = results["engine_p50_s"]
    engine_ratio = engine[32] / engine[1]
    print(f"decode loop alone, c=32 p50 / c=1 p50: {engine[32] * 1e3:.1f} / "
          f"{engine[1] * 1e3:.1f} ms = {engine_ratio:.2f}x")
    print(f"CPU ms per request at c=32: {c32['cpu_ms_per_request']}")
    results |= {"overhead_x": overhead, "overhead_beyond_noop_x": beyond,
                "batching_x": speedup, "c32_over_c1_p50_x": p50_ratio,
                "engine_c32_over_c1_p50_x": engine_ratio}
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
