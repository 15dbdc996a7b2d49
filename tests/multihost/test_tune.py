"""`lmforge tune` on hosts that share nothing but the object store and the tracking server:
the search's state (`tune.storage_path`), its trials' checkpoints (`train.storage_path`)
and the data (`data.cache_dir`) on s3://. Its driver is SIGKILLed mid-search, once the
bucket's copy of Tune's state says one trial finished and the next runs; the same command
with `--resume` then finishes the search from the bucket (`Tuner.restore` through
pyarrow's S3 filesystem), without running the finished trial again, and registers the
best trial."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

from mlflow.tracking import MlflowClient

from lmforge.tracking import RunTracker
from lmforge.tune.report import trial_runs

from ..integration.helpers import SPEC, file_size, lmforge, wait_until
from .harness import Hosts
from .test_train import STALL_S, summary_of

# Two trials of 40 steps, one at a time (each takes both hosts' CPU), evaluated (and
# checkpointed) every 20; ASHA may stop trial 2 at step 20. No serve check: what is
# tested is the search and its registration.
SEARCH = ("train.steps=40", "train.eval_every=20", "tune.num_trials=2", "serve.enabled=false",
          "tracking.run_name=mh-search", "registry.model_name=mh-tune")


def trial_states(hosts: Hosts, experiment: str) -> dict[str, str]:
    """Trial id -> status (RUNNING, TERMINATED, ...) in the newest copy of Tune's state in
    the bucket under `experiment/` ({} before Tune has put one there). Tune's
    experiment_state JSON holds each trial's fields as a JSON string."""
    keys = [k for k in hosts.list_bucket(experiment)  # not lmforge's copies in subfolders
            if k.rsplit("/", 1)[0] == experiment
            and fnmatch(k.rsplit("/", 1)[1], "experiment_state-*.json")]
    if not keys:
        return {}
    try:  # named by start time: newest last
        state = json.loads(hosts.read_object(max(keys)))
    except ValueError:
        # Tune rewrites its local copy in place before each upload, and an upload still
        # running from the turn before can put the file half written: not yet readable.
        return {}
    trials = [json.loads(fields) for fields, _ in state["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def runs_of(client: MlflowClient, parent_id: str, trial_id: str) -> list[str]:
    """Ids of the MLflow runs a trial has had under the search's parent run."""
    experiment = client.get_run(parent_id).info.experiment_id
    return [r.info.run_id for r in client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
                                    f"tags.`lmforge.trial_id` = '{trial_id}'")]


def test_a_search_killed_mid_way_resumes_from_the_bucket(two_hosts: Hosts, tmp_path: Path):
    hosts = two_hosts
    experiment = "tune/search/mh-search"
    args = ["tune", str(SPEC), *SEARCH, f"data.cache_dir={hosts.s3('tune/cache')}",
            f"train.storage_path={hosts.s3('tune/ray')}",
            f"tune.storage_path={hosts.s3('tune/search')}"]
    # Tune puts its state in the bucket every 10 s or more (its default): trial 2 runs for
    # longer (its workers alone take ~15 s to start on these hosts). Not more often: Tune
    # rewrites its local copy in place while the last upload may still read it.
    env = hosts.driver_env()
    log = tmp_path / "driver.log"
    driver = hosts.head.popen([sys.executable, "-m", "lmforge", *args], env, log)
    try:
        wait_until(lambda: sorted(trial_states(hosts, experiment).values())
                   == ["RUNNING", "TERMINATED"] or driver.poll() is not None,
                   "trial 1 finished and trial 2 running, in the bucket's state",
                   progress=lambda: (file_size(log), len(hosts.list_bucket("tune/"))),
                   stall_s=STALL_S, interval_s=0.5, detail=lambda: log.read_text()[-3000:])
        assert driver.poll() is None, log.read_text()[-3000:]
    finally:  # no cleanup by the driver: as when its machine goes away
        killed_ms = time.time() * 1000
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    states = trial_states(hosts, experiment)
    (finished,) = [t for t, status in states.items() if status == "TERMINATED"]
    (interrupted,) = [t for t, status in states.items() if status == "RUNNING"]

    client = MlflowClient(hosts.mlflow_url)
    (parent,) = client.search_runs([client.get_experiment_by_name("integration").experiment_id],
                                   filter_string="tags.mlflow.runName = 'mh-search'")
    parent_id = parent.info.run_id
    (finished_run,) = runs_of(client, parent_id, finished)

    out = lmforge(*args, "--resume", prefix=hosts.head.enter(), env=env, stall_s=STALL_S)
    summary = summary_of(out)

    # The same search, under the same parent run, with its two trials and none failed.
    assert summary.run_name == "mh-search" and summary.mlflow_run_id == parent_id, summary
    assert summary.trials == 2 and summary.trials_failed == 0, summary
    assert sorted(trial_states(hosts, experiment).items()) == sorted(
        {finished: "TERMINATED", interrupted: "TERMINATED"}.items())
    # The finished trial was not run again: still its one run, closed as finished.
    assert runs_of(client, parent_id, finished) == [finished_run]
    assert client.get_run(finished_run).info.status == "FINISHED"
    # The interrupted one ran again, under a new run (one the killed driver had started
    # is closed), to its end or until ASHA stopped it.
    again = [client.get_run(r).info for r in runs_of(client, parent_id, interrupted)]
    assert max(r.start_time for r in again) > killed_ms, again
    assert {r.status for r in again} <= {"FINISHED", "KILLED"}, again
    runs = trial_runs(RunTracker(hosts.mlflow_url, parent_id))
    assert len(runs) == 2, runs
    assert client.get_run(parent_id).info.status == "FINISHED"

    # The best trial is registered (and promoted: the model's first version) in the
    # tracking server every host uses.
    assert summary.registered_model == "mh-tune" and summary.registered_version == 1
    assert summary.best_trial_run_id in {r.info.run_id for r in runs.values()}
    version = client.get_model_version_by_alias("mh-tune", "champion")
    assert int(version.version) == 1
    # Everything of the search is in the bucket, nothing on a host's disk.
    assert any(k.startswith(f"{experiment}/") and k.endswith("tuner.pkl")
               for k in hosts.list_bucket(experiment))
    for host in hosts.hosts:
        assert not list(host.checkout.glob("s3:*")) and not (host.runs / "cache").exists()
