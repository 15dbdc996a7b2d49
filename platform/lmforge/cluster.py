"""Ray clusters: joining one (`init_ray`), and a multi-node cluster on one machine
(`LocalCluster`: a head raylet and N-1 worker raylets).

Each node is a real `ray start` process (`--head`, then workers with `--address`), so
multi-node behaviour (placement across nodes, node failure, the Jobs API, token auth)
can be tried on a laptop or in CI exactly as on a cluster of machines.

    from lmforge.cluster import LocalCluster

    with LocalCluster.up(nodes=2, cpus_per_node=1, root=tmp_path) as cluster:
        cluster.address        # "127.0.0.1:PORT", the GCS address for ray.init(address=...)
        cluster.dashboard_url  # "http://127.0.0.1:PORT", for the Jobs API / `lmforge submit`
        cluster.env            # what a client process needs: RAY_AUTH_MODE=token, and HOME
                               # plus RAY_AUTH_TOKEN_PATH when the cluster has its own home
        subprocess.run([...], env=os.environ | cluster.env)
    # leaving the block calls cluster.down()

`LocalCluster.up(nodes, cpus_per_node, root, home=None, gpus_per_node=0,
object_store_mb=256, timeout_s=120)` starts the nodes and returns once all `nodes` are
ALIVE (polled through Ray's State API with a bound, never a bare sleep), or raises
`ClusterError` with the failing node's log. `LocalCluster.load(root)` finds a cluster
that `up` started (from `root/state.json`), e.g. in another process; `down()` stops it.

What keeps several clusters (and other people's) apart on one machine:
- every node gets free ports for every port Ray would otherwise default (GCS, dashboard,
  client server, dashboard agent, runtime-env agent, metrics) and binds 127.0.0.1 only;
- every node has its own short `--temp-dir` under /tmp (Ray's unix sockets live under it,
  and the default /tmp/ray/ray_current_cluster would be taken over otherwise);
- every node is `ray start --block` in its own process group: `down()` sends SIGTERM to
  those processes only (each tears its own node down), then SIGKILL to whatever is left
  in their process groups. It never runs `ray stop`, which stops every Ray on the machine.

Token auth stays on: every node runs with RAY_AUTH_MODE=token. With `home=None` the nodes
use the caller's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, generated
by Ray's `ray get-auth-token --generate` when missing), so this process can `ray.init` to
it. With `home=PATH` the cluster gets its own HOME and token there (tests use this to act
as a separate user); pass `cluster.env` to the processes that talk to it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

STATE_FILE = "state.json"
_STOP_GRACE_S = 10  # then SIGKILL to the node's own process group
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"
"""Where Ray's State API clients in a cluster's workers find the cluster: Ray Train's
placement-group cleaner asks it, with no address, whether a run's controller is alive."""

# Polls the State API from a fresh process (the caller's Ray may hold another cluster's
# token: Ray caches tokens process-wide) until `want` nodes are ALIVE, or exactly `want`
# with a 4th argument `exact` (waiting for a lost node to be noticed). Bounded by its own
# deadline. The multi-host test harness runs it inside its head host.
NODES_PROBE = """
import json, sys, time
from ray.util.state import list_nodes
address, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
exact = sys.argv[4:] == ["exact"]
alive, error = [], None
while True:
    try:
        alive = list_nodes(address=address, filters=[("state", "=", "ALIVE")], timeout=10)
        error = None
    except Exception as e:  # the dashboard is still starting
        error = repr(e)
    if (len(alive) == want if exact else len(alive) >= want) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"alive": [{"node_id": n.node_id, "ip": n.node_ip, "head": n.is_head_node,
                             "cpus": n.resources_total.get("CPU", 0)} for n in alive],
                  "error": error}))
"""


class ClusterError(RuntimeError):
    """A local cluster did not start, or its state file is missing or stale."""


