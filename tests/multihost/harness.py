"""Hosts that share nothing but a network, an object store and a tracking server, built
on this one Linux machine for the multi-host tests.

`Hosts.up(root, hosts=2)` builds, with names that carry this run's id (parallel runs never
meet, and a run killed before its teardown is swept by the next one):

    pytest (root namespace) ── veth 10.77.X.254 ──┐
    host h1 (Ray head)     ── veth 10.77.X.1  ────┤  bridge in its own
    host h2                ── veth 10.77.X.2  ────┤  "switch" namespace
    host h3 ...            ── veth 10.77.X.3  ────┤
    services (S3, MLflow)  ── veth 10.77.X.253 ───┘

- Each host is a network namespace (its own loopback, one interface on the bridge and no
  default route: it reaches the other hosts and the services, nothing else), a UTS
  namespace (its own hostname, h1, h2...; every host's /etc/hosts resolves them all, as
  DNS would) and a mount
  namespace in which /tmp, the checkout and /dev/shm are its own: a directory under the
  test's tmp dir bind-mounted over /tmp, an overlay on the checkout (the code reads
  through; what the host writes there, runs/ included, stays its own), a fresh tmpfs on
  /dev/shm. What one host writes no other sees. HOME is under its /tmp. The code (this
  checkout and its virtualenv) is the same on every host, as an image would be.
- Each host runs a Ray node (`ray start`, token auth on with a token made for this run)
  on its own address; h1 is the head. Inside a private network namespace nothing else
  listens, so every Ray process keeps Ray's default port, as on a real machine.
- The services namespace runs the shared storage, moto's S3 server (`s3_url`, bucket
  `bucket`), and the tracking server, `mlflow server` on SQLite (`mlflow_url`).
- `close()` kills every process in every namespace of the run (what `ip netns pids`
  lists), deletes the links and the namespaces, and is safe to call twice; the fixtures
  call it whatever happened. If the test process dies without it (SIGKILL, a CI step's
  timeout), a watchdog shell does the same; a run that lost even that (the machine
  rebooted mid-way is not one: namespaces do not survive it) is swept by the next run.

Processes run inside a host through `nsenter` into its "holder" (a `sleep` that keeps the
namespaces alive): `host.enter()` is the command prefix, `host.env(...)` the environment of
a process there (the token, the S3 endpoint and keys, the tracking URI, HOME, TMPDIR).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.cluster import NODES_PROBE

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
"""The virtualenv's bin: `ray`, `mlflow`, `moto_server`, `lmforge`."""

PREFIX = "lmfh"
"""Every namespace of this harness is named lmfh-<creator pid>-<run id>-<role>."""
_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]+)-(\w+)$")
_NET_LOCK = "/tmp/lmforge-multihost-net.lock"
_SUBNET = "10.77.{}.0/24"
SERVICES_HOST, DRIVER_HOST = 253, 254  # host parts of the services' and pytest's addresses
GCS_PORT, DASHBOARD_PORT, S3_PORT, MLFLOW_PORT = 6379, 8265, 5000, 5001  # Ray's defaults
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
BUCKET = "lmforge"



class HarnessError(RuntimeError):
    """The hosts could not be built (the message says which step and shows its output)."""


