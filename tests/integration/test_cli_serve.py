"""`lmforge serve DIR serve.port=P` deploys a Hugging Face directory, answers HTTP, and
shuts down cleanly on Ctrl-C (SIGINT) or `kill` (SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import httpx
import pytest
import ray

from lmforge.config import ModelConfig, TokenizerConfig
from lmforge.data import build_tokenizer
from lmforge.model import build_model

from .helpers import ROOT, free_port


def save_tiny_model(path: Path) -> None:
    corpus = datasets.Dataset.from_dict({"text": ["to be or not to be, that is the question"]})
    tokenizer = build_tokenizer(TokenizerConfig(kind="char"), corpus)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64),
                        len(tokenizer), tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_command_answers_until_stopped(ray_cluster, tmp_path: Path, stop_signal):
    save_tiny_model(tmp_path / "model")
    port = free_port()
    # Join the session's cluster rather than start a second one beside it.
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", str(tmp_path / "model"), f"serve.port={port}",
         "serve.cpus_per_replica=0.5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # The command prints one JSON line once the deployment is ready.
        ready = next(json.loads(line) for line in proc.stdout if line.startswith("{"))
        assert ready["url"] == f"http://127.0.0.1:{port}"
        r = httpx.post(f"{ready['url']}/v1/completions",
                       json={"prompt": "to be", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "model"
    finally:
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=60) == 0
    # Serve was shut down: nothing listens on the port any more.
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        raise AssertionError(f"endpoint still up after {stop_signal.name}")
    except httpx.TransportError:
        pass