def free_port() -> int:
    """A port the OS says is free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def _pid_alive(pid: int) -> bool:
    """Running, not a zombie (an exited process nobody reaped yet is gone for our purposes)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgids: list[int]) -> list[int]:
    """Live processes (not zombies) in the given process groups."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) in pgids:
                out.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return out


@dataclass
class LocalCluster:
    """A running local cluster; see the module docstring."""

    root: Path
    address: str
    dashboard_url: str
    env: dict[str, str]
    pids: list[int] = field(default_factory=list)
    """The `ray start --block` process of each node, head first (also its process group)."""
    temp_dirs: list[str] = field(default_factory=list)
    cpus_per_node: int = 1

    @property
    def nodes(self) -> int:
        return len(self.pids)

    # --- start -------------------------------------------------------------------------

    @classmethod
    def up(cls, nodes: int = 2, cpus_per_node: int = 1, root: Path = Path("runs/cluster"),
           home: Path | None = None, gpus_per_node: int = 0, object_store_mb: int = 256,
           timeout_s: float = 120, node_path: str | None = None) -> LocalCluster:
        """Start a head and `nodes - 1` workers; return once all are ALIVE. The nodes' PATH
        (where a job's `python` is found) is this interpreter's bin, then $PATH, unless
        `node_path` gives another."""
        if nodes < 1:
            raise ValueError(f"nodes must be at least 1 (got {nodes})")
        if cpus_per_node < 1:
            raise ValueError(f"cpus_per_node must be at least 1 (got {cpus_per_node})")
        root = Path(root).resolve()
        if (root / STATE_FILE).exists():
            existing = cls.load(root)
            if existing.running():
                raise ClusterError(f"a local cluster from {root / STATE_FILE} is already "
                                   f"running at {existing.dashboard_url}; stop it first "
                                   "(`lmforge cluster down`)")
            existing.down()  # stale: its processes are gone; clear what is left
        (root / "logs").mkdir(parents=True, exist_ok=True)

        env = cls._client_env(home)
        node_env = dict(os.environ, **env, PATH=node_path or
                        f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        node_env.pop("RAY_ADDRESS", None)
        gcs_port, dashboard_port = free_port(), free_port()
        cluster = cls(root=root, address=f"127.0.0.1:{gcs_port}",
                      dashboard_url=f"http://127.0.0.1:{dashboard_port}", env=env,
                      cpus_per_node=cpus_per_node)
        # Its workers' State API clients (Ray Train's placement-group cleaner) ask this
        # cluster, not whichever one a scan of the machine finds (`private_cluster_options`).
        node_env[STATE_API_ENV] = cluster.dashboard_url
        try:
            for i in range(nodes):
                args = ["--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
                        "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
                        ] if i == 0 else [f"--address={cluster.address}"]
                cluster._start_node(i, args, cpus_per_node, gpus_per_node, object_store_mb,
                                    node_env)
                cluster._save()
                if i == 0:  # workers need the head's GCS to be up before they join
                    cluster.wait_alive(1, timeout_s)
            cluster.wait_alive(nodes, timeout_s)
        except BaseException:
            cluster.down()
            raise
        return cluster

    @staticmethod
    def _client_env(home: Path | None) -> dict[str, str]:
        """The environment a client of this cluster needs, creating the token if missing."""
        env = {"RAY_AUTH_MODE": "token"}
        if home is not None:
            home = Path(home).resolve()
            env["HOME"] = str(home)
            env["RAY_AUTH_TOKEN_PATH"] = str(home / ".ray" / "auth_token")
            token_present = Path(env["RAY_AUTH_TOKEN_PATH"]).exists()
        else:
            token_present = bool(
                os.environ.get("RAY_AUTH_TOKEN")
                or (os.environ.get("RAY_AUTH_TOKEN_PATH")
                    and Path(os.environ["RAY_AUTH_TOKEN_PATH"]).exists())
                or (Path.home() / ".ray" / "auth_token").exists())
        if not token_present:
            gen_env = dict(os.environ, **env)
            gen_env.pop("RAY_AUTH_TOKEN_PATH", None)  # generate at HOME/.ray/auth_token
            r = subprocess.run([_ray_cli(), "get-auth-token", "--generate"], env=gen_env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise ClusterError(f"could not create a Ray auth token: {r.stderr[-2000:]}")
        return env

    def _start_node(self, i: int, args: list[str], cpus: int, gpus: int, object_store_mb: int,
                    env: dict[str, str]) -> None:
        # Short, private temp dir: unix socket paths under it must stay < 108 bytes.
        temp_dir = tempfile.mkdtemp(prefix=f"lmf{i}-", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        cmd = [_ray_cli(), "start", "--block", *args, f"--temp-dir={temp_dir}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
               f"--object-store-memory={object_store_mb * 1024 * 1024}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               "--disable-usage-stats"]
        log = (self.root / "logs" / f"node-{i}.log").open("w")
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.pids.append(proc.pid)

    # --- inspect -----------------------------------------------------------------------

    def alive_nodes(self, want: int = 0, timeout_s: float = 0) -> list[dict[str, Any]]:
        """The ALIVE nodes (node_id, ip, head, cpus), polling until `want` or `timeout_s`."""
        r = subprocess.run([sys.executable, "-c", NODES_PROBE, self.dashboard_url, str(want),
                            str(timeout_s)], env=dict(os.environ, **self.env),
                           capture_output=True, text=True, timeout=timeout_s + 120)
        if r.returncode != 0:
            raise ClusterError(f"could not query nodes at {self.dashboard_url}: "
                               f"{r.stderr[-2000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        return out["alive"]

    def wait_alive(self, n: int, timeout_s: float = 120) -> None:
        """Return once `n` nodes are ALIVE; raise with the node logs if they never are."""
        dead = [i for i, pid in enumerate(self.pids) if not _pid_alive(pid)]
        if not dead:
            alive = self.alive_nodes(want=n, timeout_s=timeout_s)
            if len(alive) >= n:
                return
            dead = [i for i, pid in enumerate(self.pids) if not _pid_alive(pid)]
        logs = "\n".join(f"--- node {i} ({self.root / 'logs' / f'node-{i}.log'}):\n"
                         + self._log_tail(i) for i in (dead or range(len(self.pids))))
        raise ClusterError(f"local cluster: {n} node(s) not ALIVE "
                           f"{'(node process exited) ' if dead else ''}"
                           f"within {timeout_s:.0f} s\n{logs}")

    def _log_tail(self, i: int) -> str:
        path = self.root / "logs" / f"node-{i}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def running(self) -> bool:
        """Whether every node's `ray start` process is still running."""
        return bool(self.pids) and all(_pid_alive(pid) for pid in self.pids)

    # --- stop --------------------------------------------------------------------------

    def down(self) -> None:
        """Stop this cluster's nodes (workers first, then the head) and nothing else."""
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)  # --block: the node shuts its processes down
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _STOP_GRACE_S
        for pid in self.pids:
            while _pid_alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.1)
        # Backstop for anything a node left behind in its own process group (SIGKILL is
        # asynchronous: poll, bounded, until the groups are empty).
        deadline = time.monotonic() + _STOP_GRACE_S
        while left := group_members(self.pids):
            for pid in self.pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                _reap(pid)
            if time.monotonic() > deadline:
                raise ClusterError(f"processes {left} of the local cluster did not exit")
            time.sleep(0.1)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        (self.root / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- state file --------------------------------------------------------------------

    def _save(self) -> None:
        state = asdict(self) | {"root": str(self.root)}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, root: Path = Path("runs/cluster")) -> LocalCluster:
        """The cluster `up` started with this root (from root/state.json)."""
        path = Path(root).resolve() / STATE_FILE
        if not path.exists():
            raise ClusterError(f"no local cluster state at {path} (start one with "
                               "`lmforge cluster up`)")
        state = json.loads(path.read_text())
        state["root"] = Path(state["root"])
        return cls(**state)


