"""The spec's serve section becomes the deployment's Serve options (no Ray started)."""


import asyncio
import json
import time
import warnings

import httpx
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


# --- the app's middlewares, in the order the serving app stacks them (no Ray) ----------


def asgi_app(api_keys: tuple[str, ...] = (), body_timeout_s: float = 5.0,
             request_timeout_s: float | None = None, max_body_bytes: int = 1000,
             **serve: object):
    """A FastAPI app with the serving app's own middleware stack and settings (`configure`
    with a ServeConfig of these and `serve`), and routes that record what reached them."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    from lmforge.config import ServeConfig
    from lmforge.serve.app import api, configure

    app = FastAPI()
    app.user_middleware = list(api.user_middleware)
    configure(app.state, ServeConfig(body_timeout_s=body_timeout_s, max_body_bytes=max_body_bytes,
                                     request_timeout_s=request_timeout_s, **serve))
    app.state.api_keys = [k.encode() for k in api_keys]  # unvalidated: see the empty-key test
    app.state.reached, app.state.streams_ended = [], []
    app.state.hold = None  # an asyncio.Event that /v1/hold waits for

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await request.body()
        app.state.reached.append(body)
        return {"bytes": len(body)}

    @app.post("/v1/hold")
    async def hold() -> dict:  # a request decoding until the test releases it
        app.state.hold = app.state.hold or asyncio.Event()
        await app.state.hold.wait()
        return {"held": True}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/")
    async def playground() -> dict:
        return {"page": True}

    @app.get("/slow")
    async def slow() -> dict:
        await asyncio.sleep(30)
        return {}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def tokens():  # noqa: ANN202
            try:
                yield "data: 1\n\n"
                await asyncio.sleep(30)
                yield "data: 2\n\n"
            finally:
                app.state.streams_ended.append(True)

        return StreamingResponse(tokens(), media_type="text/event-stream")

    return app


def http(app, method: str, path: str, root_path: str = "", **kwargs) -> httpx.Response:  # noqa: ANN001
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://lmforge") as c:
            return await c.request(method, path, **kwargs)

    return asyncio.run(go())


async def trickle(first: bytes, pause_s: float = 30):  # noqa: ANN201
    """A request body that sends `first`, then nothing for `pause_s`: a slow client."""
    yield first
    await asyncio.sleep(pause_s)
    yield b'"}'


async def chunks(*sizes: int):  # noqa: ANN201
    """A body sent in chunks of `sizes` bytes, with no Content-Length."""
    for size in sizes:
        yield bytes(size)


@pytest.mark.parametrize("declared", [False, True])
def test_a_body_not_received_in_time_gets_408_and_never_reaches_the_handler(declared):
    app = asgi_app(body_timeout_s=0.2)
    headers = {"content-type": "application/json"}
    if declared:
        headers["content-length"] = "18"
    start = time.perf_counter()
    r = http(app, "POST", "/v1/completions", headers=headers,
             content=trickle(b'{"prompt": "the'))
    assert r.status_code == 408 and "0.2 s" in r.json()["error"]["message"]
    assert time.perf_counter() - start < 5 and app.state.reached == []


def test_a_whole_body_reaches_the_handler_and_an_oversized_one_does_not():
    app = asgi_app(max_body_bytes=100)
    assert http(app, "POST", "/v1/completions", content=b"x" * 100).json() == {"bytes": 100}
    assert http(app, "POST", "/v1/completions", content=chunks(30, 30, 30, 30)
                ).status_code == 413
    assert len(app.state.reached) == 1


def test_a_request_past_the_timeout_gets_408_or_is_cut_whatever_its_headers():
    app = asgi_app(request_timeout_s=0.2)
    start = time.perf_counter()
    # Serve's proxy lets a client lift its own timeout with this header; ours holds.
    r = http(app, "GET", "/slow", headers={"x-request-timeout-seconds": "0"})
    assert r.status_code == 408 and "0.2 s" in r.json()["error"]["message"]
    sent = asyncio.run(raw_get(app, "/stream"))  # httpx's transport wants whole answers
    assert sent[0] == {"type": "http.response.start", "status": 200}
    assert sent[1:] == [{"type": "http.response.body", "body": b"data: 1\n\n"}]  # cut
    assert app.state.streams_ended == [True] and time.perf_counter() - start < 5


async def raw_get(app, path: str) -> list[dict]:  # noqa: ANN001
    """The ASGI messages `app` sends for GET `path` (headers and more_body left out)."""
    sent, received = [], []

    async def receive() -> dict:
        received.append(True)
        if len(received) == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append({k: v for k, v in message.items() if k not in ("headers", "more_body")})

    await app({"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
               "http_version": "1.1", "method": "GET", "scheme": "http", "path": path,
               "raw_path": path.encode(), "root_path": "", "query_string": b"",
               "headers": [], "client": ("127.0.0.1", 1), "server": ("lmforge", 80)},
              receive, send)
    return sent


def test_slow_senders_do_not_take_the_slots_of_requests_whose_body_is_in():
    """max_ongoing_requests=1: three clients trickling their bodies hold no slot, a whole
    request runs at once beside them, and a fifth sender past max_receiving_requests=4 is
    refused at once with the backpressure status."""
    app = asgi_app(body_timeout_s=30, max_ongoing_requests=1, max_receiving_requests=4,
                   backpressure_status=429, retry_after_s=2)

    async def main() -> tuple[float, httpx.Response, dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lmforge") as c:
            slow = [asyncio.create_task(c.post("/v1/completions", content=trickle(b'{"p'))
                                        ) for _ in range(3)]
            while app.state.receiving < 3:
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            normal = await c.post("/v1/completions", content=b"x" * 10)
            took = time.perf_counter() - start
            assert normal.json() == {"bytes": 10}
            slow.append(asyncio.create_task(c.post("/v1/completions", content=trickle(b"{"))))
            while app.state.receiving < 4:
                await asyncio.sleep(0.01)
            refused = await c.post("/v1/completions", content=b"x")
            counts = {"receiving": app.state.receiving, "reached": len(app.state.reached)}
            for t in slow:
                t.cancel()
            return took, refused, counts

    took, refused, counts = asyncio.run(main())
    assert took < 2 and counts == {"receiving": 4, "reached": 1}
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
    assert "4 requests are sending their bodies" in refused.json()["error"]["message"]


def test_at_most_max_queued_requests_wait_for_a_slot_the_rest_are_refused_at_once():
    app = asgi_app(max_ongoing_requests=1, max_queued_requests=1)

    async def main() -> tuple[httpx.Response, httpx.Response, dict, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lmforge") as c:
            running = asyncio.create_task(c.post("/v1/hold"))
            while app.state.hold is None:  # it holds the one slot
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(c.post("/v1/completions", content=b"abc"))
            while app.state.waiting < 1:
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            refused = await c.post("/v1/completions", content=b"abc")
            took = time.perf_counter() - start
            health = await c.get("/healthz")  # a GET never waits for a slot
            app.state.hold.set()
            return refused, health, {"running": (await running).json(),
                                     "queued": (await queued).json()}, took

    refused, health, done, took = asyncio.run(main())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1" and took < 1
    assert "1 requests wait for one" in refused.json()["error"]["message"]
    assert health.status_code == 200
    assert done == {"running": {"held": True}, "queued": {"bytes": 3}}


def test_serve_routes_to_a_replica_its_slots_plus_the_requests_still_sending():
    config = deployment_config("serve.max_ongoing_requests=8",
                               "serve.max_receiving_requests=100")
    assert config.max_ongoing_requests == 108


@pytest.mark.parametrize(("root_path", "path", "open_"), [
    ("", "/v1/models", False), ("", "/docs", False), ("", "/openapi.json", False),
    ("", "/nothing-here", False), ("", "/healthz", True), ("", "/", True),
    ("/api", "/api/v1/models", False), ("/api", "/api/docs", False),
    ("/api", "/api/healthz", True), ("/api", "/api/", True), ("/api", "/api", True),
    ("/api", "/apix/healthz", False),
])
def test_every_route_but_the_probes_and_the_playground_needs_a_key(root_path, path, open_):
    app = asgi_app(api_keys=("k1", "k2"))
    anonymous = http(app, "GET", path, root_path=root_path)
    assert (anonymous.status_code != 401) == open_, anonymous.text
    keyed = http(app, "GET", path, root_path=root_path, headers={"authorization": "Bearer k2"})
    assert keyed.status_code != 401


@pytest.mark.parametrize("auth", ["Bearer ", "Bearer", "bearer  ", ""])
def test_an_empty_key_is_never_accepted(auth):
    app = asgi_app(api_keys=("",))  # config refuses this; the check does not rely on it
    r = http(app, "GET", "/v1/models", headers={"authorization": auth} if auth else {})
    assert r.status_code == 401


@pytest.mark.parametrize("keys", [[""], ["ok", " "], [" s3cret"], ["s3cret\n"]])
def test_config_refuses_an_api_key_no_request_could_present(keys):
    from lmforge.config import SpecError

    with pytest.raises(SpecError, match=r"serve\.api_keys: entry \d is") as info:
        load(None, [f"serve.api_keys={json.dumps(keys)}"])
    assert all(k not in str(info.value) for k in keys if k.strip())  # a secret: never shown


@pytest.mark.parametrize("value", ["", "a,,b", "a,b,", " , "])
def test_an_empty_key_in_the_environment_is_refused_naming_the_variable(monkeypatch, value):
    from lmforge.serve import with_secrets

    monkeypatch.setenv("LMFORGE_API_KEYS", value)
    with pytest.raises(ValueError, match=r"\$LMFORGE_API_KEYS: entry \d is empty"):
        with_secrets(load(None).serve)


def test_keys_from_the_environment_join_the_spec_s(monkeypatch):
    from lmforge.serve import with_secrets

    cfg = load(None, ["serve.api_keys=[spec-key]"]).serve
    monkeypatch.delenv("LMFORGE_API_KEYS", raising=False)
    assert with_secrets(cfg).api_keys == ["spec-key"]
    monkeypatch.setenv("LMFORGE_API_KEYS", " env-1 ,env-2")
    assert with_secrets(cfg).api_keys == ["spec-key", "env-1", "env-2"]
    assert cfg.api_keys == ["spec-key"]
