"""Runs whose checkpoints and search state live in an object store: a real S3-compatible
server (moto), reached through AWS_ENDPOINT_URL as any S3-compatible store would be."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs
import pytest

from lmforge.storage import resolve

from .helpers import SPEC, lmforge, own_cluster_env

pytestmark = pytest.mark.long  # train and a 2-trial search on S3: minutes (`make test-long`)


def _listing(uri: str) -> list[str]:
    where = resolve(uri, "test")
    infos = where.fs.get_file_info(pyarrow.fs.FileSelector(where.path, recursive=True,
                                                           allow_not_found=True))
    return [i.path.removeprefix(f"{where.path}/") for i in infos]


def test_train_and_tune_with_storage_on_s3(ray_cluster, s3_env, tmp_path: Path):
    """`lmforge train` and `lmforge tune` with train.storage_path and tune.storage_path on
    s3://: both finish and register their model, their checkpoints and Tune's state are in
    the bucket, and nothing lands in a local directory named after the URI (the `./s3:`
    directory the old code made). `ray_cluster`: the session's cluster runs beside the
    commands' own, as in the full suite."""
    bucket = s3_env.bucket()
    env = own_cluster_env(**s3_env.env)
    common = [f"data.cache_dir={tmp_path / 'cache'}", f"train.storage_path={bucket}/train",
              f"tune.storage_path={bucket}/tune", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
              "train.steps=20", "train.eval_every=10"]

    out = lmforge("train", str(SPEC), *common, "tracking.run_name=s3-train", cwd=tmp_path,
                  env=env, stall_s=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 20 and summary["registered_version"] == 1, summary
    train_files = _listing(f"{bucket}/train/s3-train")
    assert any(f.startswith("checkpoint_") and f.endswith("model.safetensors")
               for f in train_files), train_files

    # Two trials, beside a second Ray cluster on the machine (the session's): trial 1's
    # Train run ends when Tune stops its trial at max_t, and only Ray Train's placement-group
    # cleaner frees its CPUs for trial 2; it used to fail to tell the two clusters apart, and
    # trial 2 never got its workers (lmforge.cluster.private_cluster_options).
    out = lmforge("tune", str(SPEC), *common, "tracking.run_name=s3-search",
                  "tune.num_trials=2", cwd=tmp_path, env=env, stall_s=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 2 and summary["registered_version"] == 2, summary
    tune_files = _listing(f"{bucket}/tune/s3-search")
    assert "lmforge_run.json" in tune_files and "tuner.pkl" in tune_files, tune_files
    # The last intact copy of Tune's state, for a --resume after a kill mid-upload.
    assert ".lmforge-state/LATEST" in tune_files, tune_files
    assert any(f.startswith(".lmforge-state/") and "/experiment_state-" in f
               for f in tune_files), tune_files
    # Each trial's Train run checkpoints under train.storage_path, in the bucket too.
    assert any(f.startswith("s3-search-") for f in _listing(f"{bucket}/train")), \
        _listing(f"{bucket}/train")

    assert not [p for p in os.listdir(tmp_path) if p.startswith(("s3:", "lmf-"))]
