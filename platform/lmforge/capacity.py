"""Whether a run's workers can ever be placed on the Ray cluster, decided before it starts.

Ray waits for resources without a limit: a placement group the cluster can never hold
stays pending, so `lmforge train jobs/bench/shakespeare_char.yaml train.workers=2` on a
2-core machine printed "Attempting to start training worker group of size 2" and waited for
good. `ensure_fits` decides up front, for training and for a search (one trial: its driver
bundle plus its workers), in this order:

- the cluster's nodes can hold the run: go on;
- an autoscaler can add nodes (Ray reports its limits, as autoscaler v2 does): fail at once
  when even its limits cannot hold the run; else ask it for the run's bundles
  (`ray.autoscaler.sdk.request_resources`), say what is waited for, and give up after
  `train.scheduling_timeout_s` (600 s when unset);
- no autoscaler reports limits: the cluster is taken as fixed and the run fails at once,
  naming `train.workers`, `train.cpus_per_worker` and the GPUs asked against what the
  cluster has; unless `train.scheduling_timeout_s` is set, which says nodes may still come
  (an autoscaler v1 cluster, whose limits Ray does not publish), and it is waited for.

"Can hold" is per node, as Ray places bundles: every worker's CPUs (and GPU) on one node.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lmforge.config import JobSpec

DEFAULT_AUTOSCALER_WAIT_S = 600.0
POLL_S = 2.0  # how often the node list is read while an autoscaler adds nodes

Bundle = dict[str, float]


class ResourceError(RuntimeError):
    """The cluster cannot hold the run (now, and nothing will add the nodes in time)."""


@dataclass(frozen=True)
class Demand:
    """What a run asks Ray for: `workers` bundles of CPUs (and a GPU each), plus a search
    trial's driver bundle."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    driver_cpus: float = 0.0
    """`tune.driver_cpus` for a search trial; 0 for training (its controller takes none)."""

    @classmethod
    def of(cls, spec: JobSpec, search: bool) -> Demand:
        t = spec.train
        return cls(t.workers, t.cpus_per_worker, 1.0 if t.use_gpu else 0.0,
                   spec.tune.driver_cpus if search else 0.0)

    @property
    def worker(self) -> Bundle:
        return {"CPU": self.cpus_per_worker} | ({"GPU": self.gpus_per_worker}
                                                if self.gpus_per_worker else {})

    def bundles(self) -> list[Bundle]:
        driver = [{"CPU": self.driver_cpus}] if self.driver_cpus else []
        return driver + [self.worker] * self.workers

    @property
    def cpus(self) -> float:
        return self.driver_cpus + self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def describe(self) -> str:
        what = "one trial" if self.driver_cpus else "training"
        driver = f"tune.driver_cpus {self.driver_cpus:g} + " if self.driver_cpus else ""
        gpus = (f"{self.gpus:g} GPUs (train.use_gpu: one per worker)" if self.gpus
                else "no GPU (train.use_gpu false)")
        return (f"{what} needs {self.cpus:g} CPUs ({driver}train.workers {self.workers} x "
                f"train.cpus_per_worker {self.cpus_per_worker:g}) and {gpus}")


def fits(demand: Demand, nodes: list[Bundle]) -> bool:
    """Whether `nodes` (each node's total resources) can hold every bundle at once. Exact
    for one driver bundle and identical workers: the driver is tried on each node, then
    each node holds as many workers as fit in what is left."""
    if not demand.driver_cpus:
        return _worker_slots(demand.worker, nodes) >= demand.workers
    for i, node in enumerate(nodes):
        if node.get("CPU", 0) + 1e-9 < demand.driver_cpus:
            continue
        rest = [n | {"CPU": n.get("CPU", 0) - demand.driver_cpus} if j == i else n
                for j, n in enumerate(nodes)]
        if _worker_slots(demand.worker, rest) >= demand.workers:
            return True
    return False


def _worker_slots(bundle: Bundle, nodes: list[Bundle]) -> int:
    # The 1e-9 lets 0.95 + 0.95 + 0.1 fill a 2-CPU node, as Ray's fixed-point sums do.
    return sum(min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0)
               for node in nodes)


