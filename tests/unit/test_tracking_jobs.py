"""MLflow tracking (a SQLite store in a tmp dir), tracking URIs, and Ray Jobs token auth."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import JobSpec, TrackingConfig, resolve_tracking_uri
from lmforge.tracking import PARENT_TAG, RunTracker, experiment_id, flatten

# --- flatten -------------------------------------------------------------------------


def test_flatten_makes_dotted_params():
    tree = {"train": {"lr": 1e-3, "betas": [0.9, 0.99], "min_lr": None},
            "tune": {"search_space": {}, "nested": {"a": {"b": 1}}}, "top": "x"}
    assert flatten(tree) == {
        "train.lr": 1e-3, "train.betas": "[0.9, 0.99]", "train.min_lr": None,
        "tune.search_space": "{}", "tune.nested.a.b": 1, "top": "x"}


def test_flatten_a_whole_spec():
    flat = flatten(JobSpec().model_dump(mode="json"))
    assert flat["train.lr"] == 1e-3
    assert flat["model.n_layer"] == 4
    assert all(not isinstance(v, dict | list) for v in flat.values())


# --- RunTracker against a real SQLite store ------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(uri, experiment id, artifact root) of a fresh SQLite MLflow store; created once
    per module because creating the schema takes a few seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    return uri, experiment_id(uri, "x", root / "art"), root / "art"


def test_experiment_id_is_get_or_create(store):
    uri, exp, art = store
    assert experiment_id(uri, "x", art) == exp
    other = experiment_id(uri, "y", art)
    assert other != exp
    from mlflow.tracking import MlflowClient

    assert MlflowClient(uri).get_experiment(exp).artifact_location == art.resolve().as_uri()


def test_child_run_carries_its_parent(store):
    uri, exp, _ = store
    parent = RunTracker.start(uri, exp, "search")
    child = RunTracker.start(uri, exp, "trial-1", parent=parent, tags={"lmforge.trial_id": "t1"})
    run = child.client.get_run(child.run_id)
    assert run.data.tags[PARENT_TAG] == parent.run_id == run.data.tags["mlflow.parentRunId"]
    assert run.data.tags["lmforge.trial_id"] == "t1"
    assert run.info.run_name == "trial-1"
    assert PARENT_TAG not in parent.client.get_run(parent.run_id).data.tags


def test_metrics_round_trip_in_step_order(store):
    uri, exp, _ = store
    run = RunTracker.start(uri, exp, "metrics")
    run.log_metrics({"train_loss": 3.0, "lr": 1e-3}, step=10)
    run.log_metrics({"train_loss": 2, "val_loss": 2.5}, step=20)
    assert sorted(run.metric_history("train_loss")) == [(10, 3.0), (20, 2.0)]
    assert run.metric_history("val_loss") == [(20, 2.5)]
    assert run.metric_history("missing") == []


def test_params_and_status(store):
    uri, exp, _ = store
    run = RunTracker.start(uri, exp, "params")
    params = {f"p{i}": i for i in range(150)} | {"long": "x" * 7000}  # > one batch of 100
    run.log_params(params)
    data = run.client.get_run(run.run_id).data
    assert len(data.params) == 151 and data.params["p149"] == "149"
    assert len(data.params["long"]) == 6000
    assert run.status() == "RUNNING"
    run.finish("FAILED")
    assert run.status() == "FAILED"


def test_tracker_pickles_to_workers(store):
    uri, exp, _ = store
    run = RunTracker.start(uri, exp, "pickle")
    assert pickle.loads(pickle.dumps(run)) == run


# --- tracking URI resolution ---------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_relative_sqlite_uri_becomes_absolute(in_tmp):
    uri = resolve_tracking_uri(TrackingConfig(uri="sqlite:///runs/x.db"), Path("runs"))
    assert uri == f"sqlite:///{in_tmp / 'runs' / 'x.db'}"


def test_default_uri_is_sqlite_in_runs_dir(in_tmp):
    assert resolve_tracking_uri(TrackingConfig(), Path("runs")) == \
        f"sqlite:///{in_tmp / 'runs' / 'mlflow.db'}"


@pytest.mark.parametrize("uri", ["sqlite:////abs/mlflow.db", "http://mlflow:5000",
                                 "databricks://profile"])
def test_absolute_and_remote_uris_are_unchanged(in_tmp, uri):
    assert resolve_tracking_uri(TrackingConfig(uri=uri), Path("runs")) == uri


def test_bare_directory_becomes_absolute(in_tmp):
    assert resolve_tracking_uri(TrackingConfig(uri="mlruns"), Path("runs")) == \
        str(in_tmp / "mlruns")


def test_environment_uri_is_honoured_but_the_spec_wins(in_tmp, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(TrackingConfig(), Path("runs")) == "http://tracking:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(TrackingConfig(), Path("runs")) == f"sqlite:///{in_tmp}/env.db"
    spec_uri = TrackingConfig(uri="http://spec:5000")
    assert resolve_tracking_uri(spec_uri, Path("runs")) == "http://spec:5000"


# --- Ray Jobs token auth -------------------------------------------------------------
# Each case runs in a fresh interpreter: Ray's token loader is a process-wide C++
# singleton that caches the first token it sees, so in-process cases would leak a fake
# token into every later test that starts Ray.

AUTH_MODE_AFTER = (
    "import os; from lmforge import jobs; jobs._enable_token_auth(); "
    "print(os.environ.get('RAY_AUTH_MODE', 'unset'))"
)


@pytest.fixture
def ray_env(tmp_path) -> dict[str, str]:
    """An environment with HOME in tmp_path and no Ray auth settings."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    return env | {"HOME": str(home)}


