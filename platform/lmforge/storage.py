"""Every path field of a spec, resolved once: `data.cache_dir`, `train.storage_path`,
`tune.storage_path`.

A storage path is one of
- a local directory (`runs/ray`, made absolute by `config.load`): fine on one machine;
- a directory on a network filesystem mounted at the same path on every node (NFS, CIFS,
  Lustre, a FUSE mount such as gcsfuse or s3fs): shared, so usable by a multi-node run;
- an object-store URI (`s3://bucket/prefix`, `gs://bucket/prefix`, `abfs://...`): kept
  verbatim, and opened through pyarrow's filesystems, as Ray Train does itself with
  `RunConfig(storage_path=..., storage_filesystem=...)`.

`resolve(path, field)` is the one place that tells them apart; everything that reads or
writes one of these fields goes through its `StoragePath` (never `Path(...).resolve()` on
the raw value, which turns `s3://b/x` into a local directory `./s3:/b/x`).

Endpoints and credentials come from the standard environment: the AWS SDK's chain for keys
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...) and, for S3-compatible stores
(MinIO, Ceph, moto), AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, which boto3 and the AWS CLI
honour but pyarrow does not read by itself; GOOGLE_APPLICATION_CREDENTIALS for gs://.

A multi-node run must write where every node can read: a restarted worker on another node
resumes from the latest checkpoint, and every worker reads the data cache. `require_shared`
fails at once, before any worker starts, when the cluster spans several hosts (node IPs)
and a path is a local directory. Nodes that share one host (and so one filesystem), like
the raylets of `lmforge cluster up`, are fine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pyarrow
import pyarrow.fs

# Filesystem types that are the same directory tree on every machine that mounts them.
_SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs",
              "beegfs", "fuse.", "9p", "efs", "weka")
# URI schemes pyarrow opens (mock:// is its in-memory filesystem, for tests).
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "mock")


class StorageError(ValueError):
    """A storage path cannot serve the run (named by its spec field)."""


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@dataclass(frozen=True)
class StoragePath:
    """A path field's value, resolved: where it is, and the filesystem to reach it."""

    uri: str
    """An absolute local path, or the object-store URI exactly as the spec wrote it."""
    field: str
    """The spec field it came from (`train.storage_path`), named by every error about it."""

    @property
    def is_local(self) -> bool:
        """A directory of this machine's filesystem (maybe a network mount)."""
        return not is_uri(self.uri)

    @property
    def is_shared(self) -> bool:
        """Whether every node sees the same files here: an object store, or a local path
        on a network filesystem."""
        return not self.is_local or _on_shared_mount(self.uri)

    @cached_property
    def _opened(self) -> tuple[pyarrow.fs.FileSystem, str]:
        if self.is_local:
            return pyarrow.fs.LocalFileSystem(), self.uri
        return _open_uri(self.uri, self.field)

    @property
    def fs(self) -> pyarrow.fs.FileSystem:
        """The pyarrow filesystem (opened on first use: for s3:// that may ask the network
        for the bucket's region)."""
        return self._opened[0]

    @property
    def path(self) -> str:
        """The path inside `fs` (`bucket/prefix` for `s3://bucket/prefix`)."""
        return self._opened[1]

    def join(self, *parts: str) -> StoragePath:
        """A path under this one, in the same filesystem (`fs` is reused, not reopened)."""
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        joined = StoragePath(f"{self.uri.rstrip('/')}/{tail}" if tail else self.uri, self.field)
        if "_opened" in self.__dict__:
            fs, inner = self._opened
            joined.__dict__["_opened"] = (fs, f"{inner.rstrip('/')}/{tail}" if tail else inner)
        return joined

    def ray_storage(self) -> dict[str, Any]:
        """`storage_path` and `storage_filesystem` for Ray Train's and Tune's RunConfig
        (and `Tuner.restore`): a local path as is, a URI as the opened filesystem and the
        path inside it, so the endpoint and credentials resolved here are the ones Ray
        uses on every node (Ray's own `from_uri` would not see AWS_ENDPOINT_URL)."""
        if self.is_local:
            return {"storage_path": self.uri, "storage_filesystem": None}
        return {"storage_path": self.path, "storage_filesystem": self.fs}

    def __str__(self) -> str:
        return self.uri


def resolve(path: str, field: str) -> StoragePath:
    """The one way to read a path field. A local path (or `file://...`) becomes absolute
    against the current directory; a URI is kept verbatim. A scheme pyarrow cannot open is
    a StorageError naming the field, raised here (no network is touched until `fs`)."""
    if not isinstance(path, str) or not path.strip():
        raise StorageError(f"{field}: empty path; give a directory or an object-store URI")
    if not is_uri(path):
        return StoragePath(str(Path(path.removeprefix("file://")).expanduser().resolve()),
                           field)
    scheme = path.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise StorageError(
            f"{field}: unknown scheme {scheme!r} in {path!r}; use a local directory, a shared "
            "mount, or an object-store URI (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, abfs://...)")
    if not urlsplit(path).netloc and scheme != "mock":
        raise StorageError(f"{field}: {path!r} names no bucket; write {scheme}://BUCKET/PREFIX")
    return StoragePath(path, field)


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint the environment names, as boto3 reads it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# The AWS SDK's default request timeout (3 s without a byte) fails a listing of a busy
# bucket on a loaded node, and Ray then fails the run; a slow store should be waited for.
S3_TIMEOUTS = {"connect_timeout": 10.0, "request_timeout": 60.0}


