"""The Ray Serve application: an OpenAI-compatible endpoint over a causal LM.

`build_app(loader, cfg, model_uri)` binds the deployment to a loader function, so tests can
inject a tiny model and production passes `functools.partial(load_model, tracking_uri=...)`.
Nothing here starts Ray or Serve at import. No `from __future__ import annotations`:
FastAPI reads the handler annotations at runtime to find the request body.

Ray Serve does the serving work: `@serve.batch` gathers requests that arrive together and
hands them to the replica's decode loop (`serve/engine.py`, continuous batching), which
admits them into the running batch at the next token; `max_queued_requests` with a
`BackpressureConfig` refuse overload at once (503, or 429 with Retry-After), the proxy's
`request_timeout_s` answers 408, and the autoscaler adds and removes replicas.

One thing Serve cannot do: a request takes a replica slot the moment it is routed, before
its body arrives (the replica pulls the body from the proxy), so slow senders would hold
every slot. Admission is therefore the replica's own (`configure`): Serve may route
`max_ongoing_requests + max_receiving_requests` requests to a replica, `_ReadBody` holds
at most `max_receiving_requests` of them while their bodies arrive, and `_Admit` lets a
request whose body is in take one of `max_ongoing_requests` slots, with at most
`max_queued_requests` waiting for one; beyond either bound the answer is the
backpressure status at once.
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.metrics import Counter, Histogram
from starlette.datastructures import State

from lmforge.config import ServeConfig
from lmforge.registry import LoadedModel
from lmforge.serve.engine import Engine, Stream, run
from lmforge.serve.follow import AliasFollower
from lmforge.serve.generate import Delta, GenerationParams
from lmforge.serve.playground import PLAYGROUND_HTML
from lmforge.serve.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    CompletionRequest,
    CompletionResponse,
    SamplingRequest,
    Usage,
    error_body,
)

log = logging.getLogger("ray.serve")

api = FastAPI(title="lmforge", docs_url="/docs")
# What the middlewares read (through the scope); each replica's __init__ sets them.
api.state.api_keys = []
api.state.max_body_bytes = 1_000_000
api.state.body_timeout_s = 30.0
api.state.request_timeout_s = None
api.state.max_receiving_requests = 128
api.state.receiving = 0
api.state.slots = None  # asyncio.Semaphore(max_ongoing_requests) once configured
api.state.max_waiting = None
api.state.waiting = 0
api.state.busy_status, api.state.retry_after_s = 503, None


def configure(state: State, cfg: ServeConfig) -> None:
    """Set what the middlewares read from the app's state: keys, body and time limits,
    and the replica's admission bounds (see the module doc)."""
    state.api_keys = [k.encode() for k in cfg.api_keys if k]
    state.max_body_bytes = cfg.max_body_bytes
    state.body_timeout_s = cfg.body_timeout_s
    state.request_timeout_s = cfg.request_timeout_s
    state.max_receiving_requests, state.receiving = cfg.max_receiving_requests, 0
    # Created outside the replica's event loop, bound to it at first use (Python >= 3.10).
    state.slots = asyncio.Semaphore(cfg.max_ongoing_requests)
    state.max_waiting = None if cfg.max_queued_requests < 0 else cfg.max_queued_requests
    state.waiting = 0
    state.busy_status, state.retry_after_s = cfg.backpressure_status, cfg.retry_after_s

# The simple chat template for base models (a tokenizer's own template wins when it has
# one), and the stop that keeps the model from writing the user's next turn.
_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}
_CHAT_STOP = "\nUser:"

_RAY_METRICS_INTERVAL_S = 10.0  # AutoscalingConfig.metrics_interval_s's default


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the field (400 for a body that is not JSON), in OpenAI's error shape."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return JSONResponse(error_body(f"request body is not valid JSON: {err['msg']}", None),
                            status_code=400)
    loc = [str(p) for p in err["loc"] if p != "body"]
    param = ".".join(loc) or None
    msg = ("unknown field" if err["type"] == "extra_forbidden"
           else err["msg"].removeprefix("Value error, "))
    return JSONResponse(error_body(f"{param}: {msg}" if param else msg, param), status_code=422)