def _reap(pid: int) -> None:
    """Collect a child's exit status so it does not linger as a zombie (no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# --- joining a cluster -----------------------------------------------------------------


def init_ray(**kwargs: Any) -> None:
    """Join the cluster this process was submitted to ($RAY_ADDRESS, as Ray Jobs set it), or
    start a private local one. Never attach to some other cluster by accident."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        kwargs = private_cluster_options(kwargs)
    ray.init(address=address, log_to_driver=True, **kwargs)


def private_cluster_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`ray.init` options for a private local cluster: its dashboard on a free port chosen here,
    and that address given to every worker of the job as the State API's (`STATE_API_ENV`).

    Why: when Tune stops a trial (ASHA, or the trial's last report), it kills the trial's
    actor, and the Train controller that actor owns dies with it without removing its
    placement group; Ray Train's `PlacementGroupCleaner` exists to remove it. The cleaner
    asks the State API with no address, which Ray resolves by scanning the machine for GCS
    processes: with a second Ray cluster on the machine (another user's, a test session's)
    that fails ("Found multiple active Ray instances"), the cleaner's thread dies, and the
    trial's CPUs stay reserved: the next trial waits for its workers forever
    (WorkerGroupStartupTimeoutError every 60 s). A cluster started with `ray start` records
    its address where the cleaner looks; one started by `ray.init` does not, so it is named
    here. The caller's own `dashboard_port` or `runtime_env` values win.
    """
    if kwargs.get("include_dashboard") is False:  # no State API to point at
        return kwargs
    options = dict(kwargs)
    host = options.setdefault("dashboard_host", "127.0.0.1")
    # A free port, not Ray's usual 8265: Ray does not look further for a port it is given
    # (the dashboard is on this one or does not start), and two runs starting at once
    # would both find 8265 free. Ray prints the dashboard's URL as it starts.
    port = options.setdefault("dashboard_port", free_port())
    runtime_env = dict(options.get("runtime_env") or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    reach = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    env_vars.setdefault(STATE_API_ENV, f"http://{reach}:{port}")
    options["runtime_env"] = runtime_env | {"env_vars": env_vars}
    return options


def __getattr__(name: str) -> Any:
    if name == "serve_app":  # the import path RayService manifests named before
        import warnings

        from lmforge.serve import serve_app

        warnings.warn("lmforge.cluster:serve_app moved to lmforge.serve:serve_app",
                      DeprecationWarning, stacklevel=2)
        return serve_app
    raise AttributeError(f"module 'lmforge.cluster' has no attribute {name!r}")
