"""WSD schedules and cooldown forks (issue 17), without Ray: the LR curves, the rungs that
fork, and a fork that leaves the run exactly as it was."""

from __future__ import annotations

import dataclasses
import math
import subprocess

import numpy as np
import pytest
import torch
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from lmforge.config import JobSpec, ModelConfig, SpecError, TrainConfig, load
from lmforge.model import build_model
from lmforge.train.fork import CooldownRungs, Snapshot, cooldown_fork
from lmforge.train.parallel import Parallel
from lmforge.train.step import decay_lr, lr_at, make_optimizer, train_step
from lmforge.tune.halving import SyncHalving
from lmforge.tune.report import SearchOutcome, TrialOutcome
from lmforge.tune.search import make_scheduler, make_searcher, unfinished_bracket
from lmforge.tune.trial import cooldown_rungs, pause_steps, ranking_metric, rung_steps

CPU = torch.device("cpu")

# --- schedules ------------------------------------------------------------------------


def schedule(cfg: TrainConfig) -> list[float]:
    return [lr_at(step, cfg) for step in range(cfg.steps)]


def test_cosine_stays_the_default_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    assert cfg.schedule == "cosine"
    progress = (50 - 10) / (99 - 10)
    assert lr_at(50, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * progress))
                                           * 9e-4)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warms_up_holds_then_decays_to_min_lr_over_the_last_fraction(shape):
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5, schedule="wsd",
                      decay_fraction=0.2, decay_shape=shape)
    lrs = schedule(cfg)
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[9:80] == [1e-3] * 71  # stable: exactly lr until the decay
    decay = lrs[80:]
    assert len(decay) == cfg.decay_steps == 20
    assert all(b < a for a, b in zip([1e-3, *decay], decay, strict=False))
    assert decay[-1] == pytest.approx(1e-5)  # the last step the loop runs is at min_lr
    half = decay[9]  # progress 0.5
    expected = 1e-5 + (0.5 if shape == "linear" else 1 - math.sqrt(0.5)) * (1e-3 - 1e-5)
    assert half == pytest.approx(expected)


def test_one_minus_sqrt_drops_faster_early_than_linear():
    lin = [decay_lr(i, 50, 1.0, 0.0, "linear") for i in range(50)]
    sqrt = [decay_lr(i, 50, 1.0, 0.0, "1-sqrt") for i in range(50)]
    assert sqrt[0] < lin[0] and sqrt[10] < lin[10]
    assert lin[-1] == sqrt[-1] == 0.0


def test_wsd_decay_steps_round_and_are_at_least_one():
    assert TrainConfig(steps=2000, schedule="wsd", decay_fraction=0.15).decay_steps == 300
    assert TrainConfig(steps=10, warmup_steps=2, schedule="wsd",
                       decay_fraction=0.01).decay_steps == 1


