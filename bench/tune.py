"""Search benchmarks on tinyshakespeare (character level, the reference model size).

    .venv/bin/python bench/tune.py quality      # lmforge tune jobs/bench/tune_shakespeare_char
                                                # .yaml (30 min budget); val loss <= 1.88 - 0.05?
    .venv/bin/python bench/tune.py efficiency   # ASHA + TPE vs random search without early
                                                # stopping, equal trial count
    .venv/bin/python bench/tune.py overhead     # K short trials at concurrency 2
    .venv/bin/python bench/tune.py noise train.lr=3.5e-3 ...  # one configuration, trained
                                                # once per train.seed: run-to-run spread
    .venv/bin/python bench/tune.py rung-noise --seed 2 train.schedule=wsd \
        tune.rung_cooldown=0.2 tune.reduction_factor=4  # the same at the first rung, for
                                                # random search's configurations

`efficiency` and `overhead` take --trials/--steps to run at a reduced size (say so when
quoting the figures). `efficiency` also takes --seed, --reduction-factor (ASHA's, and
where a random side with cooldown forks forks), --random-from FILE, which reuses random
search's side from an earlier run's output (it is deterministic for the same trials,
steps, seed and random-side settings) so another ASHA setting costs only its own search,
--only random|asha (one side alone; save the line for --random-from), and --asha-set /
--random-set KEY=VALUE for one side's overrides. `replay --random-from FILE` replays ASHA
(with a random sampler) over a saved random side's trials (`asha_replay`). Cooldown
rungs, issue 17 (`--asha-set tune.scheduler=sha` for synchronous halving on that side):

    nice -n 19 .venv/bin/python bench/tune.py efficiency --seed 2 --reduction-factor 4 \
        --only random --random-set tune.rung_cooldown=0.2 train.schedule=wsd > random.json
    nice -n 19 .venv/bin/python bench/tune.py efficiency --seed 2 --reduction-factor 4 \
        --random-from random.json --asha-set tune.rung_cooldown=0.2 train.schedule=wsd

A random side with `tune.rung_cooldown` forks at the rungs ASHA would use (FIFO: the forks
stop nothing), so its line also has each rung's rank correlation between the forks' scores
and the trials' final losses; its `steps` leave the forks out (a random search needs none),
`fork_steps` counts them. The ASHA side's `steps` include its forks.
Each prints one JSON line with our figure beside its baseline.
Run from the project root (the spec reads ../shared/data/tinyshakespeare.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    from lmforge.config import JobSpec
    from lmforge.pipeline import Summary

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "jobs" / "bench" / "tune_shakespeare_char.yaml"
REFERENCE_VAL_LOSS = 1.88
QUALITY_MARGIN = 0.05


def _lmforge(command: str, overrides: list[str]) -> dict[str, Any]:
    """`lmforge COMMAND SPEC OVERRIDES...` as a user runs it; its summary is the last line
    it prints on stdout."""
    out = subprocess.run([str(Path(sys.executable).parent / "lmforge"), command, str(SPEC),
                          *overrides], cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality(overrides: list[str]) -> dict[str, Any]:
    """The shipped search, run as a user runs it; its summary is the last stdout line."""
    start = time.perf_counter()
    summary = _lmforge("tune", overrides)
    best = summary["best_val_loss"]
    return {"bench": "quality", "best_val_loss": best, "steps": summary["steps"],
            "best_config": summary["best_config"], "trials": summary["trials"],
            "registered_version": summary.get("registered_version"),
            "promotion": (summary.get("promotion") or {}).get("reason"),
            "reference_val_loss": REFERENCE_VAL_LOSS,
            "target": f"<= {REFERENCE_VAL_LOSS - QUALITY_MARGIN:.2f} after {summary['steps']} "
                      f"steps",
            "met": best <= REFERENCE_VAL_LOSS - QUALITY_MARGIN and summary["steps"] >= 2000,
            "wall_s": round(time.perf_counter() - start, 1)}


def _own_ray() -> None:
    """A Ray cluster of this process's own beside any other on the machine (others' tests,
    CI): its own temp dir and ports, and Train's placement-group cleaner pointed at this
    cluster's State API (with two local clusters and no address it cannot tell which is
    its own), as the test fixtures do."""
    from lmforge.cluster import init_ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dashboard = sock.getsockname()[1]
    os.environ.pop("RAY_ADDRESS", None)
    init_ray(_node_ip_address="127.0.0.1", _temp_dir=tempfile.mkdtemp(prefix="ray-bench-"),
             dashboard_host="127.0.0.1", dashboard_port=dashboard,
             runtime_env={"env_vars": {
                 "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}})


def _search(overrides: list[str], runs: Path) -> tuple[dict[str, Any], float]:
    """One search in this process (lmforge's library), returning its summary and wall s."""
    from lmforge.config import load
    from lmforge.pipeline import Stages, execute

    spec = load(SPEC, [f"data.cache_dir={ROOT / 'runs' / 'cache'}",
                       f"train.storage_path={runs / 'ray'}", f"tune.storage_path={runs / 'ray'}",
                       f"tracking.uri=sqlite:///{runs / 'mlflow.db'}",
                       "registry.enabled=false", "tune.time_budget_s=null", *overrides])
    _own_ray()  # once, outside the timed search
    start = time.perf_counter()
    summary = execute(spec, Stages(search=True, register=False, serve_check=False),
                      runs_dir=runs)
    return summary, time.perf_counter() - start


def _trial_curves(summary: Summary) -> list[dict[str, Any]]:
    """Each trial's run, in start order: duration and its (step, val_loss) history."""
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.mlflow_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    out = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        history = sorted((m.step, m.value)
                         for m in client.get_metric_history(run.info.run_id, "val_loss"))
        # Cooldown rungs: each fork's score at its rung, and its length (its val_loss is
        # logged at the fork's last step, rung + length).
        rungs = {}
        for m in client.get_metric_history(run.info.run_id, "rung_val_loss"):
            end = client.get_metric_history(run.info.run_id, f"cooldown/{m.step}/val_loss")
            rungs[str(m.step)] = [m.value, end[0].step - m.step if end else 0]
        out.append({"status": run.info.status, "history": history, "rungs": rungs,
                    "config": {k: run.data.params.get(k) for k in summary.best_config},
                    "seconds": ((run.info.end_time or run.info.start_time)
                                - run.info.start_time) / 1000})
    return out


def _steps_to_reach(histories: list[list[list[float]]], target: float) -> int | None:
    """Training steps the search spent (trials run one at a time, in order) until some
    evaluation first reached `target`; None if none did."""
    spent = 0
    for history in histories:
        for step, loss in history:
            if loss <= target + 1e-12:
                return int(spent + step)
        spent += history[-1][0] if history else 0
    return None


def _rank_signal(histories: list[list[list[float]]]) -> dict[int, float]:
    """ASHA's premise, measured on random search's trials (all run to the end): the rank
    correlation (Spearman's) between each evaluation step's val loss and the final one.
    Near 1, a rung at that step keeps the trials that end best; near 0 or below, it stops
    trials at random or worse."""
    full = [h for h in histories if len(h) > 1 and h[-1][0] == histories[0][-1][0]]
    if len(full) < 3:
        return {}
    finals = np.array([h[-1][1] for h in full])
    out = {}
    for i, (step, _) in enumerate(full[0][:-1]):
        at = np.array([h[i][1] for h in full])
        ranks = [np.argsort(np.argsort(v)) for v in (at, finals)]  # float losses: no ties
        out[int(step)] = round(float(np.corrcoef(*ranks)[0, 1]), 3)
    return out


def _rung_signal(histories: list[list[list[float]]],
                 rungs: list[dict[str, list[float]]]) -> dict[int, float]:
    """Cooldown rungs, measured on random search's trials (all run to the end, forking at
    ASHA's rungs): Spearman's rank correlation between each rung's fork scores and the
    trials' final val losses: what ASHA with cooldown rungs would rank by, against the
    ranking it should predict."""
    last = max(h[-1][0] for h in histories)
    full = [(h, r) for h, r in zip(histories, rungs, strict=True) if h[-1][0] == last]
    out = {}
    for rung in sorted({k for _, r in full for k in r}, key=int):
        pairs = [(r[rung][0], h[-1][1]) for h, r in full if rung in r]
        if len(pairs) >= 3:
            ranks = [np.argsort(np.argsort(v)) for v in zip(*pairs, strict=True)]
            out[int(rung)] = round(float(np.corrcoef(*ranks)[0, 1]), 3)
    return out


def _searched(summary: Summary, wall_s: float, forks_count: bool = True) -> dict[str, Any]:
    """One search's side. `forks_count`: whether its cooldown forks' steps count in its
    `steps` (ASHA's: they are what it ranks by), or are left out (random search's: it
    forks only so the bench can measure the forks' ranking)."""
    curves = [t for t in _trial_curves(summary) if t["history"]]
    histories = [[list(e) for e in t["history"]] for t in curves]
    rungs = [t["rungs"] for t in curves]
    fork_steps = sum(length for r in rungs for _, length in r.values())
    return {"best_val_loss": min(loss for h in histories for _, loss in h),
            "steps": summary.trial_steps_total - (0 if forks_count else fork_steps),
            "fork_steps": fork_steps, "wall_s": round(wall_s, 1),
            "histories": histories,  # each trial's [step, val_loss] evaluations, in order
            "rungs": rungs,  # each trial's {rung: [fork's val_loss, fork's steps]}
            "rung_correlation_with_final": _rung_signal(histories, rungs) if fork_steps
            else {},
            "configs": [t["config"] for t in curves]}  # and its sampled values


def _milestones(bracket: Any, steps: int) -> list[int]:
    """The rungs below `steps` of Ray's ASHA bracket (`_Bracket`), in increasing order."""
    return sorted(int(r) for r, _ in bracket._rungs if r < steps)


def asha_replay(histories: list[list[list[float]]], rungs: list[dict[str, list[float]]],
                grace: int, reduction_factor: int, steps: int,
                cooldown: bool) -> dict[str, Any]:
    """ASHA over random search's trials, replayed exactly from their recorded curves: the
    trials one at a time in their order, each stopped where Ray's own ASHA bracket
    (`_Bracket`, fed the same rewards) would have stopped it. Exact because a trial's own
    curve does not depend on the scheduler (nor, bit for bit, on its cooldown forks), and
    random search samples the same trials whatever their results: this is ASHA with a
    random sampler; TPE, whose samples depend on the results, cannot be replayed.

    `cooldown`: rank at rungs by the forks' scores (and count the forks' steps, as a
    search with `tune.rung_cooldown` runs them), else by the trials' own val_loss.
    Returns the steps spent, the best val_loss any evaluation reached, and each trial's
    stopping step."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket = _Bracket(grace, steps, reduction_factor, s=0)
    milestones = set(_milestones(bracket, steps))
    spent, best, stops = 0, float("inf"), []
    for i, (history, forks) in enumerate(zip(histories, rungs, strict=True)):
        trial = type("Trial", (), {"trial_id": str(i)})()
        end, fork_steps = history[-1][0], 0
        for step, loss in history:
            best = min(best, loss)
            score = loss
            if cooldown and int(step) in milestones:  # forks elsewhere: not this ASHA's
                if str(int(step)) not in forks:
                    raise ValueError(f"trial {i} has no fork score at rung {step}")
                score, length = forks[str(int(step))]
                fork_steps += length
            if step >= steps:  # ASHA stops every trial at max_t; it ends there anyway
                break
            if bracket.on_result(trial, step, -score) == TrialScheduler.STOP:
                end = step
                break
        spent += int(end) + fork_steps
        stops.append(int(end))
    return {"steps": spent, "best_val_loss": best, "stopped_at": stops}


def sha_replay(histories: list[list[list[float]]], rungs: list[dict[str, list[float]]],
               grace: int, reduction_factor: int, steps: int,
               cooldown: bool) -> dict[str, Any]:
    """Synchronous successive halving over the same recorded trials: every trial to the
    first rung, the best 1/reduction_factor of them (at least one) on to the next, and so
    on to the end; ranked by the forks' scores (`cooldown`) or the trials' own val_loss.
    What a scheduler that waits at each rung for every trial (HyperBand's bracket; ASHA's
    promotion form once all trials reached a rung) would spend: Ray's asynchronous ASHA
    cannot stop the first trials to reach a rung, so they run to the end. The rule
    `tune.scheduler: sha` (`lmforge.tune.halving`) runs, checked against this replay in
    tests/unit/test_schedule_fork.py."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    milestones = _milestones(_Bracket(grace, steps, reduction_factor, s=0), steps)
    loss_at = [{int(step): loss for step, loss in h} for h in histories]
    ends, fork_steps, alive = [0] * len(histories), 0, list(range(len(histories)))
    for rung in milestones:
        scores = {}
        for i in alive:
            ends[i] = rung
            if rung not in loss_at[i]:
                raise ValueError(f"trial {i} was not evaluated at rung {rung}")
            scores[i] = loss_at[i][rung]
            if cooldown:
                if str(rung) not in rungs[i]:
                    raise ValueError(f"trial {i} has no fork score at rung {rung}")
                scores[i], length = rungs[i][str(rung)]
                fork_steps += length
        alive = sorted(alive, key=scores.__getitem__)[:max(1, len(alive) // reduction_factor)]
    for i in alive:
        ends[i] = steps
    best = min(loss for h, end in zip(histories, ends, strict=True) for step, loss in h
               if step <= end)
    return {"steps": sum(ends) + fork_steps, "best_val_loss": best, "stopped_at": ends}


def replays(random: dict[str, Any], head: dict[str, Any],
            reduction_factor: int | None = None) -> dict[str, Any]:
    """`asha_replay` (and `sha_replay`, `sync_*`) of random search's trials, ranking rungs
    by their own val_loss and (when the random side forked) by the forks' scores, beside
    random search's figures.
    `reduction_factor`: replay another factor than the run's; its rungs must be among those
    the random side forked at (over 2000 steps from 250: 8 or 16, whose only rung is 250,
    for a run at 4, whose rungs are 250 and 1000)."""
    rf = reduction_factor or head["rungs"]["reduction_factor"]
    args = (random["histories"], random.get("rungs") or [{}] * len(random["histories"]),
            head["rungs"]["grace_period"], rf, head["steps_per_trial"])
    out: dict[str, Any] = {"reduction_factor": rf,
                           "own_val_loss": asha_replay(*args, cooldown=False),
                           "sync_own_val_loss": sha_replay(*args, cooldown=False)}
    if random.get("fork_steps"):
        out["cooldown"] = asha_replay(*args, cooldown=True)
        out["sync_cooldown"] = sha_replay(*args, cooldown=True)
    for r in (v for v in out.values() if isinstance(v, dict)):
        r["ratio"] = round(r["steps"] / random["steps"], 3)
        r["met"] = r["best_val_loss"] <= random["best_val_loss"] + 1e-12 and r["ratio"] <= 1 / 3
    return {"asha_random_replay": out}


def _earlier_random(path: Path, trials: int, steps: int, seed: int,
                    random_set: tuple[str, ...]) -> dict[str, Any]:
    """Random search's side from an earlier run's JSON line: it does not depend on the
    scheduler, and training is deterministic, so the same trials, steps and seed give the
    same search again. A line from before histories were kept has each trial's
    [last step, best val_loss]: the oracle figure then counts to the end of that trial."""
    old = json.loads(path.read_text().strip().splitlines()[-1])
    if (old["trials"], old["steps_per_trial"], old.get("seed", 0)) != (trials, steps, seed):
        sys.exit(f"{path}: a random search of {old['trials']} trials x "
                 f"{old['steps_per_trial']} steps, seed {old.get('seed', 0)}; this run needs "
                 f"{trials} x {steps}, seed {seed}")
    if "random_set" in old and tuple(old["random_set"]) != random_set:
        sys.exit(f"{path}: its random side ran with {old['random_set']}; this run asks for "
                 f"{list(random_set)} (--random-set)")
    if "random" in old:
        return {**old["random"], "from": str(path)}
    return {"best_val_loss": old["random_best_val_loss"],  # keys of the first version
            "steps": old["random_total_steps"],
            "wall_s": old["wall_s"]["random"], "from": str(path),
            "histories": [[[last, best]] for last, best in old["trials_random"]]}


def efficiency(trials: int, steps: int | None, seed: int = 0,
               reduction_factor: int | None = None, random_from: Path | None = None,
               overrides: tuple[str, ...] = (), asha_set: tuple[str, ...] = (),
               random_set: tuple[str, ...] = (), only: str | None = None) -> dict[str, Any]:
    """ASHA + TPE against random search without early stopping, equal trial count.

    A search knows which of its trials is best only when its last trial has ended, so
    what each spends to reach its best is all the training steps it ran: the target is
    ASHA + TPE's best at least as good as random search's with at most a third of its
    steps. Printed beside it, the oracle figure: the steps each had spent when an
    evaluation first reached random search's best, as if both knew to stop there."""
    extra = [f"tune.num_trials={trials}", "tune.max_concurrent_trials=1", f"tune.seed={seed}",
             *overrides]
    if steps:  # a reduced size: rungs scale with it
        extra += [f"train.steps={steps}", f"train.eval_every={max(steps // 8, 1)}",
                  f"tune.grace_period={max(steps // 8, 1)}",
                  f"train.warmup_steps={min(100, steps // 10)}"]
    # Both sides: a random side with cooldown forks forks at ASHA's rungs.
    extra += [f"tune.reduction_factor={reduction_factor}"] if reduction_factor else []
    from lmforge.config import load

    rungs_of = load(SPEC, extra).tune  # the rungs ASHA uses (and random's forks fork at)
    head = {"bench": "efficiency", "trials": trials, "steps_per_trial": steps or 2000,
            "seed": seed, "reduction_factor": reduction_factor or "the spec's",
            "rungs": {"grace_period": rungs_of.grace_period,
                      "reduction_factor": rungs_of.reduction_factor},
            "overrides": list(overrides), "asha_set": list(asha_set),
            "random_set": list(random_set)}
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        if only == "random" or random_from is None:
            random = _searched(*_search(extra + [
                "tune.searcher=random", "tune.scheduler=fifo", "tracking.run_name=random",
                *random_set], Path(tmp) / "random"), forks_count=False)
        else:
            random = _earlier_random(random_from, trials, steps or 2000, seed, random_set)
        if only == "random":
            return {**head, "rank_correlation_with_final": _rank_signal(random["histories"]),
                    **replays(random, head), "random": random}
        asha = _searched(*_search(extra + [
            "tune.searcher=tpe", "tune.scheduler=asha", "tracking.run_name=asha-tpe",
            *asha_set], Path(tmp) / "asha"))
    ratio = asha["steps"] / random["steps"]
    target = random["best_val_loss"]
    return {**head, "ratio": round(ratio, 3),
            "target": "ASHA+TPE's best <= random's best, with <= 1/3 of random's steps",
            "met": asha["best_val_loss"] <= target + 1e-12 and ratio <= 1 / 3,
            "rank_correlation_with_final": _rank_signal(random["histories"]),
            "oracle_steps_to_random_best": {
                "asha_tpe": _steps_to_reach(asha["histories"], target),
                "random": _steps_to_reach(random["histories"], target)},
            "asha_tpe": asha, "random": random}


def overhead(trials: int, steps: int) -> dict[str, Any]:
    """K short trials, two at a time (1 worker each): search wall time against the sum of
    the trials' own times / 2."""
    extra = [f"tune.num_trials={trials}", "tune.max_concurrent_trials=2",
             "tune.scheduler=fifo", f"train.steps={steps}", f"train.eval_every={steps}",
             f"train.warmup_steps={min(10, steps - 1)}", "train.cpus_per_worker=0.9",
             "train.eval_batches=10", "tracking.system_metrics_interval_s=0"]
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        summary, _ = _search(extra + ["tracking.run_name=overhead"], Path(tmp))
        curves = _trial_curves(summary)
        client = MlflowClient(summary.tracking_uri)
        parent_start = client.get_run(summary.mlflow_run_id).info.start_time
        search_s = (max(_ends(summary)) - parent_start) / 1000
    # The search's wall time runs from the parent run's start (data already prepared) to
    # its last trial's end (before plots and the summary); a trial's own time is its run's.
    trial_sum = sum(t["seconds"] for t in curves)
    ratio = search_s / (trial_sum / 2)
    return {"bench": "overhead", "trials": trials, "steps_per_trial": steps,
            "search_wall_s": round(search_s, 1), "sum_trial_s": round(trial_sum, 1),
            "ideal_s": round(trial_sum / 2, 1), "ratio": round(ratio, 3),
            "target": "<= 1.2", "met": ratio <= 1.2}


def noise(seeds: list[int], overrides: list[str]) -> dict[str, Any]:
    """Run-to-run spread: one configuration (the spec's, with `overrides`) trained to the
    end once per `train.seed` (the initialisation and the data order; every trial of a
    search trains with the spec's, 1337), one `lmforge train` after another. A search's
    targets compare one trial's final loss with another's; a difference smaller than
    this spread is chance, not a better configuration."""
    losses: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-noise-") as tmp:
        for seed in seeds:
            losses[seed] = _lmforge("train", [
                f"data.cache_dir={ROOT / 'runs' / 'cache'}", f"train.storage_path={tmp}/ray",
                f"tracking.uri=sqlite:///{tmp}/mlflow.db", "registry.enabled=false",
                f"tracking.run_name=noise-seed{seed}", *overrides, f"train.seed={seed}"]
            )["val_loss"]
    values = np.array(list(losses.values()))
    return {"bench": "noise", "overrides": overrides, "val_loss_by_seed": losses,
            "mean": round(float(values.mean()), 4),
            "std": round(float(values.std(ddof=1)), 4) if len(values) > 1 else None,
            "range": round(float(values.max() - values.min()), 4)}


def sampled_configs(spec: JobSpec, trials: int) -> list[dict[str, Any]]:
    """The first `trials` configurations a random search of `spec` samples: Optuna's
    `RandomSampler` seeded with `tune.seed`, through the search's own searcher, so the
    values are the search's to the last digit (its samples do not depend on results)."""
    from lmforge.tune.search import make_searcher

    searcher = make_searcher(spec.tune.model_copy(update={"searcher": "random"}))
    return [searcher.suggest(f"t{i}") for i in range(trials)]


def _interaction_var(grid: np.ndarray) -> float:
    """The noise that reorders configurations: of scores `grid[config, seed]`, the
    variance left after each configuration's mean and each seed's mean are taken out
    (two-way layout, one run per cell). Every trial of a search trains with the same
    `train.seed`, so a seed that lifts every configuration alike moves no ranking."""
    residual = grid - grid.mean(axis=1, keepdims=True) - grid.mean(axis=0, keepdims=True) \
        + grid.mean()
    configs, seeds = grid.shape
    return float((residual ** 2).sum() / ((configs - 1) * (seeds - 1)))


def rung_noise(trials: int, seed: int, train_seeds: list[int],
               overrides: list[str]) -> dict[str, Any]:
    """Run-to-run spread of the first rung's score. Each of the first `trials`
    configurations random search samples (`tune.seed` = `seed`) is trained once per
    `train.seed` exactly as a search's trial is up to its first rung (with
    `tune.rung_cooldown`, the cooldown fork there), and stops there, as synchronous
    halving pauses a trial (`pause_at`). Prints each score; the noise (`_interaction_var`:
    what moves one configuration against another from seed to seed); the spread across
    configurations at one seed; and the reliability 1 - noise/spread, the share of the
    spread a search sees that is the configurations'. Classical test theory's bound: a
    score correlates with anything at most as the square root of its reliability."""
    from lmforge.config import load
    from lmforge.data import prepare_data
    from lmforge.train import Paused, run_training
    from lmforge.tune.trial import cooldown_rungs, ranking_metric, rung_steps

    if trials < 2:
        sys.exit("rung-noise needs --trials 2 or more (a spread across configurations)")
    with tempfile.TemporaryDirectory(prefix="bench-rung-noise-") as tmp:
        spec = load(SPEC, [f"data.cache_dir={ROOT / 'runs' / 'cache'}",
                           f"train.storage_path={tmp}/ray", *overrides, f"tune.seed={seed}"])
        rung, forks, ranked_by = rung_steps(spec)[0], cooldown_rungs(spec), \
            ranking_metric(spec.tune)
        data = prepare_data(spec.data, spec.tokenizer, spec.model.block_size)
        _own_ray()
        configs = sampled_configs(spec, trials)
        own: dict[int, dict[int, float]] = {}
        score: dict[int, dict[int, float]] = {}
        for i, config in enumerate(configs):
            for train_seed in train_seeds:
                trial = spec.with_values({**config, "train.seed": train_seed})
                try:
                    run_training(trial, data, None, name=f"rung-noise-{i}-{train_seed}",
                                 cooldown=forks, pause_at=(rung,))
                except Paused as paused:
                    m = paused.metrics
                else:
                    sys.exit(f"trial {i} did not stop at step {rung}")
                own.setdefault(i, {})[train_seed] = round(m["val_loss"], 4)
                score.setdefault(i, {})[train_seed] = round(m[ranked_by], 4)
                print(f"[bench] trial {i} train.seed {train_seed}: own {m['val_loss']:.4f}, "
                      f"score {score[i][train_seed]:.4f}", file=sys.stderr, flush=True)
    grid = np.array([[score[i][s] for s in train_seeds] for i in range(trials)])
    noise_var = _interaction_var(grid) if len(train_seeds) > 1 else None
    total_var = float(grid.var(axis=0, ddof=1).mean())  # across configurations, per seed
    reliability = None if noise_var is None else max(0.0, 1 - noise_var / total_var)
    return {"bench": "rung_noise", "seed": seed, "rung": rung,
            "rung_cooldown": spec.tune.rung_cooldown, "train_seeds": train_seeds,
            "overrides": overrides, "configs": configs, "score": score, "own": own,
            "noise_std": None if noise_var is None else round(noise_var ** 0.5, 4),
            "spread_std": round(total_var ** 0.5, 4),
            "reliability": None if reliability is None else round(reliability, 3),
            "correlation_bound": None if reliability is None else round(reliability ** 0.5, 3)}


def _ends(summary: dict[str, Any]) -> list[int]:
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.mlflow_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return [r.info.end_time for r in runs if r.info.end_time]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["quality", "efficiency", "overhead", "replay",
                                          "noise", "rung-noise"])
    parser.add_argument("--trials", type=int, default=None,
                        help="efficiency: trials per search (default 12), rung-noise: "
                             "configurations (12); overhead: K (6)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per trial (efficiency default 2000, overhead 100)")
    parser.add_argument("--seed", type=int, default=0,
                        help="efficiency: tune.seed of both searches (their samplers); "
                             "rung-noise: the random search whose configurations to run")
    parser.add_argument("--train-seeds", default="1337,1,2",
                        type=lambda s: [int(x) for x in s.split(",")],
                        help="noise, rung-noise: the train.seed of each run, comma-separated "
                             "(default 1337,1,2; 1337 is every search trial's)")
    parser.add_argument("--reduction-factor", type=int, default=None,
                        help="efficiency: ASHA's reduction factor (default: the spec's); "
                             "replay: the factor to replay (default: the run's)")
    parser.add_argument("--random-from", type=Path, default=None,
                        help="efficiency: take random search's side from an earlier run's "
                             "output (same trials, steps and seed) instead of running it")
    parser.add_argument("--only", choices=["random", "asha"], default=None,
                        help="efficiency: run one side (asha needs --random-from)")
    parser.add_argument("--asha-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="efficiency: overrides for the ASHA + TPE side only")
    parser.add_argument("--random-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="efficiency: overrides for the random side only")
    parser.add_argument("overrides", nargs="*",
                        help="quality, efficiency (both searches), noise: spec overrides, "
                             "key=value")
    args = parser.parse_intermixed_args()
    if args.which == "replay":  # bench/tune.py replay --random-from OUT.json
        old = json.loads(args.random_from.read_text().strip().splitlines()[-1])
        result = {k: v for k, v in old.items() if k != "random"} | \
            replays(old["random"], old, args.reduction_factor)
    elif args.which == "noise":
        result = noise(args.train_seeds, args.overrides)
    elif args.which == "rung-noise":
        result = rung_noise(args.trials or 12, args.seed, args.train_seeds, args.overrides)
    elif args.which == "quality":
        result = quality(args.overrides)
    elif args.which == "efficiency":
        if args.only == "asha" and args.random_from is None:
            parser.error("--only asha needs --random-from")
        result = efficiency(args.trials or 12, args.steps, args.seed, args.reduction_factor,
                            args.random_from, tuple(args.overrides), tuple(args.asha_set),
                            tuple(args.random_set), args.only)
    else:
        result = overhead(args.trials or 6, args.steps or 100)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
