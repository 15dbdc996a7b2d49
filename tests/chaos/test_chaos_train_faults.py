"""Training and search faults: a damaged checkpoint under a worker failure, and a hung trial.

Faults are injected through `run_training`'s / `run_search`'s `step_hook`, which runs on
every worker after each optimizer step, so they land at a known step of a real 2-worker
Ray Train run (real checkpoints in storage, a real SIGKILL, a real hang).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

import cloudpickle
import pytest

from lmforge.data import prepare_data
from lmforge.tracking import RunTracker, experiment_id
from lmforge.train import run_training
from lmforge.train.checkpoint import SET_ASIDE_FILE
from lmforge.train.loop import StepInfo
from lmforge.tune import run_search
from lmforge.tune.report import trial_runs

# The hooks run in Ray workers, which may not import this test module: send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def truncate_latest_then_die(info: StepInfo, at_step: int, log: str) -> None:
    """Rank 0, first attempt, at `at_step`: cut the newest registered checkpoint's weights
    to half their size (what a full disk or a killed copy leaves), then SIGKILL itself."""
    if info.attempt != 1 or info.rank != 0 or info.step != at_step:
        return
    run_dir = Path(info.spec.train.storage_path) / info.run_name
    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def latest() -> str | None:  # Ray registers a report's checkpoint a moment after it
        try:
            state = json.loads(snapshot.read_text())
        except (FileNotFoundError, ValueError):
            return None
        name = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        return name if name == f"checkpoint_{at_step - at_step % 10:07d}" else None

    deadline = time.monotonic() + 60  # bounded: the test fails (no fault log) past it
    while (name := latest()) is None:
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    weights = run_dir / name / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    Path(log).write_text(json.dumps({"truncated": name, "size": size}))
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_checkpoint(info: StepInfo, at_step: int, checkpoint_step: int,
                          log: str) -> None:
    """Rank 1, first attempt, at `at_step`: once Ray has registered the checkpoint of
    `checkpoint_step`, SIGKILL itself (a worker lost mid-run)."""
    if info.attempt != 1 or info.rank != 1 or info.step != at_step:
        return
    run_dir = Path(info.spec.train.storage_path) / info.run_name
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    want = f"checkpoint_{checkpoint_step:07d}"
    deadline = time.monotonic() + 60  # bounded: the test fails (no fault log) past it
    while time.monotonic() < deadline:
        try:
            state = json.loads(snapshot.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        if (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") == want:
            Path(log).write_text(json.dumps({"killed_at": at_step, "latest": want}))
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)


def test_lora_worker_killed_mid_run_resumes_from_the_adapter_checkpoint(
        ray_cluster, tiny_spec, chaos_result, tmp_path: Path):
    """A LoRA run under FSDP2 (adapters on a local base, sharded with it per block; DDP
    LoRA runs in tests/integration/test_finetune.py) loses a worker at step 25: Ray Train
    restarts the group, every worker loads the base from `model.pretrained` again and the
    adapter and its optimizer state from the step-20 checkpoint, and the run ends with the
    uninterrupted run's validation loss."""
    from lmforge.config import TokenizerConfig
    from lmforge.data.tokenizer import build_tokenizer
    from lmforge.model import build_model

    base = tmp_path / "base"  # a tiny random GPT-2 and its char tokenizer: a local base
    tok = build_tokenizer(TokenizerConfig(kind="char"), _pydoc_sample())
    tok.save_pretrained(base)
    build_model(tiny_spec().model, len(tok), tok.eos_token_id).save_pretrained(base)
    steps = 40
    lora = [f"model.pretrained={base}", "tokenizer.kind=pretrained", f"tokenizer.path={base}",
            "train.method=lora", "train.strategy=fsdp", "train.lr=1e-2", f"train.steps={steps}",
            "train.eval_every=10",
            "train.max_failures=2", "train.keep_checkpoints=10"]
    # Every checkpoint kept, as in the test below: Ray's retention keeps the best by val
    # loss, and deletes step 20's once newer ones rank above it.
    spec = tiny_spec(*lora)
    data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
    reference = run_training(spec, data, None, name="lora-reference")
    log = tmp_path / "fault.json"
    start = time.monotonic()
    outcome = run_training(spec, data, None, name="lora-killed",
                           step_hook=partial(kill_after_checkpoint, at_step=25,
                                             checkpoint_step=20, log=str(log)))
    wall_s = time.monotonic() - start

    run_dir = tmp_path / "ray" / "lora-killed"
    chaos_result("LoRA: a worker killed mid-run",
                 load=f"2-worker FSDP2 LoRA training, {steps} steps, a checkpoint every 10",
                 faults="rank 1 SIGKILLed at step 25",
                 lost=f"{steps - outcome.steps} steps (5 redone from the adapter checkpoint)",
                 resumed_from_step=outcome.resumed_from_step, attempts=outcome.attempts,
                 wall_s=wall_s)
    assert json.loads(log.read_text())["killed_at"] == 25
    assert outcome.steps == steps and outcome.attempts == 2
    assert outcome.resumed_from_step == 20
    ckpt = run_dir / "checkpoint_0000020"
    assert (ckpt / "adapter_model.safetensors").exists()
    assert not (ckpt / "model.safetensors").exists()  # the adapter only
    # The restarted run trained on from exactly where the adapter checkpoint left it.
    assert outcome.val_loss == pytest.approx(reference.val_loss, abs=1e-5)
    assert wall_s < 240


