"""Storage paths: local, network-mounted or object-store; multi-host runs need shared ones."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest

from lmforge import storage
from lmforge.storage import StorageError, check_shared, filesystem, is_shared


def test_local_directory_resolves_to_an_absolute_path(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, inner = filesystem("runs/ray")
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and inner == str(tmp_path / "runs" / "ray")
    assert filesystem(f"file://{tmp_path}/x")[1] == str(tmp_path / "x")


def test_object_store_uri_goes_through_pyarrow(tmp_path: Path):
    # mock:// is pyarrow's in-memory filesystem: the same code path as s3:// or gs://.
    fs, inner = filesystem("mock:///bucket/lmforge", "train.storage_path")
    assert isinstance(fs, pyarrow.fs.FileSystem) and inner == "bucket/lmforge"


def test_unknown_scheme_names_the_field():
    with pytest.raises(StorageError, match=r"train\.storage_path: pyarrow cannot open "
                                           r"'nosuch://x'"):
        filesystem("nosuch://x", "train.storage_path")


def test_single_host_cluster_may_use_a_local_directory(tmp_path: Path):
    # Two raylets on one machine (as `lmforge cluster up` starts) share its disk.
    check_shared(str(tmp_path), "train.storage_path", ["10.0.0.5", "10.0.0.5"])


def test_multi_host_cluster_with_local_storage_fails_saying_why(tmp_path: Path):
    with pytest.raises(StorageError) as e:
        check_shared(str(tmp_path), "tune.storage_path", ["10.0.0.5", "10.0.0.6"])
    msg = str(e.value)
    assert f"tune.storage_path={tmp_path} is a local directory" in msg
    assert "spans 2 hosts (10.0.0.5, 10.0.0.6)" in msg and "s3://" in msg


def test_multi_host_cluster_accepts_uris_and_network_mounts(tmp_path: Path, monkeypatch):
    check_shared("s3://bucket/lmforge", "train.storage_path", ["10.0.0.5", "10.0.0.6"])
    nfs = SimpleNamespace(mountpoint=str(tmp_path), fstype="nfs4")
    root = SimpleNamespace(mountpoint="/", fstype="ext4")
    monkeypatch.setattr(storage.psutil, "disk_partitions", lambda all: [root, nfs])
    assert is_shared(str(tmp_path / "ckpt")) and not is_shared("/var/tmp")
    check_shared(str(tmp_path / "ckpt"), "train.storage_path", ["10.0.0.5", "10.0.0.6"])
    monkeypatch.setattr(storage.psutil, "disk_partitions",
                        lambda all: [root, SimpleNamespace(mountpoint=str(tmp_path),
                                                           fstype="fuse.gcsfuse")])
    assert is_shared(str(tmp_path))
