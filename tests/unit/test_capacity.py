"""The fit check shared by training and the search: fail at once on a cluster that cannot
grow, wait (bounded) for an autoscaler that can. A fake cluster and clock; no Ray."""

from __future__ import annotations

import pytest

from lmforge.capacity import Demand, ResourceError, ensure_fits, fits
from lmforge.config import JobSpec


class FakeCluster:
    """Nodes that an 'autoscaler' may add after some polls; records requests."""

    def __init__(self, nodes, limits=None, grow_after=None, grown=None):
        self._nodes, self.limits = nodes, limits
        self.grow_after, self.grown = grow_after, grown
        self.polls = 0
        self.requests: list[list[dict]] = []

    def nodes(self):
        self.polls += 1
        if self.grow_after is not None and self.polls > self.grow_after:
            return self.grown
        return self._nodes

    def autoscaler_limits(self):
        return self.limits

    def request(self, bundles):
        self.requests.append(bundles)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def pause(self, s: float) -> None:
        self.t += s


def check(demand, cluster, timeout_s=None):
    clock, said = Clock(), []
    ensure_fits(demand, timeout_s, cluster, said.append, clock, clock.pause)
    return clock.t, said


def spec(**train) -> JobSpec:
    return JobSpec.model_validate({"train": train, "tune": {"driver_cpus": 0.1}})


TWO_CORES = [{"CPU": 2.0}]


def test_training_demand_and_a_trial_demand():
    train = Demand.of(spec(workers=3, cpus_per_worker=1.5), search=False)
    assert (train.cpus, train.gpus, train.bundles()) == (4.5, 0, [{"CPU": 1.5}] * 3)
    trial = Demand.of(spec(workers=3, cpus_per_worker=1.5), search=True)
    assert trial.cpus == pytest.approx(4.6)
    assert trial.bundles() == [{"CPU": 0.1}] + [{"CPU": 1.5}] * 3
    gpu = Demand.of(spec(workers=2, use_gpu=True), search=False)
    assert gpu.bundles() == [{"CPU": 1.0, "GPU": 1.0}] * 2


@pytest.mark.parametrize(("workers", "cpus", "search", "nodes", "ok"), [
    (2, 0.95, True, TWO_CORES, True),       # the quickstart: 0.1 + 2 x 0.95 fills 2 CPUs
    (2, 1.0, True, TWO_CORES, False),
    (2, 1.0, False, TWO_CORES, True),
    (1, 2.0, False, [{"CPU": 1.0}, {"CPU": 1.0}], False),  # 2 CPUs, but not on one node
    (2, 1.0, True, [{"CPU": 2.0}, {"CPU": 0.5}], True),    # the driver on the small node
    (4, 2.0, False, [{"CPU": 4.0}, {"CPU": 4.0}], True),
])
def test_fits_places_bundles_per_node(workers, cpus, search, nodes, ok):
    assert fits(Demand.of(spec(workers=workers, cpus_per_worker=cpus), search), nodes) is ok


def test_a_run_that_fits_starts_at_once():
    cluster = FakeCluster(TWO_CORES)
    assert check(Demand.of(spec(workers=2, cpus_per_worker=1.0), False), cluster) == (0, [])
    assert cluster.requests == []


def test_fixed_cluster_too_small_fails_at_once_naming_the_fields():
    """`lmforge train jobs/bench/shakespeare_char.yaml train.workers=2` on 2 cores."""
    cluster = FakeCluster(TWO_CORES)
    with pytest.raises(ResourceError) as info:
        check(Demand.of(spec(workers=2, cpus_per_worker=2.0), False), cluster)
    message = str(info.value)
    for text in ("training needs 4 CPUs", "train.workers 2", "train.cpus_per_worker 2",
                 "no GPU (train.use_gpu false)", "the cluster has 2 CPUs and 0 GPUs",
                 "no autoscaler can add nodes"):
        assert text in message, text
    assert cluster.requests == [] and cluster.polls == 1


def test_a_trial_too_large_names_the_driver_bundle_too():
    with pytest.raises(ResourceError) as info:
        check(Demand.of(spec(workers=4, cpus_per_worker=1.0), True), FakeCluster(TWO_CORES))
    message = str(info.value)
    for text in ("one trial needs 4.1 CPUs", "tune.driver_cpus 0.1", "train.workers 4",
                 "train.cpus_per_worker 1", "cluster has 2"):
        assert text in message, text


def test_a_worker_larger_than_any_node_is_named():
    with pytest.raises(ResourceError, match="must be on one node .*largest has 1 CPUs"):
        check(Demand.of(spec(workers=1, cpus_per_worker=2.0), False),
              FakeCluster([{"CPU": 1.0}, {"CPU": 1.0}]))


def test_gpus_asked_are_counted_against_the_cluster():
    with pytest.raises(ResourceError, match="2 GPUs .* cluster has 16 CPUs and 1 GPUs"):
        check(Demand.of(spec(workers=2, use_gpu=True), False),
              FakeCluster([{"CPU": 16.0, "GPU": 1.0}]))
    check(Demand.of(spec(workers=1, use_gpu=True), False),
          FakeCluster([{"CPU": 16.0, "GPU": 1.0}]))


def test_autoscaler_whose_limits_are_too_small_fails_at_once():
    cluster = FakeCluster([{"CPU": 4.0}], limits={"CPU": 12.0, "GPU": 8.0})
    with pytest.raises(ResourceError, match="at most 12 CPUs and 8 GPUs"):
        check(Demand.of(spec(workers=16, use_gpu=True), False), cluster)
    assert cluster.requests == []


def test_waits_for_the_autoscaler_and_says_what_for():
    cluster = FakeCluster([{"CPU": 4.0}], limits={"CPU": 100.0, "GPU": 16.0}, grow_after=3,
                          grown=[{"CPU": 4.0}, {"CPU": 8.0, "GPU": 8.0}])
    demand = Demand.of(spec(workers=2, use_gpu=True, cpus_per_worker=2), False)
    waited, said = check(demand, cluster)
    assert 0 < waited <= 10
    assert "Waiting up to 600 s (train.scheduling_timeout_s)" in said[0]
    assert "2 GPUs" in said[0] and "the cluster has 4 CPUs and 0 GPUs" in said[0]
    # Asked for the run's bundles, then withdrew the ask once they fit.
    assert cluster.requests == [demand.bundles(), []]


def test_gives_up_after_the_scheduling_timeout():
    cluster = FakeCluster([{"CPU": 4.0}], limits={"CPU": 100.0})
    with pytest.raises(ResourceError, match="after waiting 30 s .*did not add the nodes"):
        check(Demand.of(spec(workers=8), False), cluster, timeout_s=30)
    assert cluster.requests[-1] == []


def test_without_reported_limits_a_set_timeout_still_waits():
    """An autoscaler v1 cluster publishes no limits: `train.scheduling_timeout_s` says to
    wait for it anyway."""
    cluster = FakeCluster([{"CPU": 2.0}], grow_after=2, grown=[{"CPU": 2.0}, {"CPU": 8.0}])
    waited, _ = check(Demand.of(spec(workers=4, cpus_per_worker=2), False), cluster,
                      timeout_s=120)
    assert 0 < waited < 120