def _shortfall(demand: Demand, nodes: list[Bundle]) -> str:
    """What the cluster has, worded against what the run asked."""
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    has = f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs on {len(nodes)} node(s)"
    if demand.cpus > cpus + 1e-9 or demand.gpus > gpus + 1e-9:
        return has
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    return (f"{has}, and a worker's {demand.cpus_per_worker:g} CPUs"
            + (f" and {demand.gpus_per_worker:g} GPU" if demand.gpus_per_worker else "")
            + f" must be on one node (the largest has {largest.get('CPU', 0):g} CPUs and "
            f"{largest.get('GPU', 0):g} GPUs)")


class Cluster(Protocol):
    """What `ensure_fits` asks of a Ray cluster (a fake one in unit tests)."""

    def nodes(self) -> list[Bundle]:
        """Each ALIVE node's total resources."""
        ...

    def autoscaler_limits(self) -> Bundle | None:
        """The most of each resource the autoscaler may bring up; None without one."""
        ...

    def request(self, bundles: list[Bundle]) -> None:
        """Ask the autoscaler for room for these bundles ([] withdraws the request)."""
        ...


class RayCluster:
    """The cluster this process joined (`ray.init` already called)."""

    def nodes(self) -> list[Bundle]:
        import ray

        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]

    def autoscaler_limits(self) -> Bundle | None:
        # The limits autoscaler v2 publishes (KubeRay, `ray up` with v2), as Ray Train
        # itself reads them before placing workers; Ray has no public call for them.
        try:
            from ray._private.state import state

            limits = state.get_max_resources_from_cluster_config()
        except Exception:  # a private call: if it moved, behave as without an autoscaler
            return None
        return {k: float(v) for k, v in limits.items()} if limits else None

    def request(self, bundles: list[Bundle]) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)


def ensure_fits(demand: Demand, timeout_s: float | None, cluster: Cluster | None = None,
                say: Callable[[str], None] | None = None,
                clock: Callable[[], float] = time.monotonic,
                pause: Callable[[float], None] = time.sleep) -> None:
    """Return once the cluster can hold `demand`; raise `ResourceError` when it cannot and
    nothing will change that within `timeout_s` (`train.scheduling_timeout_s`). The module
    docstring has the rules."""
    cluster = cluster or RayCluster()
    say = say or (lambda m: print(f"[lmforge] {m}", file=sys.stderr, flush=True))
    nodes = cluster.nodes()
    if fits(demand, nodes):
        return
    limits = cluster.autoscaler_limits()
    if limits is not None and not fits(demand, [limits]):
        raise ResourceError(
            f"{demand.describe()}, but {_shortfall(demand, nodes)}, and its autoscaler can "
            f"bring up at most {limits.get('CPU', 0):g} CPUs and {limits.get('GPU', 0):g} "
            "GPUs: lower train.workers or train.cpus_per_worker, or raise the autoscaler's "
            "maximum")
    if limits is None and timeout_s is None:
        raise ResourceError(
            f"{demand.describe()}, but {_shortfall(demand, nodes)}, and no autoscaler can "
            "add nodes: lower train.workers or train.cpus_per_worker"
            + (", or run on a cluster with GPUs" if demand.gpus else "")
            + " (on a cluster an autoscaler grows that Ray reports no limits for, set "
            "train.scheduling_timeout_s to wait for it)")
    wait_s = timeout_s or DEFAULT_AUTOSCALER_WAIT_S
    say(f"{demand.describe()}; {_shortfall(demand, nodes)}. Waiting up to {wait_s:g} s "
        "(train.scheduling_timeout_s) for the autoscaler to add nodes")
    cluster.request(demand.bundles())
    deadline = clock() + wait_s
    try:
        while clock() < deadline:
            pause(min(POLL_S, max(0.0, deadline - clock())))
            nodes = cluster.nodes()
            if fits(demand, nodes):
                say(f"the cluster now holds the run ({_shortfall(demand, nodes)})")
                return
    finally:
        # Withdraw the request: from here Ray's own placement group asks for the workers
        # (or, after a timeout, nothing should hold the nodes up).
        cluster.request([])
    raise ResourceError(
        f"{demand.describe()}, but after waiting {wait_s:g} s (train.scheduling_timeout_s) "
        f"{_shortfall(demand, nodes)}: the autoscaler did not add the nodes. Lower "
        "train.workers or train.cpus_per_worker, or raise train.scheduling_timeout_s")