def test_wsd_warmup_overlapping_the_decay_is_refused_naming_the_fields(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("train: {steps: 100, warmup_steps: 90, schedule: wsd, "
                    "decay_fraction: 0.2}\n")
    with pytest.raises(SpecError, match=r"train.warmup_steps \(90\).*train.decay_fraction"):
        load(path)
    with pytest.raises(SpecError, match="train.decay_shape"):
        load(path, ["train.warmup_steps=10", "train.decay_shape=cosine"])


# --- rungs and what the search ranks by ------------------------------------------------


@pytest.mark.parametrize(("steps", "grace", "rf"), [(2000, 250, 4), (2000, 250, 3),
                                                     (2000, 250, 2), (100, 10, 3), (60, 80, 2)])
def test_rung_steps_are_ashas_milestones_below_the_last_step(steps, grace, rf):
    spec = JobSpec.model_validate({"train": {"steps": steps, "warmup_steps": 1},
                                   "tune": {"grace_period": grace, "reduction_factor": rf}})
    asha = make_scheduler(spec)
    milestones = sorted(m for m, _ in asha._brackets[0]._rungs)  # Ray's own
    assert rung_steps(spec) == [m for m in milestones if m < steps]


def test_rung_steps_of_the_reference_search():
    spec = JobSpec.model_validate({"train": {"steps": 2000},
                                   "tune": {"grace_period": 250, "reduction_factor": 4,
                                            "rung_cooldown": 0.2}})
    rungs = cooldown_rungs(spec)
    assert rungs.steps == (250, 1000)
    assert (rungs.length(250), rungs.length(1000)) == (50, 200)
    assert cooldown_rungs(spec.with_values({"tune.rung_cooldown": None})) is None


def test_cooldown_rungs_rank_by_the_forks_loss():
    off = JobSpec.model_validate({"tune": {"grace_period": 10}})
    on = off.with_values({"tune.rung_cooldown": 0.1})
    assert ranking_metric(off.tune) == "val_loss"  # today's behaviour, unchanged
    assert make_scheduler(off)._metric == make_searcher(off.tune)._metric == "val_loss"
    assert ranking_metric(on.tune) == "search_loss"
    assert make_scheduler(on)._metric == make_searcher(on.tune)._metric == "search_loss"
    assert isinstance(make_scheduler(on), ASHAScheduler)


def test_rung_cooldown_is_refused_with_multi_objective(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("tune: {multi_objective: true, rung_cooldown: 0.1}\n")
    with pytest.raises(SpecError, match="tune.rung_cooldown"):
        load(path)


def test_search_steps_count_the_forks():
    def trial(steps: int, forks: int) -> TrialOutcome:
        return TrialOutcome("t", {}, "STOPPED", steps, 2.0, 2.0, 1.0, 0, None, "", None,
                            cooldown_steps=forks)
    outcome = SearchOutcome(best=trial(2000, 250), trials=[trial(2000, 250), trial(250, 50)])
    assert outcome.steps_total == 2000 + 250 + 250 + 50


# --- the fork ------------------------------------------------------------------------

TINY = ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, dropout=0.1)
VOCAB = 50


def batches(step: int, accum: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of optimizer step `step`: a pure function of the step, as BlockShard's."""
    g = torch.Generator().manual_seed(1000 + step)
    rows = torch.randint(1, VOCAB, (accum, 4, TINY.block_size + 1), generator=g)
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def held_out_loss(model: torch.nn.Module) -> float:
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(1, VOCAB, (8, TINY.block_size + 1), generator=g)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=rows[:, :-1]).logits
    model.train()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()


def run(cfg: TrainConfig, rungs: CooldownRungs | None, par: Parallel | None = None,
        wrap: bool = False) -> tuple[list[float], list[torch.Tensor], dict[int, float]]:
    """The loop's shape: train cfg.steps steps (dropout on), forking at `rungs`. Returns
    the run's own losses, its final parameters and the forks' scores."""
    par = par or Parallel(cfg, CPU)
    torch.manual_seed(0)
    model = build_model(TINY, VOCAB, 0)
    model = par.wrap(model) if wrap else model
    optimizer = make_optimizer(model, cfg, CPU)
    torch.manual_seed(1)  # the dropout stream the fork must give back
    losses, scores = [], {}
    model.train()
    for step in range(cfg.steps):
        loss, _ = train_step(model, par, optimizer, batches(step), lr_at(step, cfg))
        losses.append(loss.item())
        done = step + 1
        if rungs is not None and done in rungs.steps:
            scores[done] = cooldown_fork(model, par, optimizer, cfg, done, rungs.length(done),
                                         batches, lambda: held_out_loss(model))
    return losses, [p.detach().clone() for p in model.parameters()], scores


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_run_with_cooldown_forks_is_bit_for_bit_the_run_without(schedule):
    cfg = TrainConfig(steps=24, warmup_steps=3, lr=3e-3, min_lr=1e-4, grad_accum=2,
                      schedule=schedule, weight_decay=0.1)
    plain_losses, plain_params, _ = run(cfg, None)
    losses, params, scores = run(cfg, CooldownRungs((6, 12), 0.5))
    assert losses == plain_losses  # exactly: same floats, not approx
    assert all(torch.equal(a, b) for a, b in zip(plain_params, params, strict=True))
    assert set(scores) == {6, 12}
    # The forks trained for real: their scores are not the run's own at those steps.
    assert all(np.isfinite(s) for s in scores.values())


def test_the_fork_trains_with_decaying_lr_on_the_next_batches():
    cfg = TrainConfig(steps=20, warmup_steps=2, lr=3e-3, min_lr=1e-4, schedule="wsd",
                      decay_fraction=0.1)
    par = Parallel(cfg, CPU)
    torch.manual_seed(0)
    model = build_model(TINY.model_copy(update={"dropout": 0.0}), VOCAB, 0)
    optimizer = make_optimizer(model, cfg, CPU)
    for step in range(10):
        train_step(model, par, optimizer, batches(step), lr_at(step, cfg))
    before = held_out_loss(model)
    seen: list[tuple[int, float]] = []
    fork_params: list[torch.Tensor] = []

    def score() -> float:
        fork_params.extend(p.detach().clone() for p in model.parameters())
        return held_out_loss(model)

    fork = cooldown_fork(model, par, optimizer, cfg, 10, 5, batches, score,
                         on_step=lambda step, lr, loss: seen.append((step, lr)))
    assert [s for s, _ in seen] == [11, 12, 13, 14, 15]  # on the run's own step axis
    lrs = [lr for _, lr in seen]
    assert lrs[0] < 3e-3 and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == pytest.approx(1e-4)
    assert fork != before
    assert held_out_loss(model) == before  # restored
    assert not all(torch.equal(a, b) for a, b in zip(fork_params, model.parameters(),
                                                     strict=True))


def test_snapshot_restores_optimizer_moments_scaler_and_rng():
    cfg = TrainConfig(lr=1e-2, precision="fp16")
    par = Parallel(cfg, CPU)
    torch.manual_seed(0)
    model = build_model(TINY, VOCAB, 0)
    optimizer = make_optimizer(model, cfg, CPU)
    train_step(model, par, optimizer, batches(0), 1e-2)
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    scale = par.scaler.get_scale()
    saved = Snapshot(model, optimizer, par)
    draw = torch.rand(3)
    for step in range(1, 4):
        train_step(model, par, optimizer, batches(step), 1e-3)
    par.scaler.update(123.0)
    saved.restore()
    assert torch.equal(torch.rand(3), draw)  # the same RNG stream again
    assert par.scaler.get_scale() == scale
    for p, state in optimizer.state.items():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in state.items())
    assert all(g["lr"] == 1e-2 for g in optimizer.param_groups)


