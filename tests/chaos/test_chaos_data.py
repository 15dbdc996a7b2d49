"""The data stage killed mid-way: `lmforge data` writing to a real S3-compatible server
(moto's server mode) is SIGKILLed with its local Ray after some blocks finished, then rerun.
"""

from __future__ import annotations

import json
import sys

import pyarrow.fs as pafs

from lmforge.data.manifest import MANIFEST
from tests.integration.helpers import ROOT, kill_driver_when, lmforge, own_cluster_env
from tests.integration.test_data_stage import corpus_docs, s3_args, s3_corpus, s3_manifest


def test_data_stage_killed_then_rerun_on_s3(s3_server, tmp_path, chaos_scale, chaos_result):
    """A killed stage leaves no manifest; the rerun reuses the finished blocks and writes a
    manifest whose every shard exists."""
    server, bucket = s3_server, s3_server.bucket().removeprefix("s3://")
    fs = server.fs()
    s3_corpus(fs, bucket, corpus_docs(int(400 * chaos_scale)))  # ~1.6 MB, 40 files: 40 blocks
    env = own_cluster_env(**server.env)
    args = s3_args(bucket)

    def written() -> list[str]:
        infos = fs.get_file_info(pafs.FileSelector(f"{bucket}/cache", recursive=True,
                                                   allow_not_found=True))
        return [i.path for i in infos if i.type == pafs.FileType.File]

    kill_driver_when([sys.executable, "-m", "lmforge", *args],
                     lambda: any("/parts/" in p for p in written()), "a first finished block",
                     cwd=ROOT, env=env, log=tmp_path / "killed.log")
    after_kill = written()
    rerun = lmforge(*args, env=env, timeout_s=600, stall_s=180)
    summary = json.loads(rerun.stdout.strip().splitlines()[-1]) if rerun.returncode == 0 else {}
    manifest, missing = (s3_manifest(fs, bucket, summary["fingerprint"]) if summary
                         else (None, ["?"]))
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
