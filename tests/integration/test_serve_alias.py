"""`models:/NAME@champion` is pinned at start and followed: when the alias moves in a real
MLflow registry, the replica switches to the new version with no failed request; clients
name the model by its registered name throughout, and each response names the version
that answered."""

from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import httpx
import openai
from mlflow.tracking import MlflowClient
from ray import serve

from lmforge.config import ServeConfig
from lmforge.registry import LoadedModel
from lmforge.serve import build_app, deploy, pin_alias
from lmforge.serve.app import VERSION_HEADER

from ..ray_fixtures import tiny_model
from .helpers import free_port, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def versioned_model(uri: str) -> LoadedModel:
    """Stands in for load_model: `models:/NAME/V` -> a tiny model whose seed is V (the
    alias resolution under test is MLflow's; the weights' origin is not)."""
    import torch

    loaded = tiny_model(uri)
    torch.manual_seed(int(uri.rsplit("/", 1)[1]))
    for p in loaded.model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return loaded


def test_a_moved_alias_is_picked_up_without_a_failed_request(ray_cluster, tmp_path: Path):
    """The official `openai` client names the model as a user would (the registered name,
    or the alias) and keeps working across a promotion, with no retries and no change:
    each response reports the version that answered."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    client.create_registered_model("tiny-lm")
    for _ in range(2):
        client.create_model_version("tiny-lm", source=str(tmp_path))
    client.set_registered_model_alias("tiny-lm", "champion", "1")

    cfg = ServeConfig(port=free_port(), cpus_per_replica=0.5, max_tokens_limit=32,
                      alias_poll_s=0.5)
    app = build_app(versioned_model, cfg, "models:/tiny-lm@champion",
                    functools.partial(pin_alias, tracking_uri=tracking))
    url = deploy(app, cfg, name="test-serve-alias")
    try:
        http = httpx.Client(base_url=url, timeout=30)

        def serving() -> str:
            r = http.get("/v1/models")
            assert [m["id"] for m in r.json()["data"]] == ["tiny-lm"]  # stable
            return r.headers[VERSION_HEADER]

        assert serving() == "tiny-lm/1"
        body = {"prompt": "the ", "max_tokens": 8, "temperature": 0}
        v1_text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]

        answers: list[tuple[str, str]] = []  # (body's model, header's version)
        failures: list[BaseException] = []
        stop = threading.Event()

        def load(model: str) -> None:  # steady traffic across the switch, no retries
            oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                timeout=30)
            while not stop.is_set():
                try:
                    raw = oai.completions.with_raw_response.create(model=model, **body)
                    answers.append((raw.parse().model, raw.headers[VERSION_HEADER]))
                except Exception as e:
                    failures.append(e)

        threads = [threading.Thread(target=load, args=(m,))
                   for m in ("tiny-lm", "tiny-lm", "tiny-lm@champion")]
        for t in threads:
            t.start()
        try:
            # Traffic flowing before the promotion: every client has been answered.
            wait_until(lambda: len(answers) >= len(threads), "traffic flowing", timeout_s=60)
            client.set_registered_model_alias("tiny-lm", "champion", "2")
            deadline = time.monotonic() + 30
            wait_until(lambda: serving() == "tiny-lm/2", "alias move picked up",
                       timeout_s=30, interval_s=0.2)
            # Then some traffic at the new version (what is left of the 30 s, if any).
            wait_until(lambda: [v for _, v in answers].count("tiny-lm/2") >= 5
                       or time.monotonic() > deadline, "requests at the new version",
                       timeout_s=30)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert answers and not failures, failures[:3]  # zero failed requests
        assert all(model == version for model, version in answers)
        versions = [v for _, v in answers]
        assert "tiny-lm/1" in versions and versions[-1] == "tiny-lm/2"
        v2 = http.post("/v1/completions", json={**body, "model": "tiny-lm/2"})
        assert v2.json()["model"] == "tiny-lm/2" and v2.json()["choices"][0]["text"] != v1_text
        gone = http.post("/v1/completions", json={**body, "model": "tiny-lm/1"})
        assert gone.status_code == 404 and "'tiny-lm'" in gone.json()["error"]["message"]
    finally:
        serve.shutdown()