def test_a_fork_under_fsdp_restores_the_sharded_run(process_group):
    cfg = TrainConfig(steps=12, warmup_steps=2, lr=3e-3, strategy="fsdp", grad_accum=2)
    par = Parallel(cfg, CPU)
    plain_losses, plain_params, _ = run(cfg, None, par, wrap=True)
    losses, params, scores = run(cfg, CooldownRungs((5,), 0.6), par, wrap=True)
    assert losses == plain_losses and set(scores) == {5}
    assert all(torch.equal(a.full_tensor(), b.full_tensor())
               for a, b in zip(plain_params, params, strict=True))


def _ddp_rank(rank: int, world: int, init: str, out: str) -> None:
    """One DDP rank: the run with and without forks; writes whether they agree exactly."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = TrainConfig(steps=10, warmup_steps=2, lr=3e-3, grad_accum=2)
        par = Parallel(cfg, CPU)
        assert par.distributed
        global batches
        each_rank = batches
        batches = lambda step, accum=2: each_rank(step * world + rank, accum)  # noqa: E731
        plain = run(cfg, None, par, wrap=True)
        forked = run(cfg, CooldownRungs((4,), 0.5), par, wrap=True)
        same = plain[0] == forked[0] and all(
            torch.equal(a, b) for a, b in zip(plain[1], forked[1], strict=True))
        with open(f"{out}.{rank}", "w") as f:
            f.write(f"{same} {forked[2][4]}")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_fork_together_and_restore_exactly(tmp_path):
    """Two gloo ranks (processes, no Ray): the fork's steps all-reduce like the run's, and
    both ranks give back the run they had, bit for bit, with the same fork score."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.start_processes(_ddp_rank, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2,
                       join=True, start_method="fork")
    results = [open(f"{out}.{r}").read().split() for r in range(2)]
    assert [same for same, _ in results] == ["True", "True"]
    assert results[0][1] == results[1][1]  # one fork, scored alike on every rank


