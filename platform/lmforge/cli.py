"""The `lmforge` command. Thin: parse, validate, call the library, print, exit.

Every command that takes a SPEC also takes overrides as trailing `key.sub=value` words,
e.g. `lmforge train jobs/quickstart.yaml train.steps=50 model.n_layer=2`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lmforge.capacity import ResourceError
from lmforge.config import JobSpec, SpecError, default_run_name, load, resolve_tracking_uri
from lmforge.runs import NamedRun, ResumeError, RunExists, resume_target
from lmforge.signals import StopSignals

app = typer.Typer(
    help="Train, tune, track and serve language models on Ray from one YAML job spec.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="Job spec YAML file.", show_default=False)]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Spec overrides as key.sub=value, e.g. train.steps=50.",
                   show_default=False),
]
Address = Annotated[str, typer.Option(
    "--address", envvar="RAY_ADDRESS",
    help="Ray dashboard address of the cluster, e.g. http://127.0.0.1:8265.")]


def _load(spec: Path | None, overrides: list[str] | None, name_run: bool = True) -> JobSpec:
    """Validate before anything heavy starts; a bad spec exits 2 with file and field named."""
    try:
        return load(spec, overrides or [], name_run=name_run)
    except SpecError as e:
        err.print(f"[bold red]invalid spec[/] {e}", highlight=False, markup=True)
        raise typer.Exit(2) from None


def _execute(spec: JobSpec, search: bool, register: bool, serve_check: bool,
             resume: bool = False) -> None:
    import ray

    from lmforge.pipeline import Stages, execute
    from lmforge.serve import with_secrets
    from lmforge.train import Preempted
    from lmforge.train.preempt import EXIT_CODE as PREEMPTED_EXIT

    if serve_check:  # its API keys are read at the end of the run: check them first
        try:
            with_secrets(spec.serve)
        except ValueError as e:
            err.print(f"[bold red]cannot serve[/] {e}", highlight=False, markup=True)
            raise typer.Exit(2) from None
    try:
        summary = execute(spec, Stages(search=search, register=register,
                                       serve_check=serve_check), resume=resume)
    except RunExists as e:
        err.print(f"[bold red]run exists[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    except ResumeError as e:
        err.print(f"[bold red]cannot resume[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    except ResourceError as e:
        err.print(f"[bold red]does not fit[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    except Preempted as e:
        ray.shutdown()
        err.print(f"[bold yellow]preempted[/] {e}", highlight=False)
        raise typer.Exit(PREEMPTED_EXIT) from None
    if register:
        err.print(f"Registered {summary.model_uri} (version {summary.registered_version})."
                  f" Keep an endpoint up with: [bold]lmforge serve {summary.model_uri}[/]")
    ray.shutdown()  # before the summary, so it stays the last line on stdout
    print(json.dumps(summary.to_dict(), default=str), flush=True)


@app.command()
def validate(spec: SpecArg, overrides: Overrides = None) -> None:
    """Check a spec (and overrides) without running anything; exit 2 naming any bad field."""
    job = _load(spec, overrides)
    err.print(f"[green]ok[/] {spec}: run {job.tracking.run_name}, "
              f"{'tune ' + str(job.tune.num_trials) + ' trials' if job.tune.enabled else 'train'}"
              f" x {job.train.steps} steps on {job.train.workers} workers")
    print(job.model_dump_json())


Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue a run whose driver stopped (crash, Ctrl-C, lost node) from its "
    "latest state: tracking.run_name's, or else the newest run of this spec. Training picks "
    "up at its latest checkpoint (later steps see the same data and RNG as an uninterrupted "
    "run); a search keeps its finished trials and the searcher's history.")]


def _resume(job: JobSpec, spec: Path, search: bool) -> None:
    """Point tracking.run_name at the run `--resume` continues, or exit 2 saying there is
    none (`lmforge.runs.resume_target`: the one rule for train and search alike)."""
    try:
        job.tracking.run_name = resume_target(job, search, spec).name
    except ResumeError as e:
        err.print(f"[bold red]cannot resume[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    err.print(f"Resuming {'search' if search else 'run'} [bold]{job.tracking.run_name}[/]")


@app.command()
def run(
    spec: SpecArg,
    overrides: Overrides = None,
    resume: Resume = False,
    resume_if_started: Annotated[bool, typer.Option(
        "--resume-if-started", help="Resume tracking.run_name's run if it got as far as "
        "starting, else start it (never another run). `lmforge submit` adds it when the "
        "run's last job failed or was stopped.")] = False,
) -> None:
    """Every stage the spec enables: data, tune (or train), register, serve check.

    Ends with summary.json in runs/RUN_NAME/ and the same JSON as the last stdout line.
    """
    job = _load(spec, overrides)
    if resume_if_started and not resume:
        resume = NamedRun.of(job, search=job.tune.enabled).started()
        if not resume:
            err.print(f"Run [bold]{job.tracking.run_name}[/] never started: starting it")
    if resume:
        _resume(job, spec, search=job.tune.enabled)
    _execute(job, search=job.tune.enabled, register=job.registry.enabled,
             serve_check=job.registry.enabled and job.serve.enabled, resume=resume)


@app.command()
def data(spec: SpecArg, overrides: Overrides = None) -> None:
    """The data stage alone: list the corpus, train the tokenizer on a sample, tokenize and
    pack it on Ray Data into token shards under data.cache_dir/FINGERPRINT/ (reused when
    there). Progress goes to stderr; the last stdout line is the summary JSON."""
    import ray

    from lmforge.data.stage import run_stage

    job = _load(spec, overrides, name_run=False)
    try:
        result = run_stage(job.data, job.tokenizer, block_size=job.model.block_size)
    except ValueError as e:  # a spec field that cannot work (named in the message)
        err.print(f"[bold red]data stage failed[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    ray.shutdown()  # before the summary, so it stays the last line on stdout
    print(json.dumps(result.summary()), flush=True)


@app.command("data-examples")
def data_examples(
    name: Annotated[str, typer.Argument(help="The set: pydoc-qa (questions about Python's "
                                        "documentation topics, answered by their text).")],
    out: Annotated[Path, typer.Argument(help="The .jsonl file to write.")],
    fmt: Annotated[str, typer.Option("--format", help="instruction or chat records.")
                   ] = "instruction",
    max_chars: Annotated[int, typer.Option(help="Longest answer, in characters.")] = 300,
    questions: Annotated[int, typer.Option(help="Phrasings per section, 1 to 3.")] = 3,
) -> None:
    """Write an instruction or chat set that needs no network (built from text that ships
    with Python), for `data.format: instruction|chat`. Prints {"records": N, "path": ...}."""
    from lmforge.data.examples import SETS, write_jsonl

    if name not in SETS:
        err.print(f"[bold red]unknown set[/] {name!r}; choose from {', '.join(SETS)}")
        raise typer.Exit(2)
    if fmt not in ("instruction", "chat"):
        err.print(f"[bold red]--format[/]: instruction or chat, not {fmt!r}")
        raise typer.Exit(2)
    try:
        records = SETS[name](max_chars=max_chars, fmt=fmt, questions=questions)
    except ValueError as e:
        err.print(f"[bold red]bad option[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    write_jsonl(records, out)
    print(json.dumps({"records": len(records), "path": str(out)}), flush=True)


@app.command()
def train(spec: SpecArg, overrides: Overrides = None, resume: Resume = False) -> None:
    """Data and one distributed training run (registered when registry.enabled)."""
    job = _load(spec, overrides)
    if resume:
        _resume(job, spec, search=False)
    _execute(job, search=False, register=job.registry.enabled, serve_check=False,
             resume=resume)


@app.command()
def tune(
    spec: SpecArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue a search whose driver was killed: tracking.run_name's, or "
        "else the newest search of this spec under tune.storage_path. Finished trials are "
        "kept, the searcher keeps its history.")] = False,
) -> None:
    """Data and a hyperparameter search (Optuna TPE + ASHA); registers the best trial as
    `candidate` and runs the promotion gate."""
    job = _load(spec, overrides)
    if resume:
        _resume(job, spec, search=True)
    _execute(job, search=True, register=job.registry.enabled, serve_check=False, resume=resume)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.", show_default=False)],
    overrides: Overrides = None,
    spec: Annotated[Path | None, typer.Option(help="Take the held-out data, aliases, margin "
                                              "and tracking URI from this spec. Default: the "
                                              "spec the candidate was trained from.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking URI (default: the spec's, $MLFLOW_TRACKING_URI "
        "or sqlite:///runs/mlflow.db).")] = None,
) -> None:
    """Promotion gate: score `candidate` and `champion` on the same held-out text and move
    `champion` only if the candidate is better by registry.promote_margin (or there is no
    champion). Prints the decision as JSON; it is also recorded on the candidate's version."""
    from dataclasses import asdict

    from mlflow.exceptions import MlflowException

    from lmforge.config import TrackingConfig, parse_overrides
    from lmforge.data import prepare_data
    from lmforge.registry import PromotionError, trained_spec
    from lmforge.registry import promote as run_gate

    job = _load(spec, overrides) if spec is not None else None
    uri = tracking_uri or resolve_tracking_uri(job.tracking if job else TrackingConfig(),
                                               Path("runs"))
    if job is None:
        alias = "candidate"
        try:
            alias = load(None, overrides or []).registry.alias
            job = trained_spec(name, alias, uri).with_values(parse_overrides(overrides or []))
        except (SpecError, ValueError) as e:
            err.print(f"[bold red]invalid spec[/] {e}", highlight=False)
            raise typer.Exit(2) from None
        except MlflowException as e:
            err.print(f"[bold red]cannot promote[/] {name}@{alias}: {e.message}",
                      highlight=False)
            raise typer.Exit(1) from None
    data = prepare_data(job.data, job.tokenizer, job.model.block_size)
    try:
        decision = run_gate(name, data, job.registry, uri)
    except PromotionError as e:
        err.print(f"[bold red]cannot promote[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    err.print(f"{name}: {decision.reason} -> "
              f"[bold]{'promoted' if decision.promoted else 'refused'}[/]")
    print(json.dumps(asdict(decision)), flush=True)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="A training checkpoint directory, e.g. runs/ray/RUN/checkpoint_0000200.",
        show_default=False)],
    out: Annotated[Path, typer.Argument(help="Where to write the Hugging Face directory.",
                                        show_default=False)],
) -> None:
    """Turn a training checkpoint (DDP, or FSDP shards) into one Hugging Face directory.

    The result holds model.safetensors, config.json and the tokenizer: load it with
    AutoModelForCausalLM.from_pretrained, serve it with `lmforge serve OUT`, or fine-tune
    from it with model.pretrained=OUT. FSDP shards are gathered in this one process (no
    cluster needed). OUT is written whole or not at all.
    """
    from lmforge.train.checkpoint import IncompleteCheckpoint, UnsafeCheckpoint, export_hf

    try:
        written = export_hf(checkpoint, out)
    except (FileNotFoundError, IncompleteCheckpoint, UnsafeCheckpoint) as e:
        err.print(f"[red]cannot export[/]: {e}")
        raise typer.Exit(1) from None
    err.print(f"Exported {checkpoint} to [bold]{written}[/]")
    print(json.dumps({"checkpoint": str(checkpoint), "hf_directory": str(written)}))


