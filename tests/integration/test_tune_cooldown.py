"""Cooldown rungs (issue 17) in a real search: Ray Tune with ASHA, two trials of two DDP
workers, a WSD schedule. At each rung every trial forks a cooldown, and ASHA ranks it by
the fork's val loss (`search_loss`), which MLflow holds as `rung_val_loss` beside the fork's
own curve (`cooldown/<rung>/...`); the forks' steps count in the search's steps."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmforge.pipeline import Stages, execute


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.long  # two trials of two DDP workers with forks: minutes (`make test-long`)
def test_asha_ranks_trials_by_their_cooldown_forks(ray_cluster, tiny_spec, tmp_path: Path):
    spec = tiny_spec("tracking.run_name=cooldown", "train.schedule=wsd",
                     "train.decay_fraction=0.2", "tune.max_concurrent_trials=1",
                     "tune.reduction_factor=2", "tune.rung_cooldown=0.25",
                     "tracking.system_metrics_interval_s=0")
    assert (spec.train.steps, spec.tune.grace_period) == (60, 20)  # rungs at 20 and 40
    summary = execute(spec, Stages(search=True, register=False, serve_check=False),
                      runs_dir=tmp_path)
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.mlflow_run_id)
    children = sorted(client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"),
        key=lambda r: r.info.start_time)
    assert len(children) == 2

    rung_scores, steps_total = [], 0
    for child in children:
        run_id = child.info.run_id
        val = history(client, run_id, "val_loss")
        rungs = history(client, run_id, "rung_val_loss")
        last = max(val)
        assert sorted(rungs) == [r for r in (20, 40) if r <= last]
        for rung, score in rungs.items():
            length = rung // 4  # 0.25 of the rung
            branch = history(client, run_id, f"cooldown/{rung}/train_loss")
            assert sorted(branch) == list(range(rung + 1, rung + length + 1))
            lrs = history(client, run_id, f"cooldown/{rung}/lr")
            # Down to the trial's min_lr: its sampled lr / 10 (the spec sets no min_lr).
            assert lrs[rung + length] == pytest.approx(float(child.data.params["train.lr"]) / 10)
            assert history(client, run_id, f"cooldown/{rung}/val_loss") == {
                rung + length: pytest.approx(score)}
            # The fork is scored, not the run: the run's own loss at the rung differs.
            assert score != pytest.approx(val[rung], abs=1e-6)
        # What Tune (and so ASHA and the searcher) got at each rung: the fork's loss.
        trial_dir = tmp_path / "ray" / "cooldown" / child.data.tags["lmforge.trial_dir"]
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text()
                   .splitlines()]
        reported = {r["step"]: r for r in results if "search_loss" in r}
        for rung, score in rungs.items():
            assert reported[rung]["search_loss"] == pytest.approx(score)
            assert reported[rung]["val_loss"] == pytest.approx(val[rung])
        forks = sum(r // 4 for r in rungs)
        assert results[-1]["cooldown_steps"] == forks
        tokens_per_step = spec.train.micro_batch_size * spec.model.block_size * 2
        assert results[-1]["tokens"] == (last + forks) * tokens_per_step
        rung_scores.append(rungs[20])
        steps_total += last + forks

    # ASHA (reduction factor 2, one trial at a time): the second trial goes past the first
    # rung only if its fork scored better there than the first trial's.
    second_went_on = max(history(client, children[1].info.run_id, "val_loss")) > 20
    assert second_went_on == (rung_scores[1] < rung_scores[0])
    assert summary.trial_steps_total == steps_total  # the forks' steps counted


@pytest.mark.long
def test_sync_halving_pauses_trials_at_rungs_and_resumes_the_promoted(ray_cluster, tiny_spec,
                                                                      tmp_path: Path):
    """`tune.scheduler: sha` on real Tune: four trials, one at a time, each paused at the
    first rung (20) until all four have a fork score there; the best two go on (factor 2),
    restarting from the checkpoint they wrote at the rung, in the same MLflow run; at 40
    the better of the two goes on to 60. No step is trained twice, no trial runs beside
    another, and (the fixture's check) no Train run outlives its paused trial."""
    spec = tiny_spec("tracking.run_name=sha", "tune.scheduler=sha", "tune.num_trials=4",
                     "tune.reduction_factor=2", "tune.rung_cooldown=0.25",
                     "tune.max_concurrent_trials=1", "train.workers=1",
                     "train.schedule=wsd", "train.decay_fraction=0.2",
                     "tracking.system_metrics_interval_s=0")
    summary = execute(spec, Stages(search=True, register=False, serve_check=False),
                      runs_dir=tmp_path)
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.mlflow_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4  # a promoted trial goes on in its own run

    ends, scores, resumed, spans = {}, {}, [], []
    for child in children:
        run_id = child.info.run_id
        val, rungs = history(client, run_id, "val_loss"), history(client, run_id, "rung_val_loss")
        ends[run_id], scores[run_id] = max(val), rungs
        trial_dir = tmp_path / "ray" / "sha" / child.data.tags["lmforge.trial_dir"]
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text()
                   .splitlines()]
        steps = [r["step"] for r in results]
        assert steps == sorted(set(steps)), steps  # no step reported (trained) twice
        # When it first reported, and when it reported at the rung (and paused there).
        spans.append((results[0]["timestamp"],
                      next(r["timestamp"] for r in results if r["step"] == 20)))
        if any(r["resumed_from_step"] == 20 for r in results):
            resumed.append(run_id)
        assert child.info.status == ("FINISHED" if ends[run_id] == 60 else "KILLED")
    # One trial at a time (tune.max_concurrent_trials): each reached the rung before
    # the next one started, though the paused ones were still live.
    spans.sort()
    assert all(rung <= first for (_, rung), (first, _) in itertools.pairwise(spans))
    assert sorted(ends.values()) == [20, 20, 40, 60]
    # Rung 20 keeps the two best forks; rung 40 the better of those two.
    by_20 = sorted(ends, key=lambda r: scores[r][20])
    assert {ends[r] for r in by_20[:2]} == {40, 60} and {ends[r] for r in by_20[2:]} == {20}
    kept = by_20[:2]
    assert ends[min(kept, key=lambda r: scores[r][40])] == 60
    # Every trial's Train run ended at the rung, so both promoted there (the last to
    # arrive too) went on in a new Train run from their rung checkpoint.
    assert set(resumed) == set(kept)
    forks = 4 * 5 + 2 * 10
    assert summary.trial_steps_total == 20 + 20 + 40 + 60 + forks
