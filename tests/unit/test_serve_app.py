"""The spec's serve section becomes the deployment's Serve options (no Ray started)."""

from __future__ import annotations

import warnings

import pytest

from lmforge.config import load


def deployment_config(*overrides: str):  # noqa: ANN201
    from lmforge.serve import build_app

    cfg = load(None, list(overrides)).serve
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # none of Ray's reaches a user
        app = build_app(lambda uri: None, cfg, "models:/m/1")
    return app._bound_deployment._deployment_config


def test_autoscaling_bounds_target_delays_and_window_come_from_the_spec():
    auto = deployment_config(
        "serve.min_replicas=1", "serve.max_replicas=3", "serve.target_ongoing_requests=2",
        "serve.upscale_delay_s=5", "serve.downscale_delay_s=60",
        "serve.look_back_period_s=45").autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 2)
    assert (auto.upscale_delay_s, auto.downscale_delay_s) == (5, 60)
    assert auto.look_back_period_s == 45 and auto.metrics_interval_s == 10  # Ray's default


def test_a_short_window_gets_load_reports_at_least_twice_per_window():
    auto = deployment_config("serve.max_replicas=2",
                             "serve.look_back_period_s=2").autoscaling_config
    assert auto.look_back_period_s == 2 and auto.metrics_interval_s == 1


def test_equal_bounds_mean_a_fixed_replica_count():
    config = deployment_config("serve.min_replicas=3", "serve.max_replicas=3")
    assert config.autoscaling_config is None and config.num_replicas == 3


def test_replica_resources_come_from_the_spec():
    from lmforge.serve import build_app

    cfg = load(None, ["serve.cpus_per_replica=2", "serve.gpus_per_replica=0.5"]).serve
    options = build_app(lambda uri: None, cfg, "models:/m/1")._bound_deployment.ray_actor_options
    assert options["num_cpus"] == 2 and options["num_gpus"] == 0.5


@pytest.mark.parametrize(("uri", "version", "listed", "accepted"), [
    ("models:/lm@champion", "lm/3", "lm", {"lm", "lm@champion", "lm/3"}),
    ("models:/lm/3", "lm/3", "lm", {"lm", "lm/3"}),
    ("models:/team.lm-v2@prod", "team.lm-v2/12", "team.lm-v2",
     {"team.lm-v2", "team.lm-v2@prod", "team.lm-v2/12"}),
    ("/srv/models/mini", "mini", "mini", {"mini"}),
    ("runs:/0a1b/model", "runs:/0a1b/model", "runs:/0a1b/model", {"runs:/0a1b/model"}),
])
def test_a_registered_model_is_listed_and_answers_by_a_name_no_promotion_changes(
        uri, version, listed, accepted):
    from lmforge.serve.app import model_names

    assert model_names(uri, version) == (listed, frozenset(accepted))


def test_another_alias_or_version_of_the_same_model_is_not_served():
    from lmforge.serve.app import model_names

    _, accepted = model_names("models:/lm@champion", "lm/3")
    assert not {"lm@candidate", "lm/2", "models:/lm@champion", "LM"} & accepted
