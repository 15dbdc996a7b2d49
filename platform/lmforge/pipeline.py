"""The stages wired together: data -> train or tune -> register -> serve check.

`execute` is what `lmforge run|train|tune` call; each stage gets its section of the spec
as a typed argument, and the one MLflow tracking URI is resolved once, here.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import ray

from lmforge.config import JobSpec, resolve_tracking_uri
from lmforge.data import PreparedData, prepare_data
from lmforge.registry import Registered, load_model, promote, register
from lmforge.tracking import RunTracker, experiment_id, flatten, lineage_tags


@dataclass(frozen=True)
class Stages:
    search: bool
    register: bool
    serve_check: bool


def init_ray(**kwargs: Any) -> None:
    """Join the cluster this process was submitted to ($RAY_ADDRESS, as Ray Jobs set it), or
    start a private local one. Never attach to some other cluster by accident."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        _warn_if_another_cluster_runs()
    ray.init(address=address, log_to_driver=True, **kwargs)


def _warn_if_another_cluster_runs() -> None:
    """With two Ray clusters on one machine, Ray 2.60 Train's placement-group cleaner asks
    the state API without an address, fails ("multiple active Ray instances") and leaves
    a finished trial's resources reserved: the next trial then waits for them forever."""
    try:
        others = sorted(ray._private.services.find_gcs_addresses())  # Ray's own `ps` scan
    except Exception:  # a private helper: if it moved, go without the warning
        return
    if others:
        print(f"[lmforge] warning: another Ray cluster runs on this machine ({', '.join(others)})."
              " Ray Train cannot tell two local clusters apart when it cleans up after a "
              "run, which can leave later trials waiting for resources. Stop it (`ray stop`)"
              " or run on it (RAY_ADDRESS=... or `lmforge submit`).", file=sys.stderr,
              flush=True)


