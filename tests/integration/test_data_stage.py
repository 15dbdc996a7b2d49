"""The data stage on real Ray Data (the session's 2-CPU cluster), and `lmforge data` writing
its entry to a real S3-compatible server (moto's server mode), killed mid-way and rerun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data import stage
from lmforge.data.manifest import MANIFEST, Manifest
from lmforge.data.tokenizer import EOS

from .helpers import (
    BIN,
    ROOT,
    SPEC,
    free_port,
    kill_driver_when,
    lmforge,
    own_cluster_env,
    wait_until,
)

BPE = TokenizerConfig(kind="bpe", vocab_size=400)


def corpus_docs(n: int) -> list[str]:
    """`n` distinct documents of Python's bundled documentation text, without blank lines
    (so a .txt file of them read `sample_by: paragraph` gives them back)."""
    from pydoc_data.topics import topics

    texts = [re.sub(r"\n+", "\n", topics[k]).strip() for k in sorted(topics)]
    return [f"{i}: {texts[i % len(texts)]}" for i in range(n)]


def decoded_docs(result: stage.StageResult) -> tuple[list[str], list[str]]:
    tok = AutoTokenizer.from_pretrained(os.path.join(result.entry, "tokenizer"))
    out = []
    for split in ("train", "validation"):
        stream = np.concatenate([np.load(os.path.join(result.entry, s.file))
                                 for s in result.manifest.shards(split)])
        out.append(sorted(d for d in tok.decode(stream).split(EOS) if d))
    return out[0], out[1]


def test_txt_jsonl_and_parquet_on_ray_data(ray_cluster, tmp_path):
    """The three readers give the same documents, whole, each in one split chosen by its
    hash; blocks of work are packed in parallel; a second run reuses the entry."""
    docs = corpus_docs(120)
    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(0, len(docs), 10):  # 12 files of 10 paragraphs each
        (txt / f"{i:03d}.txt").write_text("\n\n".join(docs[i:i + 10]))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=30)
    expected_val = sorted(d for d in docs if stage.is_validation(stage.digest(d), 0.1))

    results = {}
    for name, kw in {"txt": dict(path=str(txt), sample_by="paragraph", block_bytes=40_000),
                     "jsonl": dict(path=str(tmp_path / "c.jsonl"), text_field="body"),
                     "parquet": dict(path=str(tmp_path / "c.parquet"), text_field="body")
                     }.items():
        data = DataConfig(cache_dir=str(tmp_path / "cache"), **kw)
        result = stage.run_stage(data, BPE)
        train, val = decoded_docs(result)
        assert sorted(train + val) == sorted(docs), name
        assert val == expected_val, name
        results[name] = result
    assert results["txt"].blocks > 4  # packed as several blocks of work
    assert len({r.fingerprint for r in results.values()}) == 3
    again = stage.run_stage(DataConfig(cache_dir=str(tmp_path / "cache"),
                                       path=str(tmp_path / "c.jsonl"), text_field="body"), BPE)
    assert again.cached and again.manifest == results["jsonl"].manifest


# --- S3 --------------------------------------------------------------------------------


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server on a free port with bucket `lmforge-data`; yields the environment
    that points pyarrow (and so lmforge and its Ray workers) at it."""
    port = free_port()
    log = (tmp_path / "moto.log").open("w")
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        import boto3
        import botocore.exceptions

        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                              aws_access_key_id="testing", aws_secret_access_key="testing",
                              region_name="us-east-1")

        def bucket_made() -> bool:
            try:
                client.create_bucket(Bucket="lmforge-data")
                return True
            except botocore.exceptions.EndpointConnectionError:
                return False

        wait_until(bucket_made, "moto server up", timeout_s=60, interval_s=0.1)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def s3fs(env: dict[str, str]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                             secret_key="testing", region="us-east-1")


def test_lmforge_data_on_s3_killed_then_rerun(s3, tmp_path):
    """Corpus and entry on s3://. A run killed (SIGKILL, its local Ray with it) after some
    blocks finished leaves no manifest; the rerun reuses those blocks and writes a manifest
    whose every shard exists; a third run is a cache hit. (The subprocesses start their own
    Ray: the session's cluster was started without the S3 server's environment.)"""
    fs = s3fs(s3)
    for i, doc in enumerate(corpus_docs(400)):  # ~1.6 MB in 40 files, ~100 KB blocks
        if i % 10 == 0:
            batch = []
        batch.append(doc)
        if i % 10 == 9:
            with fs.open_output_stream(f"lmforge-data/corpus/{i // 10:03d}.txt") as out:
                out.write("\n\n".join(batch).encode())
    env = own_cluster_env(**s3)
    args = ["data", str(SPEC), "data.path=s3://lmforge-data/corpus/*.txt",
            "data.sample_by=paragraph", "data.cache_dir=s3://lmforge-data/cache",
            "data.block_bytes=40000", "tokenizer.kind=bpe",
            f"tokenizer.vocab_size={BPE.vocab_size}"]

    def parts() -> list[str]:
        infos = fs.get_file_info(pafs.FileSelector("lmforge-data/cache", recursive=True,
                                                   allow_not_found=True))
        return [i.path for i in infos if i.type == pafs.FileType.File]

    kill_driver_when([sys.executable, "-m", "lmforge", *args],
                     lambda: any("/parts/" in p for p in parts()), "a first finished block",
                     cwd=ROOT, env=env, log=tmp_path / "killed.log")
    written = parts()
    assert not any(p.endswith(MANIFEST) for p in written), "a killed stage left a manifest"

    rerun = lmforge(*args, env=env, timeout_s=600, stall_s=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["cached"] is False and summary["reused_blocks"] >= 1
    assert summary["blocks"] > summary["reused_blocks"]
    entry = f"lmforge-data/cache/{summary['fingerprint']}"
    with fs.open_input_stream(f"{entry}/{MANIFEST}") as f:
        manifest = Manifest.from_json(f.read().decode())
    names = [f"{entry}/{s.file}" for s in manifest.train + manifest.validation]
    assert all(i.type == pafs.FileType.File for i in fs.get_file_info(names))
    assert summary["tokens"] == manifest.tokens("train") + manifest.tokens("validation")
    assert summary["shards"] == len(names) and set(summary) >= {
        "fingerprint", "shards", "tokens", "tokens_per_s", "wall_s", "cached"}

    # A third run finds the entry whole and builds nothing (no Ray needed: none is started).
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.items():
            mp.setenv(k, v)
        cached = stage.run_stage(DataConfig(path="s3://lmforge-data/corpus/*.txt",
                                            sample_by="paragraph", block_bytes=40000,
                                            cache_dir="s3://lmforge-data/cache"), BPE,
                                 run_blocks=lambda *a: pytest.fail("a whole entry was rebuilt"))
    assert cached.cached and cached.manifest == manifest
