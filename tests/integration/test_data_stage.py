"""The data stage on real Ray Data (the session's 2-CPU cluster), and `lmforge data` writing
its entry to a real S3-compatible server (moto's server mode), killed mid-way and rerun."""

from __future__ import annotations

import json
import os
import re

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

from ..ray_fixtures import S3Server
from .helpers import SPEC, lmforge, own_cluster_env

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
def s3(s3_server: S3Server) -> tuple[S3Server, str]:
    """The session's moto S3 server (a subprocess: lmforge and its Ray workers reach it
    through `server.env`) and a new bucket of this test's own (its name, no scheme)."""
    return s3_server, s3_server.bucket().removeprefix("s3://")


def s3_corpus(fs: pafs.S3FileSystem, bucket: str, docs: list[str], per_file: int = 10) -> None:
    for i in range(0, len(docs), per_file):
        with fs.open_output_stream(f"{bucket}/corpus/{i // per_file:03d}.txt") as out:
            out.write("\n\n".join(docs[i:i + per_file]).encode())


def s3_args(bucket: str) -> list[str]:
    """`lmforge data` on the corpus `s3_corpus` wrote, its entry under s3://BUCKET/cache."""
    return ["data", str(SPEC), f"data.path=s3://{bucket}/corpus/*.txt",
            "data.sample_by=paragraph", f"data.cache_dir=s3://{bucket}/cache",
            "data.block_bytes=40000", "tokenizer.kind=bpe",
            f"tokenizer.vocab_size={BPE.vocab_size}"]


def s3_manifest(fs: pafs.S3FileSystem, bucket: str,
                fingerprint: str) -> tuple[Manifest, list[str]]:
    """The entry's manifest, and the paths of the files it names that do not exist."""
    entry = f"{bucket}/cache/{fingerprint}"
    with fs.open_input_stream(f"{entry}/{MANIFEST}") as f:
        manifest = Manifest.from_json(f.read().decode())
    names = [f"{entry}/{s.file}" for s in manifest.train + manifest.validation]
    return manifest, [i.path for i in fs.get_file_info(names) if i.type != pafs.FileType.File]


def test_lmforge_data_reads_and_writes_s3(s3, tmp_path):
    """Corpus (a glob) and entry on s3://, packed by `lmforge data` on its own local Ray
    (the session's cluster was started without the S3 server's environment); a second run
    is a cache hit that starts nothing."""
    server, bucket = s3
    fs = server.fs()
    docs = corpus_docs(60)
    s3_corpus(fs, bucket, docs)
    run = lmforge(*s3_args(bucket), env=own_cluster_env(**server.env), timeout_s=600,
                  stall_s=180)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"fingerprint", "shards", "tokens", "tokens_per_s", "wall_s",
                            "cached"}
    assert summary["cached"] is False and summary["blocks"] > 1
    manifest, missing = s3_manifest(fs, bucket, summary["fingerprint"])
    assert not missing and summary["shards"] == len(manifest.train) + len(manifest.validation)
    assert summary["tokens"] == manifest.tokens("train") + manifest.tokens("validation")

    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        cached = stage.run_stage(DataConfig(path=f"s3://{bucket}/corpus/*.txt",
                                            sample_by="paragraph", block_bytes=40000,
                                            cache_dir=f"s3://{bucket}/cache"), BPE,
                                 run_blocks=lambda *a: pytest.fail("a whole entry was rebuilt"))
    assert cached.cached and cached.manifest == manifest
