"""The stages wired together: data -> train or search -> register and promote -> serve check.

`execute` is what `lmforge run|train|tune` call. It reads as the sequence it runs: check
that the named run may start (or resume), join Ray and check that the run fits on the
cluster, prepare the data, open the run, train or search, register and promote, check the
endpoint, close. Each stage gets its section of the spec as a typed argument; the MLflow
tracking URI is resolved once, when the run opens.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lmforge.capacity import Demand, ensure_fits
from lmforge.cluster import init_ray
from lmforge.config import JobSpec, TokenizerConfig, resolve_tracking_uri
from lmforge.data import PreparedData, prepare_data
from lmforge.registry import (
    SPEC_TAG,
    Registered,
    by_alias,
    is_model_uri,
    local_model_dir,
    pinned,
    promote,
    register,
    spec_tag,
)
from lmforge.runs import NamedRun, RunState, require_shared_storage
from lmforge.serve import deploy, serving_app, with_secrets
from lmforge.tracking import RunTracker, experiment_id, flatten, lineage_tags, record_failure
from lmforge.train import Preempted, run_training
from lmforge.tune import check_settings_unchanged, run_search, search_settings


@dataclass(frozen=True)
class Stages:
    search: bool
    register: bool
    serve_check: bool


@dataclass
class Trained:
    """What training (or the search's best trial) produced, whichever ran."""

    checkpoint: str
    model_run: RunTracker
    """The MLflow run the model is logged under: the training run, or the best trial's."""
    steps: int
    val_loss: float
    best_val_loss: float
    tokens_per_s: float
    details: dict[str, Any] = field(default_factory=dict)
    """Training: attempts, resumed_from_step. Search: trials, best_config, ..."""

    def metrics(self) -> dict[str, float]:
        return {"steps": self.steps, "val_loss": self.val_loss,
                "best_val_loss": self.best_val_loss, "tokens_per_s": self.tokens_per_s}


@dataclass
class Summary:
    """What `execute` did: runs/RUN_NAME/summary.json, and the CLI's last stdout line.
    Fields a run did not get to (a search's trials in a training run, say) are left out of
    the JSON."""

    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    data_fingerprint: str
    steps: int
    val_loss: float
    best_val_loss: float
    tokens_per_s: float
    checkpoint: str
    # training only
    attempts: int | None = None
    resumed_from_step: int | None = None
    tracking_dropped: int | None = None
    """Metric values training could not get to MLflow (an outage past
    `tracking.buffer_size`, or still unsent at `tracking.flush_timeout_s`)."""
    # search only
    trials: int | None = None
    best_config: dict[str, Any] | None = None
    best_trial_run_id: str | None = None
    trials_failed: int | None = None
    trial_steps_total: int | None = None
    pareto: list[dict[str, Any]] | None = None
    # register, promote, serve check
    registered_model: str | None = None
    registered_version: int | None = None
    model_uri: str | None = None
    promotion: dict[str, Any] | None = None
    completion: dict[str, Any] | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def execute(spec: JobSpec, stages: Stages, runs_dir: Path = Path("runs"),
            resume: bool = False) -> Summary:
    """Run the stages. `resume` continues the search (Tune experiment) or training run
    named `tracking.run_name` from its latest state, under its original MLflow run."""
    start = time.perf_counter()
    named = NamedRun.of(spec, search=stages.search)
    recorded = _may_start(spec, named, resume)  # before anything is started
    init_ray()
    # A run the cluster can never hold would wait for its workers forever: fail (or wait
    # for an autoscaler, bounded) before preparing data or opening an MLflow run.
    ensure_fits(Demand.of(spec, search=stages.search), spec.train.scheduling_timeout_s)
    # On several hosts every path must be shared: refused here, before the data stage
    # writes a local cache other hosts cannot read, or any worker starts.
    require_shared_storage(spec, stages.search)
    spec, tokenizer = _registered_base(
        spec, recorded.tracking_uri if recorded else resolve_tracking_uri(spec.tracking, runs_dir))
    data = prepare_data(spec.data, tokenizer, spec.model.block_size)
    print(f"[lmforge] data {data.fingerprint}: {data.train_tokens:,} train / "
          f"{data.val_tokens:,} validation tokens, vocab {data.vocab_size}", flush=True)
    tags = lineage_tags(data.fingerprint, f"{spec.tokenizer.kind}, vocab {data.vocab_size}")
    with _open_run(spec, named, data, tags, runs_dir, recorded) as run:
        if stages.search:
            trained = _search(spec, data, run, tags, named.name, resume)
        else:
            trained = _train(spec, data, run, named.name)
        run.log_metrics({f"final_{k}": v for k, v in trained.metrics().items()},
                        step=trained.steps)
        summary = Summary(run_name=named.name, mlflow_run_id=run.run_id,
                          tracking_uri=run.uri, data_fingerprint=data.fingerprint,
                          checkpoint=trained.checkpoint, **trained.metrics(),
                          **trained.details)
        if stages.register:
            registered = _register(spec, data, trained, run, tags, summary)
            if stages.serve_check:
                summary.completion = serve_check(spec, registered, run.uri)
        summary.wall_s = round(time.perf_counter() - start, 2)
    run_dir = runs_dir / named.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    return summary


def _registered_base(spec: JobSpec, tracking_uri: str) -> tuple[JobSpec, TokenizerConfig]:
    """A registered model to fine-tune (`models:/NAME@ALIAS`) pinned to the version its
    alias names now, so every worker, restart and the final merge use that one; and the
    tokenizer settings the data stage gets: a registered tokenizer as a local copy (the
    stage, on this machine, reads it; workers get the data's own copy of it)."""
    model, tok = spec.model, spec.tokenizer
    if is_model_uri(model.pretrained):
        model = model.model_copy(update={"pretrained": pinned(model.pretrained, tracking_uri)})
    if tok.kind == "pretrained" and is_model_uri(tok.path):
        path = pinned(tok.path, tracking_uri)
        spec = spec.model_copy(update={"tokenizer": tok.model_copy(update={"path": path})})
        tok = tok.model_copy(update={"path": local_model_dir(path, tracking_uri,
                                                             "tokenizer.path")})
    return spec.model_copy(update={"model": model}), tok


def _may_start(spec: JobSpec, named: NamedRun, resume: bool) -> RunState | None:
    """The state a resume continues from (checked against the spec), or None for a new
    run, which must not exist yet."""
    if not resume:
        named.require_new()
        return None
    recorded = named.state()
    if named.search:
        check_settings_unchanged(spec, recorded, named.name)
    return recorded


@contextlib.contextmanager
def _open_run(spec: JobSpec, named: NamedRun, data: PreparedData, tags: dict[str, str],
              runs_dir: Path, recorded: RunState | None) -> Iterator[RunTracker]:
    """The run's MLflow (parent) run, new or the one a resume continues, sampling system
    metrics while open; FINISHED when the block ends, KILLED when stopped (SIGTERM,
    Ctrl-C), FAILED when it raises; recording the end never hides the error itself."""
    if recorded is not None:
        run = RunTracker(recorded.tracking_uri, recorded.parent_run_id)
        run.client.update_run(run.run_id, status="RUNNING")
        run.set_tags({"lmforge.resumed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    else:
        uri = resolve_tracking_uri(spec.tracking, runs_dir)
        exp = experiment_id(uri, spec.tracking.experiment, runs_dir / "mlartifacts")
        run = RunTracker.start(uri, exp, named.name, tags=tags)
        run.log_params(flatten(spec.model_dump(mode="json")))
        run.log_dict(spec.model_dump(mode="json"), "spec.yaml")
        run.log_artifacts(data.tokenizer_dir, "tokenizer")
        named.record(RunState(run.run_id, exp, uri,
                              search_settings(spec.tune) if named.search else {}))
    try:
        with run.system_metrics(spec.tracking.system_metrics_interval_s):
            yield run
    except BaseException as e:
        stopped = isinstance(e, Preempted | KeyboardInterrupt | SystemExit)
        record_failure(run, e, traceback.format_exc(), "KILLED" if stopped else "FAILED")
        raise
    run.finish()


def _train(spec: JobSpec, data: PreparedData, run: RunTracker, name: str) -> Trained:
    outcome = run_training(spec, data, run, name=name, preemptible=True)
    run.log_loss_curve()
    return Trained(outcome.checkpoint, run, outcome.steps, outcome.val_loss,
                   outcome.best_val_loss, outcome.tokens_per_s,
                   {"attempts": outcome.attempts, "resumed_from_step": outcome.resumed_from_step,
                    "tracking_dropped": outcome.tracking_dropped})


def _search(spec: JobSpec, data: PreparedData, run: RunTracker, tags: dict[str, str],
            name: str, resume: bool) -> Trained:
    experiment = run.client.get_run(run.run_id).info.experiment_id
    outcome = run_search(spec, data, run, experiment, name=name, run_tags=tags, resume=resume)
    best = outcome.best
    run.log_params({f"best.{k}": v for k, v in best.config.items()})
    details: dict[str, Any] = {
        "trials": len(outcome.trials), "best_config": best.config,
        "best_trial_run_id": best.mlflow_run_id,
        "trials_failed": sum(t.status == "FAILED" for t in outcome.trials),
        "trial_steps_total": outcome.steps_total}
    if outcome.pareto:
        details["pareto"] = [{"config": t.config, "val_loss": t.best_val_loss,
                              "tokens_per_s": t.tokens_per_s, "mlflow_run_id": t.mlflow_run_id}
                             for t in outcome.pareto]
    return Trained(best.checkpoint, RunTracker(run.uri, best.mlflow_run_id), best.steps,
                   best.val_loss, best.best_val_loss, best.tokens_per_s, details)


def _register(spec: JobSpec, data: PreparedData, trained: Trained, run: RunTracker,
              tags: dict[str, str], summary: Summary) -> Registered:
    """Register the model as the candidate, run the promotion gate when the spec asks;
    return what the serve check should deploy (the champion after a gate)."""
    model_run = trained.model_run
    registered = register(
        trained.checkpoint, model_run, spec.registry,
        max_new_tokens=min(32, spec.model.block_size // 2),
        tags={"lmforge.run_id": model_run.run_id, "lmforge.pipeline_run_id": run.run_id,
              "lmforge.data_fingerprint": data.fingerprint,
              "lmforge.tokenizer": tags["lmforge.tokenizer"],
              "lmforge.checkpoint": trained.checkpoint,
              **{f"lmforge.{k}": v for k, v in trained.metrics().items()},
              **{f"lmforge.{k}": v for k, v in trained.details.items()
                 if k in ("attempts", "resumed_from_step")},
              SPEC_TAG: spec_tag(spec)},
    )
    summary.registered_model, summary.registered_version = registered.name, registered.version
    summary.model_uri = registered.uri
    if spec.registry.promote:
        decision = promote(registered.name, data, spec.registry, run.uri)
        summary.promotion = asdict(decision)
        print(f"[lmforge] promotion gate: {decision.reason} -> "
              f"{'promoted' if decision.promoted else 'refused'}", flush=True)
        registered = by_alias(registered.name, spec.registry.champion_alias, run.uri)
        summary.model_uri = registered.uri
    return registered


def serve_check(spec: JobSpec, registered: Registered, tracking_uri: str) -> dict[str, Any]:
    """Deploy the registered model, send one real HTTP completion, and shut Serve down."""
    from ray import serve

    url = deploy(serving_app(registered.uri, spec.serve, tracking_uri), spec.serve)
    try:
        body = {"prompt": "The ", "max_tokens": 24, "temperature": 0.8, "seed": 0}
        keys = with_secrets(spec.serve).api_keys
        headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        reply = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        reply.raise_for_status()
        text = reply.json()["choices"][0]["text"]
        print(f"[lmforge] {url}/v1/completions {body['prompt']!r} -> {text!r}", flush=True)
        return {"url": url, "prompt": body["prompt"], "text": text}
    finally:
        serve.shutdown()
