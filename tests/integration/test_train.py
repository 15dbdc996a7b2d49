"""Training on real Ray: DDP and FSDP lower the loss; two nodes give the one-node loss
curve; one worker accumulating two micro-batches trains the two-worker model; a run the
cluster cannot hold fails at once naming the fields. A killed worker and a killed driver
(exact resume) are faults: tests/chaos/test_chaos_recovery.py, on the reference runs
built here (`reference_run`)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.cluster import LocalCluster
from lmforge.config import load
from lmforge.pipeline import Stages, Summary, execute
from lmforge.tracking import RunTracker

from .helpers import ROOT, SPEC, lmforge, own_cluster_env

# Long enough that a worker or the driver is killed well before the end (the chaos suite's
# recovery scenarios reuse these runs).
DDP = ("train.steps=120", "train.eval_every=20")  # a checkpoint at every evaluation
FSDP = ("train.strategy=fsdp", "train.grad_accum=2", "train.steps=150", "train.eval_every=25",
        "train.checkpoint_every=25")
TRAIN_ONLY = Stages(search=False, register=False, serve_check=False)


def overrides(tmp: Path, *extra: str) -> list[str]:
    """All state under `tmp`; the training loss logged at every step, for comparisons."""
    return [f"data.cache_dir={tmp / 'cache'}", f"train.storage_path={tmp / 'ray'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "train.log_every=1", *extra]


def loss_history(summary: Summary) -> list[tuple[int, float]]:
    return RunTracker(summary.tracking_uri, summary.mlflow_run_id).metric_history(
        "train_loss")


# A training command prints a line per step (train.log_every=1): this long without a line
# is a stuck run, however slow the machine.
STALL_S = 180


def assert_resumed_exactly(summary: Summary, reference: dict[int, float], steps: int,
                           checkpoint_every: int) -> None:
    """A second attempt resumed from a checkpoint, finished every step, and logged the
    uninterrupted run's loss at every step after the resume, in the same MLflow run (steps
    the first attempt had already logged appear twice: both must match)."""
    assert summary.steps == steps and summary.attempts == 2, summary
    k = summary.resumed_from_step
    assert k % checkpoint_every == 0 and checkpoint_every <= k < steps, k
    after = [(s, v) for s, v in loss_history(summary) if s > k]
    assert {s for s, _ in after} == set(range(k + 1, steps + 1))
    for step, value in after:
        assert value == pytest.approx(reference[step], abs=1e-5), step


def summary_of(out: subprocess.CompletedProcess) -> Summary:
    """The summary `lmforge` printed as its last stdout line."""
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return Summary(**json.loads(out.stdout.strip().splitlines()[-1]))


def reference_run(tmp_path_factory: pytest.TempPathFactory, name: str,
                  args: tuple[str, ...]) -> Summary:
    """An uninterrupted training run of the tiny spec (on the session cluster): the loss
    curve and weights that other runs of the same spec must reproduce."""
    tmp = tmp_path_factory.mktemp(name)
    return execute(load(SPEC, overrides(tmp, *args)), TRAIN_ONLY, runs_dir=tmp)


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, tmp_path_factory) -> Summary:
    return reference_run(tmp_path_factory, "ddp", DDP)


@pytest.fixture(scope="module")
def fsdp_run(ray_cluster, tmp_path_factory) -> Summary:
    return reference_run(tmp_path_factory, "fsdp", FSDP)


def test_two_worker_ddp_lowers_validation_loss(ddp_run, tmp_path: Path):
    summary = ddp_run
    run = RunTracker(summary.tracking_uri, summary.mlflow_run_id)
    val = sorted(run.metric_history("val_loss"))
    assert [step for step, _ in val] == [20, 40, 60, 80, 100, 120]
    assert val[-1][1] < val[0][1] - 0.1, val
    assert summary.steps == 120 and summary.val_loss == val[-1][1]
    assert summary.tokens_per_s > 0
    assert summary.attempts == 1 and summary.resumed_from_step == 0
    assert run.status() == "FINISHED"

    # The kept checkpoint is a Hugging Face directory with safetensors weights, no pickle.
    ckpt = Path(summary.checkpoint)
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    assert (ckpt / "tokenizer.json").exists()
    assert not list(ckpt.glob("*.bin"))

    # Throughput metrics reach MLflow every log_every steps.
    for metric in ("train_loss", "lr", "tokens_per_s", "step_time_ms", "peak_memory_mb"):
        assert len(run.metric_history(metric)) == 120, metric
    artifacts = {a.path for a in run.client.list_artifacts(run.run_id)}
    assert {"loss_curve.png", "spec.yaml", "tokenizer"} <= artifacts
    params = run.client.get_run(run.run_id).data.params
    assert params["train.workers"] == "2" and params["model.n_layer"] == "1"
    assert int(params["model.parameters"]) > 10_000  # counted by rank 0 on the real model
    assert params["train.global_batch_sequences"] == "16"  # 8 per micro-step x 1 x 2 workers


def test_two_worker_fsdp_with_accumulation_lowers_loss_and_exports(fsdp_run):
    summary = fsdp_run
    run = RunTracker(summary.tracking_uri, summary.mlflow_run_id)
    val = sorted(run.metric_history("val_loss"))
    assert [s for s, _ in val] == [25, 50, 75, 100, 125, 150]
    assert val[-1][1] < val[0][1] - 0.1, val
    assert run.client.get_run(run.run_id).data.params["train.global_batch_sequences"] == "32"

    # Sharded checkpoints (torch.distributed.checkpoint) in storage; the best one exported
    # to one Hugging Face directory that loads and generates.
    ckpt = Path(summary.checkpoint)
    assert ckpt.parent.name == "hf"
    assert (ckpt.parent.parent / ckpt.name / "dcp" / ".metadata").exists()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    out = model.generate(**tok("The ", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == len(tok("The ")["input_ids"]) + 5


@pytest.mark.long  # a second raylet and a 2-node DDP run: minutes (`make test-long`)
def test_two_nodes_give_the_one_node_loss_curve(ddp_run, tmp_path: Path):
    """2 workers on 2 raylets (1 CPU each, so one worker per node), same spec and seed."""
    with LocalCluster.up(nodes=2, cpus_per_node=1, root=tmp_path / "cluster") as cluster:
        env = own_cluster_env(**cluster.env, RAY_ADDRESS=cluster.address)
        out = lmforge("train", str(SPEC), *overrides(tmp_path, *DDP, "train.cpus_per_worker=1"),
                      cwd=tmp_path, env=env, stall_s=STALL_S)
    summary = summary_of(out)
    nodes = {line.split(" on node ")[1].split()[0]
             for line in out.stdout.splitlines() + out.stderr.splitlines()
             if "[lmforge] rank " in line and " on node " in line}
    assert len(nodes) == 2, nodes
    one_node = dict(loss_history(ddp_run))
    two_nodes = dict(loss_history(summary))
    assert two_nodes.keys() == one_node.keys()
    for step, value in two_nodes.items():
        assert value == pytest.approx(one_node[step], abs=1e-5), step


def test_a_run_the_cluster_cannot_hold_fails_at_once_naming_the_fields(tmp_path: Path):
    """`lmforge train jobs/bench/shakespeare_char.yaml train.workers=2` on a 2-core machine
    (the spec asks 2 CPUs a worker) waited for its workers forever. Here each worker asks
    for every core of the machine, whatever it has."""
    cpus = os.cpu_count()
    corpus = tmp_path / "corpus.txt"  # the spec's corpus lives outside the checkout
    corpus.write_text("To be, or not to be, that is the question.\n" * 50)
    start = time.monotonic()
    out = lmforge("train", str(ROOT / "jobs" / "bench" / "shakespeare_char.yaml"),
                  "train.workers=2", f"train.cpus_per_worker={cpus}", f"data.path={corpus}",
                  f"train.storage_path={tmp_path / 'ray'}",
                  f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                  f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path, timeout_s=120)
    elapsed = time.monotonic() - start
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    message = " ".join(out.stderr.split())  # rich wraps long lines
    for text in (f"training needs {2 * cpus} CPUs", "train.workers 2",
                 f"train.cpus_per_worker {cpus}", "no GPU (train.use_gpu false)",
                 f"the cluster has {cpus} CPUs and 0 GPUs", "no autoscaler can add nodes"):
        assert text in message, text
    assert "Traceback" not in out.stderr
    # Before the data stage and MLflow: nothing was prepared or opened.
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlflow.db").exists()
    assert elapsed < 60  # a Ray start and a node list, however loaded the machine


def final_weights(summary: Summary) -> dict[str, Any]:
    """The weights of the run's last checkpoint (summary.checkpoint is the best one)."""
    from safetensors.torch import load_file

    storage = next(p for p in Path(summary.checkpoint).parents if p.name == "ray")
    (ckpt,) = storage.glob(f"{summary.run_name}/**/checkpoint_{summary.steps:07d}")
    return load_file(ckpt / "model.safetensors")


def test_one_worker_accumulating_trains_the_two_worker_model(ddp_run, ray_cluster, tmp_path):
    """The data order is a function of the global sample index: 1 worker accumulating 2
    micro-batches of 8 sees the global batches of 2 workers with 8 each, so (no dropout,
    same init) it ends with the same weights, up to the order of float additions."""
    one = execute(load(SPEC, overrides(tmp_path, *DDP, "train.workers=1",
                                       "train.grad_accum=2")), TRAIN_ONLY, runs_dir=tmp_path)
    ours, theirs = final_weights(one), final_weights(ddp_run)
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst < 1e-4, worst  # identical (0.0) on the 2-core CI machine, 2026-12-03