def bench_tune():  # noqa: ANN201
    """bench/tune.py as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "tune.py"
    spec = importlib.util.spec_from_file_location("bench_tune", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_replays_asha_over_random_searchs_trials_by_fork_scores():
    """bench/tune.py's replay of ASHA (Ray's own bracket) over recorded trials: ranking by
    the forks' scores keeps the trial whose fork is best though its own loss was worst,
    and the forks' steps are counted."""
    bench = bench_tune()
    # Three trials of 40 steps, rungs at 10 and 20 (grace 10, reduction factor 2). The
    # third is worst by its own loss at step 10, best once cooled (and at the end).
    histories = [[[10, 2.0], [20, 1.8], [30, 1.7], [40, 1.6]],
                 [[10, 2.1], [20, 1.9], [30, 1.8], [40, 1.7]],
                 [[10, 2.5], [20, 2.0], [30, 1.6], [40, 1.4]]]
    forks = [{"10": [1.9, 2], "20": [1.7, 4]}, {"10": [2.0, 2], "20": [1.8, 4]},
             {"10": [1.5, 2], "20": [1.5, 4]}]
    own = bench.asha_replay(histories, forks, 10, 2, 40, cooldown=False)
    cooled = bench.asha_replay(histories, forks, 10, 2, 40, cooldown=True)
    assert own["stopped_at"] == [40, 10, 10] and own["steps"] == 60
    assert own["best_val_loss"] == 1.6
    assert cooled["stopped_at"] == [40, 10, 40]
    assert cooled["steps"] == (40 + 6) + (10 + 2) + (40 + 6)
    assert cooled["best_val_loss"] == 1.4
    # Reduction factor 4: one rung (10); the forks at 20 are not this ASHA's, nor counted.
    wide = bench.asha_replay(histories, forks, 10, 4, 40, cooldown=True)
    assert wide["stopped_at"] == [40, 10, 40] and wide["steps"] == (40 + 2) + (10 + 2) + (40 + 2)


def test_bench_replays_synchronous_halving_over_the_same_trials():
    """bench/tune.py's synchronous successive halving: every trial to a rung, the best
    half (factor 2) on; the first trial is stopped too when it ranks low."""
    bench = bench_tune()
    histories = [[[10, 2.0], [20, 1.8], [30, 1.7], [40, 1.6]],
                 [[10, 2.1], [20, 1.9], [30, 1.8], [40, 1.7]],
                 [[10, 2.5], [20, 2.0], [30, 1.6], [40, 1.4]],
                 [[10, 1.9], [20, 1.85], [30, 1.75], [40, 1.65]]]
    forks = [{"10": [1.9, 2], "20": [1.7, 4]}, {"10": [2.0, 2], "20": [1.8, 4]},
             {"10": [1.5, 2], "20": [1.5, 4]}, {"10": [1.8, 2], "20": [1.75, 4]}]
    own = bench.sha_replay(histories, forks, 10, 2, 40, cooldown=False)
    # Rung 10 keeps trials 3 and 0 (1.9, 2.0); rung 20 keeps trial 0 (1.8 < 1.85).
    assert own["stopped_at"] == [40, 10, 10, 20] and own["steps"] == 80
    assert own["best_val_loss"] == 1.6
    cooled = bench.sha_replay(histories, forks, 10, 2, 40, cooldown=True)
    # By the forks: rung 10 keeps 2 and 3 (1.5, 1.8); rung 20 keeps 2 (1.5).
    assert cooled["stopped_at"] == [10, 10, 40, 20]
    assert cooled["steps"] == 80 + 4 * 2 + 2 * 4 and cooled["best_val_loss"] == 1.4


# --- synchronous successive halving (tune.scheduler: sha) ------------------------------


class FakeTrial:
    """What SyncHalving reads of a Tune trial, with a recorded curve to report from."""

    def __init__(self, trial_id: str, curve: dict[int, float]) -> None:
        self.trial_id, self.curve = trial_id, curve
        self.status, self.last_result, self.is_saving = Trial.PENDING, {}, False

    def set_status(self, status: str) -> None:
        self.status = status


class FakeSearcher(Searcher):
    def __init__(self) -> None:
        super().__init__(metric="search_loss", mode="min")

    def suggest(self, trial_id: str) -> dict:
        return {}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass


