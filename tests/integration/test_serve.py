"""The Serve endpoint answers real HTTP requests, good and bad, over an injected tiny model."""

from __future__ import annotations

import sys

import cloudpickle
import datasets
import httpx
import openai
import pytest
from ray import serve

from lmforge.config import ModelConfig, ServeConfig, TokenizerConfig
from lmforge.data import build_tokenizer
from lmforge.model import build_model
from lmforge.registry import LoadedModel
from lmforge.serve import build_app, deploy

from .conftest import free_port

API_KEY = "test-key-123"

# The loader below lives in this test module, which replicas cannot import: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny_model(uri: str) -> LoadedModel:
    import torch

    corpus = datasets.Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog"]})
    tokenizer = build_tokenizer(TokenizerConfig(kind="char"), corpus)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64),
                        len(tokenizer), tokenizer.eos_token_id)
    return LoadedModel(model.eval(), tokenizer, name=uri)


@pytest.fixture(scope="module")
def endpoint(ray_cluster):
    cfg = ServeConfig(port=free_port(), max_batch_size=4, max_tokens_limit=32,
                      cpus_per_replica=0.5, api_keys=[API_KEY, "second-key"])
    url = deploy(build_app(tiny_model, cfg, "tiny"), cfg, name="test-serve")
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client
    serve.shutdown()


def test_completion_has_openai_shape(endpoint: httpx.Client):
    r = endpoint.post("/v1/completions", json={"prompt": "the ", "max_tokens": 5,
                                               "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] == 4 and usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    again = endpoint.post("/v1/completions", json={"prompt": "the ", "max_tokens": 5,
                                                   "temperature": 0})
    assert again.json()["choices"][0]["text"] == choice["text"]  # greedy is deterministic


def test_health_and_models(endpoint: httpx.Client):
    assert endpoint.get("/healthz").json()["status"] == "ok"
    assert endpoint.get("/readyz").json()["status"] == "ready"
    assert endpoint.get("/v1/models").json()["data"][0]["id"] == "tiny"


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "the", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "the", "max_tokens": 33}, "max_tokens"),
    ({"prompt": "the", "temperature": 5}, "temperature"),
    ({"prompt": "the", "top_p": 0}, "top_p"),
    ({"prompt": "the", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "the" * 30, "max_tokens": 10}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "the", "best_of": 3}, "best_of"),
])
def test_bad_requests_get_422_naming_the_field(endpoint: httpx.Client, body, param):
    r = endpoint.post("/v1/completions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_json_gets_400(endpoint: httpx.Client):
    r = endpoint.post("/v1/completions", content=b'{"prompt": ',
                      headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {API_KEY}"])
def test_v1_routes_need_a_valid_api_key(endpoint: httpx.Client, auth):
    headers = {"Authorization": auth} if auth else {}
    with httpx.Client(base_url=str(endpoint.base_url), timeout=60, headers=headers) as anon:
        for r in (anon.post("/v1/completions", json={"prompt": "the", "max_tokens": -1}),
                  anon.get("/v1/models")):
            # 401 before validation: a bad body from a stranger learns nothing about the API.
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert anon.get("/healthz").status_code == 200  # health stays open


def test_any_configured_key_is_accepted(endpoint: httpx.Client):
    r = endpoint.get("/v1/models", headers={"Authorization": "Bearer second-key"})
    assert r.status_code == 200


def test_official_openai_client_works_unchanged(endpoint: httpx.Client):
    client = openai.OpenAI(base_url=str(endpoint.base_url.join("/v1")), api_key=API_KEY)
    completion = client.completions.create(model="tiny", prompt="the ", max_tokens=4,
                                           temperature=0, seed=1)
    assert completion.model == "tiny"
    assert completion.usage.completion_tokens <= 4
    assert isinstance(completion.choices[0].text, str)
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt="the ", max_tokens=-1)
