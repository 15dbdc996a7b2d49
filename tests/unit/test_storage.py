"""Storage paths: local, network-mounted or object-store, resolved by one function; multi-host
runs need shared ones, for every path field."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest

from lmforge import storage
from lmforge.config import SpecError, load
from lmforge.runs import NamedRun, require_shared_storage
from lmforge.storage import StorageError, check_shared, filesystem, is_shared, resolve


def test_local_directory_resolves_to_an_absolute_path(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, inner = filesystem("runs/ray")
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and inner == str(tmp_path / "runs" / "ray")
    assert filesystem(f"file://{tmp_path}/x")[1] == str(tmp_path / "x")
    local = resolve("runs/cache", "data.cache_dir")
    assert local.uri == str(tmp_path / "runs" / "cache") and local.is_local
    assert local.ray_storage() == {"storage_path": local.uri, "storage_filesystem": None}
    assert local.join("ab", "c/").uri == str(tmp_path / "runs" / "cache" / "ab" / "c")


def test_object_store_uri_is_kept_verbatim_and_opened_through_pyarrow(monkeypatch):
    # No network until the filesystem is used: resolving a URI is pure.
    s3 = resolve("s3://bucket/lmforge/runs", "tune.storage_path")
    assert s3.uri == "s3://bucket/lmforge/runs" and not s3.is_local and s3.is_shared
    assert s3.join("search-1").uri == "s3://bucket/lmforge/runs/search-1"
    # mock:// is pyarrow's in-memory filesystem: the same code path as gs:// or abfs://.
    mock = resolve("mock:///bucket/lmforge", "train.storage_path")
    assert isinstance(mock.fs, pyarrow.fs.FileSystem) and mock.path == "bucket/lmforge"
    child = mock.join("run-1")
    assert child.fs is mock.fs and child.path == "bucket/lmforge/run-1"
    assert child.ray_storage() == {"storage_path": "bucket/lmforge/run-1",
                                   "storage_filesystem": mock.fs}


def test_s3_endpoint_comes_from_the_standard_environment(monkeypatch):
    # pyarrow ignores AWS_ENDPOINT_URL; boto3 and the AWS CLI honour it, and so do we.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    s3 = resolve("s3://bucket/x/", "train.storage_path")
    assert isinstance(s3.fs, pyarrow.fs.S3FileSystem) and s3.path == "bucket/x"
    assert s3.fs.__reduce__()[1][0]["endpoint_override"] == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")  # boto3's order
    assert resolve("s3://b/x", "f").fs.__reduce__()[1][0]["endpoint_override"] == \
        "http://127.0.0.1:10"


def test_bad_uris_name_the_field():
    with pytest.raises(StorageError, match=r"train\.storage_path: unknown scheme 'nosuch'"):
        resolve("nosuch://x", "train.storage_path")
    with pytest.raises(StorageError, match=r"data\.cache_dir: 's3:///x' names no bucket"):
        resolve("s3:///x", "data.cache_dir")


def test_spec_keeps_uris_and_makes_local_paths_absolute(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load(None, ["tune.storage_path=s3://bkt/tune", "data.cache_dir=gs://bkt/cache",
                       "train.storage_path=ckpt"])
    assert spec.tune.storage_path == "s3://bkt/tune"
    assert spec.data.cache_dir == "gs://bkt/cache"
    assert spec.train.storage_path == str(tmp_path / "ckpt")
    search = NamedRun.of(spec, search=True, name="s1")
    assert search.path == "s3://bkt/tune/s1" and search.storage.field == "tune.storage_path"
    assert os.listdir(tmp_path) == []  # nothing like ./s3:/bkt was made


def test_spec_with_an_unknown_scheme_names_file_and_field(tmp_path: Path):
    spec = tmp_path / "job.yaml"
    spec.write_text("train:\n  storage_path: s4://bkt/x\n")
    with pytest.raises(SpecError, match=rf"{spec}: train\.storage_path: unknown scheme 's4'"):
        load(spec)


def test_single_host_cluster_may_use_a_local_directory(tmp_path: Path):
    # Two raylets on one machine (as `lmforge cluster up` starts) share its disk.
    check_shared([resolve(str(tmp_path), "train.storage_path")], ["10.0.0.5", "10.0.0.5"])


def test_multi_host_cluster_with_local_paths_fails_naming_each_field(tmp_path: Path):
    with pytest.raises(StorageError) as e:
        check_shared([resolve(str(tmp_path / "c"), "data.cache_dir"),
                      resolve("s3://bkt/ckpt", "train.storage_path"),
                      resolve(str(tmp_path / "t"), "tune.storage_path")],
                     ["10.0.0.5", "10.0.0.6"])
    msg = str(e.value)
    assert "spans 2 hosts (10.0.0.5, 10.0.0.6)" in msg and "s3://" in msg
    assert f"data.cache_dir={tmp_path / 'c'} is a local directory" in msg
    assert f"tune.storage_path={tmp_path / 't'} is a local directory" in msg
    assert "train.storage_path=" not in msg  # the object store is fine


def test_multi_host_cluster_accepts_uris_and_network_mounts(tmp_path: Path, monkeypatch):
    hosts = ["10.0.0.5", "10.0.0.6"]
    check_shared([resolve("s3://bucket/lmforge", "train.storage_path")], hosts)
    nfs = SimpleNamespace(mountpoint=str(tmp_path), fstype="nfs4")
    root = SimpleNamespace(mountpoint="/", fstype="ext4")
    monkeypatch.setattr(storage.psutil, "disk_partitions", lambda all: [root, nfs])
    assert is_shared(str(tmp_path / "ckpt")) and not is_shared("/var/tmp")
    check_shared([resolve(str(tmp_path / "ckpt"), "train.storage_path")], hosts)
    monkeypatch.setattr(storage.psutil, "disk_partitions",
                        lambda all: [root, SimpleNamespace(mountpoint=str(tmp_path),
                                                           fstype="fuse.gcsfuse")])
    assert is_shared(str(tmp_path))


@pytest.mark.parametrize("search", [False, True])
def test_run_paths_are_checked_together_before_workers_start(tmp_path: Path, monkeypatch,
                                                             search: bool):
    import ray

    spec = load(None, [f"data.cache_dir={tmp_path}/cache", "train.storage_path=s3://b/x",
                       f"tune.storage_path={tmp_path}/tune"])
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(storage, "cluster_hosts", lambda: ["10.0.0.5", "10.0.0.6"])
    with pytest.raises(StorageError) as e:
        require_shared_storage(spec, search)
    assert "data.cache_dir=" in str(e.value)
    assert ("tune.storage_path=" in str(e.value)) == search
    monkeypatch.setattr(storage, "cluster_hosts", lambda: ["10.0.0.5"])
    require_shared_storage(spec, search)


def test_s3_paths_read_and_write_through_a_real_s3_server(s3_env):
    bucket = s3_env.bucket()
    run = NamedRun("run-1", f"{bucket}/ray")
    assert not run.exists()
    d = run.storage
    d.fs.create_dir(d.path)
    with d.fs.open_output_stream(f"{d.path}/result.json") as f:
        f.write(b"{}")
    assert run.exists()
    fresh = resolve(f"{bucket}/ray/run-1/result.json", "train.storage_path")
    with fresh.fs.open_input_stream(fresh.path) as f:
        assert f.read() == b"{}"