def _pydoc_sample() -> list[str]:
    from pydoc_data.topics import topics

    return list(topics.values())


def hang_once(info: StepInfo, at_step: int, claim: str) -> None:
    """The first trial to reach `at_step` hangs for good (its rank 0 blocks; the other rank
    then blocks in the next collective): a trial that never reports again."""
    if info.rank != 0 or info.step != at_step:
        return
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    threading.Event().wait()


def test_truncated_latest_checkpoint_then_killed_worker_resumes_from_the_previous_one(
        ray_cluster, tiny_spec, chaos_result, tmp_path: Path):
    steps = 60
    # Every checkpoint kept: Ray's retention would otherwise delete the set-aside one once
    # newer ones rank above it, as it does any checkpoint that falls out of the kept best.
    spec = tiny_spec(f"train.steps={steps}", "train.eval_every=10", "train.max_failures=2",
                     "train.keep_checkpoints=10")
    data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
    log = tmp_path / "fault.json"
    start = time.monotonic()
    outcome = run_training(spec, data, None, name="chaos-ckpt",
                           step_hook=partial(truncate_latest_then_die, at_step=25,
                                             log=str(log)))
    wall_s = time.monotonic() - start

    run_dir = tmp_path / "ray" / "chaos-ckpt"
    fault = json.loads(log.read_text())
    marker = run_dir / fault["truncated"] / SET_ASIDE_FILE
    chaos_result("latest checkpoint truncated, then a worker killed",
                 load=f"2-worker DDP training, {steps} steps, a checkpoint every 10",
                 faults=f"{fault['truncated']}'s weights cut to half, then rank 0 SIGKILLed "
                        "at step 25",
                 lost=f"{steps - outcome.steps} steps (15 redone from the previous "
                      "checkpoint)",
                 resumed_from_step=outcome.resumed_from_step, attempts=outcome.attempts,
                 wall_s=wall_s)
    assert fault["truncated"] == "checkpoint_0000020"
    assert outcome.steps == steps and outcome.attempts == 2
    assert outcome.resumed_from_step == 10  # the previous kept checkpoint, not the damaged
    # Set aside, not deleted; its step written again under a name of its own.
    assert marker.exists() and "SafetensorError" in json.loads(marker.read_text())["reason"]
    assert (run_dir / fault["truncated"] / "model.safetensors").stat().st_size \
        == fault["size"] // 2
    assert (run_dir / "checkpoint_0000020-2" / "trainer_state.json").exists()
    assert Path(outcome.checkpoint).name != fault["truncated"]
    assert wall_s < 180  # 44 s on the quiet 2-core machine, 104 s with others' runs on it


def test_hung_trial_fails_at_its_timeout_and_the_search_finishes(
        ray_cluster, tiny_spec, chaos_result, tmp_path: Path):
    # The timeout leaves room for a healthy trial's start: on 2 cores, starting a trial's
    # actor and its 2 workers took 35-40 s (measured 2026-12-03), and a 40 s timeout
    # failed both trials of a run before either trained a step.
    timeout_s, steps = 90, 40
    spec = tiny_spec("tune.num_trials=2", "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
                     f"tune.trial_timeout_s={timeout_s}", f"train.steps={steps}",
                     "train.eval_every=20")
    data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
    uri = spec.tracking.uri
    experiment = experiment_id(uri, "chaos", tmp_path / "mlartifacts")
    parent = RunTracker.start(uri, experiment, "chaos-hang")
    claim = tmp_path / "hung"
    start = time.monotonic()
    outcome = run_search(spec, data, parent, experiment, name="chaos-hang",
                         step_hook=partial(hang_once, at_step=5, claim=str(claim)))
    wall_s = time.monotonic() - start

    failed = [t for t in outcome.trials if t.status == "FAILED"]
    finished = [t for t in outcome.trials if t.status == "FINISHED"]
    errors = list((tmp_path / "ray" / "chaos-hang").glob("*/error.txt"))
    runs = list(trial_runs(parent).values())
    # How long the hung trial lived, as its own MLflow run recorded it (start to FAILED).
    # Not error.txt's mtime in storage: Tune syncs that copy to storage_path when it next
    # syncs, which on a loaded machine came 14 s after the driver wrote the error.
    hung_for = next(((r.info.end_time - r.info.start_time) / 1000 for r in runs
                     if r.info.status == "FAILED"), float("nan"))
    chaos_result("a hung trial", load=f"a 2-trial search, one trial at a time, {steps} steps",
                 faults=f"one trial's training blocked for good at step 5 "
                        f"(tune.trial_timeout_s {timeout_s})",
                 lost=f"{steps - finished[0].steps if finished else steps} steps of the "
                      "healthy trial; the search finished",
                 hung_trial_ended_after_s=hung_for, wall_s=wall_s)
    assert claim.exists(), "no trial hung"
    assert len(failed) == 1 and f"tune.trial_timeout_s ({timeout_s} s)" in failed[0].error
    assert len(finished) == 1 and finished[0].steps == steps
    assert outcome.best.trial_id == finished[0].trial_id
    # FAILED at its timeout (counted from the trial's start, before the hang), plus the
    # moments recording the failure takes.
    assert len(errors) == 1 and timeout_s - 5 < hung_for < timeout_s + 10
    assert {r.info.status for r in runs} == {"FAILED", "FINISHED"}
    assert wall_s < 300
