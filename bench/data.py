"""The data stage's throughput and memory, beside the training it feeds, in one run.

Corpus: real text that needs no network, the .py/.pyi/.rst/.md/.txt files of the installed
packages (site-packages), deduplicated by content, one JSON line per file, in files of
~4 MB under /tmp/lmforge-bench-data (built once, never committed): half A (100 MB) and
half B (100 MB). The stage runs on A, then on A + B (200 MB), each on a fresh local Ray
(all CPUs) and a fresh cache, with the default settings (byte-level BPE, vocab 2048,
trained on a 64 MB sample; 32 MB blocks).

Figures:
- data tokens/s: tokens written / the stage's wall time (listing, tokenizer training,
  Ray Data's reading, tokenizing, packing, writing, the manifest; Ray's own start-up
  excluded), against the reference training run's tokens/s (`jobs/bench/shakespeare_char.yaml`,
  1 worker, measured here with `lmforge train`): target >= 20x;
- peak RSS of the driver (this process) and of the largest Ray worker (psutil, every
  0.1 s, over the Ray worker processes under this driver): target <= 1.5 GB each, and flat
  as the corpus doubles.

    .venv/bin/python bench/data.py                        # 100 and 200 MB, training 300 steps
    .venv/bin/python bench/data.py --sizes 100 --train-steps 0   # a quicker look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data.stage import run_stage

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SPEC = ROOT / "jobs" / "bench" / "shakespeare_char.yaml"
CORPUS = Path("/tmp/lmforge-bench-data")
SUFFIXES = (".py", ".pyi", ".rst", ".md", ".txt")
FILE_BYTES = 4 * 2**20
GB = 2**30


def build_corpus(half_mb: int = 100) -> Path:
    """CORPUS/a and CORPUS/b, `half_mb` MB each of distinct package source and docs."""
    done = CORPUS / f"done-{half_mb}"
    if done.exists():
        return CORPUS
    shutil.rmtree(CORPUS, ignore_errors=True)
    seen: set[bytes] = set()
    halves = [CORPUS / "a", CORPUS / "b"]
    for h in halves:
        h.mkdir(parents=True)
    half, part, written, out = 0, 0, 0, None
    roots = sorted({Path(p) for p in site.getsitepackages()})
    for path in sorted(p for r in roots for p in r.rglob("*") if p.suffix in SUFFIXES):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if not text.strip() or key in seen or len(text) > 2**21:
            continue
        seen.add(key)
        if out is None or out.tell() >= FILE_BYTES:
            if out is not None:
                out.close()
            if written >= half_mb * 2**20:
                half, part, written = half + 1, 0, 0
                if half == len(halves):
                    out = None
                    break
            out = (halves[half] / f"part-{part:04d}.jsonl").open("w", encoding="utf-8")
            part += 1
        line = json.dumps({"text": text}) + "\n"
        out.write(line)
        written += len(line.encode())
    if out is not None:
        out.close()
    if half < len(halves):  # the packages ran out before both halves were full
        have = sum(f.stat().st_size for f in CORPUS.rglob("*.jsonl")) / 2**20
        raise SystemExit(f"only {have:.0f} MB of distinct text in {roots}; need "
                         f"{2 * half_mb} MB")
    done.write_text("")
    return CORPUS


class PeakRSS:
    """Peak resident memory of this process and of each Ray worker process under it,
    sampled every 0.1 s on a thread."""

    def __init__(self) -> None:
        self.driver = 0
        self.workers: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in me.children(recursive=True):
                try:
                    if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::"):
                        self.workers[p.pid] = max(self.workers.get(p.pid, 0),
                                                  p.memory_info().rss)
                except psutil.Error:  # exited while we looked
                    pass
            self._stop.wait(0.1)


def stage_run(path: Path) -> dict[str, float]:
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    cache = tempfile.mkdtemp(prefix="lmforge-bench-cache-")
    try:
        mb = sum(f.stat().st_size for f in path.rglob("*.jsonl")) / 2**20
        with PeakRSS() as peak:
            result = run_stage(DataConfig(path=str(path), cache_dir=cache),
                               TokenizerConfig(kind="bpe", vocab_size=2048))
        s = result.summary()
        return {"corpus_mb": round(mb), "tokens": s["tokens"], "shards": s["shards"],
                "blocks": s["blocks"], "wall_s": s["wall_s"],
                "tokenizer_s": s.get("tokenizer_s", 0.0), "pack_s": s.get("pack_s", 0.0),
                "tokens_per_s": s["tokens_per_s"],
                "driver_peak_gb": round(peak.driver / GB, 3),
                "worker_peak_gb": round(max(peak.workers.values(), default=0) / GB, 3),
                "workers": len(peak.workers)}
    finally:
        ray.shutdown()
        shutil.rmtree(cache, ignore_errors=True)


def training_tokens_per_s(steps: int) -> float:
    """`lmforge train` on the reference spec with 1 worker, as bench/train.py runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", str(TRAIN_SPEC), "train.workers=1",
         f"train.steps={steps}", f"train.eval_every={steps}"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,200",
                        help="corpus sizes in MB, from 100 (half A) and 200 (A + B)")
    parser.add_argument("--train-steps", type=int, default=300,
                        help="steps of the reference training run (0: skip it)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    corpus = build_corpus()
    print(f"corpus ready under {corpus} in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        path = corpus / "a" if size <= 100 else corpus
        rows.append(stage_run(path))
        print(json.dumps(rows[-1]), flush=True)
    train = training_tokens_per_s(args.train_steps) if args.train_steps else None

    print(f"\n{'corpus MB':>9} {'tokens':>12} {'wall s':>7} {'tok s':>6} {'pack s':>7} "
          f"{'tokens/s':>10} {'driver GB':>9} {'worker GB':>9}")
    for r in rows:
        print(f"{r['corpus_mb']:>9} {r['tokens']:>12,} {r['wall_s']:>7.1f} "
              f"{r['tokenizer_s']:>6.1f} {r['pack_s']:>7.1f} {r['tokens_per_s']:>10,} "
              f"{r['driver_peak_gb']:>9.2f} {r['worker_peak_gb']:>9.2f}")
    result: dict[str, object] = {"rows": rows}
    if train:
        ratio = min(r["tokens_per_s"] for r in rows) / train
        print(f"\ntraining (shakespeare_char, 1 worker): {train:,.0f} tokens/s; data / "
              f"training: {ratio:.1f}x (target >= 20x: {'met' if ratio >= 20 else 'missed'})")
        result |= {"training_tokens_per_s": round(train), "data_over_training": round(ratio, 1)}
    worst = max(max(r["driver_peak_gb"], r["worker_peak_gb"]) for r in rows)
    print(f"peak RSS: {worst:.2f} GB at most (target <= 1.5 GB: "
          f"{'met' if worst <= 1.5 else 'missed'})")
    if len(rows) > 1:
        growth = {k: rows[-1][k] / max(rows[0][k], 1e-9)
                  for k in ("driver_peak_gb", "worker_peak_gb")}
        print(f"as the corpus grows {rows[-1]['corpus_mb'] / rows[0]['corpus_mb']:.1f}x: driver "
              f"peak x{growth['driver_peak_gb']:.2f}, worker peak x{growth['worker_peak_gb']:.2f}")
        result["peak_growth"] = {k: round(v, 2) for k, v in growth.items()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    main()
