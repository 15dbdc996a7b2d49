"""Real services that the integration and chaos tests share, loaded for the whole suite by
tests/conftest.py (`pytest_plugins`): Ray's settings for the session, one private local Ray
cluster, the guard that no training run outlives its test, the tiny spec with every piece
of state under the test's tmp_path, a real `mlflow server` that a test can stop and start
again (an outage), the tiny model the Serve tests inject, and an S3-compatible object
store (a real moto server: `moto_s3()`, `s3_server`, `s3_env`).

Nothing here is autouse: a folder that needs Ray's settings and the guard turns them on in
its own conftest (tests/integration, tests/chaos), so the unit tests stay free of them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cloudpickle
import httpx
import pytest
import ray

from lmforge.cluster import private_cluster_options
from lmforge.config import JobSpec, load
from lmforge.registry import LoadedModel
from lmforge.tune.reaper import orphaned_train_groups, remove_groups

from .integration.helpers import BIN, SPEC, TRAIN_POLL_ENV, free_port, wait_until

if TYPE_CHECKING:
    import pyarrow.fs

# tiny_model is handed to Serve replicas, which cannot import this module: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="session")
def ray_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Environment for every Ray this session starts: its own, the ones test subprocesses
    start (they inherit it), and the nodes of local clusters.

    - A local Ray cluster started without a token writes one to ~/.ray/auth_token, outside
      pytest's tmp dirs, and a token there then switches later clients to token auth: use
      one token under tmp instead. Tests acting as another user drop it (`user_env`).
    - Ray Train passes a worker's report on at its controller's health-check poll, every
      2 s by default, and the worker waits for it: with the tiny model (20 steps in a
      fraction of a second) that poll was most of every training run's time. Tests that
      kill a run mid-way set it back to 2 s (`TRAIN_POLL_S`): its reports' pace is their
      window to kill in.
    """
    token = tmp_path_factory.mktemp("ray-token") / "auth_token"
    token.write_text(secrets.token_hex(32))
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    mp.setenv(TRAIN_POLL_ENV, "0.2")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def ray_cluster(ray_settings: None) -> Iterator[str]:
    """One private local Ray cluster (2 logical CPUs, like CI) for the whole session; yields
    its GCS address.

    It keeps to itself: on 127.0.0.1, with a free dashboard port and its own temp dir (not
    /tmp/ray, which every local Ray on the machine shares by default), and its workers ask
    its own State API (`private_cluster_options`, as `lmforge` does for the cluster it
    starts): Ray Train's placement-group cleaner would otherwise fail whenever another Ray
    runs on the machine, as one does while a test's subprocess runs its own cluster.
    """
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # in the session's short private TMPDIR
    dashboard = free_port()
    ray.init(**private_cluster_options(dict(
        address="local", num_cpus=2, _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
        dashboard_host="127.0.0.1", dashboard_port=dashboard)))
    try:
        webui = ray._private.worker._global_node.address_info["webui_url"]
        assert webui == f"127.0.0.1:{dashboard}", f"dashboard at {webui}, not on {dashboard}"
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def no_training_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test on the session cluster, no placement group may be left reserved: a
    training run that outlives its test (a failed test's thread, say) holds CPUs, and every
    later test on the cluster would wait for them. Such a run is stopped and the test
    errors, so one failure stays one failure instead of hanging the rest of the suite."""
    yield
    if "ray_cluster" not in request.fixturenames or not ray.is_initialized():
        return
    try:  # a run that has just ended frees its placement groups asynchronously
        wait_until(lambda: not _reserved_placement_groups(), "placement groups released",
                   timeout_s=60)
    except AssertionError:
        left = _describe_reserved()
        _stop_training_runs()
        pytest.fail(f"the test left placement groups reserved ({left}); stopped its "
                    "training run(s)")


def _reserved_placement_groups() -> list[str]:
    return [pg_id for pg_id, pg in ray.util.placement_group_table().items()
            if pg["state"] != "REMOVED"]


def _describe_reserved() -> str:
    """What a failure report needs to say why a placement group outlived its test: each
    reserved group (state; bundles: a Train run's workers or a Tune trial's driver; whether
    its creator is a dead Train controller), the Train actors still alive, and what Ray
    Train's `PlacementGroupCleaner`s logged. Each cleaner removes its run's group once the
    run's controller has died (Tune ends a stopped trial's actor, and the controller with
    it), and a search removes what a cleaner left (`lmforge.tune.reaper`): a group of a dead
    controller left after a search means neither did."""
    from ray.util.state import list_actors

    table = ray.util.placement_group_table()
    parts, orphans = [], set()
    try:
        orphans = set(orphaned_train_groups())  # what the search's reaper would remove
    except Exception as e:  # the report must not fail on the GCS it asks
        parts.append(f"GCS tables: {type(e).__name__}: {e}")
    parts += [f"{pg_id} {table[pg_id]['state']} {list(table[pg_id]['bundles'].values())}"
             + (" (its Train controller is dead)" if pg_id in orphans else "")
             for pg_id in _reserved_placement_groups()]
    try:
        actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=1000,
                             filters=[("state", "!=", "DEAD")], timeout=20)
        alive = [f"{a.class_name} pid {a.pid}" for a in actors if a.class_name in
                 {"TrainController", "PlacementGroupCleaner", "RayTrainWorker"}]
        parts.append(f"alive: {alive or 'no Train actor'}")
    except Exception as e:  # the report must not fail on the State API it asks
        parts.append(f"State API: {type(e).__name__}: {e}")
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for log in sorted(logs.glob("worker-*.err")):
        text = log.read_text(errors="replace")
        if ":actor_name:PlacementGroupCleaner" in text:
            said = [line for line in text.splitlines()
                    if line and not line.startswith(":") and "Cleaning up" not in line]
            if said:
                parts.append(f"cleaner {log.name}: {' | '.join(said[-5:])}")
    return "; ".join(parts)


def _stop_training_runs() -> None:
    """Kill the session cluster's Train controllers (their workers go with them) and
    remove whatever placement groups are still reserved."""
    from ray.util.state import list_actors

    for actor in list_actors(address=ray.get_runtime_context().gcs_address,
                             filters=[("class_name", "=", "TrainController"),
                                      ("state", "=", "ALIVE")]):
        try:
            os.kill(actor.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    remove_groups(_reserved_placement_groups())


@pytest.fixture
def tiny_spec(tmp_path: Path):
    """Load the tiny spec with every piece of state under this test's tmp_path."""
    def make(*overrides: str) -> JobSpec:
        return load(SPEC, [
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.storage_path={tmp_path / 'ray'}",
            f"tune.storage_path={tmp_path / 'ray'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"serve.port={free_port()}",
            *overrides,
        ])
    return make


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts, all
    under `root`. `stop()` and `start()` again keep its port and store: a tracking outage."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "server.log", "a")  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts")],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        log.close()
        proc = self.proc

        def healthy() -> bool:  # readiness: poll /health, bounded
            assert proc.poll() is None, "mlflow server exited"
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(healthy, "mlflow server /health", timeout_s=90, interval_s=0.25)
        except AssertionError as e:
            self.stop()
            pytest.fail(f"mlflow server did not start ({e}): "
                        f"{(self.root / 'server.log').read_text()}")

    def stop(self) -> None:
        """SIGKILL the server and its workers (its state is on disk under `root`)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def mlflow_service(tmp_path: Path) -> Iterator[MlflowServer]:
    """A started MlflowServer under this test's tmp_path, killed at the end."""
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(mlflow_service: MlflowServer) -> str:
    """The tracking URI of a real `mlflow server` for this test."""
    return mlflow_service.url


