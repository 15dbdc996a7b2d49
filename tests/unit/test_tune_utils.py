"""Search-space translation and trial sizing (pure functions; Ray is imported, not started)."""

from __future__ import annotations

import numpy as np
import pytest
from ray.tune.search import sample

import lmforge.tune as lmtune
from lmforge.config import JobSpec
from lmforge.tune import ResourceError, check_fits, search_space, trial_resources

SPACE = {
    "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "train.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.2},
    "model.n_layer": {"type": "int", "low": 1, "high": 3},
    "model.n_embd": {"type": "choice", "values": [32, 64, 96]},
}


def spec_with(**sections) -> JobSpec:
    return JobSpec.model_validate(sections)


@pytest.fixture(scope="module")
def domains():
    return search_space(spec_with(tune={"search_space": SPACE}).tune.search_space)


def draw(domain, n: int = 2000) -> np.ndarray:
    return np.asarray(domain.sample(size=n, random_state=np.random.RandomState(0)))


def test_every_dim_maps_to_its_ray_tune_domain(domains):
    assert domains.keys() == SPACE.keys()
    kinds = {
        "train.lr": (sample.Float, sample.LogUniform),
        "train.weight_decay": (sample.Float, sample.Uniform),
        "model.n_layer": (sample.Integer, sample.Uniform),
        "model.n_embd": (sample.Categorical, sample.Uniform),
    }
    for key, (domain_type, sampler_type) in kinds.items():
        assert isinstance(domains[key], domain_type), key
        assert isinstance(domains[key].get_sampler(), sampler_type), key
    assert not isinstance(domains["train.weight_decay"].get_sampler(), sample.LogUniform)


def test_float_samples_lie_in_range(domains):
    lr = draw(domains["train.lr"])
    assert lr.min() >= 1e-4 and lr.max() <= 1e-2
    # Log-uniform: about half the draws fall below the geometric mean 1e-3.
    assert 0.4 < (lr < 1e-3).mean() < 0.6
    wd = draw(domains["train.weight_decay"])
    assert wd.min() >= 0.0 and wd.max() <= 0.2
    assert 0.4 < (wd < 0.1).mean() < 0.6


def test_int_high_is_inclusive(domains):
    assert set(draw(domains["model.n_layer"]).tolist()) == {1, 2, 3}


def test_choice_samples_the_given_values(domains):
    assert set(draw(domains["model.n_embd"]).tolist()) == {32, 64, 96}


def test_a_sampled_trial_config_is_a_valid_spec(domains):
    spec = spec_with(tune={"search_space": SPACE}, model={"n_head": 4},
                     train={"steps": 20, "warmup_steps": 2})
    rng = np.random.RandomState(1)
    for _ in range(5):
        config = {k: d.sample(random_state=rng) for k, d in domains.items()}
        trial = spec.with_values(config)
        assert trial.train.lr == pytest.approx(float(config["train.lr"]))
        assert trial.model.n_layer == int(config["model.n_layer"])
        assert trial.model.n_embd == config["model.n_embd"]


# --- trial sizing --------------------------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if sizing a CPU trial asks the (unstarted) cluster anything."""

    def refuse():
        raise AssertionError("check_fits queried Ray for a CPU-only spec")

    monkeypatch.setattr(lmtune.ray, "cluster_resources", refuse)


def cpu_spec(workers: int, cpus_per_worker: float, driver_cpus: float = 0.1) -> JobSpec:
    return spec_with(train={"workers": workers, "cpus_per_worker": cpus_per_worker,
                            "use_gpu": False},
                     tune={"driver_cpus": driver_cpus})


def test_trial_resources_is_driver_plus_workers():
    assert trial_resources(cpu_spec(3, 1.5, 0.5)) == pytest.approx(5.0)


def test_check_fits_refuses_a_trial_larger_than_the_cluster(no_ray):
    with pytest.raises(ResourceError) as info:
        check_fits(cpu_spec(workers=4, cpus_per_worker=1.0), cluster_cpus=2)
    message = str(info.value)
    for text in ("4.1 CPUs", "tune.driver_cpus 0.1", "train.workers 4",
                 "train.cpus_per_worker 1", "cluster has 2"):
        assert text in message


@pytest.mark.parametrize(("workers", "cpus", "cluster"), [(2, 0.95, 2), (1, 1.0, 8), (4, 2, 8.1)])
def test_check_fits_passes_when_a_trial_fits(no_ray, workers, cpus, cluster):
    # (2, 0.95, 2) is the quickstart's sizing: 0.1 + 2 * 0.95 fills a 2-CPU machine exactly.
    check_fits(cpu_spec(workers, cpus), cluster_cpus=cluster)


def test_check_fits_counts_gpus_when_training_on_gpu(monkeypatch):
    monkeypatch.setattr(lmtune.ray, "cluster_resources", lambda: {"CPU": 16, "GPU": 1})
    spec = spec_with(train={"workers": 2, "use_gpu": True})
    with pytest.raises(ResourceError, match="2 GPUs"):
        check_fits(spec, cluster_cpus=16)
    check_fits(spec.with_values({"train.workers": 1}), cluster_cpus=16)