class FakeController:
    """Tune's controller as far as a scheduler sees it: its trials, and `stop_trial`,
    which (as Tune's does) tells the scheduler `on_trial_remove` for a paused trial and
    the searcher that the trial ended."""

    def __init__(self, scheduler: SyncHalving) -> None:
        self.scheduler, self.trials = scheduler, []
        self.searcher = scheduler.limit(FakeSearcher())

    def get_trials(self) -> list[FakeTrial]:
        return self.trials

    def stop_trial(self, trial: FakeTrial) -> None:
        assert trial.status in (Trial.PAUSED, Trial.PENDING)
        self.scheduler.on_trial_remove(self, trial)
        self.searcher.on_trial_complete(trial.trial_id)
        trial.status = Trial.TERMINATED


def run_bracket(scheduler: SyncHalving, curves: list[dict[int, float]],
                fail: dict[int, int] | None = None) -> tuple[list[int], list[str]]:
    """Drive `scheduler` as Tune does, one trial running at a time: the searcher (limited
    by `scheduler.limit`) creates a trial when it has room, Tune runs the trial the
    scheduler chooses or else a PENDING one, and a running trial reports each step of
    its curve until the scheduler pauses or stops it or it ends. `fail`: trial index ->
    the step at which it errors. Returns each trial's last step and the order trials ran."""
    ctl, fail, ran = FakeController(scheduler), fail or {}, []
    while True:
        if len(ctl.trials) < len(curves) and \
                ctl.searcher.suggest(str(len(ctl.trials))) is not None:
            trial = FakeTrial(str(len(ctl.trials)), curves[len(ctl.trials)])
            ctl.trials.append(trial)
            scheduler.on_trial_add(ctl, trial)
        trial = scheduler.choose_trial_to_run(ctl) or next(
            (t for t in ctl.trials if t.status == Trial.PENDING), None)
        if trial is None:
            break
        trial.status = Trial.RUNNING
        ran.append(trial.trial_id)
        for step in sorted(s for s in trial.curve if s > trial.last_result.get("step", 0)):
            if fail.get(int(trial.trial_id)) == step:
                trial.status = Trial.ERROR
                scheduler.on_trial_error(ctl, trial)
                ctl.searcher.on_trial_complete(trial.trial_id, error=True)
                break
            trial.last_result = {"step": step, "search_loss": trial.curve[step]}
            decision = scheduler.on_trial_result(ctl, trial, trial.last_result)
            if step == max(trial.curve) or decision == TrialScheduler.STOP:
                trial.status = Trial.TERMINATED
                scheduler.on_trial_complete(ctl, trial, trial.last_result)
                ctl.searcher.on_trial_complete(trial.trial_id, trial.last_result)
                break
            if decision == TrialScheduler.PAUSE:
                trial.status = Trial.PAUSED
                break
    assert all(t.status in (Trial.TERMINATED, Trial.ERROR) for t in ctl.trials)
    return [t.last_result.get("step", 0) for t in ctl.trials], ran


def curves_of(histories: list[list[list[float]]]) -> list[dict[int, float]]:
    return [{int(step): loss for step, loss in h} for h in histories]


def test_sync_halving_stops_trials_where_the_bench_replay_of_it_does():
    """The scheduler and bench/tune.py's `sha_replay` are one rule: over twelve random
    curves (rungs at 250 and 1000 of 2000, factor 4) they stop every trial at the same
    step; the first trial to reach a rung is stopped there too when it ranks low."""
    bench = bench_tune()
    rng = np.random.default_rng(3)
    steps = [250, 500, 750, 1000, 1250, 1500, 1750, 2000]
    histories = [[[s, float(v)] for s, v in zip(steps, np.sort(rng.uniform(1.5, 2.5, 8))[::-1],
                                                 strict=True)] for _ in range(12)]
    replay = bench.sha_replay(histories, [{}] * 12, 250, 4, 2000, cooldown=False)
    stopped, ran = run_bracket(SyncHalving("search_loss", [250, 1000], 4, 12, 1),
                               curves_of(histories))
    assert stopped == replay["stopped_at"]
    assert sorted(stopped) == [250] * 9 + [1000] * 2 + [2000]
    assert ran[:12] == [str(i) for i in range(12)]  # all to the first rung, in order
    # Then only promoted trials run again, each at most once per rung it passed.
    promoted = [str(i) for i, step in enumerate(stopped) if step > 250]
    assert set(ran[12:]) <= set(promoted) and len(ran[12:]) <= 3 + 1