def tiny_model(uri: str) -> LoadedModel:
    """The model every Serve test injects as its loader: a 1-layer char-level GPT-2 (~15k
    parameters, random weights, context 64), the same for every `uri`."""
    import datasets
    import torch

    from lmforge.config import ModelConfig, TokenizerConfig
    from lmforge.data import build_tokenizer
    from lmforge.model import build_model

    corpus = datasets.Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog",
                                                  "System: User: Assistant:\n"]})
    tokenizer = build_tokenizer(TokenizerConfig(kind="char"), corpus)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64),
                        len(tokenizer), tokenizer.eos_token_id)
    return LoadedModel(model.eval(), tokenizer, name=uri)


class Paced:
    """A model whose every forward pass takes `step_s`, as a bigger model's would: generation
    time ~ step_s * tokens, so a test can hold requests in flight for as long as it needs."""

    def __init__(self, inner, step_s: float) -> None:  # noqa: ANN001
        self.inner, self.config, self.step_s = inner, inner.config, step_s

    def parameters(self):  # noqa: ANN201
        return self.inner.parameters()

    def __call__(self, **kwargs):  # noqa: ANN003, ANN204
        time.sleep(self.step_s)
        return self.inner(**kwargs)


def paced_model(uri: str, step_s: float) -> LoadedModel:
    """`tiny_model` at the pace of `step_s` per forward pass (bind step_s with a partial)."""
    loaded = tiny_model(uri)
    return LoadedModel(Paced(loaded.model, step_s), loaded.tokenizer, loaded.name)


# --- an S3-compatible object store ----------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: its endpoint and the environment that points the AWS SDK
    (pyarrow, boto3) and `lmforge.storage` at it with dummy keys."""

    endpoint_url: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}  # no lookups of an instance profile

    def fs(self) -> pyarrow.fs.S3FileSystem:
        """pyarrow's S3 filesystem on this server (paths are `BUCKET/KEY`, no scheme)."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint_url,
                                       access_key="testing", secret_key="testing",
                                       region="us-east-1", allow_bucket_creation=True)

    def bucket(self) -> str:
        """A new empty bucket; returns `s3://NAME`."""
        name = f"lmf-{uuid.uuid4().hex[:12]}"
        self.fs().create_dir(name)
        return f"s3://{name}"


@contextlib.contextmanager
def moto_s3(host: str = "127.0.0.1") -> Iterator[S3Server]:
    """`moto_server` on a free port of `host` until the block ends (moto[server], a dev
    dependency). Ready when it answers HTTP; a port taken between the pick and the bind
    (another process won the race) is retried with a new one."""
    moto = BIN / "moto_server"
    # Its log (a line per request) goes to a file: a pipe nobody reads fills up, and then
    # the server blocks on its next log line and stops answering.
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    for _ in range(3):
        port = free_port() if host == "127.0.0.1" else _free_port_on(host)
        proc = subprocess.Popen([str(moto), "-H", host, "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        raise RuntimeError(f"moto_server did not start on {host}: "
                           f"{Path(log.name).read_text()[-2000:]}")
    try:
        if time.monotonic() >= deadline:
            raise RuntimeError(f"moto_server on {url} did not answer within 60 s")
        yield S3Server(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


def _free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session (started on first use); each test takes its own
    `s3_server.bucket()`. Processes a test starts reach it with `s3_server.env`."""
    with moto_s3() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """`s3_server` with its environment set in this process (for this test)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_server
