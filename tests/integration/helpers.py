"""What the integration tests share: the tiny spec, the `lmforge` command as a subprocess,
environments for processes that start or join a Ray cluster, Serve replica lookups, and
bounded waits.

The waits fail on a *stall* (nothing changed for `stall_s`) as well as on a generous outer
bound, rather than on "finished within N seconds": a 2-core CI machine under load is often
several times slower than a quiet laptop, and a run that is slow but moving should not be
cut short, while one that is stuck should fail soon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from lmforge.cluster import free_port

__all__ = ["BIN", "ROOT", "SPEC", "TRAIN_POLL_ENV", "TRAIN_POLL_S", "file_size", "free_port",
           "kill_driver_when", "lmforge", "own_cluster_env", "replica_pids",
           "replica_states", "tree_size", "user_env", "wait_until"]

SPEC = Path(__file__).parent / "specs" / "tiny.yaml"
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
"""The virtualenv's bin: `ray`, `mlflow` and `lmforge` of the Python running the tests."""

T = TypeVar("T")

TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""How often a Ray Train controller polls its workers, and so passes their reports on
(conftest sets 0.2 s for the session)."""
TRAIN_POLL_S = "2"
"""Ray's default poll, for a run a test kills mid-way: a report every 2 s at most leaves a
window of seconds between the checkpoint it waits for and the end of the run."""


# --- waiting -------------------------------------------------------------------------


def wait_until(done: Callable[[], T], what: str, *, timeout_s: float = 600,
               progress: Callable[[], object] | None = None, stall_s: float = 120,
               interval_s: float = 0.1, detail: Callable[[], str] | None = None) -> T:
    """Poll `done()` until it returns something truthy, and return that.

    Fails after `timeout_s` (an outer bound: keep it generous), or, given `progress` (any
    value that changes while the awaited work moves on: a log's size, files written),
    as soon as `progress()` has not changed for `stall_s`. `detail()` is appended to the
    failure message (a log tail, the current state)."""
    start = last_change = time.monotonic()
    seen = progress() if progress is not None else None
    while not (value := done()):
        now = time.monotonic()
        if progress is not None:
            current = progress()
            if current != seen:
                seen, last_change = current, now
            elif now - last_change > stall_s:
                raise AssertionError(f"{what}: no progress for {stall_s:.0f} s"
                                     + (f"\n{detail()}" if detail else ""))
        if now - start > timeout_s:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s"
                                 + (f"\n{detail()}" if detail else ""))
        time.sleep(interval_s)
    return value


def file_size(path: Path) -> int:
    """Progress of a log being written: its size (0 while it does not exist)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def tree_size(path: Path) -> tuple[int, int]:
    """Progress of a run writing under `path`: (files, bytes)."""
    files = size = 0
    for folder, _, names in os.walk(path):  # missing or vanishing folders: skipped
        for name in names:
            try:
                size += os.stat(os.path.join(folder, name)).st_size
                files += 1
            except OSError:  # removed while we walked
                pass
    return files, size


# --- processes -----------------------------------------------------------------------


def own_cluster_env(**extra: str) -> dict[str, str]:
    """The environment of a process that starts its own private local Ray instead of
    joining the session's cluster."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | extra


def user_env(home: Path) -> dict[str, str]:
    """Another user on this machine: their own HOME (so their own ~/.ray/auth_token), the
    virtualenv's `ray` and `lmforge` on PATH, and none of this session's Ray settings (its
    cluster's address, auth mode or token), as in a fresh shell."""
    env = dict(os.environ, HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}")
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    return env


def lmforge(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
            timeout_s: float = 900, stall_s: float | None = None,
            prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run `python -m lmforge ARGS` (this interpreter, so this checkout's lmforge) and
    capture its output. `env` defaults to `own_cluster_env()`; `prefix` runs it through
    another command (the multi-host tests' `nsenter` into a host).

    Fails after `timeout_s` in all (keep it generous), or, with `stall_s`, once the
    command has printed nothing for `stall_s` (training and `--wait` print as they go)."""
    cmd = [*prefix, sys.executable, "-m", "lmforge", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env if env is not None else own_cluster_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    err: list[str] = []
    last_output = [time.monotonic()]

    def pump(stream, sink: list[str]) -> None:  # noqa: ANN001
        for line in iter(stream.readline, ""):
            sink.append(line)
            last_output[0] = time.monotonic()

    pumps = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
    for t in pumps:
        t.start()
    start = time.monotonic()
    while proc.poll() is None:
        now = time.monotonic()
        stalled = stall_s is not None and now - last_output[0] > stall_s
        if stalled or now - start > timeout_s:
            proc.kill()
            proc.wait()
            for t in pumps:
                t.join(timeout=10)
            why = f"printed nothing for {stall_s:.0f} s" if stalled else \
                f"still running after {timeout_s:.0f} s"
            raise AssertionError(f"lmforge {' '.join(args)}: {why}\n"
                                 f"{''.join(out)[-3000:]}{''.join(err)[-3000:]}")
        time.sleep(0.2)
    for t in pumps:
        t.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(err))


def kill_driver_when(cmd: list[str], when: Callable[[], bool], what: str, *, cwd: Path,
                     env: dict[str, str], log: Path, stall_s: float = 180) -> None:
    """Run the driver `cmd` (which starts its own local Ray) with its output in `log`, and
    SIGKILL it as soon as `when()` holds: no cleanup, as when its machine goes away. Its
    Ray processes, in its process group, go down with it. Fails if the driver exits first,
    or its log stops growing for `stall_s`."""
    with log.open("w") as out:
        driver = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until(lambda: when() or driver.poll() is not None, what,
                   progress=lambda: file_size(log), stall_s=stall_s, interval_s=0.05,
                   detail=lambda: log.read_text()[-3000:])
        assert driver.poll() is None, log.read_text()[-3000:]
        driver.kill()
        driver.wait(timeout=30)
    finally:
        try:  # whatever the driver's local cluster left behind
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- Serve ---------------------------------------------------------------------------


def replica_states(app: str) -> dict[str, int]:
    """App `app`'s TextGenerator replicas by state, as Serve reports them: {"RUNNING": 2}."""
    from ray import serve

    deployment = serve.status().applications[app].deployments["TextGenerator"]
    # Typed as ReplicaState keys, built from their string values: accept either.
    return {getattr(state, "value", state): n
            for state, n in deployment.replica_states.items() if n}


def replica_pids(app: str) -> set[int]:
    """PIDs of app `app`'s live replica processes, from the State API of this process's
    cluster (named: with other Ray instances on the machine, no address is ambiguous)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", f"ServeReplica:{app}:TextGenerator"),
                                  ("state", "=", "ALIVE")])
    return {a.pid for a in actors}
