"""The Serve endpoint answers real HTTP requests, good and bad, over an injected tiny model."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from ray import serve

from lmforge.config import ServeConfig
from lmforge.serve import build_app, deploy

from ..ray_fixtures import tiny_model
from .helpers import free_port

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def endpoint(ray_cluster):
    cfg = ServeConfig(port=free_port(), max_batch_size=4, max_tokens_limit=32,
                      cpus_per_replica=0.5, api_keys=[API_KEY, "second-key"],
                      max_body_bytes=100_000)
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
    models = endpoint.get("/v1/models")
    assert models.json()["data"][0]["id"] == "tiny"
    assert models.headers["x-lmforge-model-version"] == "tiny"
    r = endpoint.post("/v1/completions", json={"prompt": "the ", "max_tokens": 2})
    assert r.headers["x-lmforge-model-version"] == r.json()["model"] == "tiny"


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "the", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "the", "max_tokens": 33}, "max_tokens"),
    ({"prompt": "the", "temperature": 5}, "temperature"),
    ({"prompt": "the", "top_p": 0}, "top_p"),
    ({"prompt": "the", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "the" * 30, "max_tokens": 10}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "the", "best_of": 3}, "best_of"),
    ({"prompt": "the", "seed": 2**64 - 1}, "seed"),  # seed + i would pass torch's range
    ({"prompt": "the", "top_k": 10**7}, "top_k"),
    ({"prompt": "the", "stop": "x" * 300}, "stop"),
])
def test_bad_requests_get_422_naming_the_field(endpoint: httpx.Client, body, param):
    r = endpoint.post("/v1/completions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/completions", b'{"prompt": "the \\ud800"}', "prompt"),
    ("/v1/completions", b'{"prompt": "the", "stop": ["\\udc00"]}', "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages.0.content"),
])
def test_text_that_is_not_valid_unicode_gets_422_naming_the_field(endpoint: httpx.Client,
                                                                   route, body, param):
    r = endpoint.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_json_gets_400(endpoint: httpx.Client):
    r = endpoint.post("/v1/completions", content=b'{"prompt": ',
                      headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {API_KEY}"])
def test_routes_need_a_valid_api_key(endpoint: httpx.Client, auth):
    headers = {"Authorization": auth} if auth else {}
    with httpx.Client(base_url=str(endpoint.base_url), timeout=60, headers=headers) as anon:
        for r in (anon.post("/v1/completions", json={"prompt": "the", "max_tokens": -1}),
                  anon.get("/v1/models")):
            # 401 before validation: a bad body from a stranger learns nothing about the API.
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"
        for path in ("/docs", "/openapi.json"):  # not only /v1
            assert anon.get(path).status_code == 401
        for path in ("/healthz", "/readyz", "/"):  # the probes and the playground stay open
            assert anon.get(path).status_code == 200


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


# --- chat, streaming, sampling ----------------------------------------------------------


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded, [DONE] kept."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line  # nothing but data lines and blank separators
    return events


def complete(endpoint: httpx.Client, **body) -> dict:
    r = endpoint.post("/v1/completions", json={"prompt": "the ", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_completion_has_openai_shape(endpoint: httpx.Client):
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "the quick"}],
            "max_tokens": 6, "temperature": 1.0, "seed": 5}  # a seed that does not end at once
    r = endpoint.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    usage = out["usage"]
    assert 0 < usage["completion_tokens"] <= 6
    assert usage["prompt_tokens"] > len("the quick")  # the chat template was applied


def test_streamed_completion_equals_the_unstreamed_one(endpoint: httpx.Client):
    whole = complete(endpoint, max_tokens=12)
    body = {"prompt": "the ", "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with endpoint.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len(chunks) > 1  # token by token, not one blob
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_streamed_chat_opens_with_the_role_and_ends_with_done(endpoint: httpx.Client):
    body = {"messages": [{"role": "user", "content": "the lazy"}], "max_tokens": 8,
            "temperature": 1.0, "seed": 5}  # a seed whose first token is not end-of-text
    whole = endpoint.post("/v1/chat/completions", json=body).json()
    with endpoint.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"] != ""
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


def test_stop_sequences_cut_the_text_streamed_or_not(endpoint: httpx.Client):
    full = complete(endpoint, max_tokens=24)["choices"][0]["text"]
    stop = full[5:7]
    cut = complete(endpoint, max_tokens=24, stop=[stop, "zzz"])["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    body = {"prompt": "the ", "max_tokens": 24, "temperature": 0, "stop": stop,
            "stream": True}
    with endpoint.stream("POST", "/v1/completions", json=body) as r:
        chunks = sse_events(r)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]  # never sent


def test_n_seed_and_top_k(endpoint: httpx.Client):
    body = {"max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 3}
    first, again = complete(endpoint, **body), complete(endpoint, **body)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]  # seeded: reproducible
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert first["usage"]["completion_tokens"] == sum(len(t) for t in texts)  # char model
    greedy = complete(endpoint, max_tokens=10)["choices"][0]["text"]
    for seed in range(3):  # top_k=1 leaves only the most likely token
        sampled = complete(endpoint, max_tokens=10, temperature=1.0, top_k=1, seed=seed)
        assert sampled["choices"][0]["text"] == greedy


def test_greedy_output_alone_equals_output_in_a_batch(endpoint: httpx.Client):
    prompts = ["the ", "quick brown ", "a", "over the lazy dog ", "fox", "jumps ", "lazy",
               "the quick brown fox "]
    alone = [complete(endpoint, prompt=p, max_tokens=4 + i)["choices"][0]["text"]
             for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(len(prompts)) as pool:  # arrive together: batched
        together = list(pool.map(lambda ip: complete(endpoint, prompt=ip[1], max_tokens=4 + ip[0]),
                                 enumerate(prompts)))
    assert [t["choices"][0]["text"] for t in together] == alone


def test_official_openai_client_chat_and_streaming(endpoint: httpx.Client):
    client = openai.OpenAI(base_url=str(endpoint.base_url.join("/v1")), api_key=API_KEY)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the"}], max_tokens=5,
        temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the"}], max_tokens=5,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    pieces = list(client.completions.create(model="tiny", prompt="the ", max_tokens=6,
                                            temperature=0, stream=True))
    whole = client.completions.create(model="tiny", prompt="the ", max_tokens=6, temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text


# --- validation: 4xx in OpenAI's error shape, never a 500 -------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "the " * 20}], "max_tokens": 10}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99},
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": -1}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"x": 1}},
     "stream_options.x"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {}}, "logit_bias"),
])
def test_bad_chat_requests_get_422_naming_the_field(endpoint: httpx.Client, body, param):
    r = endpoint.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_404_and_a_json_array_is_422(endpoint: httpx.Client):
    r = endpoint.post("/v1/completions", json={"prompt": "the", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert endpoint.post("/v1/completions", json=["the"]).status_code == 422


def test_oversized_body_gets_413_declared_or_chunked(endpoint: httpx.Client):
    # 150 kB: over the spec's max_body_bytes (100 kB), under the 1 MB default.
    big = json.dumps({"prompt": "the " * 37_500}).encode()
    r = endpoint.post("/v1/completions", content=big,
                      headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "larger than 100000 bytes" in r.json()["error"]["message"]
    chunked = endpoint.post("/v1/completions", content=iter([big[:70_000], big[70_000:]]),
                            headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text


# --- the playground page, in a real headless browser -----------------------------------

CHROMIUM = "/usr/bin/chromium"


def test_playground_streams_text_into_the_page(endpoint: httpx.Client, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("LMFORGE_REQUIRE_CHROMIUM"):  # set by .ci/run, which installs it
            pytest.fail(f"{CHROMIUM} missing but LMFORGE_REQUIRE_CHROMIUM is set")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium; CI's .ci/run does)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(str(endpoint.base_url))
            page.fill("#api_key", API_KEY)
            page.dispatch_event("#api_key", "change")
            expect(page.locator("#model")).to_have_text("model: tiny", timeout=30_000)
            page.fill("#prompt", "the ")
            page.fill("#max_tokens", "12")
            page.fill("#temperature", "0")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("done", timeout=30_000)
            shown = page.inner_text("#output")
        finally:
            browser.close()
    expected = complete(endpoint, max_tokens=12)["choices"][0]["text"]
    assert shown == "the " + expected and expected  # the prompt, then the streamed text
