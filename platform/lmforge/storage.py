"""Where Ray Train and Tune persist checkpoints: `train.storage_path` / `tune.storage_path`.

A storage path is one of
- a local directory (`runs/ray`, made absolute by `config.load`): fine on one machine;
- a directory on a network filesystem mounted at the same path on every node (NFS, CIFS,
  Lustre, a FUSE mount such as gcsfuse or s3fs): shared, so usable by a multi-node run;
- an object-store URI (`s3://bucket/prefix`, `gs://bucket/prefix`, `abfs://...`,
  `hdfs://...`): resolved through pyarrow's filesystems, as Ray Train does itself with
  `RunConfig(storage_path=..., storage_filesystem=...)`.

A multi-node run must write its checkpoints where every node can read them: a restarted
worker on another node resumes from the latest one. `require_shared` fails at once, before
any worker starts, when the cluster spans several hosts (node IPs) and the storage is a
local directory. Nodes that share one host (and so one filesystem), like the raylets of
`lmforge cluster up`, are fine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import psutil
import pyarrow
import pyarrow.fs

# Filesystem types that are the same directory tree on every machine that mounts them.
_SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs",
              "beegfs", "fuse.", "9p", "efs", "weka")


class StorageError(ValueError):
    """A storage path cannot serve the run (named by its spec field)."""


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str, field: str = "storage_path") -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local directory or an object-store URI,
    the pair Ray Train's RunConfig takes as storage_filesystem and storage_path. Endpoints
    and credentials come from the standard environment (AWS_ENDPOINT_URL, AWS_* keys,
    GOOGLE_APPLICATION_CREDENTIALS). A URI pyarrow cannot open (unknown scheme, missing
    credentials library) is a StorageError naming the field."""
    if not is_uri(path):
        local = Path(path.removeprefix("file://")).expanduser().resolve()
        return pyarrow.fs.LocalFileSystem(), str(local)
    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as e:
        raise StorageError(f"{field}: pyarrow cannot open {path!r}: {e}") from None
    return fs, inner


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


def is_shared(path: str) -> bool:
    """Whether every node can see the same files at `path`: an object-store URI, or a
    directory on a network filesystem."""
    if is_uri(path):
        return True
    fstype = mount_fstype(path.removeprefix("file://")).lower()
    return any(fstype == t or (t.endswith(".") and fstype.startswith(t)) for t in _SHARED_FS)


def check_shared(path: str, field: str, node_ips: Iterable[str]) -> None:
    """Raise StorageError when `node_ips` are several hosts and `path` is local-only."""
    hosts = sorted(set(node_ips))
    if len(hosts) <= 1 or is_shared(path):
        return
    raise StorageError(
        f"{field}={path} is a local directory ({mount_fstype(path) or 'unknown'} filesystem), "
        f"but the cluster spans {len(hosts)} hosts ({', '.join(hosts)}): each node would keep "
        "its checkpoints on its own disk, and a worker restarted on another node could not "
        "resume from them. Use a directory every node mounts (NFS) or an object-store URI "
        f"such as s3://BUCKET/lmforge or gs://BUCKET/lmforge for {field}.")


def cluster_hosts() -> list[str]:
    """IPs of the alive nodes of the Ray cluster this process is connected to."""
    import ray

    return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]


def require_shared(path: str, field: str) -> None:
    """check_shared against the connected Ray cluster (a no-op when Ray is not started)."""
    import ray

    if ray.is_initialized():
        check_shared(path, field, cluster_hosts())