@app.command()
def serve(
    model_uri: Annotated[str, typer.Argument(
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a HF model directory.",
        show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Serve settings as serve.key=value, e.g. serve.port=8001.", show_default=False)]
    = None,
    spec: Annotated[Path | None, typer.Option(help="Take serve and tracking settings from "
                                              "this spec.")] = None,
) -> None:
    """Deploy a model as an OpenAI-compatible endpoint; runs until interrupted (Ctrl-C)."""
    from ray import serve as ray_serve

    from lmforge.cluster import init_ray
    from lmforge.serve import deploy, serving_app

    job = _load(spec, overrides)
    tracking_uri = resolve_tracking_uri(job.tracking, Path("runs"))
    try:  # before Ray starts: a bad $LMFORGE_API_KEYS exits 2, naming it
        # models:/NAME@ALIAS is pinned to its version at start, and followed as it moves.
        serving = serving_app(model_uri, job.serve, tracking_uri)
    except ValueError as e:
        err.print(f"[bold red]cannot serve[/] {e}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    init_ray()
    url = deploy(serving, job.serve)  # Ctrl-C here interrupts it, as anywhere before
    try:
        with StopSignals() as stop:  # caught before the ready line below is printed
            err.print(f"Serving [bold]{model_uri}[/] at {url}/v1 (playground: {url}/; "
                      f"Ctrl-C stops)")
            print(json.dumps({"url": url, "model_uri": model_uri}), flush=True)
            stop.wait()
    finally:
        err.print("Shutting down Serve")
        ray_serve.shutdown()


@app.command()
def submit(
    spec: SpecArg,
    overrides: Overrides = None,
    address: Address = "http://127.0.0.1:8265",
    wait: Annotated[bool, typer.Option(help="Stream logs; exit 0 only if the job succeeds.")]
    = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run named by tracking.run_name from its latest "
        "checkpoint (the job runs `lmforge run SPEC --resume`), even one that SUCCEEDED. "
        "Without it, a run whose last job FAILED or was STOPPED is resumed by itself.")]
    = False,
    submission_id: Annotated[str | None, typer.Option(
        help="Job id to use (default: run name + random suffix); an existing id is refused."
    )] = None,
    forward_secrets: Annotated[bool, typer.Option(
        "--forward-secrets", help="Also send the secrets set here (LMFORGE_API_KEYS, "
        "AWS_SECRET_ACCESS_KEY, HF_TOKEN, MLflow's password or token, ...) and secret "
        "overrides (serve.api_keys=...) with the job, where anyone who can list the "
        "cluster's jobs or open its dashboard reads them. Default: they stay here and the "
        "nodes need their own (docs/clusters.md#secrets).")] = False,
    runtime_env_json: Annotated[str | None, typer.Option(
        help="Ray runtime_env entries for the job, as JSON, e.g. '{\"pip\": [\"typer\"]}' "
        "(pip, uv, conda, env_vars): how to give the job what the cluster lacks.")] = None,
    preflight: Annotated[bool, typer.Option(
        help="First run a short job that checks the cluster's python and every node's "
        "workers have lmforge's dependencies; fail at once naming what is missing.")] = True,
) -> None:
    """Send `lmforge run SPEC` to a Ray cluster through the Jobs API; print the job id.

    The project directory is the job's working_dir; the MLflow tracking URI travels as
    MLFLOW_TRACKING_URI, and endpoints (MLFLOW_S3_ENDPOINT_URL, AWS_DEFAULT_REGION) as
    their own variables when set. Secrets do not travel: Ray shows a job's environment to
    anyone who can list jobs, so the cluster's nodes get them from their own environment
    (docs/clusters.md#secrets), unless --forward-secrets. The job is tagged with the run
    name (metadata lmforge.run_name): resubmitting a run whose last job FAILED or was
    STOPPED resumes it; a run still PENDING or RUNNING, or one that SUCCEEDED (without
    --resume), is refused.
    Ray's token auth (~/.ray/auth_token) is used when present.
    """
    from lmforge import jobs

    job = _load(spec, overrides, name_run=False)
    if resume and job.tracking.run_name is None:  # a generated name is new each time
        err.print("[bold red]cannot resume[/] without a run name: set tracking.run_name "
                  "(in the spec or as an override) to the run to continue", highlight=False)
        raise typer.Exit(2)
    job.tracking.run_name = job.tracking.run_name or default_run_name(spec)
    try:
        extra = json.loads(runtime_env_json) if runtime_env_json else {}
        if not isinstance(extra, dict):
            raise ValueError("a JSON object")
    except ValueError as e:
        err.print(f"[bold red]not submitted[/] --runtime-env-json: expected a JSON object "
                  f"({e})", highlight=False)
        raise typer.Exit(2) from None
    if (named := [k for k in extra.get("env_vars", {}) if jobs.is_secret(k)]) \
            and not forward_secrets:
        err.print(f"[bold red]not submitted[/] --runtime-env-json: env_vars "
                  f"{', '.join(named)} are secrets; {jobs.EXPOSED}. Give the cluster's nodes "
                  "their own (docs/clusters.md#secrets), or pass --forward-secrets",
                  highlight=False)
        raise typer.Exit(2)
    environ = dict(os.environ)
    env = jobs.job_env(resolve_tracking_uri(job.tracking, Path("runs")), environ,
                       forward_secrets)
    try:
        jobs.check_no_secrets(jobs.flat_fields(job.model_dump(mode="json")) | env,
                              overrides or [], forward_secrets)
    except ValueError as e:
        err.print(f"[bold red]not submitted[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    if secrets := jobs.secrets_set(environ, overrides or []):
        if forward_secrets:
            err.print(f"[bold yellow]WARNING[/] --forward-secrets: sending {', '.join(secrets)} "
                      f"with the job (runtime_env, entrypoint). {jobs.EXPOSED}.",
                      highlight=False)
        else:
            err.print(f"Not sent with the job (secrets): {', '.join(secrets)}; the cluster's "
                      "nodes need their own (docs/clusters.md#secrets), or pass "
                      "--forward-secrets.", highlight=False)
    if preflight:
        from lmforge import preflight as checks

        try:
            checks.check(jobs.client(address), {**extra, "env_vars": {
                **extra.get("env_vars", {}), **env}})
        except checks.PreflightError as e:
            err.print("[bold red]not submitted[/]", end=" ")
            err.print(str(e), highlight=False, markup=False)
            raise typer.Exit(1) from None
    try:
        submitted = jobs.submit(address, spec, overrides or [], job.tracking.run_name, Path.cwd(),
                                env, submission_id=submission_id, resume=resume,
                                runtime_env_extra=extra)
    except (jobs.SubmitError, ValueError) as e:
        err.print(f"[bold red]not submitted[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    job_id, last = submitted.job_id, submitted.resumes
    if last is not None:
        err.print(f"Resuming run [bold]{job.tracking.run_name}[/]: its last job "
                  f"{last.submission_id} {last.status} (the job runs with --resume-if-started)",
                  highlight=False)
    print(job_id, flush=True)
    if wait:
        final = jobs.follow(address, job_id)
        err.print(f"job {job_id}: {final}")
        raise typer.Exit(0 if final == "SUCCEEDED" else 1)


@app.command()
def status(job_id: str, address: Address = "http://127.0.0.1:8265") -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from lmforge import jobs

    print(jobs.status(address, job_id))


@app.command()
def logs(
    job_id: str,
    address: Address = "http://127.0.0.1:8265",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")]
    = False,
) -> None:
    """Print a submitted job's logs."""
    from lmforge import jobs

    if follow:
        jobs.follow(address, job_id)
    else:
        sys.stdout.write(jobs.logs(address, job_id))


@app.command()
def stop(job_id: str, address: Address = "http://127.0.0.1:8265") -> None:
    """Stop a submitted job (its workers are stopped with it)."""
    from lmforge import jobs

    print("stopped" if jobs.stop(address, job_id) else "already finished")


# --- lmforge cluster up|down|status: a multi-node Ray cluster on this machine ----------

cluster_app = typer.Typer(help="A local multi-node Ray cluster (a head and N worker raylets "
                          "on this machine) for trying multi-node jobs.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
ClusterRoot = Annotated[Path, typer.Option(
    "--root", help="Where the cluster keeps its state file and node logs.")]


@cluster_app.command("up")
def cluster_up(
    nodes: Annotated[int, typer.Option(help="Raylets: one head plus NODES-1 workers.", min=1)]
    = 2,
    cpus_per_node: Annotated[int, typer.Option(help="Logical CPUs of each raylet.", min=1)] = 1,
    root: ClusterRoot = Path("runs/cluster"),
) -> None:
    """Start the cluster and print its addresses as JSON once every node is ALIVE."""
    from lmforge.cluster import ClusterError, LocalCluster

    try:
        c = LocalCluster.up(nodes=nodes, cpus_per_node=cpus_per_node, root=root)
    except ClusterError as e:
        err.print(f"[bold red]cluster up failed[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    err.print(f"{nodes} node(s) up. Submit with: [bold]lmforge submit SPEC --address "
              f"{c.dashboard_url}[/]; stop with: [bold]lmforge cluster down[/]")
    print(json.dumps({"address": c.address, "dashboard_url": c.dashboard_url,
                      "nodes": c.nodes, "pids": c.pids}), flush=True)


@cluster_app.command("down")
def cluster_down(root: ClusterRoot = Path("runs/cluster")) -> None:
    """Stop the cluster `lmforge cluster up` started (only its own processes)."""
    from lmforge.cluster import ClusterError, LocalCluster

    try:
        LocalCluster.load(root).down()
    except ClusterError as e:
        err.print(f"[bold red]no cluster[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    err.print("cluster stopped")


@cluster_app.command("status")
def cluster_status(root: ClusterRoot = Path("runs/cluster")) -> None:
    """Print the cluster's addresses and its ALIVE nodes as JSON; exit 1 if it is down."""
    from lmforge.cluster import ClusterError, LocalCluster

    try:
        c = LocalCluster.load(root)
        alive = c.alive_nodes() if c.running() else []
    except ClusterError as e:
        err.print(f"[bold red]no cluster[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    print(json.dumps({"address": c.address, "dashboard_url": c.dashboard_url,
                      "nodes": c.nodes, "alive": alive}), flush=True)
    if len(alive) < c.nodes:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