def test_sync_halving_pauses_every_trial_at_a_rung_even_the_promoted_last_one():
    """A trial's Train run ends at each rung, so the scheduler never lets a trial go on
    from there: the one whose report completes a rung is paused and (promoted) started
    again, or stopped at once when it ranks low."""
    curves = [{10: 2.0, 20: 1.8, 40: 1.6}, {10: 1.5, 20: 1.5, 40: 1.4}]
    stopped, ran = run_bracket(SyncHalving("search_loss", [10, 20], 2, 2, 1), curves)
    assert stopped == [10, 40] and ran == ["0", "1", "1", "1"]
    curves = [{10: 1.5, 20: 1.5, 40: 1.4}, {10: 2.0, 20: 1.8, 40: 1.6}]
    stopped, ran = run_bracket(SyncHalving("search_loss", [10, 20], 2, 2, 1), curves)
    assert stopped == [40, 10] and ran == ["0", "1", "0", "0"]


def test_sync_halving_decides_a_rung_when_the_trial_it_waited_for_fails():
    """A trial that errors before the rung is not waited for: the others are ranked
    without it and the bracket goes on."""
    curves = [{10: 2.0, 20: 1.9, 40: 1.8}, {10: 1.5, 20: 1.4, 40: 1.3},
              {10: 1.0, 20: 0.9, 40: 0.8}]
    stopped, _ = run_bracket(SyncHalving("search_loss", [10], 2, 3, 1), curves, fail={2: 10})
    assert stopped == [10, 40, 0]


def test_sync_halving_runs_at_most_max_concurrent_counting_no_waiting_trial():
    """Tune starts every PENDING trial, so the searcher creates trials only while fewer
    than max_concurrent are live and not paused at a rung; a promoted trial is restarted
    only when fewer than that are running or about to."""
    scheduler = SyncHalving("search_loss", [10], 2, 3, max_concurrent=2)
    ctl = FakeController(scheduler)
    for i in range(2):
        assert ctl.searcher.suggest(str(i)) == {}
        ctl.trials.append(FakeTrial(str(i), {}))
        scheduler.on_trial_add(ctl, ctl.trials[i])
    assert ctl.searcher.suggest("2") is None  # two live: one pending, one to be
    ctl.trials[0].status = Trial.RUNNING
    ctl.trials[0].last_result = {"step": 10, "search_loss": 1.0}
    assert scheduler.on_trial_result(ctl, ctl.trials[0], ctl.trials[0].last_result) \
        == TrialScheduler.PAUSE
    ctl.trials[0].status = Trial.PAUSED
    assert scheduler.waiting() == {"0"}
    assert ctl.searcher.suggest("2") == {}  # the paused trial holds no slot
    ctl.trials.append(FakeTrial("2", {}))
    scheduler.on_trial_add(ctl, ctl.trials[2])
    assert ctl.searcher.suggest("3") is None
    for trial, loss in ((ctl.trials[1], 2.0), (ctl.trials[2], 3.0)):
        trial.status, trial.last_result = Trial.RUNNING, {"step": 10, "search_loss": loss}
    assert scheduler.on_trial_result(ctl, ctl.trials[1], ctl.trials[1].last_result) \
        == TrialScheduler.PAUSE
    ctl.trials[1].status = Trial.PAUSED
    # Trial 2 completes the rung and ranks last: stopped; trial 0 is promoted, trial 1
    # stopped while it waits (3 // 2 = 1 goes on).
    assert scheduler.on_trial_result(ctl, ctl.trials[2], ctl.trials[2].last_result) \
        == TrialScheduler.STOP
    ctl.trials[2].status = Trial.TERMINATED
    assert ctl.trials[1].status == Trial.TERMINATED and scheduler.waiting() == set()
    assert scheduler.choose_trial_to_run(ctl) is ctl.trials[0]
    ctl.trials[0].status = Trial.PENDING  # Tune stages it...
    ctl.trials.append(FakeTrial("x", {}))  # ...and one more pending would fill the slots
    assert scheduler.choose_trial_to_run(ctl) is None