def _state(scope) -> State:  # noqa: ANN001
    """The serving app's state, which the replica's __init__ configured. Serve runs a
    copy of `api` made by cloudpickle, and middleware classes travel by value with it, so
    inside them the module global `api` may be another copy: always go through the scope."""
    return scope["app"].state


class _Deadline:
    """Ends a request still running `serve.request_timeout_s` after it reached this
    replica: a 408 when nothing was sent yet, else the response is cut short (its rows
    leave the batch). Serve's proxy enforces the same limit, queueing included, but any
    client can lift that one with Serve's `x-request-timeout-seconds: 0` header; this
    one holds whatever the client sends. Added first, so it runs last, around the app."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        limit: float | None = _state(scope).request_timeout_s if scope["type"] == "http" \
            else None
        if limit is None:
            return await self.app(scope, receive, send)
        started = False

        async def watched(message) -> None:  # noqa: ANN001
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await self.app(scope, receive, watched)
        except TimeoutError:
            if not deadline.expired():
                raise  # the app's own
        if not started:
            await _error(408, f"request not answered within {limit:g} s")(scope, receive, send)


class _Admit:
    """A generation request (POST) runs only while it holds one of the replica's
    `max_ongoing_requests` slots; its body is already in (`_ReadBody` runs first). At most
    `max_queued_requests` wait for a slot, the others are refused at once. Added before
    `_Deadline`, so it runs inside it: waiting for a slot counts toward the request's
    timeout."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        state = _state(scope)
        slots: asyncio.Semaphore | None = state.slots if scope["type"] == "http" else None
        if slots is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if slots.locked() and state.max_waiting is not None \
                and state.waiting >= state.max_waiting:
            return await _busy(state, f"every slot is taken and {state.waiting} requests "
                                      "wait for one")(scope, receive, send)
        state.waiting += 1
        try:
            await slots.acquire()
        finally:
            state.waiting -= 1
        try:
            return await self.app(scope, receive, send)
        finally:
            slots.release()


api.add_middleware(_Admit)
api.add_middleware(_Deadline)


class _ReadBody:
    """Reads the whole request body before the app sees any of it, so a request reaches
    its handler, and the decode loop, only once its body is in: a slow sender holds no
    decode row, and holds its replica slot at most `serve.body_timeout_s` (then 408). A
    body over `serve.max_body_bytes` gets 413: a declared Content-Length unread, a
    chunked one as soon as it passes the limit. A pure ASGI middleware."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = _state(scope)
        limit: int = state.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(limit)(scope, receive, send)
        if state.receiving >= state.max_receiving_requests:
            return await _busy(state, f"{state.receiving} requests are sending their "
                                      "bodies to this replica")(scope, receive, send)
        messages, size = [], 0
        state.receiving += 1
        try:
            async with asyncio.timeout(state.body_timeout_s):
                while size <= limit:
                    message = await receive()
                    messages.append(message)
                    size += len(message.get("body", b""))
                    if message["type"] != "http.request" or not message.get("more_body"):
                        break
        except TimeoutError:
            return await _error(408, f"request body not received within "
                                     f"{state.body_timeout_s:g} s")(scope, receive, send)
        finally:
            state.receiving -= 1
        if messages[-1]["type"] == "http.disconnect":
            return None  # the client left before its body was in: nothing to answer
        if size > limit:
            return await _too_large(limit)(scope, receive, send)

        async def replay():  # noqa: ANN202
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(message, None), status_code=status)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body is larger than {limit} bytes")


def _busy(state: State, why: str) -> JSONResponse:
    """The replica's refusal, as Serve's own backpressure answers: its status, Retry-After."""
    response = _error(state.busy_status, f"replica is full: {why}; retry later")
    if state.retry_after_s is not None:
        response.headers["Retry-After"] = f"{state.retry_after_s:g}"
    return response


api.add_middleware(_ReadBody)

# What anyone may fetch without a key: the probes and the playground page (which asks for
# the key itself). Paths below the app's root, whatever its route_prefix.
OPEN_ROUTES = frozenset({"", "/", "/healthz", "/readyz"})


def route_path(scope) -> str:  # noqa: ANN001
    """The path the app's routes match: the request's path below its root_path (Serve's
    route_prefix, and any root_path of a proxy in front), by Starlette's own rule."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (path == root or path[len(root)] == "/"):
        return path[len(root):]
    return path


