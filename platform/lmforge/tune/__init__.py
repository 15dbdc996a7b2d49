"""Tune stage: Optuna (TPE or random, through Ray Tune's OptunaSearch) with ASHA over spec
fields, each trial a distributed training run.

- `search.py`: the searcher, scheduler and token budget; `run_search` runs or resumes it;
- `trial.py`: `train_driver_fn`, one trial (its own TorchTrainer, reporting to Tune);
- `space.py`: the spec's search space as Optuna distributions;
- `report.py`: the outcome, and what the search's MLflow parent run holds of it;
- `snapshot.py`: intact copies of Tune's state files, put back on `--resume`;
- `reaper.py`: removes the placement groups of Train runs whose controller died with its
  trial, which Ray Train's own cleaner left reserved;
- `preempt.py`: SIGTERM to the driver checkpoints every running trial and saves the
  search's state, for `--resume`.

The search's MLflow parent run and one child run per trial are addressed by (tracking URI,
run id), never by a process-global active run, so concurrent trials nest correctly.
"""

from lmforge.tune.report import SearchOutcome, TrialOutcome
from lmforge.tune.search import (
    check_settings_unchanged,
    run_search,
    search_settings,
)

__all__ = ["SearchOutcome", "TrialOutcome", "check_settings_unchanged", "run_search",
           "search_settings"]