def test_sync_halving_restored_before_the_rung_is_decided():
    """Tune keeps no scheduler state across `--resume`: a new SyncHalving reads each
    trial's last report. Restored trials come back PENDING; one that had reached the
    rung is set PAUSED (Tune would start it) and waits until the rung is decided."""
    scheduler = SyncHalving("search_loss", [10], 2, 3, 1)
    ctl = FakeController(scheduler)
    waiting, failed, short = FakeTrial("0", {}), FakeTrial("1", {}), FakeTrial("2", {})
    waiting.last_result = {"step": 10, "search_loss": 1.7}
    failed.last_result, failed.status = {"step": 5, "search_loss": 2.5}, Trial.ERROR
    short.last_result = {"step": 5, "search_loss": 3.0}
    ctl.trials = [waiting, failed, short]
    for t in ctl.trials:
        scheduler.on_trial_add(ctl, t)
    assert waiting.status == Trial.PAUSED and short.status == Trial.PENDING
    assert scheduler.choose_trial_to_run(ctl) is None  # short runs (Tune starts it)
    short.status = Trial.RUNNING
    decision = scheduler.on_trial_result(ctl, short, {"step": 10, "search_loss": 1.2})
    assert decision == TrialScheduler.PAUSE  # 1.2 beats 1.7; 2 // 2 keeps one
    assert waiting.status == Trial.TERMINATED
    short.status = Trial.PAUSED
    assert scheduler.choose_trial_to_run(ctl) is short  # promoted: it goes on


def test_sync_halving_restored_after_the_rung_was_decided_keeps_its_promotions():
    """A search killed after a rung was ranked, before its promoted trials restarted:
    the trials stopped at the rung's step show it was decided, so the two waiting there
    are the ones it promoted (not ranked again, which would keep 2 // 2 = 1)."""
    scheduler = SyncHalving("search_loss", [10, 20], 2, 4, 1)
    ctl = FakeController(scheduler)
    for i, (loss, status) in enumerate([(1.0, Trial.PENDING), (2.0, Trial.TERMINATED),
                                        (1.5, Trial.PENDING), (3.0, Trial.TERMINATED)]):
        trial = FakeTrial(str(i), {})
        trial.last_result, trial.status = {"step": 10, "search_loss": loss}, status
        ctl.trials.append(trial)
        scheduler.on_trial_add(ctl, trial)
    first = scheduler.choose_trial_to_run(ctl)
    assert first is ctl.trials[0] and scheduler.waiting() == set()
    first.status = Trial.RUNNING
    assert scheduler.on_trial_result(ctl, first, {"step": 20, "search_loss": 0.9}) \
        == TrialScheduler.PAUSE  # waits at 20 for trial 2
    first.status = Trial.PAUSED
    assert scheduler.choose_trial_to_run(ctl) is ctl.trials[2]


def test_sha_scheduler_from_the_spec_checkpoints_trials_at_its_rungs():
    spec = JobSpec.model_validate({
        "train": {"steps": 2000},
        "tune": {"scheduler": "sha", "grace_period": 250,
                 "reduction_factor": 4, "num_trials": 12, "rung_cooldown": 0.2,
                 "max_concurrent_trials": 2}})
    sha = make_scheduler(spec)
    assert isinstance(sha, SyncHalving)
    assert sha._rungs == [250, 1000] and sha._metric == "search_loss"
    assert sha._num_trials == 12 and sha._max_concurrent == 2
    assert sha.limit(make_searcher(spec.tune)).max_concurrent == 2
    assert pause_steps(spec) == (250, 1000)
    asha = spec.model_copy(update={"tune": spec.tune.model_copy(update={"scheduler": "asha"})})
    assert pause_steps(asha) == ()


def test_sha_search_cut_short_by_its_budget_says_so():
    spec = JobSpec.model_validate({"train": {"steps": 2000},
                                   "tune": {"scheduler": "sha", "num_trials": 16}})

    def trial(steps: int, status: str = "STOPPED") -> TrialOutcome:
        return TrialOutcome("t", {}, status, steps, 2.0, 2.0, 1.0, 0, None, "", None)
    cut = [trial(250)] * 15 + [trial(750)]
    warning = unfinished_bracket(spec, cut)
    assert "no trial reached train.steps (2000)" in warning and "step 750" in warning
    assert "tune.num_trials (16)" in warning
    assert unfinished_bracket(spec, [*cut, trial(2000, "FINISHED")]) is None
    failed = dataclasses.replace(trial(250), error="RuntimeError: boom")
    assert unfinished_bracket(spec, [failed]) is None  # "every trial failed" says it
    asha = spec.with_values({"tune.scheduler": "asha"})
    assert unfinished_bracket(asha, cut) is None