class _RequireApiKey:
    """With API keys configured, every route but OPEN_ROUTES needs `Authorization: Bearer
    KEY`. Added last (so it runs first): an unauthenticated request is refused before its
    body is read. A pure ASGI middleware, like _ReadBody: Starlette's
    `@app.middleware("http")` runs every response through an extra task and stream."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        keys: list[bytes] = _state(scope).api_keys if scope["type"] == "http" else []
        if keys and route_path(scope) not in OPEN_ROUTES:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, key = auth.partition(b" ")
            # Compare against every key in constant time, so timing leaks nothing.
            matches = [hmac.compare_digest(key, k) for k in keys]
            if scheme.lower() != b"bearer" or not key or not any(matches):
                return await _unauthorized()(scope, receive, send)
        return await self.app(scope, receive, send)


api.add_middleware(_RequireApiKey)


def _unauthorized() -> JSONResponse:
    body = error_body("missing or invalid API key: send Authorization: Bearer KEY", None)
    body["error"]["code"] = "invalid_api_key"
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _reject(message: str, param: str | None) -> JSONResponse:
    return JSONResponse(error_body(message, param), status_code=422)


VERSION_HEADER = "x-lmforge-model-version"
"""Response header naming the version that answered (as the body's `model` does)."""


def model_names(model_uri: str, version: str) -> tuple[str, frozenset[str]]:
    """The id `/v1/models` lists for an endpoint serving `model_uri` (now answering with
    `version`, a LoadedModel's name), and every `model` a request may name.

    A registered model is listed by its name, which no promotion changes, and answers to
    `NAME`, `NAME@ALIAS` (the alias it follows) and `NAME/VERSION` (the version serving
    now); anything else (a directory, a run) by its one name."""
    if not model_uri.startswith("models:/"):
        return version, frozenset({version})
    ref = model_uri.removeprefix("models:/")
    name = ref.split("@", 1)[0] if "@" in ref else ref.rsplit("/", 1)[0]
    return name, frozenset({name, version, ref})


def pin_alias(uri: str, tracking_uri: str | None) -> str:
    """`models:/NAME@ALIAS` -> `models:/NAME/VERSION` the alias points at now; any other
    URI unchanged. Loading the pinned URI cannot race a promotion."""
    if not (uri.startswith("models:/") and "@" in uri):
        return uri
    from mlflow.tracking import MlflowClient

    name, alias = uri.removeprefix("models:/").split("@", 1)
    version = MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}"


