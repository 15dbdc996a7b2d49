"""Search benchmarks on tinyshakespeare (character level, the reference model size).

    .venv/bin/python bench/tune.py quality      # lmforge tune jobs/bench/tune_shakespeare_char
                                                # .yaml (30 min budget); val loss <= 1.88 - 0.05?
    .venv/bin/python bench/tune.py efficiency   # ASHA + TPE vs random search without early
                                                # stopping, equal trial count
    .venv/bin/python bench/tune.py overhead     # K short trials at concurrency 2

`efficiency` and `overhead` take --trials/--steps to run at a reduced size (say so when
quoting the figures). Each prints one JSON line with our figure beside its baseline.
Run from the project root (the spec reads ../shared/data/tinyshakespeare.txt).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "jobs" / "bench" / "tune_shakespeare_char.yaml"
REFERENCE_VAL_LOSS = 1.88
QUALITY_MARGIN = 0.05


def quality(overrides: list[str]) -> dict[str, Any]:
    """The shipped search, run as a user runs it; its summary is the last stdout line."""
    start = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).parent / "lmforge"), "tune", str(SPEC),
                          *overrides], cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
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


def _search(overrides: list[str], runs: Path) -> tuple[dict[str, Any], float]:
    """One search in this process (lmforge's library), returning its summary and wall s."""
    from lmforge.config import load
    from lmforge.pipeline import Stages, execute, init_ray

    spec = load(SPEC, [f"data.cache_dir={ROOT / 'runs' / 'cache'}",
                       f"train.storage_path={runs / 'ray'}", f"tune.storage_path={runs / 'ray'}",
                       f"tracking.uri=sqlite:///{runs / 'mlflow.db'}",
                       "registry.enabled=false", "tune.time_budget_s=null", *overrides])
    init_ray()  # once, outside the timed search
    start = time.perf_counter()
    summary = execute(spec, Stages(search=True, register=False, serve_check=False),
                      runs_dir=runs)
    return summary, time.perf_counter() - start


def _trial_curves(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each trial's run, in start order: duration and its (step, val_loss) history."""
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    out = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        history = sorted((m.step, m.value)
                         for m in client.get_metric_history(run.info.run_id, "val_loss"))
        out.append({"status": run.info.status, "history": history,
                    "seconds": ((run.info.end_time or run.info.start_time)
                                - run.info.start_time) / 1000})
    return out


def _steps_to_reach(curves: list[dict[str, Any]], target: float) -> int | None:
    """Training steps the search spent (trials run one at a time, in order) until some
    evaluation first reached `target`; None if none did."""
    spent = 0
    for trial in curves:
        for step, loss in trial["history"]:
            if loss <= target + 1e-12:
                return spent + step
        spent += trial["history"][-1][0] if trial["history"] else 0
    return None


def efficiency(trials: int, steps: int | None, seed: int = 0) -> dict[str, Any]:
    """ASHA + TPE against random search without early stopping, equal trial count.

    A search knows which of its trials is best only when its last trial has ended, so
    what each spends to reach its best is all the training steps it ran: the target is
    ASHA + TPE's best at least as good as random search's with at most a third of its
    steps. Printed beside it, the oracle figure: the steps each had spent when an
    evaluation first reached random search's best, as if both knew to stop there."""
    extra = [f"tune.num_trials={trials}", "tune.max_concurrent_trials=1", f"tune.seed={seed}"]
    if steps:  # a reduced size: rungs scale with it
        extra += [f"train.steps={steps}", f"train.eval_every={max(steps // 8, 1)}",
                  f"tune.grace_period={max(steps // 8, 1)}",
                  f"train.warmup_steps={min(100, steps // 10)}"]
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        asha, asha_s = _search(extra + ["tune.searcher=tpe", "tune.scheduler=asha",
                                        "tracking.run_name=asha-tpe"], Path(tmp) / "asha")
        rand, rand_s = _search(extra + ["tune.searcher=random", "tune.scheduler=fifo",
                                        "tracking.run_name=random"], Path(tmp) / "random")
        asha_curves, rand_curves = _trial_curves(asha), _trial_curves(rand)
    rand_best = min(loss for t in rand_curves for _, loss in t["history"])
    asha_best = min(loss for t in asha_curves for _, loss in t["history"])
    rand_steps, asha_steps = rand["trial_steps_total"], asha["trial_steps_total"]
    ratio = asha_steps / rand_steps
    asha_reach, rand_reach = (_steps_to_reach(c, rand_best) for c in (asha_curves, rand_curves))
    return {"bench": "efficiency", "trials": trials, "steps_per_trial": steps or 2000,
            "seed": seed, "random_best_val_loss": rand_best, "random_steps": rand_steps,
            "asha_tpe_best_val_loss": asha_best, "asha_tpe_steps": asha_steps,
            "ratio": round(ratio, 3),
            "target": "ASHA+TPE's best <= random's best, with <= 1/3 of random's steps",
            "met": asha_best <= rand_best + 1e-12 and ratio <= 1 / 3,
            "oracle_steps_to_random_best": {"asha_tpe": asha_reach, "random": rand_reach},
            "wall_s": {"asha_tpe": round(asha_s, 1), "random": round(rand_s, 1)},
            # each trial in start order: [last step, its best val_loss]
            "trials_asha_tpe": _trial_table(asha_curves),
            "trials_random": _trial_table(rand_curves)}


def _trial_table(curves: list[dict[str, Any]]) -> list[list[float]]:
    return [[t["history"][-1][0], round(min(loss for _, loss in t["history"]), 4)]
            for t in curves if t["history"]]


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
        client = MlflowClient(summary["tracking_uri"])
        parent_start = client.get_run(summary["mlflow_run_id"]).info.start_time
        search_s = (max(_ends(summary)) - parent_start) / 1000
    # The search's wall time runs from the parent run's start (data already prepared) to
    # its last trial's end (before plots and the summary); a trial's own time is its run's.
    trial_sum = sum(t["seconds"] for t in curves)
    ratio = search_s / (trial_sum / 2)
    return {"bench": "overhead", "trials": trials, "steps_per_trial": steps,
            "search_wall_s": round(search_s, 1), "sum_trial_s": round(trial_sum, 1),
            "ideal_s": round(trial_sum / 2, 1), "ratio": round(ratio, 3),
            "target": "<= 1.2", "met": ratio <= 1.2}


def _ends(summary: dict[str, Any]) -> list[int]:
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return [r.info.end_time for r in runs if r.info.end_time]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["quality", "efficiency", "overhead"])
    parser.add_argument("--trials", type=int, default=None,
                        help="efficiency: trials per search (default 12); overhead: K (6)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per trial (efficiency default 2000, overhead 100)")
    parser.add_argument("--seed", type=int, default=0,
                        help="efficiency: tune.seed of both searches (their samplers)")
    parser.add_argument("overrides", nargs="*", help="quality: spec overrides, key.sub=value")
    args = parser.parse_args()
    if args.which == "quality":
        result = quality(args.overrides)
    elif args.which == "efficiency":
        result = efficiency(args.trials or 12, args.steps, args.seed)
    else:
        result = overhead(args.trials or 6, args.steps or 100)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