def execute(spec: JobSpec, stages: Stages, runs_dir: Path = Path("runs"),
            resume: bool = False) -> dict[str, Any]:
    """Run the stages. `resume` continues the search (Tune experiment) or training run
    named `tracking.run_name` from its latest state, under its original MLflow run."""
    start = time.perf_counter()
    run_name = spec.tracking.run_name or "lmforge"
    run_dir = runs_dir / run_name
    if not stages.search and not resume:
        from lmforge.train import RunExists, run_exists

        if run_exists(spec.train.storage_path, run_name):  # before anything is started
            raise RunExists(f"run {run_name!r} already exists under train.storage_path "
                            f"({spec.train.storage_path}); pass --resume to continue it, or "
                            "set another tracking.run_name")
    if stages.search and resume:
        from lmforge.tune import check_settings_unchanged

        check_settings_unchanged(spec, run_name)  # before anything is started
    run_dir.mkdir(parents=True, exist_ok=True)

    data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
    print(f"[lmforge] data {data.fingerprint}: {data.train_tokens:,} train / "
          f"{data.val_tokens:,} validation tokens, vocab {data.vocab_size}", flush=True)

    tags = lineage_tags(data.fingerprint, f"{spec.tokenizer.kind}, vocab {data.vocab_size}")
    if resume:
        if stages.search:
            from lmforge.tune import resume_state

            state = resume_state(spec, run_name)
        else:
            from lmforge.train import resume_state

            state = resume_state(spec.train.storage_path, run_name)
        uri, exp = state["tracking_uri"], state["experiment_id"]
        run = RunTracker(uri, state["parent_run_id"])
        run.client.update_run(run.run_id, status="RUNNING")
        run.set_tags({"lmforge.resumed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    else:
        uri = resolve_tracking_uri(spec.tracking, runs_dir)
        exp = experiment_id(uri, spec.tracking.experiment, runs_dir / "mlartifacts")
        run = RunTracker.start(uri, exp, run_name, tags=tags)
        _log_spec(run, spec, data)
    init_ray()
    metrics_sampler = run.system_metrics(spec.tracking.system_metrics_interval_s)
    metrics_sampler.__enter__()
    try:
        summary: dict[str, Any] = {"run_name": run_name, "mlflow_run_id": run.run_id,
                                   "tracking_uri": uri, "data_fingerprint": data.fingerprint}
        if stages.search:
            from lmforge.tune import run_search

            outcome = run_search(spec, data, run, exp, name=run_name, run_tags=tags,
                                 resume=resume)
            best = outcome.best
            run.log_params({f"best.{k}": v for k, v in best.config.items()})
            summary |= {"trials": len(outcome.trials), "best_config": best.config,
                        "best_trial_run_id": best.mlflow_run_id,
                        "trials_failed": sum(t.status == "FAILED" for t in outcome.trials),
                        "trial_steps_total": sum(t.steps for t in outcome.trials)}
            if outcome.pareto:
                summary["pareto"] = [{"config": t.config, "val_loss": t.best_val_loss,
                                      "tokens_per_s": t.tokens_per_s,
                                      "mlflow_run_id": t.mlflow_run_id} for t in outcome.pareto]
            checkpoint, model_run = best.checkpoint, RunTracker(uri, best.mlflow_run_id)
            result = {"steps": best.steps, "val_loss": best.val_loss,
                      "best_val_loss": best.best_val_loss, "tokens_per_s": best.tokens_per_s}
        else:
            from lmforge.train import run_training

            outcome = run_training(spec, data, run, name=run_name, resume=resume)
            run.log_loss_curve()
            checkpoint, model_run = outcome.checkpoint, run
            result = {"steps": outcome.steps, "val_loss": outcome.val_loss,
                      "best_val_loss": outcome.best_val_loss,
                      "tokens_per_s": outcome.tokens_per_s, "attempts": outcome.attempts,
                      "resumed_from_step": outcome.resumed_from_step}
        summary |= result | {"checkpoint": checkpoint}
        run.log_metrics({f"final_{k}": v for k, v in result.items()}, step=result["steps"])

        if stages.register:
            registered = register(
                str(checkpoint), model_run, spec.registry,
                max_new_tokens=min(32, spec.model.block_size // 2),
                tags={"lmforge.run_id": model_run.run_id, "lmforge.pipeline_run_id": run.run_id,
                      "lmforge.data_fingerprint": data.fingerprint,
                      "lmforge.tokenizer": tags["lmforge.tokenizer"],
                      "lmforge.checkpoint": checkpoint,
                      **{f"lmforge.{k}": v for k, v in result.items()},
                      "lmforge.spec": spec_json(spec)},
            )
            summary |= {"registered_model": registered.name,
                        "registered_version": registered.version, "model_uri": registered.uri}
            if spec.registry.promote:
                decision = promote(registered.name, data, spec.registry, uri)
                summary["promotion"] = asdict(decision)
                print(f"[lmforge] promotion gate: {decision.reason} -> "
                      f"{'promoted' if decision.promoted else 'refused'}", flush=True)
                champion = run.client.get_model_version_by_alias(
                    registered.name, spec.registry.champion_alias)
                registered = Registered(registered.name, int(champion.version),
                                        spec.registry.champion_alias,
                                        f"models:/{registered.name}@{spec.registry.champion_alias}")
                summary["model_uri"] = registered.uri
            if stages.serve_check:
                summary["completion"] = serve_check(spec, registered, uri)
        summary["wall_s"] = round(time.perf_counter() - start, 2)
        metrics_sampler.__exit__(None, None, None)
        run.finish()
    except BaseException:
        metrics_sampler.__exit__(None, None, None)
        run.finish("FAILED")
        raise
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def serve_check(spec: JobSpec, registered: Registered, tracking_uri: str) -> dict[str, Any]:
    """Deploy the registered model, send one real HTTP completion, and shut Serve down."""
    from ray import serve

    from lmforge.serve import build_app, deploy

    loader = functools.partial(load_model, tracking_uri=tracking_uri)
    url = deploy(build_app(loader, spec.serve, registered.uri), spec.serve)
    try:
        body = {"prompt": "The ", "max_tokens": 24, "temperature": 0.8, "seed": 0}
        keys = spec.serve.api_keys
        headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        reply = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        reply.raise_for_status()
        text = reply.json()["choices"][0]["text"]
        print(f"[lmforge] {url}/v1/completions {body['prompt']!r} -> {text!r}", flush=True)
        return {"url": url, "prompt": body["prompt"], "text": text}
    finally:
        serve.shutdown()


def spec_json(spec: JobSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def _log_spec(run: RunTracker, spec: JobSpec, data: PreparedData) -> None:
    run.log_params(flatten(spec.model_dump(mode="json")))
    run.log_dict(spec.model_dump(mode="json"), "spec.yaml")
    run.log_artifacts(data.tokenizer_dir, "tokenizer")