def _open_uri(uri: str, field: str) -> tuple[pyarrow.fs.FileSystem, str]:
    try:
        if uri.lower().startswith("s3://") and "?" not in uri:
            # pyarrow ignores AWS_ENDPOINT_URL; a custom endpoint has no region to look up
            # (from_uri would ask AWS for the bucket's).
            inner = uri[len("s3://"):].rstrip("/")
            endpoint = s3_endpoint()
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if not endpoint:
                region = pyarrow.fs.resolve_s3_region(inner.split("/", 1)[0])
            options: dict[str, Any] = {"endpoint_override": endpoint} if endpoint else {}
            if region:
                options["region"] = region
            return pyarrow.fs.S3FileSystem(**options, **S3_TIMEOUTS), inner
        # Other schemes, and s3:// URIs carrying pyarrow's own options (?endpoint_override=).
        fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as e:
        raise StorageError(f"{field}: pyarrow cannot open {uri!r}: {e}") from None
    return fs, inner.rstrip("/")


def filesystem(path: str, field: str = "storage_path") -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of `resolve(path, field)`."""
    resolved = resolve(path, field)
    return resolved.fs, resolved.path


def local_copy(path: str, field: str = "data.cache_dir") -> str:
    """A local path holding `path` (a file or a directory): `path` itself when it is local,
    else a copy in the read-through cache, downloaded once and reused by every process on
    the host. For files that are never rewritten under the same name (data cache entries,
    named by their fingerprint). The cache is `LMFORGE_REMOTE_CACHE`, else
    ~/.cache/lmforge/remote."""
    if not is_uri(path):
        return path.removeprefix("file://")
    root = Path(os.environ.get("LMFORGE_REMOTE_CACHE", "~/.cache/lmforge/remote")).expanduser()
    key = hashlib.sha256(path.encode()).hexdigest()[:24]
    local = root / key / Path(path.rstrip("/")).name
    if local.exists():
        return str(local)
    fs, inner = filesystem(path, field)
    local.parent.mkdir(parents=True, exist_ok=True)
    # Download next to the final name and rename: a reader sees a whole copy or none, and
    # two processes fetching at once both end with one.
    tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=".part-"))
    try:
        dest = tmp / local.name
        if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
            dest.mkdir()
        pyarrow.fs.copy_files(inner, str(dest), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        try:
            dest.rename(local)
        except OSError:  # another process finished first; its copy is the same
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(local)


def mount_fstype(path: str) -> str:
    """The filesystem type of the mount that holds `path` (its deepest existing parent)."""
    p = Path(path).expanduser().resolve()
    best, fstype = "", ""
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        if (p == Path(mp) or Path(mp) in p.parents) and len(mp) > len(best):
            best, fstype = mp, part.fstype
    return fstype


def _on_shared_mount(path: str) -> bool:
    fstype = mount_fstype(path).lower()
    return any(fstype == t or (t.endswith(".") and fstype.startswith(t)) for t in _SHARED_FS)


def is_shared(path: str) -> bool:
    """Whether every node can see the same files at `path`: an object-store URI, or a
    directory on a network filesystem."""
    return resolve(path, "path").is_shared


def check_shared(paths: Iterable[StoragePath], node_ips: Iterable[str]) -> None:
    """Raise StorageError naming every local-only path when `node_ips` are several hosts."""
    hosts = sorted(set(node_ips))
    if len(hosts) <= 1:
        return
    local = [p for p in paths if not p.is_shared]
    if not local:
        return
    why = {"data.cache_dir": "each worker would look for the data on its own disk",
           "train.storage_path": "each node would keep its checkpoints on its own disk, and "
                                 "a worker restarted on another node could not resume",
           "tune.storage_path": "each node would keep its trials' state on its own disk, and "
                                "a resumed search could not find it"}
    lines = [f"{p.field}={p.uri} is a local directory ({mount_fstype(p.uri) or 'unknown'} "
             f"filesystem): {why.get(p.field, 'other nodes cannot read it')}" for p in local]
    raise StorageError(
        f"the cluster spans {len(hosts)} hosts ({', '.join(hosts)}), and " + "; ".join(lines)
        + ". Use a directory every node mounts (NFS) or an object-store URI such as "
        f"s3://BUCKET/lmforge for {', '.join(p.field for p in local)}.")


def cluster_hosts() -> list[str]:
    """IPs of the alive nodes of the Ray cluster this process is connected to."""
    import ray

    return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]


def require_shared(*paths: StoragePath) -> None:
    """check_shared against the connected Ray cluster (a no-op when Ray is not started):
    call it before any worker starts."""
    import ray

    if ray.is_initialized():
        check_shared(paths, cluster_hosts())