def test_bench_noise_trains_one_configuration_once_per_seed(monkeypatch):
    """`bench/tune.py noise`: one `lmforge train` per seed, the seed given last (after the
    user's overrides, so it cannot be overridden away), and the spread of their losses."""
    bench = bench_tune()
    calls = []

    def fake_run(cmd, **kwargs):  # noqa: ANN001, ANN202
        calls.append(cmd)
        seed = int(cmd[-1].split("=")[1])
        loss = {1337: 1.735, 1: 1.745, 2: 1.740}[seed]
        return subprocess.CompletedProcess(cmd, 0, stdout=f"log\n{{\"val_loss\": {loss}}}\n")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    out = bench.noise([1337, 1, 2], ["train.lr=3.5e-3", "train.seed=7"])
    assert [c[1] for c in calls] == ["train"] * 3
    assert [c[-1] for c in calls] == ["train.seed=1337", "train.seed=1", "train.seed=2"]
    assert all("train.lr=3.5e-3" in c and "registry.enabled=false" in c for c in calls)
    assert out["val_loss_by_seed"] == {1337: 1.735, 1: 1.745, 2: 1.740}
    assert out["mean"] == 1.74 and out["std"] == 0.005 and out["range"] == 0.01


def test_bench_rung_noise_counts_only_noise_that_reorders_configurations():
    """`_interaction_var`: a seed that moves every configuration alike is no noise to a
    search (its trials share `train.seed`); one that swaps two configurations is."""
    bench = bench_tune()
    configs = np.array([2.30, 2.32, 2.35, 2.40])
    additive = configs[:, None] + np.array([0.0, 0.02, -0.01])[None, :]
    assert bench._interaction_var(additive) == pytest.approx(0.0, abs=1e-12)
    swapped = additive.copy()
    swapped[[0, 1], 2] = swapped[[1, 0], 2]  # seed 2 ranks the first two the other way
    assert bench._interaction_var(swapped) > 1e-5


def test_bench_rung_noise_runs_each_configuration_to_its_first_rung(monkeypatch, tmp_path):
    """`bench/tune.py rung-noise`: random search's configurations (the search's own draws),
    each trained once per `train.seed` as a trial is, forking at the first rung and
    stopping there; the scores, and a reliability that is 1 where seeds move nothing."""
    import lmforge.data
    import lmforge.train
    from lmforge.train import Paused

    bench = bench_tune()
    runs = []

    def fake_training(spec, data, tracker, name, cooldown=None, pause_at=()):  # noqa: ANN001, ANN202
        runs.append((spec.train.seed, spec.train.lr, cooldown, pause_at))
        fork = 2.3 + 100 * abs(spec.train.lr - 4e-3) + {1337: 0.0, 1: 0.01}[spec.train.seed]
        raise Paused({"step": pause_at[0], "val_loss": fork + 0.1, "search_loss": fork,
                      "pausing": True})

    monkeypatch.setattr(lmforge.train, "run_training", fake_training)
    monkeypatch.setattr(lmforge.data, "prepare_data", lambda *a: None)
    monkeypatch.setattr(bench, "_own_ray", lambda: None)
    corpus = tmp_path / "corpus.txt"  # the spec's own corpus lives outside the checkout
    corpus.write_text("To be, or not to be.\n" * 50)
    out = bench.rung_noise(3, 2, [1337, 1], [f"data.path={corpus}", "train.schedule=wsd",
                                             "tune.rung_cooldown=0.2",
                                             "tune.reduction_factor=4"])
    lrs = [c["train.lr"] for c in out["configs"]]
    assert lrs[0] == pytest.approx(2.7289457495676007e-03)  # seed 2's trial 0, as searched
    assert [(seed, lr) for seed, lr, _, _ in runs] == [(s, lr) for lr in lrs for s in (1337, 1)]
    assert {(c.steps, c.fraction, p) for _, _, c, p in runs} == {((250, 1000), 0.2, (250,))}
    assert out["rung"] == 250 and out["score"][0][1] == round(out["score"][0][1337] + 0.01, 4)
    assert out["reliability"] == 1.0 and out["noise_std"] == 0.0
