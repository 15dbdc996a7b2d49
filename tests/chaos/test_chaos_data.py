"""The data stage killed mid-way: `lmforge data` writing to a real S3-compatible server
(moto's server mode) is SIGKILLed with its local Ray after some blocks finished, then rerun.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from lmforge.data.manifest import MANIFEST
from tests.integration.helpers import (
    ROOT,
    kill_driver_when,
    lmforge,
    moto_s3,
    own_cluster_env,
    s3fs,
)
from tests.integration.test_data_stage import S3_ARGS, corpus_docs, s3_corpus, s3_manifest


@pytest.fixture
def s3(tmp_path: Path):
    yield from moto_s3(tmp_path)


def test_data_stage_killed_then_rerun_on_s3(s3, tmp_path, chaos_scale, chaos_result):
    """A killed stage leaves no manifest; the rerun reuses the finished blocks and writes a
    manifest whose every shard exists."""
    fs = s3fs(s3)
    s3_corpus(fs, corpus_docs(int(400 * chaos_scale)))  # ~1.6 MB in 40 files: 40 blocks
    env = own_cluster_env(**s3)

    def written() -> list[str]:
        infos = fs.get_file_info(pafs.FileSelector("lmforge-data/cache", recursive=True,
                                                   allow_not_found=True))
        return [i.path for i in infos if i.type == pafs.FileType.File]

    kill_driver_when([sys.executable, "-m", "lmforge", *S3_ARGS],
                     lambda: any("/parts/" in p for p in written()), "a first finished block",
                     cwd=ROOT, env=env, log=tmp_path / "killed.log")
    after_kill = written()
    rerun = lmforge(*S3_ARGS, env=env, timeout_s=600, stall_s=180)
    summary = json.loads(rerun.stdout.strip().splitlines()[-1]) if rerun.returncode == 0 else {}
    manifest, missing = s3_manifest(fs, summary["fingerprint"]) if summary else (None, ["?"])
    chaos_result("data stage SIGKILLed mid-way, entry on S3",
                 load=f"{summary.get('blocks', '?')} blocks of input to s3://",
                 faults="SIGKILL of the driver and its local Ray after a first block",
                 lost=f"{len(missing)} shards missing from the manifest",
                 reused_blocks=summary.get("reused_blocks", 0),
                 blocks=summary.get("blocks", 0))
    assert not any(p.endswith(MANIFEST) for p in after_kill), "a killed stage left a manifest"
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert summary["cached"] is False and 1 <= summary["reused_blocks"] < summary["blocks"]
    assert not missing
    assert summary["tokens"] == manifest.tokens("train") + manifest.tokens("validation")