def auth_mode_after(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", AUTH_MODE_AFTER], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def write_token(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("secret-token\n")


def test_token_file_in_home_enables_token_auth(ray_env):
    write_token(Path(ray_env["HOME"]) / ".ray" / "auth_token")
    assert auth_mode_after(ray_env) == "token"


def test_token_path_from_environment(ray_env, tmp_path):
    token = tmp_path / "elsewhere" / "token"
    write_token(token)
    assert auth_mode_after(ray_env | {"RAY_AUTH_TOKEN_PATH": str(token)}) == "token"


def test_token_in_environment(ray_env):
    assert auth_mode_after(ray_env | {"RAY_AUTH_TOKEN": "secret-token"}) == "token"


def test_explicit_auth_mode_is_kept(ray_env):
    write_token(Path(ray_env["HOME"]) / ".ray" / "auth_token")
    assert auth_mode_after(ray_env | {"RAY_AUTH_MODE": "disabled"}) == "disabled"


def test_no_token_leaves_auth_mode_unset(ray_env):
    assert auth_mode_after(ray_env) == "unset"


def test_a_private_cluster_names_its_own_state_api_to_its_workers(monkeypatch):
    """The cluster `lmforge` starts for itself pins its dashboard's port and gives its
    workers that address as the State API's: Ray Train's
    placement-group cleaner, which asks it with no address, then never finds another
    cluster on the machine instead (tests/integration/test_object_store.py runs the search
    it broke). Joining a cluster changes nothing."""
    import ray

    from lmforge import cluster, pipeline

    started = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: started.append(kw))
    pipeline.init_ray()
    (options,) = started
    port = options["dashboard_port"]
    assert options["address"] == "local" and options["dashboard_host"] == "127.0.0.1"
    assert options["runtime_env"] == {"env_vars": {cluster.STATE_API_ENV:
                                                   f"http://127.0.0.1:{port}"}}

    # A caller's own values win, and its other env_vars are kept.
    mine = cluster.private_cluster_options({"dashboard_port": 1234, "runtime_env": {
        "env_vars": {"A": "1"}, "pip": ["x"]}})
    assert mine["runtime_env"] == {"pip": ["x"], "env_vars": {
        "A": "1", cluster.STATE_API_ENV: "http://127.0.0.1:1234"}}
    assert cluster.private_cluster_options({"include_dashboard": False}) == {
        "include_dashboard": False}

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # joining a cluster: as it is
    pipeline.init_ray()
    assert started[1] == {"address": "127.0.0.1:6379", "log_to_driver": True}
