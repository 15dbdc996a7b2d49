"""The Ray Serve application: an OpenAI-compatible completion endpoint over a causal LM.

`build_app(loader, cfg)` binds the deployment to a loader function, so tests can inject a
tiny model and production passes `functools.partial(load_model, "models:/NAME@champion")`.
Nothing here starts Ray or Serve at import. No `from __future__ import annotations`:
FastAPI reads the handler annotations at runtime to find the request body.
"""


import asyncio
import hmac
from collections.abc import Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from lmforge.config import ServeConfig
from lmforge.registry import LoadedModel
from lmforge.serve.generate import Generation, GenerationParams, generate_batch
from lmforge.serve.schemas import Choice, CompletionRequest, CompletionResponse, Usage, error_body

api = FastAPI(title="lmforge", docs_url="/docs")


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the field (400 for a body that is not JSON), in OpenAI's error shape."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return JSONResponse(error_body(f"request body is not valid JSON: {err['msg']}", None),
                            status_code=400)
    loc = [str(p) for p in err["loc"] if p != "body"]
    param = ".".join(loc) or None
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    return JSONResponse(error_body(f"{param}: {msg}" if param else msg, param), status_code=422)


@api.middleware("http")
async def _require_api_key(request: Request, call_next):  # noqa: ANN001
    """With API keys configured, /v1 routes need `Authorization: Bearer KEY`. A middleware,
    so an unauthenticated request is refused before its body is even validated."""
    keys: list[bytes] = getattr(request.app.state, "api_keys", [])
    if keys and request.url.path.startswith("/v1"):
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # Compare against every key in constant time, so timing leaks nothing.
        matches = [hmac.compare_digest(key.encode(), k) for k in keys]
        if scheme.lower() != "bearer" or not any(matches):
            return _unauthorized()
    return await call_next(request)


def _unauthorized() -> JSONResponse:
    body = error_body("missing or invalid API key: send Authorization: Bearer KEY", None)
    body["error"]["code"] = "invalid_api_key"
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _reject(message: str, param: str) -> JSONResponse:
    return JSONResponse(error_body(message, param), status_code=422)


@serve.deployment(name="TextGenerator")
@serve.ingress(api)
class TextGenerator:
    def __init__(self, loader: Callable[[], LoadedModel], cfg: ServeConfig) -> None:
        torch.set_num_threads(max(1, int(cfg.cpus_per_replica)))
        loaded = loader()
        self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, loaded.name
        self.context = self.model.config.max_position_embeddings
        self.max_tokens_limit = cfg.max_tokens_limit
        api.state.api_keys = [k.encode() for k in cfg.api_keys]  # read by _require_api_key
        self._generate.set_max_batch_size(cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate(self, batch: list[GenerationParams]) -> list[Generation]:
        # In a thread, so health checks and new requests are served while a batch decodes.
        return await asyncio.to_thread(generate_batch, self.model, self.tokenizer, batch)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.name}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        # Serve routes to a replica only after __init__ (the model load) returned.
        return {"status": "ready", "model": self.name}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model",
                                            "owned_by": "lmforge"}]}

    @api.post("/v1/completions", response_model=None)
    async def completions(self, req: CompletionRequest) -> CompletionResponse | JSONResponse:
        if req.max_tokens > self.max_tokens_limit:
            return _reject(f"max_tokens: at most {self.max_tokens_limit}", "max_tokens")
        prompt_ids = self.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + req.max_tokens > self.context:
            return _reject(
                f"prompt: {len(prompt_ids)} prompt tokens + max_tokens {req.max_tokens} exceed "
                f"the model's context of {self.context} tokens", "prompt")
        out = await self._generate(GenerationParams(
            prompt_ids=prompt_ids, max_tokens=req.max_tokens, temperature=req.temperature,
            top_p=req.top_p, seed=req.seed, stop=tuple(req.stop or ())))
        n_out = len(out.token_ids)
        return CompletionResponse(
            model=self.name,
            choices=[Choice(index=0, text=out.text, finish_reason=out.finish_reason)],
            usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=n_out,
                        total_tokens=len(prompt_ids) + n_out),
        )


def build_app(loader: Callable[[], LoadedModel], cfg: ServeConfig) -> Application:
    options: dict = {"ray_actor_options": {"num_cpus": cfg.cpus_per_replica},
                     "max_ongoing_requests": max(2 * cfg.max_batch_size, 4)}
    if cfg.min_replicas == cfg.max_replicas:
        options["num_replicas"] = cfg.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    return TextGenerator.options(**options).bind(loader, cfg)


def deploy(app: Application, cfg: ServeConfig, name: str = "lmforge") -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port, deploy, wait until ready; return the URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=name, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}"
