"""The harness itself: the hosts share the network, the object store and the tracking
server, and nothing else; Ray runs on them with token auth; teardown leaves nothing, and a
run killed before its teardown is swept by the next one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from ..integration.helpers import wait_until
from .harness import PREFIX, ROOT, Hosts, _namespaces, netns_pids

# A small script run on a host: write or read one object of the shared bucket.
_S3 = """
import sys, pyarrow.fs as f
fs, path = f.FileSystem.from_uri(sys.argv[2])
if sys.argv[1] == "put":
    with fs.open_output_stream(path) as out:
        out.write(sys.argv[3].encode())
else:
    with fs.open_input_stream(path) as src:
        print(src.read().decode())
"""

_MLFLOW = """
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient()  # MLFLOW_TRACKING_URI: the services host
if sys.argv[1] == "create":
    client.create_experiment(sys.argv[2])
print(client.get_experiment_by_name(sys.argv[2]).experiment_id)
"""

# Ray's State API with whatever token the environment holds (or none).
_NODES = """
import sys
from ray.util.state import list_nodes
print(len(list_nodes(address=sys.argv[1], timeout=30)))
"""


def test_hosts_share_the_network_and_the_services_and_nothing_else(two_hosts: Hosts):
    hosts = two_hosts
    h1, h2 = hosts.hosts

    # Two Ray nodes, one per host, each on its own address.
    alive = sorted(hosts.alive_nodes(), key=lambda n: n["ip"])
    assert [(n["ip"], n["head"], n["cpus"]) for n in alive] == [
        (h1.ip, True, 1), (h2.ip, False, 1)]

    # /tmp, /dev/shm and what a host writes into the checkout (runs/ and a relative path's
    # stray files) are each host's own; the code is the same on each.
    for path in ("/tmp/mine", "/dev/shm/mine", "mine"):
        h1.run(["sh", "-c", f"echo h1 > {path}"], hosts.env(h1))
        assert h2.run(["test", "-e", path], hosts.env(h2), check=False).returncode == 1, path
    assert (h1.tmp / "mine").read_text() == (h1.checkout / "mine").read_text() == "h1\n"
    assert not Path("/tmp/mine").exists() and not (ROOT / "mine").exists()
    assert h2.run(["cat", "tests/multihost/harness.py"], hosts.env(h2)).stdout == \
        (ROOT / "tests/multihost/harness.py").read_text()

    # Each has its own name, and every name resolves to its host's address (Gloo binds
    # to the address of the host's name).
    resolve = "import socket; n = socket.gethostname(); print(n, socket.gethostbyname(n))"
    for host in hosts.hosts:
        assert host.run([sys.executable, "-c", resolve], hosts.env(host)).stdout.split() == [
            host.name, host.ip]

    # The bucket is shared: what h1 writes, h2 reads.
    uri = hosts.s3("harness/hello.txt")
    h1.run([sys.executable, "-c", _S3, "put", uri, "from h1"], hosts.env(h1))
    assert h2.run([sys.executable, "-c", _S3, "get", uri],
                  hosts.env(h2)).stdout.strip() == "from h1"

    # So is the tracking server.
    made = h1.run([sys.executable, "-c", _MLFLOW, "create", "harness"], hosts.env(h1))
    seen = h2.run([sys.executable, "-c", _MLFLOW, "get", "harness"], hosts.env(h2))
    assert seen.stdout.strip() == made.stdout.strip()

    # A host's loopback is its own: a server on pytest's 127.0.0.1 is out of its reach.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        probe = (f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)")
        refused = h1.run([sys.executable, "-c", probe], hosts.env(h1), check=False)
        assert refused.returncode == 1 and "ConnectionRefusedError" in refused.stderr

    # Token auth is on: with the run's token the State API answers, without it, not.
    ok = h2.run([sys.executable, "-c", _NODES, hosts.dashboard_url], hosts.env(h2))
    assert ok.stdout.strip() == "2"
    no_token = {k: v for k, v in hosts.env(h2).items() if k != "RAY_AUTH_TOKEN"}
    denied = h2.run([sys.executable, "-c", _NODES, hosts.dashboard_url], no_token,
                    check=False)
    assert denied.returncode != 0, denied.stdout


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed process whose parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _links(run_id: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"lh{run_id}" in line]


def test_close_leaves_no_namespace_link_or_process(tmp_path: Path):
    hosts = Hosts.up(tmp_path / "hosts", hosts=2, ray=False, services=False)
    try:
        # A process per host, and one that leaves its parent behind (as Ray's daemons do).
        for host in hosts.hosts:
            host.popen(["sleep", "600"], hosts.env(host), tmp_path / f"{host.name}.log")
            host.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 &"], hosts.env(host))
        pids = [pid for host in hosts.hosts for pid in host.pids()]
        assert len(pids) == 6  # holder + 2 sleeps on each host
        assert _links(hosts.run_id)
    finally:
        hosts.close()
    assert not [ns for ns in _namespaces() if hosts.run_id in ns]
    assert not _links(hosts.run_id)
    assert not [pid for pid in pids if _running(pid)]
    hosts.close()  # twice is fine


# A test process that builds hosts, says which, and waits to be killed.
_BUILD = """
import json, signal, sys
sys.path.insert(0, sys.argv[1])
from tests.multihost.harness import Hosts
hosts = Hosts.up(sys.argv[2], hosts=2, ray=False, services=False)
host = hosts.hosts[0]
host.popen(["sleep", "600"], hosts.env(host), hosts.dir / "sleep.log")
print(json.dumps({"namespaces": hosts.namespaces, "run_id": hosts.run_id,
                  "pids": [p for h in hosts.hosts for p in h.pids()]}), flush=True)
signal.pause()
"""


def test_a_test_process_killed_before_its_teardown_leaves_nothing(tmp_path: Path):
    """SIGKILL, so no finalizer runs: the run's watchdog tears it down."""
    proc = subprocess.Popen([sys.executable, "-c", _BUILD, str(ROOT), str(tmp_path / "h")],
                            stdout=subprocess.PIPE, text=True)
    built = json.loads(proc.stdout.readline())
    assert len(built["namespaces"]) == 3 and len(built["pids"]) == 3
    proc.kill()
    proc.wait()
    wait_until(lambda: not [ns for ns in _namespaces() if ns in built["namespaces"]]
               and not _links(built["run_id"]), "the watchdog's teardown", timeout_s=60)
    assert not [pid for pid in built["pids"] if _running(pid)]


def test_a_run_killed_before_its_teardown_is_swept_by_the_next(tmp_path: Path):
    """A namespace named for a creator that is gone, a process still in it: the next run
    removes both before it builds its own."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}-{dead.pid}-0badc0-h1"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"],
                                  start_new_session=True)
        wait_until(lambda: orphan.pid in netns_pids(stale), "the orphan in its namespace",
                   timeout_s=30)
        with Hosts.up(tmp_path / "hosts", hosts=1, ray=False, services=False):
            assert stale not in _namespaces()
            assert orphan.wait(timeout=30) == -9
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)