@serve.deployment(name="TextGenerator")
@serve.ingress(api)
class TextGenerator:
    def __init__(self, loader: Callable[[str], LoadedModel], cfg: ServeConfig, model_uri: str,
                 resolve: Callable[[str], str] | None = None) -> None:
        torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        self._loader, self._resolve = loader, resolve or (lambda uri: uri)
        self._model_uri = model_uri
        self.max_tokens_limit = cfg.max_tokens_limit
        # `api` here is the app Serve runs; the middlewares read its state through the scope.
        configure(api.state, cfg)
        self._admit.set_max_batch_size(cfg.max_batch_size)
        self._admit.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._engine = Engine(max_rows=cfg.max_batch_size)
        self._stall_s = cfg.stall_timeout_s
        pinned = self._resolve(model_uri)
        self.loaded = self._load(pinned)
        tags = ("model_version",)
        self._requests = Counter("lmforge_requests_total", "Completions answered.",
                                 tag_keys=(*tags, "route", "stream"))
        self._tokens = Counter("lmforge_generated_tokens_total", "Tokens generated.",
                               tag_keys=tags)
        self._ttft = Histogram("lmforge_time_to_first_token_s",
                               "Seconds from request to its first generated token.",
                               boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                               tag_keys=tags)
        self._rate = Histogram("lmforge_tokens_per_s", "Tokens per second of one request.",
                               boundaries=[1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500],
                               tag_keys=tags)
        self._stop = threading.Event()
        if model_uri != pinned and cfg.alias_poll_s > 0:
            # A thread, not a task: loading is blocking work, and the event loop keeps
            # serving the old version until the new one is ready, then the swap is one
            # attribute assignment (requests already running finish on the old one).
            follower = AliasFollower(model_uri, pinned, self._resolve, self._load,
                                     self._swap, cfg.alias_poll_s)
            threading.Thread(target=follower.run, args=(self._stop,), daemon=True,
                             name="lmforge-alias-follow").start()

    def _load(self, pinned: str) -> LoadedModel:
        loaded = self._loader(pinned)
        if ray.get_gpu_ids():  # Ray gave this replica a GPU (serve.gpus_per_replica)
            loaded.model.to("cuda")
        if pinned.startswith("models:/") and "@" not in pinned:
            loaded = dataclasses.replace(loaded, name=pinned.removeprefix("models:/"))
        return loaded

    def _swap(self, loaded: LoadedModel, _pinned: str) -> None:
        self.loaded = loaded

    async def check_health(self) -> None:
        """Serve calls this every `serve.health_check_period_s`; raising (or not answering
        within `serve.health_check_timeout_s`, as when this event loop is stuck) marks the
        replica unhealthy, and after 3 failures Serve replaces it."""
        if (why := self._engine.health(self._stall_s)) is not None:
            raise RuntimeError(f"replica unhealthy: {why}")

    def engine_stats(self) -> dict[str, int]:
        """The decode loop's counters (`EngineStats`) and this replica's admission now:
        requests sending their bodies, waiting for a slot. Called through a handle
        (`serve.get_app_handle(app).engine_stats.remote()`), not over HTTP."""
        state = api.state
        return self._engine.stats_dict() | {"receiving": state.receiving,
                                            "waiting_for_slot": state.waiting}

    def __del__(self) -> None:
        self._stop.set()
        self._engine.close()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _admit(self, streams: list[Stream]) -> list[Stream]:
        """Requests Serve gathered together join the decode loop as one group (prefilled
        together, between two decode steps)."""
        self._engine.submit(streams)
        return streams

    async def _run(self, stream: Stream, start: float) -> AsyncIterator[Delta]:
        """One sequence's deltas; returns as soon as it finishes, whatever the batch does."""
        n_tokens = 0
        # A client gone or timed out, even while its request is being admitted: its row
        # is never taken, or leaves the batch at the next step (`aclosing`: at once, not
        # whenever the generator is collected).
        async with aclosing(run(stream, self._admit)) as deltas:
            async for delta in deltas:
                n_tokens += len(delta.token_ids)
                yield delta
        if n_tokens:
            tags = {"model_version": stream.loaded.name}
            self._ttft.observe(stream.first_token_at - start, tags=tags)
            self._tokens.inc(n_tokens, tags=tags)
            self._rate.observe(n_tokens / max(time.perf_counter() - start, 1e-6), tags=tags)

    # --- routes ----------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(PLAYGROUND_HTML)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.loaded.name}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        # Serve routes to a replica only after __init__ (the model load) returned.
        return {"status": "ready", "model": self.loaded.name}

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        version = self.loaded.name
        model_id, _ = model_names(self._model_uri, version)
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "lmforge"}]},
            headers={VERSION_HEADER: version})

    @api.post("/v1/completions", response_model=None)
    async def completions(self, req: CompletionRequest) -> JSONResponse | StreamingResponse:
        loaded = self.loaded
        prompt_ids = loaded.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
        return await self._complete(req, loaded, prompt_ids, "prompt", req.max_tokens or 16,
                                    req.stop or [], chat=False)

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, req: ChatCompletionRequest
                               ) -> JSONResponse | StreamingResponse:
        loaded = self.loaded
        tok = loaded.tokenizer
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        stop = list(req.stop or [])
        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        else:
            prompt = "".join(f"{_ROLE[m['role']]}: {m['content']}\n" for m in messages)
            prompt += "Assistant:"
            if _CHAT_STOP not in stop:
                stop.append(_CHAT_STOP)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        max_tokens = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if max_tokens is None:  # OpenAI's chat default: as much as the context allows
            room = loaded.model.config.max_position_embeddings - len(prompt_ids)
            max_tokens = max(1, min(self.max_tokens_limit, room))
        return await self._complete(req, loaded, prompt_ids, "messages", max_tokens, stop,
                                    chat=True, max_tokens_param=param)

    async def _complete(self, req: SamplingRequest, loaded: LoadedModel, prompt_ids: list[int],
                        prompt_param: str, max_tokens: int, stop: list[str], chat: bool,
                        max_tokens_param: str = "max_tokens"):  # noqa: ANN202
        # Validation before any generation work, each error naming its field.
        if not prompt_ids:  # a tokenizer may drop everything a text holds
            return _reject(f"{prompt_param}: the text encodes to no tokens", prompt_param)
        if max_tokens > self.max_tokens_limit:
            return _reject(f"{max_tokens_param}: at most {self.max_tokens_limit}",
                           max_tokens_param)
        context = loaded.model.config.max_position_embeddings
        if len(prompt_ids) + max_tokens > context:
            return _reject(
                f"{prompt_param}: {len(prompt_ids)} prompt tokens + {max_tokens_param} "
                f"{max_tokens} exceed the model's context of {context} tokens", prompt_param)
        model_id, accepted = model_names(self._model_uri, loaded.name)
        if req.model is not None and req.model not in accepted:
            return JSONResponse(error_body(
                f"model: {req.model!r} is not served here; this endpoint serves "
                f"{model_id!r}", "model"), status_code=404)
        start = time.perf_counter()
        # n > 1: independent samples, each with its own seed (seed + i) so that a seeded
        # request stays reproducible; they batch together with everything else.
        streams = [Stream(loaded, GenerationParams(
            prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=req.temperature,
            top_p=req.top_p, top_k=req.top_k, stop=tuple(stop),
            seed=None if req.seed is None else req.seed + i), live=req.stream)
            for i in range(req.n)]
        route = "chat" if chat else "completions"
        self._requests.inc(tags={"model_version": loaded.name, "route": route,
                                 "stream": str(req.stream).lower()})
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._sse(streams, start, loaded.name, chat, usage, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", VERSION_HEADER: loaded.name})
        texts, reasons = [""] * len(streams), ["length"] * len(streams)

        async def collect(i: int) -> None:
            async for d in self._run(streams[i], start):
                texts[i] += d.text
                usage["completion_tokens"] += len(d.token_ids)
                reasons[i] = d.finish_reason or reasons[i]

        tasks = [asyncio.ensure_future(collect(i)) for i in range(len(streams))]
        try:
            await asyncio.gather(*tasks)
        finally:  # one choice failed (a 500): the others' rows leave the batch too
            for t in tasks:
                t.cancel()
        u = Usage(**usage, total_tokens=usage["prompt_tokens"] + usage["completion_tokens"])
        body: ChatCompletionResponse | CompletionResponse
        if chat:
            body = ChatCompletionResponse(model=loaded.name, usage=u, choices=[
                ChatChoice(index=i, message=ChatChoiceMessage(content=t), finish_reason=r)
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))])
        else:
            body = CompletionResponse(model=loaded.name, usage=u, choices=[
                Choice(index=i, text=t, finish_reason=r)
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))])
        return JSONResponse(body.model_dump(mode="json"),
                            headers={VERSION_HEADER: loaded.name})

    async def _sse(self, streams: list[Stream], start: float, model: str, chat: bool,
                   usage: dict[str, int], include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model}

        def chunk(choices: list[dict], **extra) -> str:  # noqa: ANN003
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        def choice(i: int, text: str | None, finish: str | None) -> dict:
            if not chat:
                return {"index": i, "text": text or "", "logprobs": None,
                        "finish_reason": finish}
            delta = {"content": text} if text else {}
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

        if chat:  # OpenAI opens every chat choice with the role
            for i in range(len(streams)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for d in self._run(streams[i], start):
                    await queue.put((i, d))
            except Exception as e:  # surfaced in the stream: the 200 is already sent
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
        try:
            running = len(streams)
            while running:
                i, d = await queue.get()
                if d is None:
                    running -= 1
                elif isinstance(d, Exception):
                    log.exception("generation failed", exc_info=d)
                    yield f"data: {json.dumps(error_body(str(d), None, 'server_error'))}\n\n"
                elif d.text or d.finish_reason:
                    usage["completion_tokens"] += len(d.token_ids)
                    yield chunk([choice(i, d.text, d.finish_reason)])
                else:
                    usage["completion_tokens"] += len(d.token_ids)
            if include_usage:
                total = usage["prompt_tokens"] + usage["completion_tokens"]
                yield chunk([], usage={**usage, "total_tokens": total})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()


def build_app(loader: Callable[[str], LoadedModel], cfg: ServeConfig, model_uri: str,
              resolve: Callable[[str], str] | None = None) -> Application:
    """The deployment serving `loader(resolve(model_uri))`, with cfg's Serve options.

    `resolve` pins an alias to a version (`pin_alias`); with it, replicas follow the alias
    every `cfg.alias_poll_s` seconds."""
    options: dict = {
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica,
                              "num_gpus": cfg.gpus_per_replica},
        # Serve's count includes requests whose bodies are still arriving: the replica
        # admits among them itself (`configure`).
        "max_ongoing_requests": cfg.max_ongoing_requests + cfg.max_receiving_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "backpressure_config": BackpressureConfig(status_code=cfg.backpressure_status,
                                                  retry_after_s=cfg.retry_after_s),
    }
    if cfg.min_replicas == cfg.max_replicas:
        options["num_replicas"] = cfg.min_replicas
    else:
        options["autoscaling_config"] = autoscaling = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
            "look_back_period_s": cfg.look_back_period_s,
        }
        # Handles report their load every `metrics_interval_s` (Ray's default: 10 s). A
        # window shorter than two reports would average stale numbers, so report faster
        # there. Ray 2.60 calls the field deprecated in favour of environment variables it
        # does not read yet; it is still the only setting that changes the interval.
        if cfg.look_back_period_s < 2 * _RAY_METRICS_INTERVAL_S:
            autoscaling["metrics_interval_s"] = cfg.look_back_period_s / 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `metrics_interval_s` field", DeprecationWarning)
        deployment = TextGenerator.options(**options)
    return deployment.bind(loader, cfg, model_uri, resolve)


def deploy(app: Application, cfg: ServeConfig, name: str = "lmforge") -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port, deploy, wait until ready; return the URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port,
                              "request_timeout_s": cfg.request_timeout_s})
    serve.run(app, name=name, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}"