def unavailable() -> str | None:
    """Why this machine cannot build the hosts, or None when it can: the tests skip with it."""
    if sys.platform != "linux":
        return "needs Linux network and mount namespaces"
    if os.geteuid() != 0:
        return "needs root to create network and mount namespaces (CI runs as root)"
    for tool in ("ip", "nsenter", "unshare", "sleep"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2 / util-linux) on PATH"
    if ROOT == Path("/tmp") or Path("/tmp") in ROOT.parents:
        return f"the checkout ({ROOT}) is under /tmp, which every host replaces by its own"
    if not (BIN / "moto_server").exists():
        return "needs moto's S3 server (`moto[server]`, a dev dependency: make install)"
    probe = f"{PREFIX}-{os.getpid()}-probe-x"
    r = _sh(["ip", "netns", "add", probe], check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    try:
        with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-probe-") as d:
            for sub in ("tmp", "checkout", ".overlay-work"):
                os.mkdir(os.path.join(d, sub))
            r = _sh(["nsenter", f"--net=/run/netns/{probe}", "unshare", "--mount", "--uts",
                     "--propagation", "private", "sh", "-c",
                     f"hostname {PREFIX}-probe; {_private_mounts(Path(d))}"], check=False)
        if r.returncode != 0:
            return ("a private hostname and mounts (tmpfs, overlay, bind) fail here: "
                    f"{r.stderr.strip()}")
    finally:
        _sh(["ip", "netns", "del", probe], check=False)
    return None


def _private_mounts(dir: Path) -> str:
    """Shell commands that give a fresh mount namespace its own /dev/shm (a tmpfs), its own
    writes to the checkout (an overlay: the code reads through, what the host writes lands
    in dir/checkout) and its own /tmp (dir/tmp, bound last: dir is under the real /tmp)."""
    return (f"mount -t tmpfs -o size=1g,mode=1777 {PREFIX}-shm /dev/shm; "
            f"mount -t overlay {PREFIX}-checkout -o lowerdir={ROOT},upperdir={dir}/checkout,"
            f"workdir={dir}/.overlay-work {ROOT}; "
            f"mount --bind {dir}/tmp /tmp")


def _sh(cmd: list[str], check: bool = True, timeout_s: float = 60
        ) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if check and r.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_pids(netns: str) -> list[int]:
    """Every process in network namespace `netns` (none when it is gone)."""
    r = _sh(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def kill_netns(netns: str, timeout_s: float = 30) -> None:
    """SIGKILL every process in `netns` until none is left (bounded): a process forking
    while we kill is caught on the next pass."""
    deadline = time.monotonic() + timeout_s
    while pids := netns_pids(netns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:  # our own children (holders, nsenter'd commands): reap them
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} in {netns} survived SIGKILL")
        time.sleep(0.05)


def _namespaces() -> list[str]:
    r = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _sweep_stale() -> None:
    """Remove what a run killed before its teardown left: namespaces of this harness whose
    creating process is gone (their links go with them)."""
    for ns in _namespaces():
        m = _NAME.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            kill_netns(ns)
            _sh(["ip", "netns", "del", ns], check=False)


def _free_subnet() -> int:
    """A 10.77.X.0/24 that no address of the root namespace is in (other runs included)."""
    used = _sh(["ip", "-o", "-4", "addr", "show"]).stdout
    taken = {int(m) for m in re.findall(r"inet 10\.77\.(\d+)\.", used)}
    free = [x for x in range(1, 250) if x not in taken]
    if not free:
        raise HarnessError("no free 10.77.X.0/24 subnet left")
    return secrets.choice(free)


@dataclass
class Host:
    """One "machine": a network namespace, a mount namespace, a directory of its own."""

    name: str
    netns: str
    ip: str
    dir: Path
    """Holds tmp/ (its /tmp), checkout/ (what it wrote into the checkout) and its logs."""
    holder: subprocess.Popen | None = None

    @property
    def tmp(self) -> Path:
        """The host's /tmp, seen from outside it (Ray logs: tmp/ray/session_latest/logs)."""
        return self.dir / "tmp"

    @property
    def checkout(self) -> Path:
        """What the host wrote into the checkout, seen from outside it (its runs/ and any
        stray file a relative path put there)."""
        return self.dir / "checkout"

    @property
    def runs(self) -> Path:
        """The host's runs/ (summary.json, local caches), seen from outside it."""
        return self.checkout / "runs"

    def enter(self) -> list[str]:
        """The command prefix that runs a program inside this host, in the checkout."""
        assert self.holder is not None, f"host {self.name} is not started"
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--uts", "--net",
                f"--wdns={ROOT}", "--"]

    def run(self, cmd: list[str], env: dict[str, str], timeout_s: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run `cmd` inside the host; with `check`, fail showing its output."""
        r = subprocess.run([*self.enter(), *cmd], env=env, capture_output=True, text=True,
                           timeout=timeout_s, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise HarnessError(f"on {self.name}: {' '.join(cmd)} failed ({r.returncode}):\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def popen(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start `cmd` inside the host, in a process group of its own, output to `log`."""
        with log.open("w") as out:
            return subprocess.Popen([*self.enter(), *cmd], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def pids(self) -> list[int]:
        """Every process on this host."""
        return netns_pids(self.netns)

    def kill(self) -> None:
        """The host goes away: every process on it is killed, then its cable is pulled (its
        interface goes down, so the others see silence, not refused connections)."""
        kill_netns(self.netns)
        if self.holder is not None:
            self.holder.wait(timeout=30)
        _sh(["ip", "-n", self.netns, "link", "set", "dev", self.link, "down"], check=False)

    @property
    def link(self) -> str:
        """Its interface: lh<run id><role> (the switch's end adds "b"; names < 16 bytes)."""
        return "lh" + self.netns.split("-", 2)[2].replace("-", "")


@dataclass
class Hosts:
    """The hosts of one run, the services and the Ray cluster on them; see the module doc."""

    dir: Path
    run_id: str
    subnet: int
    token: str
    hosts: list[Host] = field(default_factory=list)
    services: Host | None = None
    namespaces: list[str] = field(default_factory=list)
    root_link: str = ""
    cpus: list[int] = field(default_factory=list)
    _watchdog: subprocess.Popen | None = field(default=None, repr=False)
    _svc_s3: subprocess.Popen | None = field(default=None, repr=False)
    _svc_mlflow: subprocess.Popen | None = field(default=None, repr=False)

    # --- addresses ---------------------------------------------------------------------

    def ip(self, k: int) -> str:
        return str(ipaddress.ip_network(_SUBNET.format(self.subnet))[k])

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.ip(SERVICES_HOST)}:{S3_PORT}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.ip(SERVICES_HOST)}:{MLFLOW_PORT}"

    def s3(self, prefix: str) -> str:
        """An object-store URI under this run's bucket."""
        return f"s3://{BUCKET}/{prefix.strip('/')}"

    def _bucket_fs(self):  # noqa: ANN202 (pyarrow is imported lazily)
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(endpoint_override=self.s3_url, scheme="http",
                                       access_key=S3_KEYS["AWS_ACCESS_KEY_ID"],
                                       secret_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                                       region=S3_KEYS["AWS_REGION"])

    def list_bucket(self, prefix: str = "") -> list[str]:
        """Keys of the bucket under `prefix` (objects, not directory markers), as seen from
        the test process."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(f"{BUCKET}/{prefix}".rstrip("/"), recursive=True,
                                           allow_not_found=True)
        return sorted(i.path.removeprefix(f"{BUCKET}/")
                      for i in self._bucket_fs().get_file_info(selector)
                      if i.type == pyarrow.fs.FileType.File)

    def read_object(self, key: str) -> bytes:
        """The content of object `key` of the bucket, as seen from the test process."""
        with self._bucket_fs().open_input_stream(f"{BUCKET}/{key}") as f:
            return f.read()

    def env(self, host: Host, **extra: str) -> dict[str, str]:
        """The environment of a process on `host`: this checkout's code (PYTHONPATH kept),
        the virtualenv first on PATH, a private HOME and TMPDIR, Ray's token, the S3
        endpoint and keys, the tracking server; none of the caller's Ray, MLflow or AWS
        settings (they name things on the caller's machine)."""
        keep = {k: v for k, v in os.environ.items()
                if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))
                and k not in ("TMPDIR", "HOME", "PATH")}
        return keep | {
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": "/tmp/home", "TMPDIR": "/tmp",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            "AWS_ENDPOINT_URL": self.s3_url, **S3_KEYS,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PYTHONUNBUFFERED": "1",
        } | extra

    def driver_env(self, **extra: str) -> dict[str, str]:
        """A driver on the head host: `lmforge` there joins the cluster (RAY_ADDRESS)."""
        return self.env(self.head, RAY_ADDRESS=self.gcs_address, **extra)

    # --- build -------------------------------------------------------------------------

    @classmethod
    def up(cls, dir: Path, hosts: int = 2, cpus: int | list[int] = 1, ray: bool = True,
           services: bool = True, object_store_mb: int = 200,
           node_env: dict[str, str] | None = None) -> Hosts:
        """Build `hosts` hosts (Ray nodes with `cpus` CPUs each, or one count per host,
        when `ray`) and the services; on any failure, tear down what was built and raise."""
        run = cls(dir=Path(dir), run_id=secrets.token_hex(3), subnet=0,
                  token=secrets.token_hex(32))
        run.cpus = cpus if isinstance(cpus, list) else [cpus] * hosts
        if len(run.cpus) != hosts:
            raise ValueError(f"{hosts} hosts but {len(run.cpus)} CPU counts")
        try:
            run._network(hosts, services)
            run._start_watchdog()
            run._write_hosts_file()
            for host in [*run.hosts, *([run.services] if run.services else [])]:
                run._start_holder(host)
            if run.services is not None:
                run._start_services()
            if ray:
                run._start_ray(object_store_mb, node_env or {})
        except BaseException:
            run.close()
            raise
        return run

    def _start_watchdog(self) -> None:
        """A shell in the root namespace that tears the run down if this process dies
        without doing so (SIGKILL, a CI step's timeout): it polls for this process once a
        second, then kills every process in the run's namespaces and deletes them. Plain
        `sh` and `ip`: it needs nothing that might be gone by then."""
        nss = " ".join(self.namespaces)
        script = (f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; "
                  "for i in $(seq 100); do left=; "
                  f"for ns in {nss}; do p=$(ip netns pids $ns 2>/dev/null); "
                  '[ -n "$p" ] && { kill -9 $p; left=1; }; done; '
                  '[ -z "$left" ] && break; sleep 0.1; done; '
                  f"ip link del {self.root_link} 2>/dev/null; "
                  f"for ns in {nss}; do ip netns del $ns 2>/dev/null; done")
        self._watchdog = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)

    def _ns(self, role: str) -> str:
        return f"{PREFIX}-{os.getpid()}-{self.run_id}-{role}"

    def _network(self, hosts: int, services: bool) -> None:
        """The switch, one veth per host to it, and one to the root namespace (pytest's)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(_NET_LOCK, "w") as lock:  # one run at a time picks a subnet and takes it
            fcntl.flock(lock, fcntl.LOCK_EX)
            _sweep_stale()
            self.subnet = _free_subnet()
            switch = self._ns("sw")
            self._add_netns(switch)
            bridge = f"lh{self.run_id}br"
            _sh(["ip", "-n", switch, "link", "add", bridge, "type", "bridge"])
            _sh(["ip", "-n", switch, "link", "set", bridge, "up"])
            # pytest's end: the only thing this harness adds to the root namespace; deleted
            # first on close (a namespace's links otherwise go away asynchronously).
            self.root_link = f"lh{self.run_id}r"
            _sh(["ip", "link", "add", self.root_link, "type", "veth", "peer", "name",
                 f"{self.root_link}b", "netns", switch])
            _sh(["ip", "-n", switch, "link", "set", f"{self.root_link}b", "master", bridge,
                 "up"])
            _sh(["ip", "addr", "add", f"{self.ip(DRIVER_HOST)}/24", "dev", self.root_link])
            _sh(["ip", "link", "set", self.root_link, "up"])
        roles = [(f"h{i + 1}", i + 1) for i in range(hosts)]
        if services:
            roles.append(("svc", SERVICES_HOST))
        for role, k in roles:
            netns = self._ns(role)
            host = Host(name=role, netns=netns, ip=self.ip(k), dir=self.dir / role)
            self._add_netns(netns)
            _sh(["ip", "link", "add", host.link, "netns", netns, "type", "veth", "peer",
                 "name", f"{host.link}b", "netns", switch])
            _sh(["ip", "-n", switch, "link", "set", f"{host.link}b", "master", bridge, "up"])
            _sh(["ip", "-n", netns, "addr", "add", f"{host.ip}/24", "dev", host.link])
            _sh(["ip", "-n", netns, "link", "set", host.link, "up"])
            _sh(["ip", "-n", netns, "link", "set", "lo", "up"])
            if role == "svc":
                self.services = host
            else:
                self.hosts.append(host)

    def _add_netns(self, name: str) -> None:
        _sh(["ip", "netns", "add", name])
        self.namespaces.append(name)

    def _write_hosts_file(self) -> None:
        """Every host's /etc/hosts: its name and the others' resolve to their addresses, as
        DNS does on a real cluster. (The machine's own name resolves to 127.0.0.1 here, and
        Gloo, which binds to the address of the host's name, would then give the other
        hosts a loopback address to connect to.)"""
        lines = ["127.0.0.1 localhost"] + [
            f"{h.ip} {h.name}" for h in [*self.hosts, *([self.services] if self.services else [])]]
        (self.dir / "hosts").write_text("\n".join(lines) + "\n")

    def _start_holder(self, host: Host) -> None:
        """The process that holds the host's namespaces: its own name (UTS) and /etc/hosts,
        its mounts made private: /dev/shm, the checkout and then /tmp (last: the host's
        directories live under the real /tmp); then sleep."""
        for sub in ("tmp", "checkout", ".overlay-work"):
            (host.dir / sub).mkdir(parents=True, exist_ok=True)
        host.tmp.chmod(0o1777)
        script = (f"set -e; hostname {host.name}; mount --bind {self.dir / 'hosts'} /etc/hosts; "
                  f"{_private_mounts(host.dir)}; mkdir -p /tmp/home; "
                  "echo ready; exec sleep infinity >/dev/null 2>&1")
        host.holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--mount", "--uts",
             "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, start_new_session=True)
        line = host.holder.stdout.readline().strip()  # the mounts are done (or it failed)
        host.holder.stdout.close()
        if line != "ready":
            host.holder.wait(timeout=30)
            raise HarnessError(f"host {host.name}: private mounts failed: "
                               f"{host.holder.stderr.read()}")
        host.holder.stderr.close()

    def _start_services(self) -> None:
        svc = self.services
        assert svc is not None
        env = self.env(svc)
        ip = svc.ip
        self._svc_s3 = svc.popen([str(BIN / "moto_server"), "-H", ip, "-p", str(S3_PORT)],
                                 env, svc.dir / "s3.log")
        self._svc_mlflow = svc.popen(
            [str(BIN / "mlflow"), "server", "--host", ip, "--port", str(MLFLOW_PORT),
             "--workers", "1", "--backend-store-uri", "sqlite:////tmp/mlflow.db",
             "--artifacts-destination", "/tmp/mlartifacts"], env, svc.dir / "mlflow.log")
        # Readiness from pytest's end of the network: the same path the hosts take.
        _wait_http(f"{self.s3_url}/", "moto S3 server", svc.dir / "s3.log", self._svc_s3)
        _wait_http(f"{self.mlflow_url}/health", "mlflow server", svc.dir / "mlflow.log",
                   self._svc_mlflow)
        req = urllib.request.Request(f"{self.s3_url}/{BUCKET}", method="PUT")
        with urllib.request.urlopen(req, timeout=30) as resp:
            if resp.status != 200:
                raise HarnessError(f"could not create bucket {BUCKET}: HTTP {resp.status}")

    def _start_ray(self, object_store_mb: int, node_env: dict[str, str]) -> None:
        """`ray start` on each host, the head first; returns once every node is ALIVE."""
        for i, host in enumerate(self.hosts):
            args = (["--head", f"--port={GCS_PORT}", "--dashboard-host=0.0.0.0",
                     f"--dashboard-port={DASHBOARD_PORT}"] if i == 0
                    else [f"--address={self.gcs_address}"])
            cmd = [str(BIN / "ray"), "start", *args, f"--node-ip-address={host.ip}",
                   f"--num-cpus={self.cpus[i]}", "--num-gpus=0",
                   f"--object-store-memory={object_store_mb * 1024 * 1024}",
                   "--disable-usage-stats"]
            # `ray start` returns once its node is up; its daemons keep running, so its
            # output goes to a file (a pipe would stay open as long as they live).
            log = host.dir / "ray-start.log"
            proc = host.popen(cmd, self.env(host, **node_env), log)
            try:
                code = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                raise HarnessError(f"ray start on {host.name} "
                                   f"{'timed out' if code is None else f'exited {code}'}:\n"
                                   f"{log.read_text()[-3000:]}")
        alive = self.alive_nodes(want=len(self.hosts), timeout_s=120)
        if sorted(n["ip"] for n in alive) != sorted(h.ip for h in self.hosts):
            raise HarnessError(f"Ray nodes ALIVE: {alive}, expected one on each of "
                               f"{[h.ip for h in self.hosts]}")

    def alive_nodes(self, want: int = 0, timeout_s: float = 0) -> list[dict]:
        """The cluster's ALIVE nodes (ip, head, node_id, cpus) as the head's State API lists them,
        polled until there are `want` or `timeout_s` has passed."""
        r = self.head.run([sys.executable, "-c", NODES_PROBE, self.dashboard_url, str(want),
                           str(timeout_s), "exact"], self.env(self.head), timeout_s=timeout_s + 120)
        return json.loads(r.stdout.strip().splitlines()[-1])["alive"]

    # --- tear down ---------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process of the run, delete its links and namespaces. Idempotent."""
        errors = []
        for ns in self.namespaces:
            try:
                kill_netns(ns)
            except HarnessError as e:
                errors.append(str(e))
        for host in [*self.hosts, *([self.services] if self.services else [])]:
            if host.holder is not None and host.holder.poll() is None:
                host.holder.wait(timeout=30)
        if self.root_link:
            _sh(["ip", "link", "del", self.root_link], check=False)
        for ns in self.namespaces:
            _sh(["ip", "netns", "del", ns], check=False)
        left = [ns for ns in self.namespaces if ns in _namespaces()]
        if self._watchdog is not None:  # its work is done
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if errors or left:
            raise HarnessError(f"teardown left {left or 'processes'}: {errors}")
        self.namespaces = []

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_http(url: str, what: str, log: Path, proc: subprocess.Popen,
               timeout_s: float = 120) -> None:
    """Poll `url` until it answers (any HTTP status), bounded; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise HarnessError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise HarnessError(f"{what} not answering at {url} after {timeout_s:.0f} s:\n"
                               f"{log.read_text()[-3000:]}")
        time.sleep(0.2)
